"""Filter scores. Higher means more important (kept first).

TVSPrune's score is a lower bound on the total-variation distance between a filter's
class-conditional output distributions: the squared Hellinger distance between diagonal
Gaussians, reduced over class pairs (minimum by default: the worst-separated pair).
``mean-distance`` is the released reference code's score (min over pairs of the
distance between class means). The baselines read weights, never moments.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..calibration.moments import LayerMoments, Moments
from ..errors import TvsError

VAR_FLOOR_REL = 1e-6
MOMENT_CRITERIA = ("tvs", "mean-distance")
WEIGHT_CRITERIA = ("l1", "l2", "random", "bn-scale", "fpgm")
CRITERIA = MOMENT_CRITERIA + WEIGHT_CRITERIA


def _pairs(classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ia, ib = np.triu_indices(len(classes), k=1)
    return classes[ia], classes[ib]


def _pair_chunks(n_pairs: int, per_pair_bytes: int, budget_bytes: int = 256 << 20):
    step = max(1, budget_bytes // max(1, per_pair_bytes))
    for s in range(0, n_pairs, step):
        yield slice(s, min(n_pairs, s + step))


def hellinger_pairs(lm: LayerMoments, reduce: str = "min", var_floor_rel: float = VAR_FLOOR_REL,
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """Squared Hellinger distance per filter, reduced over class pairs -> [C] float64.

    ``log BC = sum_d 0.5 log(2 s_a s_b / (s_a^2 + s_b^2)) - (mu_a - mu_b)^2 / (4 (s_a^2 + s_b^2))``
    in log space; variances are floored at ``var_floor_rel`` x the layer's mean variance so
    a dead filter (zero variance, equal means) scores 0 rather than NaN. Class pairs are
    processed in chunks so many classes fit in memory.
    """
    present = torch.nonzero(lm.count > 0).flatten().cpu().numpy()
    if len(present) < 2:
        raise TvsError("TV scores need calibration samples of at least two classes")
    mu = lm.mean.to(device)
    var = lm.var.to(device)
    positive = var[var > 0]
    floor = (positive.mean() if positive.numel() else torch.tensor(1.0, dtype=var.dtype, device=device)) * var_floor_rel
    var = var.clamp(min=float(floor))
    sd = var.sqrt()
    ia, ib = _pairs(present)
    C, D = mu.shape[1], mu.shape[2]
    best = None
    total = torch.zeros(C, dtype=torch.float64, device=device)
    for sl in _pair_chunks(len(ia), C * D * 8 * 6):
        a, b = torch.as_tensor(ia[sl], device=device), torch.as_tensor(ib[sl], device=device)
        s2 = var[a] + var[b]
        log_bc = (0.5 * torch.log(2 * sd[a] * sd[b] / s2) - (mu[a] - mu[b]) ** 2 / (4 * s2)).sum(-1)
        h2 = -torch.expm1(log_bc)  # 1 - BC, accurate near 0
        if reduce == "min":
            m = h2.min(0).values
            best = m if best is None else torch.minimum(best, m)
        else:
            total += h2.sum(0)
    if reduce == "min":
        return best.cpu()
    if reduce == "mean":
        return (total / len(ia)).cpu()
    raise TvsError(f"unknown pair reduction {reduce!r} (min or mean)")


def mean_distance(lm: LayerMoments, reduce: str = "min") -> torch.Tensor:
    """The reference code's score: min (or mean) over class pairs of ||mu_a - mu_b||_2."""
    present = torch.nonzero(lm.count > 0).flatten().numpy()
    if len(present) < 2:
        raise TvsError("mean-distance scores need calibration samples of at least two classes")
    ia, ib = _pairs(present)
    mu = lm.mean
    out = None
    total = torch.zeros(mu.shape[1], dtype=torch.float64)
    for sl in _pair_chunks(len(ia), mu.shape[1] * mu.shape[2] * 8 * 2):
        d = (mu[torch.as_tensor(ia[sl])] - mu[torch.as_tensor(ib[sl])]).norm(dim=-1)
        if reduce == "min":
            m = d.min(0).values
            out = m if out is None else torch.minimum(out, m)
        else:
            total += d.sum(0)
    return out if reduce == "min" else total / len(ia)


def ldiff(scores: np.ndarray) -> float:
    """LDIFF = 1 - mean(s / max s): 0 when every filter is equally discriminative."""
    s = np.asarray(scores, dtype=np.float64)
    top = s.max() if s.size else 0.0
    return float(1.0 - (s / top).mean()) if top > 0 else 0.0


def _weight(module: nn.Module) -> torch.Tensor:
    return module.weight.detach().double().flatten(1)


def _fpgm(w: torch.Tensor) -> torch.Tensor:
    """Sum of distances to the layer's other filters: small = near the geometric median."""
    return torch.cdist(w, w).sum(1)


def weight_scores(criterion: str, module: nn.Module, norm: nn.Module | None, seed: int, name: str) -> torch.Tensor:
    if criterion == "l1":
        return _weight(module).abs().sum(1)
    if criterion == "l2":
        return _weight(module).norm(dim=1)
    if criterion == "fpgm":
        return _fpgm(_weight(module))
    if criterion == "random":
        g = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, name)))
        return torch.rand(_weight(module).shape[0], generator=g, dtype=torch.float64)
    if criterion == "bn-scale":
        if norm is None or getattr(norm, "weight", None) is None:
            return _weight(module).abs().sum(1)  # no BatchNorm after this layer: fall back to L1
        return norm.weight.detach().double().abs()
    raise TvsError(f"unknown criterion {criterion!r} (one of {', '.join(CRITERIA)})")


def layer_scores(criterion: str, model: nn.Module | None, moments: Moments | None, layers: list[str],
                 stat_modules: dict[str, str] | None = None, seed: int = 0, pair_reduce: str = "min",
                 device: str = "cpu") -> dict[str, np.ndarray]:
    """Scores for every layer in ``layers``: a float64 array per layer, higher = keep."""
    out: dict[str, np.ndarray] = {}
    if criterion in MOMENT_CRITERIA:
        if moments is None:
            raise TvsError(f"criterion {criterion!r} needs a moments file (tvsprune calibrate)")
        fn: Callable[[LayerMoments], torch.Tensor] = (
            (lambda lm: hellinger_pairs(lm, pair_reduce, device=device)) if criterion == "tvs"
            else (lambda lm: mean_distance(lm, pair_reduce)))
        for name in layers:
            if name in moments.layers:
                out[name] = fn(moments.layers[name]).numpy()
        return out
    if model is None:
        raise TvsError(f"criterion {criterion!r} needs the model's weights")
    modules = dict(model.named_modules())
    stat_modules = stat_modules or {}
    for name in layers:
        norm_name = stat_modules.get(name)
        norm = modules.get(norm_name) if norm_name and norm_name != name else None
        out[name] = weight_scores(criterion, modules[name], norm, seed, name).numpy()
    return out


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


__all__ = ["CRITERIA", "hellinger_pairs", "layer_scores", "ldiff", "mean_distance", "spearman"]
