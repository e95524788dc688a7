"""Apply a plan: physically remove channels (and every channel coupled to them)."""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn as nn

from ..errors import TvsError
from .graph import ChannelGraph
from .plan import Plan

log = logging.getLogger(__name__)


def consumers_of(graph: ChannelGraph, plan: Plan) -> list[str]:
    """Conv/Linear layers that lose input channels under ``plan`` (mean compensation targets)."""
    out = set()
    removed = dict(zip((g["root"] for g in plan.groups), plan.removed()))
    for g in graph.groups:
        if len(removed.get(g.root, [])) == 0:
            continue
        for it in g.items:
            if it.dim == "in" and isinstance(graph.modules[it.module], (nn.Conv2d, nn.Linear)):
                out.add(it.module)
    return sorted(out)


@torch.no_grad()
def _fold_means(graph: ChannelGraph, plan: Plan, means: dict[str, np.ndarray],
                norm_after: dict[str, str]) -> None:
    """Fold removed inputs' means into consumers (before any removal, original indices)."""
    removed = dict(zip((g["root"] for g in plan.groups), plan.removed()))
    shifts: dict[str, torch.Tensor] = {}
    for g in graph.groups:
        rm = removed.get(g.root)
        if rm is None or len(rm) == 0:
            continue
        rm_mask = np.zeros(g.channels, dtype=bool)
        rm_mask[rm] = True
        for it in g.items:
            m = graph.modules[it.module]
            if it.dim != "in" or not isinstance(m, (nn.Conv2d, nn.Linear)):
                continue
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                continue  # depthwise: the removed channel's own filter goes with it
            if it.module not in means:
                raise TvsError(f"mean compensation: no input means measured for {it.module}")
            idx = it.idxs[rm_mask[it.root_idxs]]
            if len(idx) == 0:
                continue
            w = m.weight.detach().double()
            mu = torch.as_tensor(means[it.module][idx], dtype=torch.float64)
            contrib = w[:, idx].flatten(2).sum(-1) if w.dim() == 4 else w[:, idx]
            shifts[it.module] = shifts.get(it.module, 0) + contrib @ mu
    for name, shift in shifts.items():
        m = graph.modules[name]
        norm = graph.modules.get(norm_after.get(name, ""))
        if m.bias is not None:
            m.bias.add_(shift.to(m.bias.dtype))
        elif isinstance(norm, (nn.BatchNorm1d, nn.BatchNorm2d)) and norm is not m:
            norm.running_mean.sub_(shift.to(norm.running_mean.dtype))
        else:
            m.bias = nn.Parameter(shift.to(m.weight.dtype).clone())


def apply_plan(model: nn.Module, plan: Plan, example: torch.Tensor, logits_layer: str | None = None,
               input_means: dict[str, np.ndarray] | None = None,
               norm_after: dict[str, str] | None = None, graph: ChannelGraph | None = None) -> nn.Module:
    """Remove the plan's channels from ``model`` in place and return it.

    ``input_means`` (from :func:`repairs.consumer_input_means`) switches on mean
    compensation: each consumer keeps receiving the mean of the inputs it loses.
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
    if input_means is not None:
        _fold_means(graph, plan, input_means, norm_after or {})
    for pg, rm in zip(plan.groups, plan.removed()):
        if len(rm) == 0:
            continue
        graph.prune_group(pg["root"], rm, pg["members"]).prune(record_history=False)
    return model
