"""Budget metrics: a cost of the network as a function of its kept widths, registered by name in
``COSTS``; :class:`CostModel` turns a choice of removed root channels into those widths.

A cost takes the model's :class:`~tvsprune.models.costs.CostTable` and the kept widths per
layer; a measured latency table is one more entry, and the budget code does not change.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch.nn as nn

from ..errors import TvsError
from ..models.costs import CostTable, Widths, count_params_macs, output_shapes  # noqa: F401 (re-exported)
from ..registry import Registry
from .graph import ChannelGraph

Cost = Callable[[CostTable, Widths], float]
COSTS: Registry[Cost] = Registry("budget metric")
COSTS.register("params", lambda table, widths: table.params_macs(widths)[0])
COSTS.register("macs", lambda table, widths: table.params_macs(widths)[1])


def _latency(table: CostTable, widths: Widths) -> float:
    """Predicted milliseconds on the latency backend (:class:`.latency.LatencyTable`, set on the table)."""
    measured = getattr(table, "latency", None)
    if measured is None:
        raise TvsError("the latency metric needs a latency table measured on the target backend "
                       "(prune with --target-latency)")
    return measured.predict(widths)


COSTS.register("latency", _latency)


class CostModel:
    """The model's costs for any choice of removed root channels of ``graph``'s groups, exactly.

    Counts Conv2d / Linear weights and biases and BatchNorm affine parameters that
    pruning changes; everything else is a constant taken from the model.
    """

    def __init__(self, model: nn.Module, graph: ChannelGraph | None, shapes: dict[str, list[int]]) -> None:
        self.table = CostTable(model, shapes)
        self.graph, self.shapes = graph, shapes

    def widths(self, removed: list[np.ndarray] | None = None) -> Widths:
        """Kept (output, input) width per layer when ``removed[g]`` root channels of group g go."""
        out = {n: c.out for n, c in self.table.layers.items()}
        inp = {n: c.inp for n, c in self.table.layers.items()}
        if removed is not None:
            for group, rm in zip(self.graph.groups, removed):
                if rm is None or len(rm) == 0:
                    continue
                rm_set = np.zeros(group.channels, dtype=bool)
                rm_set[rm] = True
                for it in group.items:
                    if it.module not in self.table.layers:
                        continue
                    n = int(rm_set[it.root_idxs].sum()) if len(it.root_idxs) else 0
                    if it.dim == "out":
                        out[it.module] -= n
                    else:
                        inp[it.module] -= n
        return {n: (out[n], inp[n]) for n in out}

    def metric(self, metric: str, removed: list[np.ndarray] | None = None) -> float:
        """The budget metric ``metric`` (a ``COSTS`` name) of the model, or with ``removed`` channels gone."""
        return float(COSTS.get(metric)(self.table, self.widths(removed)))

    def cost(self, removed: list[np.ndarray] | None = None) -> tuple[int, int]:
        """(params, MACs) when ``removed[g]`` root channels of group g are removed."""
        return self.table.params_macs(self.widths(removed))
