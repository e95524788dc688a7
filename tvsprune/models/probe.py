"""Find a model's prunable layers by running one forward pass with hooks.

A layer is prunable when it is a ``Conv2d`` or a ``Linear`` that does not produce the
logits and whose output reaches them (a feature head beside the logits keeps its width).
Its statistic point is the layer itself, or the first BatchNorm its output reaches through
channel-wise operations only (ReLU and other activations, pooling, dropout, reshapes).

Both answers come from the data flow, not from tensor identity: the probe records
gradients for its one forward pass, keeps every output alive, and walks the autograd
graph back from the model's output (and from each BatchNorm's input) to the layer that
produced it. A functional tail after the classifier (``log_softmax``, ``softmax``, a
flatten or ``view``, a temperature scale) is walked through.
"""
from __future__ import annotations

import contextlib
import fnmatch
import functools
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from ..errors import TvsError

log = logging.getLogger(__name__)

PRUNABLE = (nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class LayerInfo:
    name: str
    kind: str              # "conv" | "linear"
    channels: int          # output channels / features
    stat_module: str       # where the statistic is taken (the layer or its BatchNorm)
    out_shape: list[int]   # output shape without the batch dimension
    groups: int = 1
    stat_shape: list[int] | None = None  # the statistic point's output shape, when it differs (pooling between)

    @property
    def map_shape(self) -> list[int]:
        """The shape of what calibrate's hook sees: the statistic point's output."""
        return self.stat_shape or self.out_shape

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelProbe:
    layers: list[LayerInfo]
    logits_layer: str | None
    output_shape: list[int]

    @property
    def num_outputs(self) -> int:
        return int(self.output_shape[-1]) if self.output_shape else 0

    def select(self, pattern: str | None) -> list[LayerInfo]:
        """Layers whose names match a comma-separated list of globs (all when None)."""
        if not pattern:
            return list(self.layers)
        globs = [g.strip() for g in pattern.split(",") if g.strip()]
        chosen = [l for l in self.layers if any(fnmatch.fnmatchcase(l.name, g) for g in globs)]
        if not chosen:
            raise TvsError(f"--layers {pattern!r} matches no prunable layer (they are: "
                           + ", ".join(l.name for l in self.layers[:8]) + ("..." if len(self.layers) > 8 else "") + ")")
        return chosen


def run_forward(model: nn.Module, x: torch.Tensor, what: str = "model") -> torch.Tensor:
    """The user's forward, with its errors turned into one readable line that blames the model.

    Call it only where no tvsprune hook is registered: an error raised here is then the
    model's own (a shape that does not fit, or a bug in its code), never tvsprune's.
    """
    try:
        out = model(x)
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TvsError(f"input of shape {list(x.shape[1:])} does not fit {what}: {first}") from None
    except (ArithmeticError, AttributeError, IndexError, KeyError, LookupError, NotImplementedError,
            TypeError, ValueError, AssertionError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise TvsError(f"{what}'s forward raised {type(e).__name__} on an input of shape "
                       f"{list(x.shape[1:])}: {first}") from None
    if not isinstance(out, torch.Tensor):
        raise TvsError(f"{what} returns {type(out).__name__}; tvsprune needs a model that returns one logits tensor, "
                       f"or a dict or named tuple with a 'logits' entry (give a model file whose build() wraps it, "
                       f"returning out[0]; its checkpoint loads into the wrapper as it is)")
    return out


def logits_of(out: Any) -> Any:
    """The logits in a model's output: the output itself when it is a tensor, else the tensor
    its ``logits`` entry names (a dict's key, or a field: HuggingFace's ``ModelOutput``,
    torchvision's ``GoogLeNetOutputs``), else the output as it is (:func:`run_forward` refuses it).
    An unnamed tuple stays refused: which of its tensors is the logits is the user's call."""
    if isinstance(out, torch.Tensor):
        return out
    found = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    return found if isinstance(found, torch.Tensor) else out


def logits_only(module: nn.Module) -> nn.Module:
    """``module``, its forward returning :func:`logits_of` its output (so every stage, the
    dependency graph and the exporters see one tensor). The same object, of a subclass made
    here: its parameter names, checkpoint and class name are unchanged. Applied where tvsprune
    builds a model from a spec (not to a module the user passes in: that one stays theirs)."""
    cls = type(module)
    if getattr(cls, "_tvs_logits_only", False) or isinstance(module, torch.jit.ScriptModule):
        return module

    @functools.wraps(cls.forward)  # its signature is the model's: torch.export binds dynamic shapes by it
    def forward(self, *args, **kwargs):
        out = cls.forward(self, *args, **kwargs)
        return out if self.__dict__.get("_tvs_raw") else logits_of(out)

    module.__class__ = type(cls.__name__, (cls,), {"forward": forward, "_tvs_logits_only": True,
                                                   "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return module


@contextlib.contextmanager
def raw_outputs(module: nn.Module):
    """Within it, a module made by :func:`logits_only` returns its whole output: the dependency
    graph then sees every layer the model runs (a feature head beside the logits, whose input
    channels go with the layer that feeds it)."""
    module.__dict__["_tvs_raw"] = True
    try:
        yield module
    finally:
        module.__dict__.pop("_tvs_raw", None)


_MULTI_INPUT = ("Add", "Sub", "Cat", "Stack", "Mm", "Bmm", "Matmul", "Addmm", "Convolution", "Einsum")


def _walk_back(start, stops: dict, through_multi: bool, through_layers: bool = False) -> set:
    """Layers (values of ``stops``, keyed by grad_fn) reachable backwards from ``start``.

    Does not walk past a layer output unless ``through_layers`` (then: every layer whose output
    reaches ``start``). Without ``through_multi``, a node that combines two tensors (an
    addition, a concatenation, a matrix product) ends the walk: the source is then not unique.
    """
    found, seen, todo = set(), set(), [start]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn in stops:
            found.add(stops[fn])
            if not through_layers:
                continue
        name = type(fn).__name__
        if name == "AccumulateGrad":
            continue
        inputs = [f for f, _ in fn.next_functions if f is not None and type(f).__name__ != "AccumulateGrad"]
        if not through_multi and len(inputs) > 1 and name.startswith(_MULTI_INPUT):
            return set()
        todo.extend(inputs)
    return found


_ATTENTION_PARTS = (("qkv",), ("q", "k", "v"), ("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))


def attention_block(model: nn.Module) -> tuple[str, str] | None:
    """The first attention block (name, class) in ``model``: ``nn.MultiheadAttention``, or a
    module with a ``qkv`` projection or separate query/key/value projections."""
    for name, m in model.named_modules():
        children = dict(m.named_children())
        if isinstance(m, nn.MultiheadAttention) or any(all(isinstance(children.get(c), PRUNABLE) for c in parts)
                                                       for parts in _ATTENTION_PARTS):
            return name, type(m).__name__
    return None


def refuse_attention(model: nn.Module, what: str = "model") -> None:
    """Attention (ViT, Swin) is outside what tvsprune prunes: one clear error naming the block."""
    found = attention_block(model)
    if found is not None:
        raise TvsError(f"{what} has an attention block, {found[0] or '(the model)'} ({found[1]}): tvsprune prunes "
                       "convolutional networks; attention models (ViT, Swin, ...) are not supported")


def probe_model(model: nn.Module, example: torch.Tensor, what: str = "model") -> ModelProbe:
    """Run ``example`` through ``model`` and describe its prunable layers."""
    refuse_attention(model, what)
    names = {m: n for n, m in model.named_modules()}
    order: list[nn.Module] = []
    produced: dict = {}             # grad_fn of a layer's output -> layer
    shapes: dict[nn.Module, list[int]] = {}
    follows: dict[nn.Module, nn.Module] = {}
    norm_shapes: dict[nn.Module, list[int]] = {}
    alive: list[torch.Tensor] = []  # every hooked tensor lives until the probe ends
    handles = []

    def on_layer(m, inp, out):
        alive.append(out)
        if m not in shapes:
            order.append(m)
            shapes[m] = list(out.shape[1:])
        if out.grad_fn is not None:
            produced.setdefault(out.grad_fn, m)

    def on_norm(m, inp):
        x = inp[0]
        alive.append(x)
        if x.grad_fn is None:
            return
        src = _walk_back(x.grad_fn, produced, through_multi=False)
        if len(src) == 1:
            layer = next(iter(src))
            follows.setdefault(layer, m)
            norm_shapes.setdefault(m, list(x.shape[1:]))

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # the model's own forward first, with no hook: its errors are the model's
            run_forward(model, example, what)
        for m in model.modules():
            if isinstance(m, PRUNABLE):
                handles.append(m.register_forward_hook(on_layer))
            elif isinstance(m, NORMS):
                handles.append(m.register_forward_pre_hook(on_norm))
        x = example.detach().clone().requires_grad_(example.is_floating_point())
        with torch.enable_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    heads = _walk_back(out.grad_fn, produced, through_multi=True) if out.grad_fn is not None else set()
    heads = {m for m in heads if isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d)}
    if len(heads) == 1:
        logits = next(iter(heads))
    else:  # several heads feed the output (or none is traced): the last layer executed
        logits = order[-1] if order else None
    live = _walk_back(out.grad_fn, produced, True, through_layers=True) if out.grad_fn is not None else set(order)
    layers = []
    for m in order:
        if m is logits:
            continue
        if m not in live:  # a head of its own beside the logits (features, an embedding): its width is its output's
            log.info("not pruning %s: its output does not reach the logits", names[m])
            continue
        stat = follows.get(m, m)
        stat_shape = norm_shapes.get(stat)
        layers.append(LayerInfo(
            name=names[m], kind="conv" if isinstance(m, nn.Conv2d) else "linear",
            channels=m.out_channels if isinstance(m, nn.Conv2d) else m.out_features,
            stat_module=names[stat], out_shape=shapes[m],
            groups=getattr(m, "groups", 1),
            stat_shape=stat_shape if stat_shape is not None and stat_shape != shapes[m] else None))
    if not layers:
        raise TvsError(f"{what} has no prunable layer (Conv2d, or Linear before the logits)")
    return ModelProbe(layers, names.get(logits) if logits is not None else None, list(out.shape[1:]))
