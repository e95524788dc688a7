"""``mean-distance``: the released reference code's score, min (or mean) over class pairs of
the distance between class means (the shared-isotropic-variance special case of ``tvs``)."""
from __future__ import annotations

import torch

from ...calibration.moments import LayerMoments
from . import CRITERIA, MomentCriterion, ScoreInputs, class_pairs, pair_chunks


def mean_distance(lm: LayerMoments, reduce: str = "min") -> torch.Tensor:
    """min (or mean) over class pairs of ||mu_a - mu_b||_2 -> [C] float64."""
    ia, ib = class_pairs(lm, "mean-distance")
    mu = lm.mean
    out = None
    total = torch.zeros(mu.shape[1], dtype=torch.float64)
    for sl in pair_chunks(len(ia), mu.shape[1] * mu.shape[2] * 8 * 2):
        d = (mu[torch.as_tensor(ia[sl])] - mu[torch.as_tensor(ib[sl])]).norm(dim=-1)
        if reduce == "min":
            m = d.min(0).values
            out = m if out is None else torch.minimum(out, m)
        else:
            total += d.sum(0)
    return out if reduce == "min" else total / len(ia)


@CRITERIA.entry("mean-distance")
class MeanDistance(MomentCriterion):
    def layer(self, lm: LayerMoments, inputs: ScoreInputs) -> torch.Tensor:
        return mean_distance(lm, inputs.pair_reduce)
