"""The network being pruned: the model with its probe, channel graph and cost model, and
where its calibration images come from."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..calibration.moments import Moments
from ..data.options import DataOptions
from ..console import short_list
from ..data import BatchStream, stratified_indices
from ..models import LoadedModel
from ..models.probe import ModelProbe, probe_model
from .costs import CostModel, output_shapes
from .graph import ChannelGraph

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What every step needs: the model, its probe, graph and cost model."""

    loaded: LoadedModel
    example: torch.Tensor
    probe: ModelProbe
    graph: ChannelGraph
    cost: CostModel
    memo: dict = field(default_factory=dict)  # what a re-plan reuses (the sensitivity curves)

    @classmethod
    def build(cls, loaded: LoadedModel, input_shape: list[int]) -> "Context":
        example = torch.zeros(1, *input_shape)
        probe = probe_model(loaded.module, example, what=f"model {loaded.spec.spec}")
        graph = ChannelGraph(loaded.module, example, probe.logits_layer)
        rigid = graph.find_rigid_groups(example)
        by_reason: dict[str, list[str]] = {}
        for root, reason in rigid.items():
            by_reason.setdefault(reason, []).append(root)
        for reason, roots in by_reason.items():
            shown = short_list(roots, 3)
            log.warning("not pruning %s: %s (prune.json lists them)", shown, reason)
        return cls(loaded, example, probe, graph, CostModel(loaded.module, graph, output_shapes(loaded.module,
                                                                                               input_shape)))

    @property
    def stat_modules(self) -> dict[str, str]:
        return {l.name: l.stat_module for l in self.probe.layers}


def calib_options_from(moments: Moments, override: DataOptions | None) -> DataOptions | None:
    """The calibration data recorded in the moments file, unless the user gave other data."""
    if override is not None:
        return override
    d = moments.meta.get("data") or {}
    src, pre = d.get("source"), d.get("preprocess") or {}
    if not src or not Path(src).exists():
        return None
    return DataOptions.build(path=src, resize=pre.get("resize"), crop=pre.get("crop"), mean=pre.get("mean"),
                       std=pre.get("std"), samples_per_class=d.get("samples_per_class"), seed=d.get("seed", 0))


def repair_batches(data: DataOptions, model: LoadedModel, per_class: int | None, exclude: np.ndarray | None = None):
    """Repair images in a seeded random order, so that every batch mixes the classes.

    BatchNorm re-estimation averages per-batch statistics: batches of one class each (the
    sorted order of an image folder) miss the variance between classes, and the running
    variances come out too small (measured: 6x at the first BatchNorm of a network
    re-estimated on class-sorted batches)."""
    source = data.open(model)
    idx = stratified_indices(source.labels, per_class, data.seed, exclude)
    idx = np.random.default_rng(data.seed).permutation(idx)
    return source, BatchStream(source, idx, data.batch_size, data.workers, data.skip_bad)
