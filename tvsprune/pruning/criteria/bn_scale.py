"""``bn-scale``: |gamma| of the BatchNorm after each layer (network slimming); L1 where none follows."""
from __future__ import annotations

import torch
import torch.nn as nn

from . import CRITERIA, ScoreInputs, WeightCriterion, flat_weight


@CRITERIA.entry("bn-scale")
class BNScale(WeightCriterion):
    def layer(self, module: nn.Module, norm: nn.Module | None, name: str, inputs: ScoreInputs) -> torch.Tensor:
        if norm is None or getattr(norm, "weight", None) is None:
            return flat_weight(module).abs().sum(1)  # no BatchNorm after this layer: fall back to L1
        return norm.weight.detach().double().abs()
