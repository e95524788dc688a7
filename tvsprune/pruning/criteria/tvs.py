"""``tvs``: TVSPrune's score, a lower bound on the total-variation distance between a filter's
class-conditional output distributions (squared Hellinger distance between diagonal
Gaussians), reduced over class pairs: the minimum by default, the worst-separated pair."""
from __future__ import annotations

import numpy as np
import torch

from ...calibration.moments import LayerMoments
from ...errors import TvsError
from . import CRITERIA, MomentCriterion, ScoreInputs, class_pairs

VAR_FLOOR_REL = 1e-6
WORKING_SET_BYTES = 256 << 20  # what one step of the pairwise loop may hold


def hellinger_pairs(lm: LayerMoments, reduce: str = "min", var_floor_rel: float = VAR_FLOOR_REL,
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """Squared Hellinger distance per filter, reduced over class pairs -> [C] float64.

    ``log BC = sum_d 0.5 log(2 s_a s_b / (s_a^2 + s_b^2)) - (mu_a - mu_b)^2 / (4 (s_a^2 + s_b^2))``
    in log space; variances are floored at ``var_floor_rel`` x the layer's mean variance so
    a dead filter (zero variance, equal means) scores 0 rather than NaN. Class pairs are
    processed in chunks so many classes fit in memory.
    """
    if reduce not in ("min", "mean"):
        raise TvsError(f"unknown pair reduction {reduce!r} (min or mean)")
    present = torch.as_tensor(np.unique(np.concatenate(class_pairs(lm, "TV", min_count=2))), device=device)
    mu = lm.mean.to(device)[present]
    var = lm.var.to(device)
    positive = var[var > 0]
    floor = (positive.mean() if positive.numel() else torch.tensor(1.0, dtype=var.dtype, device=device)) * var_floor_rel
    var = var[present].clamp(min=float(floor))
    sd = var.sqrt()
    K, C, D = mu.shape
    best = torch.full((C,), -torch.inf, dtype=torch.float64, device=device)  # max log BC = min H^2
    total = torch.zeros(C, dtype=torch.float64, device=device)
    rows = max(1, WORKING_SET_BYTES // max(1, C * D * 8 * 4))  # class pairs per step
    # class a against every later class b, in slices of b: views, no gathers; the arithmetic
    # is the formula's, in its order, so results do not depend on the slicing
    for ia in range(K - 1):
        for start in range(ia + 1, K, rows):
            sb = slice(start, min(K, start + rows))
            s2 = var[ia] + var[sb]
            log_bc = (sd[ia] * sd[sb]).mul_(2).div_(s2).log_().mul_(0.5)
            diff = mu[ia] - mu[sb]
            log_bc.sub_(diff.mul_(diff).div_(s2.mul_(4)))
            log_bc = log_bc.sum(-1)
            if reduce == "min":  # -expm1 is decreasing: min over pairs of H^2 = -expm1(max log BC)
                torch.maximum(best, log_bc.max(0).values, out=best)
            else:
                total += (-torch.expm1(log_bc)).sum(0)  # 1 - BC, accurate near 0
    if reduce == "min":
        return (-torch.expm1(best)).cpu()
    return (total / (K * (K - 1) // 2)).cpu()


@CRITERIA.entry("tvs")
class TVS(MomentCriterion):
    def layer(self, lm: LayerMoments, inputs: ScoreInputs) -> torch.Tensor:
        return hellinger_pairs(lm, inputs.pair_reduce, device=inputs.device)
