"""``l1`` and ``l2``: the norm of each filter's weights (the classic magnitude baselines)."""
from __future__ import annotations

import torch
import torch.nn as nn

from . import CRITERIA, ScoreInputs, WeightCriterion, flat_weight


@CRITERIA.entry("l1")
class L1(WeightCriterion):
    def layer(self, module: nn.Module, norm: nn.Module | None, name: str, inputs: ScoreInputs) -> torch.Tensor:
        return flat_weight(module).abs().sum(1)


@CRITERIA.entry("l2")
class L2(WeightCriterion):
    def layer(self, module: nn.Module, norm: nn.Module | None, name: str, inputs: ScoreInputs) -> torch.Tensor:
        return flat_weight(module).norm(dim=1)
