"""Apply a plan: physically remove channels (and every channel coupled to them)."""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..errors import TvsError
from .graph import ChannelGraph
from .plan import Plan

log = logging.getLogger(__name__)


def apply_plan(model: nn.Module, plan: Plan, example: torch.Tensor, logits_layer: str | None = None,
               graph: ChannelGraph | None = None) -> nn.Module:
    """Remove the plan's channels from ``model`` in place and return it.

    Compensation (:mod:`.compensation`) folds into the consumers before this, on the same graph.
    """
    graph = graph or ChannelGraph(model, example, logits_layer)
    known = {g.root: g for g in graph.groups}
    for pg in plan.groups:
        g = known.get(pg["root"])
        if g is None:
            raise TvsError(f"plan group {pg['root']!r} is not a prunable group of this model: "
                           "the plan was made for another model")
        if g.channels != pg["channels"]:
            raise TvsError(f"plan group {pg['root']!r} has width {pg['channels']} but the model's is {g.channels}")
    for pg, rm in zip(plan.groups, plan.removed()):
        if len(rm) == 0:
            continue
        graph.prune_group(pg["root"], rm, pg["members"]).prune(record_history=False)
    return model
