"""Model specs: turn a user's string into an ``nn.Module``, and load checkpoints safely.

Spec forms (one registered source each, :mod:`.sources`)
----------
- ``resnet20``, ``vgg11_bn``, ...            the built-in CIFAR zoo
- ``path/to/file.py:Name``                   a class or factory in the user's file
- ``package.module:Name``                    a class or factory in an importable module
- ``torchvision:resnet18`` / ``timm:resnet18`` when those packages import
- a pruned artifact: a ``tvsprune prune`` output directory or its ``pruned.safetensors``
  (registered by :mod:`tvsprune.pruning.artifact`)
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..artifacts import sha256_file
from ..errors import TvsError
from .sources import SOURCES
from .sources.code import user_file  # noqa: F401 (re-exported)


@dataclass
class ModelSpec:
    """What builds a model: the spec string, its keyword arguments and optional weights."""

    spec: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "kwargs": dict(self.kwargs), "weights": self.weights}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        return cls(spec=d["spec"], kwargs=dict(d.get("kwargs") or {}), weights=d.get("weights"))


@dataclass
class LoadedModel:
    """A built model plus what the later stages need to know about it."""

    module: nn.Module
    spec: ModelSpec
    weights_sha256: str | None = None
    normalize: dict[str, list[float]] | None = None
    input_shape: tuple[int, ...] | None = None  # (C, H, W) when known
    plan: dict[str, Any] | None = None  # set for pruned artifacts
    extra: dict[str, Any] = field(default_factory=dict)


def parse_kwargs(items: list[str] | str | None) -> dict[str, Any]:
    """Parse ``key=value`` pairs (values as JSON when they parse) or one JSON object."""
    if not items:
        return {}
    if isinstance(items, str):
        items = [items]
    if len(items) == 1 and items[0].lstrip().startswith("{"):
        try:
            value = json.loads(items[0])
        except (ValueError, RecursionError) as e:
            raise TvsError(f"--model-kwargs: not valid JSON: {str(e)[:100]}") from None
        if not isinstance(value, dict):
            raise TvsError(f"--model-kwargs: expected a JSON object, got {type(value).__name__}")
        return value
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise TvsError(f"--model-kwargs: expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except (ValueError, RecursionError):
            out[k] = v
    return out


def build_module(spec: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build an untrained ``nn.Module`` from a spec string (see :mod:`.sources`)."""
    return SOURCES.find(spec).build(spec, dict(kwargs or {}))


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint without unpickling arbitrary objects.

    Accepts a bare state_dict or a dict holding one under ``state_dict`` or ``model``
    (``.pt``/``.pth`` via ``torch.load(weights_only=True)``, or ``.safetensors``).
    Returns the state_dict and the other top-level entries (e.g. ``normalize``).
    """
    path = Path(path)
    if path.is_dir():
        raise TvsError(f"checkpoint {path} is a directory, not a weights file")
    if not path.is_file():
        raise TvsError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path))), {}
        except (SafetensorError, OSError, ValueError) as e:
            raise TvsError(f"checkpoint {path} is not a readable safetensors file: {e}") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt zip, pickle with forbidden globals, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TvsError(f"checkpoint {path} cannot be loaded safely (weights_only): {first}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                extras = {k: v for k, v in obj.items() if k != key}
                return obj[key], extras
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj, {}
    raise TvsError(f"checkpoint {path} holds no state_dict (expected a dict of tensors, "
                   "or a dict with 'state_dict' or 'model')")


def _strip_data_parallel(state_dict: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """The state dict without DataParallel's ``module.`` prefix, its ``_metadata`` (module
    versions, read by versioned ``_load_from_state_dict`` such as MNASNet's and BatchNorm's)
    kept and renamed alike."""
    def strip(k: str) -> str:
        return k[7:] if k == "module" or k.startswith("module.") else k

    sd = OrderedDict((strip(k), v) for k, v in state_dict.items())
    meta = getattr(state_dict, "_metadata", None)
    if isinstance(meta, dict):
        sd._metadata = OrderedDict((strip(k), v) for k, v in meta.items())  # type: ignore[attr-defined]
    return sd


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, turning missing / unexpected / mis-shaped keys into one error."""
    own = model.state_dict()
    sd = _strip_data_parallel(state_dict)
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shaped = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)):
            if keys:
                shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
                parts.append(f"{label}: {shown}")
        raise TvsError(f"checkpoint {source} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


def _normalize_from(extras: dict[str, Any], weights: str = "the checkpoint") -> dict[str, list[float]] | None:
    norm = extras.get("normalize")
    if isinstance(norm, dict) and "mean" in norm and "std" in norm:
        try:
            return {"mean": [float(x) for x in norm["mean"]], "std": [float(x) for x in norm["std"]]}
        except (TypeError, ValueError):
            raise TvsError(f"{weights}: the checkpoint's normalize mean/std are not lists of numbers "
                           f"({str(norm)[:80]})") from None
    return None


def load_model(spec: str | ModelSpec, weights: str | None = None,
               kwargs: dict[str, Any] | None = None, base: str | ModelSpec | None = None) -> LoadedModel:
    """Resolve a spec (zoo, user code, hub, or pruned artifact) and load its weights.

    ``base``: for a pruned artifact, the base model the user names (spec, or a ModelSpec with
    its kwargs); needed when the artifact's recorded base is code that it was not pruned from
    here (see :mod:`.trust`). The model is returned in eval mode on the CPU.
    """
    if isinstance(spec, ModelSpec):
        ms = spec
    else:
        ms = ModelSpec(spec=spec, kwargs=dict(kwargs or {}), weights=weights)
    source = SOURCES.find(ms.spec)
    artifact = source.load(ms.spec, ModelSpec(spec=base) if isinstance(base, str) else base)
    if artifact is not None:
        return artifact
    module = source.build(ms.spec, dict(ms.kwargs))
    loaded = LoadedModel(module=module, spec=ms)
    source.describe(module, loaded)
    if ms.weights:
        sd, extras = read_checkpoint(ms.weights)
        bad = next((k for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point()
                    and not torch.isfinite(v).all()), None)
        if bad is not None:
            raise TvsError(f"{ms.weights}: tensor {bad!r} holds NaN or Inf values: refusing to use these weights")
        load_state_dict_strict(module, sd, ms.weights)
        loaded.weights_sha256 = sha256_file(ms.weights)
        loaded.normalize = _normalize_from(extras, str(weights)) or loaded.normalize
    module.eval()
    return loaded
