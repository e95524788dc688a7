"""``random``: seeded uniform scores, the floor every criterion must beat."""
from __future__ import annotations

import torch
import torch.nn as nn

from . import CRITERIA, ScoreInputs, WeightCriterion


@CRITERIA.entry("random")
class Random(WeightCriterion):
    def layer(self, module: nn.Module, norm: nn.Module | None, name: str, inputs: ScoreInputs) -> torch.Tensor:
        g = torch.Generator().manual_seed(inputs.seed * 1_000_003 + sum(map(ord, name)))
        return torch.rand(module.weight.shape[0], generator=g, dtype=torch.float64)
