"""``fpgm``: the sum of distances to the layer's other filters; small means near the geometric
median, i.e. redundant (He et al., Filter Pruning via Geometric Median)."""
from __future__ import annotations

import torch
import torch.nn as nn

from . import CRITERIA, ScoreInputs, WeightCriterion, flat_weight


@CRITERIA.entry("fpgm")
class FPGM(WeightCriterion):
    def layer(self, module: nn.Module, norm: nn.Module | None, name: str, inputs: ScoreInputs) -> torch.Tensor:
        w = flat_weight(module)
        return torch.cdist(w, w).sum(1)
