"""``uniform``: the same fraction of every group (Torch-Pruning's default per-layer ratio)."""
from __future__ import annotations

import math

from . import ALLOCATIONS, Allocation


@ALLOCATIONS.entry("uniform", instantiate=False)
class Uniform(Allocation):
    def n_remove(self, a, i: int, lam: float) -> int:
        return int(math.floor(lam * a.channels[i] + 1e-9))
