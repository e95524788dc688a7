"""``tvs``: TVSPrune's score, a lower bound on the total-variation distance between a filter's
class-conditional output distributions (squared Hellinger distance between diagonal
Gaussians), reduced over class pairs: the minimum by default, the worst-separated pair."""
from __future__ import annotations

import torch

from ...calibration.moments import LayerMoments
from ...errors import TvsError
from . import CRITERIA, MomentCriterion, ScoreInputs, class_pairs, pair_chunks

VAR_FLOOR_REL = 1e-6


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
    ia, ib = class_pairs(lm, "TV")
    mu = lm.mean.to(device)
    var = lm.var.to(device)
    positive = var[var > 0]
    floor = (positive.mean() if positive.numel() else torch.tensor(1.0, dtype=var.dtype, device=device)) * var_floor_rel
    var = var.clamp(min=float(floor))
    sd = var.sqrt()
    C, D = mu.shape[1], mu.shape[2]
    best = None
    total = torch.zeros(C, dtype=torch.float64, device=device)
    for sl in pair_chunks(len(ia), C * D * 8 * 6):
        a, b = torch.as_tensor(ia[sl], device=device), torch.as_tensor(ib[sl], device=device)
        s2 = var[a] + var[b]
        log_bc = (0.5 * torch.log(2 * sd[a] * sd[b] / s2) - (mu[a] - mu[b]) ** 2 / (4 * s2)).sum(-1)
        h2 = -torch.expm1(log_bc)  # 1 - BC, accurate near 0
        if reduce == "min":
            m = h2.min(0).values
            best = m if best is None else torch.minimum(best, m)
        else:
            total += h2.sum(0)
    return best.cpu() if reduce == "min" else (total / len(ia)).cpu()


@CRITERIA.register("tvs")
class TVS(MomentCriterion):
    def layer(self, lm: LayerMoments, inputs: ScoreInputs) -> torch.Tensor:
        return hellinger_pairs(lm, inputs.pair_reduce, device=inputs.device)
