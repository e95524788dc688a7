"""The run configuration: one TOML file, typed and strict.

Unknown or misspelt keys are errors that name the key and suggest the closest valid one.
Relative paths are resolved against the config file's folder.
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..bench.options import BenchOptions
from ..calibration.options import CalibrateOptions
from ..data.options import ReadOptions
from ..errors import TvsError
from ..exporters.options import ExportOptions
from ..options import explain
from ..pruning.options import DEFAULT_TARGET_PARAMS, PruneOptions

# The stage sections *are* the stages' options models (DataOptions' reading options,
# CalibrateOptions, PruneOptions, ExportOptions, BenchOptions): a default is written once,
# on its field, and the CLI and the Python API read the same ones (tests/test_options.py).


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Strict):
    spec: str
    weights: str | None = None
    kwargs: dict[str, Any] = {}


class DataSection(ReadOptions):
    """How images are read (ReadOptions), and the two folders they are read from."""

    calibration: str
    evaluation: str | None = None


class BenchSection(BenchOptions):
    enabled: bool = True


class RunConfig(Strict):
    output_dir: str = "runs/tvsprune"
    model: ModelSection
    data: DataSection
    calibrate: CalibrateOptions = Field(default_factory=CalibrateOptions)
    prune: PruneOptions = Field(default_factory=PruneOptions)
    export: ExportOptions = Field(default_factory=ExportOptions)
    bench: BenchSection = Field(default_factory=BenchSection)

    @field_validator("output_dir")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


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
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise TvsError(f"{path}: invalid TOML: {e}") from None
        except RecursionError:
            raise TvsError(f"{path}: invalid TOML: nested too deeply") from None
        except IsADirectoryError:
            raise TvsError(f"{path} is a directory, not a config file") from None
        base_dir = path.parent.resolve()
    for item in overrides or []:
        k, v = parse_override(item)
        set_dotted(raw, k, v)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise TvsError(f"{path or 'config'}: {explain(e, RunConfig)}") from None
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


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def config_reference() -> list[str]:
    """The README's config reference table, one row per section: every key with its default
    (none shown: no default, or None), read from the models themselves."""
    rows = ["| section | keys (default) |", "|---|---|"]
    top = [f"`{k}` ({_toml(f.default)})" for k, f in RunConfig.model_fields.items()
           if not (isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel))]
    rows.append(f"| top | {', '.join(top)} |")
    for name, field in RunConfig.model_fields.items():
        model = field.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        keys = []
        for key, f in model.model_fields.items():
            default = None if f.is_required() else f.get_default(call_default_factory=True)
            if (name, key) == ("prune", "target_params"):
                keys.append(f"`{key}` ({DEFAULT_TARGET_PARAMS:g} when no budget is given)")
                continue
            keys.append(f"`{key}`" + (f" ({_toml(default)})" if default not in (None, {}) else ""))
        rows.append(f"| `[{name}]` | {', '.join(keys)} |")
    return rows
