"""Find a model's prunable layers by running one forward pass with hooks.

A layer is prunable when it is a ``Conv2d`` or a ``Linear`` that does not produce the
logits. Its statistic point is the layer itself, or the BatchNorm that directly consumes
its output (detected by tensor identity, which also works for functional forwards).
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from ..errors import TvsError

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
    """Forward with input-shape errors turned into one readable line."""
    try:
        return model(x)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise TvsError(f"input of shape {list(x.shape[1:])} does not fit {what}: {first}") from None


@torch.no_grad()
def probe_model(model: nn.Module, example: torch.Tensor, what: str = "model") -> ModelProbe:
    """Run ``example`` through ``model`` and describe its prunable layers."""
    names = {m: n for n, m in model.named_modules()}
    order: list[nn.Module] = []
    outputs: dict[int, nn.Module] = {}
    shapes: dict[nn.Module, list[int]] = {}
    follows: dict[nn.Module, nn.Module] = {}
    handles = []

    def on_layer(m, inp, out):
        if m not in shapes:
            order.append(m)
            shapes[m] = list(out.shape[1:])
        outputs[id(out)] = m

    def on_norm(m, inp):
        src = outputs.get(id(inp[0]))
        if src is not None and src not in follows:
            follows[src] = m

    for m in model.modules():
        if isinstance(m, PRUNABLE):
            handles.append(m.register_forward_hook(on_layer))
        elif isinstance(m, NORMS):
            handles.append(m.register_forward_pre_hook(on_norm))
    was_training = model.training
    model.eval()
    try:
        out = run_forward(model, example, what)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise TvsError(f"{what} returns {type(out).__name__}; tvsprune needs a model that returns one logits tensor")
    logits = outputs.get(id(out))
    if logits is None:  # output reshaped after the last layer: take the last Linear executed
        linears = [m for m in order if isinstance(m, nn.Linear)]
        logits = linears[-1] if linears else None
    layers = []
    for m in order:
        if m is logits:
            continue
        stat = follows.get(m, m)
        layers.append(LayerInfo(
            name=names[m], kind="conv" if isinstance(m, nn.Conv2d) else "linear",
            channels=m.out_channels if isinstance(m, nn.Conv2d) else m.out_features,
            stat_module=names[stat], out_shape=shapes[m],
            groups=getattr(m, "groups", 1)))
    if not layers:
        raise TvsError(f"{what} has no prunable layer (Conv2d, or Linear before the logits)")
    return ModelProbe(layers, names.get(logits) if logits is not None else None, list(out.shape[1:]))
