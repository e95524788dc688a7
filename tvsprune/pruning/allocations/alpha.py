"""``alpha``: the reference code's rule, a channel goes when its score is below alpha x its
group's mean score (alpha = lam x the largest useful value)."""
from __future__ import annotations

from . import ALLOCATIONS, Allocation


@ALLOCATIONS.entry("alpha", instantiate=False)
class Alpha(Allocation):
    def setup(self, a, ldiffs, unit_costs, cost_power) -> None:
        super().setup(a, ldiffs, unit_costs, cost_power)
        a.alpha_max = max([1.0 / m for m in a.means if m > 0] or [1.0]) * 1.0001

    def n_remove(self, a, i: int, lam: float) -> int:
        return int((a.gscores[i] < lam * a.alpha_max * a.means[i]).sum())
