"""Apply a plan: physically remove channels (and every channel coupled to them)."""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..errors import TvsError
from .graph import ChannelGraph, out_width
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
    expected = expected_widths(graph, plan)
    for pg, rm in zip(plan.groups, plan.removed()):
        if len(rm) == 0:
            continue
        graph.prune_group(pg["root"], rm, pg["members"]).prune(record_history=False)
    check_widths(model, expected, example)
    return model


def expected_widths(graph: ChannelGraph, plan: Plan) -> dict[str, int]:
    """Output width of every Conv2d/Linear after the plan, from the groups' index maps."""
    return graph.implied_widths(dict(zip((g["root"] for g in plan.groups), plan.removed())))


def check_widths(model: nn.Module, expected: dict[str, int], example: torch.Tensor) -> None:
    """Refuse a surgery whose result is not what the plan says: a layer whose width is not the
    one the plan implies, an empty layer, or a network that no longer runs. These mean the
    dependency graph coupled channels it should not have (a silently wrong network)."""
    modules = dict(model.named_modules())
    for name, want in expected.items():
        m = modules.get(name)
        if isinstance(m, (nn.Conv2d, nn.Linear)) and out_width(m) != want:
            raise TvsError(f"pruning left {name} with {out_width(m)} output channels where the plan implies {want}: "
                           "the channel coupling of this model is not understood (refusing a network that "
                           "would be wrong)")
    empty = next((n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear)) and out_width(m) == 0), None)
    if empty is not None:
        raise TvsError(f"pruning removed every channel of {empty}: the channel coupling of this model is not "
                       "understood (refusing a network that would be wrong)")
    try:
        with torch.no_grad():
            model.eval()(example)
    except RuntimeError as e:
        raise TvsError(f"the pruned network no longer runs ({str(e).strip().splitlines()[0]}): the channel "
                       "coupling of this model is not understood (refusing a network that would be wrong)") from None
