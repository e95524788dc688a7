"""``global``: one threshold on the (per-layer normalised) scores for the whole network."""
from __future__ import annotations

from . import ALLOCATIONS, Allocation


@ALLOCATIONS.entry("global", instantiate=False)
class Global(Allocation):
    def n_remove(self, a, i: int, lam: float) -> int:
        return int((a.gscores[i] < lam).sum())
