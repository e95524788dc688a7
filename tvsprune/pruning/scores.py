"""What is computed from filter scores: TVSPrune's combined scores (the TV bound alone, or times
a second saliency), LDIFF per layer and rank correlations between criteria.

The criteria themselves (TVSPrune's ``tvs`` and the baselines) are registered one module
each in :mod:`.criteria`; ``layer_scores`` and the two moment scores are re-exported here.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from ..calibration.moments import Moments
from .criteria import CRITERIA, layer_scores
from .criteria.mean_distance import mean_distance
from .criteria.tvs import VAR_FLOOR_REL, hellinger_pairs
from .saliency import ls_saliency

if TYPE_CHECKING:
    from .context import Context
    from .options import PruneOptions

log = logging.getLogger(__name__)


def tv_bound(moments: Moments, layers: list[str], pair_reduce: str, device: str, required: bool
             ) -> dict[str, np.ndarray]:
    """Every layer's TV bound. Where the moments cannot give one (fewer than two classes with two
    images) and the criterion does not rank by it, none: LDIFF and the report use its scores."""
    from ..errors import TvsError

    try:
        return layer_scores("tvs", None, moments, layers, pair_reduce=pair_reduce, device=device)
    except TvsError as e:
        if required:
            raise
        log.warning("no TV bound beside the criterion's scores: %s", e)
        return {}


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


def _by_max(t: np.ndarray) -> np.ndarray:
    top = t.max()
    return t / top if top > 0 else np.ones_like(t)


def tvs_scores(ctx: "Context", moments: Moments, opts: "PruneOptions",
               tv: dict[str, np.ndarray] | None = None, combine: str | None = None) -> dict[str, np.ndarray]:
    """TVSPrune's per-layer scores: the TV lower bound (``tv`` when already computed), combined
    as ``combine`` (default ``opts.tvs_saliency``; "auto" here means the TV score alone)."""
    layers = [l.name for l in ctx.probe.layers]
    combine = combine or opts.tvs_saliency
    if tv is None:
        tv = layer_scores("tvs", None, moments, layers, pair_reduce=opts.pair_reduce, device=opts.device)
    if combine in ("none", "auto") or opts.threshold is not None:
        return tv
    if combine == "l1":  # the magnitude ranking alone, auto's guard against a TV ranking that misleads
        return layer_scores("l1", ctx.loaded.module, None, layers, ctx.stat_modules)
    if combine == "l2":
        other = layer_scores("l2", ctx.loaded.module, None, layers, ctx.stat_modules)
    elif not moments.inputs:
        log.warning("the moments file has no input second moments: tvs ranks by the TV score alone")
        return tv
    else:
        other = ls_saliency(ctx.graph, moments.inputs, layers, opts.ridge)
    out = {}
    for name, t in tv.items():
        s = other.get(name)
        # no consumer statistics for this layer: TV alone
        out[name] = _by_max(t) if s is None or not (s.max() > 0) else _by_max(t) * (s / s.max())
    return out
