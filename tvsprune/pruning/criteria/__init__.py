"""Pruning criteria: one module per criterion, each registered by name in ``CRITERIA``.

A criterion turns what it declares it needs (``moments``: the calibration moments file;
``weights``: the model) into one score per output channel of each prunable layer; higher
means keep. Scores never touch the model's structure: plans are made from them
(:mod:`..plan`). To add one, write a module here:

    from . import CRITERIA, WeightCriterion

    @CRITERIA.entry("l-inf")
    class LInf(WeightCriterion):
        def layer(self, module, norm, name, inputs):
            return module.weight.detach().double().flatten(1).abs().amax(1)

and a test; the CLI, the config and the API accept ``--method l-inf`` from then on.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ...lazy import lazy
from ...registry import Registry

if TYPE_CHECKING:
    from ._base import Criterion

# the registry holds no torch: the CLI's parser lists the criteria from their modules' source
# (Registry.declared) without importing them; the base classes load on first use (_base, torch)
CRITERIA: Registry[Criterion] = Registry("criterion", package=__name__)

_BASE = ("Criterion", "MomentCriterion", "ScoreInputs", "WeightCriterion", "class_pairs", "criteria_needing",
         "flat_weight", "layer_scores", "pair_chunks")
__getattr__ = lazy(__name__, dict.fromkeys(_BASE, "._base"))


__all__ = ["CRITERIA", "Criterion", "MomentCriterion", "ScoreInputs", "WeightCriterion", "criteria_needing",
           "layer_scores"]
