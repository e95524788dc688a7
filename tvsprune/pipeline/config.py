"""The run configuration: one TOML file, typed and strict.

Unknown or misspelt keys are errors that name the key and suggest the closest valid one.
Relative paths are resolved against the config file's folder.
"""
from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError, field_validator,
                      model_validator)

from ..bench.stage import BenchOptions
from ..calibration.stage import DEFAULT_RESOLUTION, DataOptions
from ..data.sources import MAX_SIDE
from ..errors import TvsError
from ..exporters import defaults as export_defaults
from ..pruning.options import DEFAULT_TARGET_PARAMS, LIMITS, Guards, PruneOptions
from ..registry import unknown

# Every default below is read from the library's own options (DataOptions, PruneOptions,
# Guards, BenchOptions, exporters.defaults): the CLI reads the same ones, and
# tests/test_defaults.py checks that the three agree.
_BENCH = BenchOptions()


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def one_of(value: str, valid: list[str] | tuple[str, ...], what: str) -> str:
    """``value`` if valid, else a ValueError naming the closest valid value."""
    if value in valid:
        return value
    raise ValueError(unknown(what, value, tuple(valid)))


class ModelSection(Strict):
    spec: str
    weights: str | None = None
    kwargs: dict[str, Any] = {}


class DataSection(Strict):
    calibration: str
    evaluation: str | None = None
    samples_per_class: PositiveInt | None = DataOptions.samples_per_class
    eval_samples: PositiveInt | None = None
    split: Literal["train", "test"] = DataOptions.split
    resize: Annotated[int, Field(ge=1, le=MAX_SIDE)] | None = None
    crop: Annotated[int, Field(ge=1, le=MAX_SIDE)] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    batch_size: PositiveInt = DataOptions.batch_size
    workers: NonNegativeInt = DataOptions.workers
    skip_bad: bool = DataOptions.skip_bad


class CalibrateSection(Strict):
    resolution: str = DEFAULT_RESOLUTION
    layers: str | None = None
    device: str = "cpu"

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, v: str) -> str:
        from ..calibration.resolution import parse_resolution

        try:
            parse_resolution(v)
        except TvsError:
            if v.startswith("pool"):
                raise ValueError(f"unknown resolution {v!r} (did you mean 'pool:4'? valid: global, pool:K "
                                 "with K >= 1, full)") from None
            one_of(v, ("global", "pool:4", "full"), "resolution")
        return v




class PruneSection(Strict):
    method: str = PruneOptions.method
    target_params: float | None = None  # DEFAULT_TARGET_PARAMS when no budget is given
    target_flops: float | None = None
    threshold: float | None = None
    allocation: str = PruneOptions.allocation
    cost_power: float = PruneOptions.cost_power
    min_keep_frac: float = Guards.min_keep_frac
    min_keep: PositiveInt = Guards.min_keep
    round_to: PositiveInt = Guards.round_to
    pair_reduce: Literal["min", "mean"] = PruneOptions.pair_reduce
    tvs_saliency: Literal["auto", "none", "ls", "l2"] = PruneOptions.tvs_saliency
    compensation: Literal["auto", "none", "mean", "ls", "ls-seq"] = PruneOptions.compensation
    bn_recalibrate: bool = PruneOptions.bn_recalibrate
    ridge: float = PruneOptions.ridge
    mean_compensation: bool = False  # old spelling of compensation = "mean"
    repair_samples_per_class: PositiveInt | None = PruneOptions.repair_samples_per_class
    max_acc_drop: float = PruneOptions.max_acc_drop
    step: float = PruneOptions.step
    seed: NonNegativeInt = PruneOptions.seed

    @model_validator(mode="after")
    def _limits(self) -> "PruneSection":
        """The same finite ranges as the flags (LIMITS), with the same words."""
        for name, limit in LIMITS.items():
            value = getattr(self, name, None)
            if value is not None:
                limit.check(name, value)
        return self

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        from ..pruning.options import methods

        return one_of(v, methods(), "method")

    @field_validator("allocation")
    @classmethod
    def _allocation(cls, v: str) -> str:
        from ..pruning.options import allocation_choices

        return one_of(v, allocation_choices(), "allocation")

    @model_validator(mode="after")
    def _one_budget(self) -> "PruneSection":
        given = [k for k in ("target_params", "target_flops", "threshold") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one budget, not {' and '.join(given)}")
        if not given:  # PruneOptions' default budget, shown in the resolved config
            self.__dict__["target_params"] = DEFAULT_TARGET_PARAMS  # bypasses validate_assignment recursion
        return self


class ExportSection(Strict):
    onnx: bool = True
    opset: int | None = None
    parity_samples: PositiveInt = export_defaults.PARITY_SAMPLES
    tolerance: float = export_defaults.TOLERANCE
    int8: bool = False
    int8_method: Literal["minmax", "entropy", "percentile"] = export_defaults.INT8_METHOD
    int8_samples: PositiveInt = export_defaults.INT8_SAMPLES
    tensorrt: list[Literal["fp32", "fp16", "bf16", "int8"]] = []
    min_batch: int = export_defaults.MIN_BATCH
    opt_batch: int = export_defaults.OPT_BATCH
    max_batch: int = export_defaults.MAX_BATCH
    workspace_mib: int | None = None
    opt_level: int | None = None


class BenchSection(Strict):
    enabled: bool = True
    backends: list[str] = []
    batch_sizes: list[int] = _BENCH.batch_sizes
    rounds: PositiveInt = _BENCH.latency.rounds
    iters: PositiveInt = _BENCH.latency.iters
    eval_samples: PositiveInt | None = _BENCH.eval_samples
    threads: PositiveInt | None = None
    trt_precision: Literal["fp32", "fp16", "bf16", "int8"] = _BENCH.trt_precision

    @field_validator("backends")
    @classmethod
    def _backends(cls, v: list[str]) -> list[str]:
        from ..backends import BACKENDS

        return [one_of(b, BACKENDS.names(), "backend") for b in v]

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
            msgs.append(f"'{dotted}': {unknown('value', err.get('input'), tuple(valid))}")
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
