"""The latency table's layer model (``--latency-model layer``): every Conv2d / Linear timed alone,
as a one-layer graph (the layer and its ReLU, which the backends fuse), on a grid of kept
(input, output) widths; bilinear between the grid's points, summed over the layers. Also the
grid of widths both models measure (``width_grid``)."""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.nn as nn

from ..compare.on_backend import measure_layer
from ..console import step
from ..models.costs import CostTable, Widths, hooked_forward
from .options import Guards

GRID_POINTS = 5      # measured widths per pruned dimension of a layer, at most (its full width included)


@dataclass(frozen=True)
class LayerShape:
    """A Conv2d / Linear's geometry apart from its widths (what a timing is keyed by)."""

    kind: str                   # conv | linear
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1             # 0: depthwise (groups follow the channels)
    size: tuple[int, ...] = ()  # input H, W (conv); rows per image (linear)
    bias: bool = True

    def key(self, cin: int, cout: int) -> str:
        return (f"{self.kind} {cin}->{cout} k{self.kernel} s{self.stride} p{self.padding} d{self.dilation} "
                f"g{self.groups} in{self.size} bias{int(self.bias)}").replace(" ", "")

    @property
    def tied(self) -> bool:
        return self.kind == "conv" and self.groups == 0


def layer_shapes(model: nn.Module, table: CostTable, input_shape: list[int]) -> dict[str, LayerShape]:
    """The geometry of every Conv2d / Linear of ``table``, its input size read by one forward."""
    sizes: dict[str, tuple[int, ...]] = {}
    names = {m: n for n, m in model.named_modules()}

    def hook(m, inp, out):
        shape = tuple(inp[0].shape[1:])
        sizes[names[m]] = shape[1:3] if isinstance(m, nn.Conv2d) else (int(np.prod(shape[:-1])),)

    mods = [m for n, m in model.named_modules() if n in table.layers and isinstance(m, (nn.Conv2d, nn.Linear))]
    hooked_forward(model, input_shape, mods, hook)
    out = {}
    for m in mods:
        n = names[m]
        c = table.layers[n]
        if isinstance(m, nn.Conv2d):
            pad = m.padding
            if isinstance(pad, str):  # "same" / "valid"
                pad = tuple(d * (k - 1) // 2 for d, k in zip(m.dilation, m.kernel_size)) if pad == "same" else (0, 0)
            out[n] = LayerShape("conv", tuple(m.kernel_size), tuple(m.stride), tuple(pad), tuple(m.dilation),
                                c.groups, tuple(int(s) for s in sizes.get(n, (1, 1))), m.bias is not None)
        else:
            out[n] = LayerShape("linear", size=sizes.get(n, (1,)), bias=m.bias is not None)
    return out


def width_grid(full: int, step: int, guards: Guards, multiple: int = 1) -> list[int]:
    """Kept widths to measure for a dimension of ``full`` channels: multiples of ``step`` (and of
    ``multiple``, a grouped convolution's group count) from the guards' least width up, and the
    full width; at most GRID_POINTS, evenly spread, the ends kept."""
    unit = step * multiple // math.gcd(step, multiple)
    least = max(1, full - guards.max_removable(full))
    vals = sorted({full} | {w for w in range(unit, full, unit) if w >= least})
    if len(vals) > GRID_POINTS:
        idx = np.unique(np.round(np.linspace(0, len(vals) - 1, GRID_POINTS)).astype(int))
        vals = [vals[i] for i in idx]
    return vals


def _at(grid: list[int], v: float) -> tuple[int, int, float]:
    """Bracketing indices of ``v`` in ``grid`` and the weight of the upper one (clamped at the ends)."""
    if v <= grid[0]:
        return 0, 0, 0.0
    if v >= grid[-1]:
        return len(grid) - 1, len(grid) - 1, 0.0
    j = bisect.bisect_right(grid, v)
    return j - 1, j, (v - grid[j - 1]) / (grid[j] - grid[j - 1])


@dataclass
class LayerTable:
    shape: LayerShape
    cin: list[int]
    cout: list[int]
    ms: dict[tuple[int, int], float] = field(default_factory=dict)

    def points(self) -> list[tuple[int, int]]:
        if self.shape.tied:
            return [(w, w) for w in self.cout]
        return [(i, o) for i in self.cin for o in self.cout]

    def at(self, cin: int, cout: int) -> float:
        """Milliseconds at these kept widths (bilinear between the grid's points)."""
        if self.shape.tied:
            i, j, t = _at(self.cout, cout)
            return (1 - t) * self.ms[(self.cout[i], self.cout[i])] + t * self.ms[(self.cout[j], self.cout[j])]
        a, b, u = _at(self.cin, cin)
        c, d, t = _at(self.cout, cout)

        def row(x: int) -> float:
            return (1 - t) * self.ms[(self.cin[x], self.cout[c])] + t * self.ms[(self.cin[x], self.cout[d])]

        return (1 - u) * row(a) + u * row(b)


@dataclass
class LatencyTable:
    """Per layer, measured milliseconds on a grid of kept widths; ``predict`` sums them."""

    backend: str
    precision: str
    batch: int
    layers: dict[str, LayerTable]
    info: dict[str, Any] = field(default_factory=dict)

    def predict(self, widths: Widths) -> float:
        """Predicted milliseconds of the layers with these kept (output, input) widths."""
        return float(sum(t.at(widths[n][1], widths[n][0]) for n, t in self.layers.items()))


def layer_table(model, table, graph, input_shape, backend, batch, guards, precision, cached, save
                 ) -> tuple[LatencyTable, int, int]:
    varying = {(it.module, it.dim) for g in graph.groups if g.root not in graph.rigid for it in g.items}
    step_ = max(1, guards.round_to)
    layers: dict[str, LayerTable] = {}
    for n, s in layer_shapes(model, table, input_shape).items():
        c = table.layers[n]
        mult = c.groups if c.groups > 1 else 1
        cin = width_grid(c.inp, step_, guards, mult) if (n, "in") in varying and not s.tied else [c.inp]
        cout = width_grid(c.out, step_, guards, mult) if (n, "out") in varying else [c.out]
        layers[n] = LayerTable(s, cin, cout)
    todo: dict[str, tuple[LayerShape, list[tuple[int, int]]]] = {}
    for lt in layers.values():
        for p in lt.points():
            if lt.shape.key(*p) not in cached:
                todo.setdefault(lt.shape.key(0, 0), (lt.shape, []))[1].append(p)
    measured = 0
    if todo:
        total = sum(len(set(ps)) for _, ps in todo.values())
        step(f"measuring {total} layer latencies on {backend} at batch {batch} (cached for the next prune)")
        for shape, ps in todo.values():
            ps = sorted(set(ps))
            save({shape.key(*p): ms for p, ms in measure_layer(backend, precision, shape, ps, batch).items()})
            measured += len(ps)
    for lt in layers.values():
        lt.ms = {p: cached[lt.shape.key(*p)] for p in lt.points()}
    return LatencyTable(backend, precision, batch, layers), measured, sum(len(lt.points()) for lt in layers.values())
