"""What is computed from filter scores: LDIFF per layer and rank correlations between criteria.

The criteria themselves (TVSPrune's ``tvs`` and the baselines) are registered one module
each in :mod:`.criteria`; ``layer_scores`` and the two moment scores are re-exported here.
"""
from __future__ import annotations

import numpy as np

from .criteria import CRITERIA, layer_scores
from .criteria.mean_distance import mean_distance
from .criteria.tvs import VAR_FLOOR_REL, hellinger_pairs


def ldiff(scores: np.ndarray) -> float:
    """LDIFF = 1 - mean(s / max s): 0 when every filter is equally discriminative."""
    s = np.asarray(scores, dtype=np.float64)
    top = s.max() if s.size else 0.0
    return float(1.0 - (s / top).mean()) if top > 0 else 0.0


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x), dtype=np.float64)
        r[order] = np.arange(len(x), dtype=np.float64)
        _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
        sums = np.bincount(inv, weights=r)
        return sums[inv] / counts[inv]

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    sa, sb = ra.std(), rb.std()
    if sa == 0 or sb == 0:
        return float("nan")
    return float(((ra - ra.mean()) * (rb - rb.mean())).mean() / (sa * sb))


__all__ = ["CRITERIA", "VAR_FLOOR_REL", "hellinger_pairs", "layer_scores", "ldiff", "mean_distance", "spearman"]
