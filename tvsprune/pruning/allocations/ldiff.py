"""``ldiff``: a uniform fraction weighted by each group's LDIFF (more from mixed layers)."""
from __future__ import annotations

import math

import numpy as np

from . import ALLOCATIONS, Allocation


@ALLOCATIONS.entry("ldiff", instantiate=False)
class LDiff(Allocation):
    def setup(self, a, ldiffs, unit_costs, cost_power) -> None:
        ld = np.asarray(ldiffs if ldiffs is not None else [0.0] * len(a.gscores), dtype=np.float64)
        valid = [v for v, t in zip(ld, a.gscores) if t is not None]
        mean = float(np.mean(valid)) if valid and np.mean(valid) > 0 else 1.0
        a.weights = ld / mean

    def n_remove(self, a, i: int, lam: float) -> int:
        return int(math.floor(min(1.0, lam * a.weights[i]) * a.channels[i] + 1e-9))
