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
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..artifacts import sha256_file
from ..errors import TvsError
from .probe import logits_only
from .sources import SOURCES
from .sources.code import user_file  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


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
    return logits_only(SOURCES.find(spec).build(spec, dict(kwargs or {})))


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint without unpickling arbitrary objects.

    Accepts a bare state_dict or a dict holding one under one of :data:`STATE_KEYS` (or as its
    only dict of tensors: kuangliu's CIFAR scripts save ``net``, PyTorch's tutorial
    ``model_state_dict``) (``.pt``/``.pth`` via ``torch.load(weights_only=True)``, which also
    reads the harmless types training scripts save beside it, :func:`_plain_types`, or
    ``.safetensors``). Returns the state_dict and the other top-level entries (e.g. ``normalize``).
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
        with torch.serialization.safe_globals(_plain_types()):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt zip, pickle with forbidden globals, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in first:  # torch's first line says nothing: name what it refused
            try:
                names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            except Exception:  # noqa: BLE001 (the names are a courtesy; the refusal stands without them)
                names = []
            first = ("it holds objects other than tensors and plain values" +
                     (f" ({', '.join(names[:4])})" if names else "") +
                     ": save its state_dict alone (torch.save(model.state_dict(), path))")
        raise TvsError(f"checkpoint {path} cannot be loaded safely (weights_only): {first}") from None
    if isinstance(obj, dict):
        found = [k for k in STATE_KEYS if _tensors(obj.get(k))] or [k for k, v in obj.items() if _tensors(v)]
        if len(found) == 1 or found and found[0] in STATE_KEYS:
            return obj[found[0]], {k: v for k, v in obj.items() if k != found[0]}
        if found:
            raise TvsError(f"checkpoint {path} holds several state_dicts ({', '.join(map(repr, found))}): "
                           "save the one to use alone")
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj, {}
    raise TvsError(f"checkpoint {path} holds no state_dict (expected a dict of tensors, or a dict with one under "
                   f"{', '.join(map(repr, STATE_KEYS))} or another key)")


STATE_KEYS = ("state_dict", "model_state_dict", "model", "net")  # where training scripts put it, first first


def _tensors(v: Any) -> bool:
    """Whether ``v`` is a non-empty dict of tensors with string keys (a state_dict)."""
    return isinstance(v, dict) and bool(v) and all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                                   for k, t in v.items())


def _plain_types() -> list[Any]:
    """What training scripts save beside the weights, allowed to ``torch.load(weights_only=True)``:
    ``argparse.Namespace`` (torchvision's and timm's scripts' ``args``), paths in it, and numpy
    scalars with their dtypes (a best accuracy as ``np.float64``). Each is rebuilt from plain
    values; none runs code (no numpy array: its reconstruction is a general function)."""
    import argparse
    import pathlib

    import numpy as np

    kinds = (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, np.bool_)
    return [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.PureWindowsPath, np.dtype,
            np.float64(0).__reduce__()[0], *{type(np.dtype(k)) for k in kinds}]


def _prefixes(keys) -> set[str]:
    """Every dotted prefix (``a.``, ``a.b.``) of ``keys``."""
    return {".".join(parts[:i]) + "." for k in keys for parts in [k.split(".")] for i in range(1, len(parts))}


def _under_prefix(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``sd`` renamed to ``own``'s keys where a key prefix tells them apart: the tensors under
    one prefix of the checkpoint (``module.`` of DataParallel, ``model.`` of a Lightning module,
    ``_orig_mod.`` of torch.compile, ``ema.``) or the model's keys under one prefix (a wrapper around the
    network the checkpoint was saved from), with the same names and shapes. ``sd`` as it is
    where none fits (the caller's error names the keys); an error where several do."""
    def fits(renamed: dict[str, Any]) -> bool:
        return renamed.keys() == own.keys() and all(tuple(renamed[k].shape) == tuple(own[k].shape) for k in own)

    def module_name(m: str, p: str, theirs: bool) -> str | None:  # a module's name in _metadata, renamed alike
        if not theirs:
            return p + m if m else p[:-1]
        return "" if m == p[:-1] else m[len(p):] if m.startswith(p) else None

    found = []  # (prefix, whose: the checkpoint's keys under it (True) or the model's (False), renamed)
    for p in sorted(_prefixes(sd)):
        if fits(renamed := {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}):
            found.append((p, True, renamed))
    for p in sorted(_prefixes(own)):
        if all(k.startswith(p) for k in own) and fits(renamed := {p + k: v for k, v in sd.items()}):
            found.append((p, False, renamed))
    if len(found) > 1:
        raise TvsError(f"checkpoint {source}: the weights of several modules fit the model (under "
                       f"{', '.join(repr(p) for p, _, _ in found)}): save the state_dict of the one to use")
    if not found:
        return sd
    p, theirs, renamed = found[0]
    out = OrderedDict(renamed)
    meta = getattr(sd, "_metadata", None)
    if isinstance(meta, dict):  # module versions, read by a versioned _load_from_state_dict (MNASNet's, BatchNorm's)
        out._metadata = OrderedDict((n, v) for m, v in meta.items()  # type: ignore[attr-defined]
                                    if (n := module_name(m, p, theirs)) is not None)
    left = len(sd) - len(out)
    if not theirs:
        log.info("checkpoint %s: its keys are the model's under %r", source, p)
    else:
        log.log(logging.WARNING if left else logging.INFO, "checkpoint %s: using the %d tensors under %r%s", source,
                len(out), p, f" ({left} other{'' if left == 1 else 's'} left out)" if left else "")
    return out


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, turning missing / unexpected / mis-shaped keys into one error (keys under
    one prefix, or the model's under one prefix, are renamed first: :func:`_under_prefix`)."""
    own = model.state_dict()
    sd = state_dict if state_dict.keys() == own.keys() else _under_prefix(state_dict, own, source)
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
    module = logits_only(source.build(ms.spec, dict(ms.kwargs)))
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
    bake_reparametrizations(module)
    return loaded


def reparametrized(module: nn.Module) -> list[tuple[str, nn.Module, str, Any]]:
    """Weights computed from others at each call: ``(layer, module, tensor, hook)`` for every
    ``torch.nn.utils.parametrizations`` entry (hook None) and every old-style ``weight_norm`` /
    ``spectral_norm`` forward pre-hook."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    found = []
    for name, m in module.named_modules():
        if parametrize.is_parametrized(m):
            found += [(name, m, t, None) for t in m.parametrizations.keys()]
        found += [(name, m, h.name, h) for h in m._forward_pre_hooks.values()
                  if isinstance(h, (WeightNorm, SpectralNorm))]
    return found


def bake_reparametrizations(module: nn.Module) -> None:
    """Replace weight norm, spectral norm and other parametrizations by the weights they compute
    (in eval mode: spectral norm's power iteration does not run), as inference uses them: channels
    are then sliced from one tensor, and the ONNX graph holds no norm of the weights. Not under
    no_grad: a weight computed without a graph would come back as a buffer, not a parameter."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.spectral_norm import SpectralNormLoadStateDictPreHook
    from torch.nn.utils.weight_norm import WeightNorm

    found = reparametrized(module)
    for _, m, tensor, hook in found:
        if hook is None:
            parametrize.remove_parametrizations(m, tensor, leave_parametrized=True)
        elif isinstance(hook, WeightNorm):
            torch.nn.utils.remove_weight_norm(m, tensor)
        else:
            torch.nn.utils.remove_spectral_norm(m, tensor)
            # torch leaves its load hook (wrapped, so its own isinstance misses it): the baked
            # weight would then not load
            for k, h in list(m._load_state_dict_pre_hooks.items()):
                h = getattr(h, "hook", h)
                if isinstance(h, SpectralNormLoadStateDictPreHook) and h.fn.name == tensor:
                    del m._load_state_dict_pre_hooks[k]
    if found:
        log.info("weights computed at each call (weight or spectral norm) baked into %s",
                 ", ".join(sorted({n or "(the model)" for n, *_ in found})))
