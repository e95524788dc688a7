"""What a network costs: parameters and multiply-accumulates, exactly, for the model as it is
or for any choice of removed channels (the one MAC counter: plans, prune.json, export.json
and the bench report all count with it). Budgets name a cost from ``COSTS``."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ..registry import Registry
from .graph import ChannelGraph, is_grouped_conv

# budget metric -> which of (params, MACs) it reads; a latency model would be one more entry
COSTS: Registry = Registry("budget metric")
COSTS.register("params", lambda params, macs: params)
COSTS.register("macs", lambda params, macs: macs)


@dataclass
class _Costed:
    name: str
    kind: str
    out: int
    inp: int
    k: int           # kernel area
    spatial: int     # output positions
    bias: bool
    groups: int      # 0: depthwise (groups follow the channels)


class CostModel:
    """Parameters and MACs of the model for any choice of removed root channels, exactly.

    Counts Conv2d / Linear weights and biases and BatchNorm affine parameters that
    pruning changes; everything else is a constant taken from the model.
    """

    def __init__(self, model: nn.Module, graph: ChannelGraph | None, shapes: dict[str, list[int]]) -> None:
        self.layers: dict[str, _Costed] = {}
        tracked = 0
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                hw = shapes.get(name, [m.out_channels, 1, 1])
                spatial = int(np.prod(hw[1:])) if len(hw) >= 3 else 1
                c = _Costed(name, "conv", m.out_channels, m.in_channels, m.kernel_size[0] * m.kernel_size[1],
                            spatial, m.bias is not None, m.groups if is_grouped_conv(m) or m.groups == 1 else 0)
            elif isinstance(m, nn.Linear):  # a Linear on [N, ..., C] (channels-last) runs at every position
                shape = shapes.get(name, [m.out_features])
                c = _Costed(name, "linear", m.out_features, m.in_features, 1, int(np.prod(shape[:-1])),
                            m.bias is not None, 1)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = _Costed(name, "bn", m.num_features, m.num_features, 1, 1, False, 1)
            else:
                continue
            self.layers[name] = c
            tracked += sum(p.numel() for p in m.parameters(recurse=False))
        self.other_params = sum(p.numel() for p in model.parameters()) - tracked
        self.graph, self.shapes = graph, shapes

    def metric(self, metric: str, removed: list[np.ndarray] | None = None) -> int:
        """The budget metric ``metric`` (a ``COSTS`` name) of the model, or with ``removed`` channels gone."""
        return int(COSTS.get(metric)(*self.cost(removed)))

    def cost(self, removed: list[np.ndarray] | None = None) -> tuple[int, int]:
        """(params, MACs) when ``removed[g]`` root channels of group g are removed."""
        out = {n: c.out for n, c in self.layers.items()}
        inp = {n: c.inp for n, c in self.layers.items()}
        if removed is not None:
            for group, rm in zip(self.graph.groups, removed):
                if rm is None or len(rm) == 0:
                    continue
                rm_set = np.zeros(group.channels, dtype=bool)
                rm_set[rm] = True
                for it in group.items:
                    if it.module not in self.layers:
                        continue
                    n = int(rm_set[it.root_idxs].sum()) if len(it.root_idxs) else 0
                    if it.dim == "out":
                        out[it.module] -= n
                    else:
                        inp[it.module] -= n
        params, macs = self.other_params, 0
        for n, c in self.layers.items():
            if c.kind == "bn":
                params += 2 * out[n]
                continue
            w = out[n] * c.k if c.groups == 0 else out[n] * (inp[n] // c.groups) * c.k
            params += w + (out[n] if c.bias else 0)
            macs += w * c.spatial
        return int(params), int(macs)


def output_shapes(model: nn.Module, input_shape: list[int] | tuple[int, ...]) -> dict[str, list[int]]:
    """Output shape (without the batch dimension) of every Conv2d / Linear for one image."""
    shapes: dict[str, list[int]] = {}
    names = {m: n for n, m in model.named_modules()}

    def hook(m, inp, out):
        shapes[names[m]] = list(out.shape[1:])

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return shapes


def count_params_macs(model: nn.Module, input_shape: list[int] | tuple[int, ...]) -> tuple[int, int]:
    """Parameters, and multiply-accumulates of Conv2d / Linear layers for one image."""
    return CostModel(model, None, output_shapes(model, input_shape)).cost()
