"""``cost``: a channel goes when its score is low relative to what removing it saves (its unit
cost to the power ``cost_power``); ``cost-rank``: the same rule on within-group ranks, so the
saving alone decides how many channels a group loses and the criterion only which ones."""
from __future__ import annotations

import numpy as np

from . import ALLOCATIONS, Allocation


@ALLOCATIONS.entry("cost", instantiate=False)
class Cost(Allocation):
    def setup(self, a, ldiffs, unit_costs, cost_power) -> None:
        uc = np.asarray(unit_costs, dtype=np.float64)
        live = np.asarray([t is not None for t in a.gscores], dtype=bool)
        a.weights = (uc / uc[live].mean()) ** cost_power if live.any() else np.ones(len(a.gscores))
        a.lam_max = 1.0001 / max(float(a.weights[live].min()), 1e-12) if live.any() else 1.0

    def n_remove(self, a, i: int, lam: float) -> int:
        return int((a.gscores[i] < lam * a.lam_max * a.weights[i]).sum())


def _ranks(order: np.ndarray) -> np.ndarray:
    """Rank in (0, 1] of each channel, from its removal order (first removed = smallest)."""
    r = np.empty(len(order), dtype=np.float64)
    r[order] = np.arange(1, len(order) + 1) / len(order)
    return r


@ALLOCATIONS.entry("cost-rank", instantiate=False)
class CostRank(Cost):
    def transform(self, gscores, orders):
        return [None if o is None else _ranks(o) for o in orders]
