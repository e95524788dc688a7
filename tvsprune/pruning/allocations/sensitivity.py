"""``sensitivity``: how many channels each group loses follows its *measured* sensitivity.

For every group, prune stage measures a curve before the allocation runs
(:func:`tvsprune.pruning.stage.sensitivity_curves`): the network with only that group cut
by a grid of counts (its lowest-scored channels, least-squares fold, no BatchNorm
re-estimation), and the KL divergence of its outputs from the unpruned network's on
the images the candidates are compared on (calibration images the repairs did not
use, when there are any). No labels: the same measure the ``auto`` choice uses.

The rule is a Lagrangian one: each curve (made non-decreasing) is replaced by its lower
convex hull over what the cut saves alone in the budget's metric (for parameters and
MACs the count times one channel's saving, unless a layer both reads and writes the group;
a measured latency is not linear in the width, so each cut is priced by the cost model);
one price ``t`` per unit saved is shared by all groups, and a group loses the channels of
every hull segment whose KL per unit saved is at most ``t``. Monotone in ``t``, so
``make_plan`` bisects it like every rule; the criterion still decides *which* channels go.
In the spirit of Provable Filter Pruning's per-layer sensitivity, measured on the network
rather than bounded.

Measured (benchmarks/accuracy_vs_sparsity.py): VGG-11 at 50 % of MACs, where the
magnitude and global rules drain the MAC-heavy early layers evenly, the measured curves
keep the first convolutions wide and cut the middle ones.
"""
from __future__ import annotations

import numpy as np

from ...errors import TvsError
from . import ALLOCATIONS, Allocation


def lower_hull(x: np.ndarray, y: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of points sorted by ``x`` (the first point included)."""
    hull: list[int] = []
    for j in range(len(x)):
        hull.append(j)
        while len(hull) >= 3:
            a, b, c = hull[-3:]
            if (y[b] - y[a]) * (x[c] - x[b]) >= (y[c] - y[b]) * (x[b] - x[a]):
                hull.pop(-2)  # b lies on or above the chord a-c
            else:
                break
    return hull


@ALLOCATIONS.entry("sensitivity", instantiate=False)
class Sensitivity(Allocation):
    def setup(self, a, ldiffs, unit_costs, cost_power) -> None:
        super().setup(a, ldiffs, unit_costs, cost_power)
        if a.curves is None:
            raise TvsError("the sensitivity allocation needs measured curves (prune with calibration images; "
                           "make_plan(curves=...))")
        self.steps: list[tuple[np.ndarray, np.ndarray] | None] = []
        slopes_all: list[float] = []
        for i, t in enumerate(a.gscores):
            curve = a.curves[i] if i < len(a.curves) else None
            if t is None or not curve:
                self.steps.append(None)
                continue
            n = np.array([0] + [c for c, _ in curve], dtype=np.float64)
            kl = np.maximum.accumulate(np.array([0.0] + [max(0.0, float(k)) for _, k in curve]))
            saved = a.savings[i] if a.savings is not None and i < len(a.savings) else None
            x = np.array([0.0] + list(saved)) if saved else n * max(float(unit_costs[i]), 1e-12)
            # a cut that saves no more than a smaller one (a width the backend runs no faster) is never worth it
            useful = [0] + [j for j in range(1, len(x)) if x[j] > x[:j].max()]
            n, kl, x = n[useful], kl[useful], x[useful]
            hull = lower_hull(x, kl)
            slopes = np.diff(kl[hull]) / np.diff(x[hull])
            self.steps.append((n[hull[1:]].astype(np.int64), slopes))
            slopes_all += [s for s in slopes if s > 0]
        self.scale = float(np.median(slopes_all)) if slopes_all else 1.0

    def n_remove(self, a, i: int, lam: float) -> int:
        s = self.steps[i]
        if s is None:
            return 0
        counts, slopes = s
        price = np.inf if lam >= 1.0 else self.scale * lam / (1.0 - lam)
        k = int((slopes <= price).sum())  # hull slopes increase: the first k segments are worth their price
        return int(counts[k - 1]) if k else 0
