"""What every criterion builds on (the inputs, the base classes, the helpers) and the lookup that
scores layers; imported on first use, as it imports torch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn

from ...calibration.moments import LayerMoments, Moments
from ...errors import TvsError
from . import CRITERIA


@dataclass
class ScoreInputs:
    """Everything a criterion may read; each uses only what it declares in ``needs``."""

    layers: list[str]
    model: nn.Module | None = None
    moments: Moments | None = None
    stat_modules: dict[str, str] = field(default_factory=dict)  # layer -> the module its statistics are read at
    seed: int = 0
    pair_reduce: str = "min"
    device: str = "cpu"


class Criterion:
    """Scores for every layer: ``score(inputs) -> {layer: float64 array}``."""

    needs: ClassVar[frozenset[str]] = frozenset()
    name: ClassVar[str] = ""

    def score(self, inputs: ScoreInputs) -> dict[str, np.ndarray]:
        raise NotImplementedError


class MomentCriterion(Criterion):
    """A score computed from each layer's class-conditional moments alone."""

    needs = frozenset({"moments"})

    def layer(self, lm: LayerMoments, inputs: ScoreInputs) -> torch.Tensor:
        raise NotImplementedError

    def score(self, inputs: ScoreInputs) -> dict[str, np.ndarray]:
        if inputs.moments is None:
            raise TvsError(f"criterion {self.name!r} needs a moments file (tvsprune calibrate)")
        return {n: self.layer(inputs.moments.layers[n], inputs).numpy()
                for n in inputs.layers if n in inputs.moments.layers}


class WeightCriterion(Criterion):
    """A score computed from each layer's weights (and the norm layer after it)."""

    needs = frozenset({"weights"})

    def layer(self, module: nn.Module, norm: nn.Module | None, name: str, inputs: ScoreInputs) -> torch.Tensor:
        raise NotImplementedError

    def score(self, inputs: ScoreInputs) -> dict[str, np.ndarray]:
        if inputs.model is None:
            raise TvsError(f"criterion {self.name!r} needs the model's weights")
        modules = dict(inputs.model.named_modules())
        out = {}
        for name in inputs.layers:
            norm_name = inputs.stat_modules.get(name)
            norm = modules.get(norm_name) if norm_name and norm_name != name else None
            out[name] = self.layer(modules[name], norm, name, inputs).numpy()
        return out


def flat_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as [out channels, everything else], float64."""
    return module.weight.detach().double().flatten(1)


def class_pairs(lm: LayerMoments, what: str, min_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Both members of every pair of classes that have at least ``min_count`` calibration samples
    (2 where a score needs the classes' variances: one image has none)."""
    present = torch.nonzero(lm.count >= min_count).flatten().cpu().numpy()
    if len(present) < 2:
        need = "calibration samples" if min_count == 1 else f"{min_count} calibration images each (a variance)"
        raise TvsError(f"{what} scores need {need} of at least two classes; the moments have "
                       f"{sorted(lm.count.tolist(), reverse=True)[:8]} per class: give more images per class")
    ia, ib = np.triu_indices(len(present), k=1)
    return present[ia], present[ib]


def pair_chunks(n_pairs: int, per_pair_bytes: int, budget_bytes: int = 256 << 20):
    """Slices of the class pairs whose working set stays within ``budget_bytes``."""
    step = max(1, budget_bytes // max(1, per_pair_bytes))
    for s in range(0, n_pairs, step):
        yield slice(s, min(n_pairs, s + step))



def criteria_needing(need: str) -> tuple[str, ...]:
    return tuple(n for n, c in CRITERIA.items() if need in c.needs)


def layer_scores(criterion: str, model: nn.Module | None, moments: Moments | None, layers: list[str],
                 stat_modules: dict[str, str] | None = None, seed: int = 0, pair_reduce: str = "min",
                 device: str = "cpu") -> dict[str, np.ndarray]:
    """Scores of ``criterion`` for every layer in ``layers``: a float64 array per layer, higher = keep."""
    inputs = ScoreInputs(list(layers), model, moments, dict(stat_modules or {}), seed, pair_reduce, device)
    return CRITERIA.get(criterion).score(inputs)
