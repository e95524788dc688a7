"""What a network costs, from its structure: parameters and multiply-accumulates as a function
of every layer's kept widths (the one counter: plans, prune.json, export.json and the bench
report all count with it)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn


def is_grouped_conv(m: nn.Module) -> bool:
    """A Conv2d whose channels split into groups that do not mix (depthwise excepted)."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and not (m.groups == m.in_channels == m.out_channels)


@dataclass
class LayerCost:
    name: str
    kind: str        # "conv" | "linear" | "bn"
    out: int
    inp: int
    k: int           # kernel area
    spatial: int     # output positions
    bias: bool
    groups: int      # 0: depthwise (groups follow the channels)


Widths = dict[str, tuple[int, int]]  # layer -> (kept output width, kept input width)


class CostTable:
    """Every Conv2d / Linear / BatchNorm of a model with what its cost depends on; the rest of the
    parameters are a constant. ``widths()`` is the model as it is; costs take any widths."""

    def __init__(self, model: nn.Module, shapes: dict[str, list[int]]) -> None:
        self.layers: dict[str, LayerCost] = {}
        tracked = 0
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                hw = shapes.get(name, [m.out_channels, 1, 1])
                spatial = int(np.prod(hw[1:])) if len(hw) >= 3 else 1
                c = LayerCost(name, "conv", m.out_channels, m.in_channels, m.kernel_size[0] * m.kernel_size[1],
                              spatial, m.bias is not None, m.groups if is_grouped_conv(m) or m.groups == 1 else 0)
            elif isinstance(m, nn.Linear):  # a Linear on [N, ..., C] (channels-last) runs at every position
                shape = shapes.get(name, [m.out_features])
                c = LayerCost(name, "linear", m.out_features, m.in_features, 1, int(np.prod(shape[:-1])),
                              m.bias is not None, 1)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = LayerCost(name, "bn", m.num_features, m.num_features, 1, 1, False, 1)
            else:
                continue
            self.layers[name] = c
            tracked += sum(p.numel() for p in m.parameters(recurse=False))
        self.other_params = sum(p.numel() for p in model.parameters()) - tracked
        self.shapes = shapes
        self.latency = None  # a measured latency table (tvsprune.pruning.latency), for the latency metric

    def widths(self) -> Widths:
        return {n: (c.out, c.inp) for n, c in self.layers.items()}

    def params_macs(self, widths: Widths) -> tuple[int, int]:
        """(params, MACs for one image) of the model with these kept widths."""
        params, macs = self.other_params, 0
        for n, c in self.layers.items():
            out, inp = widths[n]
            if c.kind == "bn":
                params += 2 * out
                continue
            w = out * c.k if c.groups == 0 else out * (inp // c.groups) * c.k
            params += w + (out if c.bias else 0)
            macs += w * c.spatial
        return int(params), int(macs)


def hooked_forward(model: nn.Module, input_shape: list[int] | tuple[int, ...], modules: list[nn.Module],
                   hook) -> None:
    """One eval-mode forward of a zero image with ``hook`` on ``modules``; the hooks and the
    model's mode restored after."""
    handles = [m.register_forward_hook(hook) for m in modules]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def output_shapes(model: nn.Module, input_shape: list[int] | tuple[int, ...]) -> dict[str, list[int]]:
    """Output shape (without the batch dimension) of every Conv2d / Linear for one image."""
    shapes: dict[str, list[int]] = {}
    names = {m: n for n, m in model.named_modules()}

    def hook(m, inp, out):
        shapes[names[m]] = list(out.shape[1:])

    hooked_forward(model, input_shape, [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))], hook)
    return shapes


def count_params_macs(model: nn.Module, input_shape: list[int] | tuple[int, ...]) -> tuple[int, int]:
    """Parameters, and multiply-accumulates of Conv2d / Linear layers for one image."""
    table = CostTable(model, output_shapes(model, input_shape))
    return table.params_macs(table.widths())
