"""The run configuration: one TOML file, typed and strict.

Unknown or misspelt keys are errors that name the key and suggest the closest valid one.
Relative paths are resolved against the config file's folder.
"""
from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from ..errors import TvsError
from ..calibration.stage import DEFAULT_RESOLUTION
from ..pruning.stage import DEFAULT_TARGET_PARAMS, PruneOptions


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def one_of(value: str, valid: list[str] | tuple[str, ...], what: str) -> str:
    """``value`` if valid, else a ValueError naming the closest valid value."""
    if value in valid:
        return value
    close = difflib.get_close_matches(value, list(valid), n=1, cutoff=0.4)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"unknown {what} {value!r} ({hint}valid: {', '.join(valid)})")


class ModelSection(Strict):
    spec: str
    weights: str | None = None
    kwargs: dict[str, Any] = {}


class DataSection(Strict):
    calibration: str
    evaluation: str | None = None
    samples_per_class: int | None = 200
    eval_samples: int | None = None
    split: Literal["train", "test"] = "test"
    resize: int | None = None
    crop: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    batch_size: int = 128
    workers: int = 0
    skip_bad: bool = False


class CalibrateSection(Strict):
    resolution: str = DEFAULT_RESOLUTION
    layers: str | None = None
    device: str = "cpu"

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, v: str) -> str:
        from ..calibration.collector import parse_resolution

        try:
            parse_resolution(v)
        except TvsError:
            if v.startswith("pool"):
                raise ValueError(f"unknown resolution {v!r} (did you mean 'pool:4'? valid: global, pool:K "
                                 "with K >= 1, full)") from None
            one_of(v, ("global", "pool:4", "full"), "resolution")
        return v




class PruneSection(Strict):
    method: str = "tvs"
    target_params: float | None = None  # DEFAULT_TARGET_PARAMS when no budget is given
    target_flops: float | None = None
    threshold: float | None = None
    allocation: str = PruneOptions.allocation
    cost_power: float = PruneOptions.cost_power
    min_keep_frac: float = 0.1
    min_keep: int = 1
    round_to: int = 1
    pair_reduce: Literal["min", "mean"] = "min"
    tvs_saliency: Literal["none", "ls"] = PruneOptions.tvs_saliency
    compensation: Literal["none", "mean", "ls", "ls-seq"] = PruneOptions.compensation
    bn_recalibrate: bool = PruneOptions.bn_recalibrate
    ridge: float = PruneOptions.ridge
    mean_compensation: bool = False  # old spelling of compensation = "mean"
    repair_samples_per_class: int = 100
    max_acc_drop: float = 2.0
    step: float = 0.05
    seed: int = 0

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        from ..pruning.stage import METHODS

        return one_of(v, METHODS, "method")

    @field_validator("allocation")
    @classmethod
    def _allocation(cls, v: str) -> str:
        from ..pruning.stage import ALLOCATION_CHOICES

        return one_of(v, ALLOCATION_CHOICES, "allocation")

    @model_validator(mode="after")
    def _one_budget(self) -> "PruneSection":
        given = [k for k in ("target_params", "target_flops", "threshold") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one budget, not {' and '.join(given)}")
        if not given:
            self.__dict__["target_params"] = DEFAULT_TARGET_PARAMS  # bypasses validate_assignment recursion
        return self


class ExportSection(Strict):
    onnx: bool = True
    opset: int | None = None
    int8: bool = False
    int8_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    int8_samples: int = 512
    tensorrt: list[Literal["fp32", "fp16", "bf16", "int8"]] = []
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 64
    workspace_mib: int | None = None
    opt_level: int | None = None


class BenchSection(Strict):
    enabled: bool = True
    backends: list[str] = []
    batch_sizes: list[int] = [1, 8, 32]
    rounds: int = 5
    iters: int = 10
    eval_samples: int | None = 2000
    threads: int | None = None

    @field_validator("backends")
    @classmethod
    def _backends(cls, v: list[str]) -> list[str]:
        from ..bench.runners import REGISTRY

        return [one_of(b, list(REGISTRY), "backend") for b in v]

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError(f"batch sizes must be positive integers, got {v}")
        return v


class RunConfig(Strict):
    output_dir: str = "runs/tvsprune"
    model: ModelSection
    data: DataSection
    calibrate: CalibrateSection = CalibrateSection()
    prune: PruneSection = PruneSection()
    export: ExportSection = ExportSection()
    bench: BenchSection = BenchSection()

    @field_validator("output_dir")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    cls: Any = model
    for part in loc[:-1]:
        field = cls.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        cls = field.annotation
    return list(cls.model_fields)


def _explain(e: ValidationError) -> str:
    msgs = []
    for err in e.errors():
        loc = tuple(str(p) for p in err["loc"])
        dotted = ".".join(loc)
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc[-1], _known_keys(RunConfig, loc), n=1)
            hint = f" (did you mean '{'.'.join(loc[:-1] + (close[0],))}'?)" if close else ""
            msgs.append(f"unknown key '{dotted}'{hint}")
        elif err["type"] == "missing":
            msgs.append(f"missing key '{dotted}'")
        elif err["type"] == "literal_error":
            valid = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))
            close = difflib.get_close_matches(str(err.get("input")), valid, n=1, cutoff=0.4)
            hint = f"did you mean {close[0]!r}? " if close else ""
            msgs.append(f"'{dotted}': unknown value {err.get('input')!r} ({hint}valid: {', '.join(valid)})")
        else:
            msgs.append(f"'{dotted}': {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(msgs)


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise TvsError(f"--set {dotted}: '{p}' is not a section")
    cur[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``key.path=value``; the value is parsed as TOML when it parses, else kept as a string."""
    if "=" not in item:
        raise TvsError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                raw: dict[str, Any] | None = None, base_dir: Path | None = None) -> tuple[RunConfig, Path]:
    """Read and validate a config; returns it with the folder relative paths resolve against."""
    if raw is None:
        path = Path(path)  # type: ignore[arg-type]
        if not path.is_file():
            raise TvsError(f"config not found: {path}")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise TvsError(f"{path}: invalid TOML: {e}") from None
        base_dir = path.parent.resolve()
    for item in overrides or []:
        k, v = parse_override(item)
        set_dotted(raw, k, v)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise TvsError(f"{path or 'config'}: {_explain(e)}") from None
    return cfg, (base_dir or Path.cwd())


def resolve_paths(cfg: RunConfig, base: Path) -> RunConfig:
    """Make file paths absolute and check that inputs exist (naming the first that does not)."""
    def res(p: str | None) -> str | None:
        if p is None:
            return None
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (base / q).resolve())

    cfg = cfg.model_copy(deep=True)
    cfg.output_dir = res(cfg.output_dir)  # type: ignore[assignment]
    if cfg.model.weights:
        cfg.model.weights = res(cfg.model.weights)
    spec = cfg.model.spec
    if ":" in spec and spec.split(":", 1)[0].endswith(".py"):
        file, name = spec.rsplit(":", 1)
        cfg.model.spec = f"{res(file)}:{name}"
    cfg.data.calibration = res(cfg.data.calibration)  # type: ignore[assignment]
    cfg.data.evaluation = res(cfg.data.evaluation)
    for label, p in (("model.weights", cfg.model.weights), ("data.calibration", cfg.data.calibration),
                     ("data.evaluation", cfg.data.evaluation)):
        if p is not None and not Path(p).exists():
            raise TvsError(f"{label}: path not found: {p}")
    return cfg
