"""``magnitude``: how many channels each group loses follows one global threshold on the
filters' L2 norms, each layer's divided by its largest (Torch-Pruning's global magnitude
allocation); the criterion decides only *which* channels go.

Measured (benchmarks/accuracy_vs_sparsity.py): under a MAC budget the TV score's own
distribution drains ResNet-20's cheap late layers (44 % of parameters for 30 % of MACs),
while these counts spread the cut over the early, MAC-heavy layers too."""
from __future__ import annotations

from ...errors import TvsError
from . import ALLOCATIONS, Allocation


@ALLOCATIONS.entry("magnitude", instantiate=False)
class Magnitude(Allocation):
    counts_by_magnitude = True  # make_plan supplies the L2 norms when the caller gives none

    def setup(self, a, ldiffs, unit_costs, cost_power) -> None:
        super().setup(a, ldiffs, unit_costs, cost_power)
        if a.count_scores is None:
            raise TvsError("the magnitude allocation needs the filters' L2 norms (make_plan(count_scores=...))")

    def n_remove(self, a, i: int, lam: float) -> int:
        t = a.count_scores[i]
        return 0 if t is None else int((t < lam).sum())
