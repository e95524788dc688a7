"""Budget: scores + an allocation rule + a cost -> a plan (the bisection on the rule's scalar)."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..errors import TvsError
from .allocations import ALLOCATIONS, Allocator, removal_order
from .costs import CostModel
from .graph import ChannelGraph
from .options import Guards, PruneOptions
from .plan import Plan, plan_groups

OVERSHOOT_WARN = 0.05  # a plan removing more than target + this is recorded and logged

log = logging.getLogger(__name__)


def group_scores(graph: ChannelGraph, scores: dict[str, np.ndarray], normalise: bool = True) -> list[np.ndarray | None]:
    """One score per root channel of each group: the max over its members' (normalised) scores.

    A channel survives when any layer that shares it needs it. With ``normalise``, each
    layer's scores are divided by their maximum first, so layers are comparable.
    """
    out: list[np.ndarray | None] = []
    for g in graph.groups:
        if g.root in graph.rigid:  # left unpruned; its index maps may not even fit the layers
            out.append(None)
            continue
        t = np.full(g.channels, -np.inf)
        for it in g.items:
            if it.dim != "out" or it.module not in scores:
                continue
            s = np.asarray(scores[it.module], dtype=np.float64)
            if len(s) <= int(it.idxs.max(initial=-1)):
                raise TvsError(f"scores for {it.module} have {len(s)} entries; the layer has more channels")
            if normalise:
                top = s.max()
                s = s / top if top > 0 else np.zeros_like(s)
            np.maximum.at(t, it.root_idxs, s[it.idxs])
        out.append(t if np.isfinite(t).all() else None)
    return out


def block_scores(graph: ChannelGraph, gscores: list[np.ndarray | None]) -> list[np.ndarray | None]:
    """Per group, one score per block-local channel: the mean over the blocks of a grouped convolution.

    Groups without a grouped convolution have one block, so this is the identity for them.
    """
    return [t if t is None or g.blocks == 1 else t.reshape(g.blocks, -1).mean(0)
            for g, t in zip(graph.groups, gscores)]


def _expand(graph: ChannelGraph, local: list[np.ndarray]) -> list[np.ndarray]:
    return [g.expand(rm) if g.blocks > 1 else rm for g, rm in zip(graph.groups, local)]


def _fill_ties(alloc: Allocator, lo: list[int], hi: list[int], cost_of, base: int, target: float) -> list[int]:
    """Between the bisection's bounds, add channels one at a time until the target is met.

    Tied scores (dead filters score 0 alike) make the allocation jump past the target in
    one step; here the channels that the step adds are taken round-robin over the groups,
    each in its group's removal order, and stop as soon as the budget is reached.
    """
    counts = list(lo)
    extra = [h - l for l, h in zip(lo, hi)]
    if sum(extra) <= 1 or alloc.guards.round_to > 1 or target <= 0:
        return list(hi)
    step = max(1, sum(extra) // 2000)  # bounded work for very large tie sets
    while any(extra):
        for i in range(len(counts)):
            take = min(step, extra[i])
            if not take:
                continue
            counts[i] += take
            extra[i] -= take
            if 1.0 - cost_of(counts) / base >= target:
                return counts
    return list(hi)


def alone(graph: ChannelGraph, i: int, local: np.ndarray) -> list[np.ndarray]:
    """A removal (per group, root channels) that cuts only group ``i``: its block-local ``local`` channels."""
    none = np.empty(0, dtype=np.int64)
    return [graph.groups[i].expand(local) if j == i else none for j in range(len(graph.groups))]


def _curve_savings(graph: ChannelGraph, cost: CostModel, metric: str, base: float,
                   curves: list[list[tuple[int, float]] | None] | None) -> list[list[float] | None] | None:
    """Per group, what each cut of its measured curve saves alone in ``metric``. Parameters
    and MACs are linear in one group's width (the count times one channel's saving, exactly)
    unless a layer both reads and writes the group (a convolution from a residual stream back
    into it costs the square of its width); a measured latency is not linear (ONNX Runtime
    CPU, VGG-11: 0.64 to 1.53 times the count times one channel's saving). So the
    sensitivity allocation prices each cut by what it saves."""
    if curves is None:
        return None
    return [None if not c else [float(base - cost.metric(metric, alone(graph, i, np.arange(n)))) for n, _ in c]
            for i, c in enumerate(curves)]


def make_plan(graph: ChannelGraph, cost: CostModel, scores: dict[str, np.ndarray], *,
              allocation: str, target: float | None = None, metric: str = "params", threshold: float | None = None,
              guards: Guards | None = None, meta: dict[str, Any] | None = None,
              ldiffs: dict[str, float] | None = None, cost_power: float | None = None, normalise: bool = True,
              count_scores: dict[str, np.ndarray] | None = None,
              curves: list[list[tuple[int, float]] | None] | None = None) -> Plan:
    """Decide the kept channels of every group.

    - ``target`` (fraction of ``metric`` = params or macs to remove): bisection on the
      allocation's scalar until the removed fraction reaches the target;
    - ``threshold`` (absolute score): remove channels whose group score is below it.

    ``normalise=False`` keeps scores as they are across layers (for criteria whose scale is
    already comparable between layers, such as the least-squares saliency).
    ``count_scores`` (per layer, e.g. L2 norms): what allocations that count by a second
    score read (``magnitude``); channels still go in the order of ``scores``.
    ``curves`` (per group of ``graph.groups``, measured (count, KL) points): what the
    ``sensitivity`` allocation reads (:func:`.stage.sensitivity_curves`).
    """
    if cost_power is None:  # one default, PruneOptions' (no second definition here)
        cost_power = PruneOptions.default("cost_power")
    guards = guards or Guards()
    channels = [g.block_size for g in graph.groups]  # what the allocation counts: block-local channels
    base_params, base_macs = cost.cost()
    base = cost.metric(metric)
    if threshold is not None:
        raw = block_scores(graph, group_scores(graph, scores, normalise=False))
        counts = [0 if t is None else guards.clamp(len(t), int((t < threshold).sum())) for t in raw]
        orders = [None if t is None else removal_order(t) for t in raw]
        removed = _expand(graph, [np.sort(o[:n]) if o is not None else np.empty(0, dtype=np.int64)
                                  for o, n in zip(orders, counts)])
        lam = None
    else:
        if target is None or not (0.0 <= target < 1.0):
            raise TvsError(f"the budget must be a fraction in [0, 1), got {target}")
        gs = block_scores(graph, group_scores(graph, scores, normalise=normalise))
        gl = [max((ldiffs or {}).get(m, 0.0) for m in g.members) if g.members else 0.0 for g in graph.groups]
        # what removing one channel of each group saves
        unit = [float(base - cost.metric(metric, alone(graph, i, np.array([0])))) for i in range(len(graph.groups))]
        if count_scores is None and getattr(ALLOCATIONS.get(allocation), "counts_by_magnitude", False):
            count_scores = {n: graph.modules[n].weight.detach().double().flatten(1).norm(dim=1).numpy()
                            for n in scores if n in graph.modules}
        cs = block_scores(graph, group_scores(graph, count_scores)) if count_scores is not None else None
        alloc = Allocator(allocation, gs, channels, guards, gl, unit, cost_power, cs, curves,
                          _curve_savings(graph, cost, metric, base, curves))

        def removal(lam: float) -> list[np.ndarray]:
            return _expand(graph, alloc.removed(alloc.counts(lam)))

        def frac(lam: float) -> float:
            return 1.0 - cost.metric(metric, removal(lam)) / base

        lo, hi = 0.0, 1.0
        if frac(hi) >= target:
            for _ in range(50):
                mid = (lo + hi) / 2
                if frac(mid) >= target:
                    hi = mid
                else:
                    lo = mid
        lam = hi
        # even the lowest price removes more than the target (channels this rule prices at
        # nothing, e.g. measured curves flat at zero: residual branches that a zero-initialised
        # BatchNorm silences): the fill starts from nothing removed instead of overshooting
        floor = [0] * len(channels) if frac(lo) >= target else alloc.counts(lo)
        counts = _fill_ties(alloc, floor, alloc.counts(hi),
                            lambda c: cost.metric(metric, _expand(graph, alloc.removed(c))), base, target)
        removed = _expand(graph, alloc.removed(counts))
    params, macs = cost.cost(removed)
    groups = plan_groups(graph, removed)
    info = dict(meta or {})
    if graph.rigid:
        info["rigid_groups"] = dict(graph.rigid)
    info.update({"allocation": allocation if threshold is None else "threshold",
                 "budget": {"metric": metric, "target": target, "threshold": threshold, "lambda": lam},
                 "guards": {"min_keep_frac": guards.min_keep_frac, "min_keep": guards.min_keep,
                            "round_to": guards.round_to},
                 "params": {"before": base_params, "after": params, "removed_frac": 1 - params / base_params},
                 "macs": {"before": base_macs, "after": macs, "removed_frac": 1 - macs / base_macs if base_macs else 0.0}})
    if metric not in info:  # any other registered cost: recorded beside params and MACs
        after = cost.metric(metric, removed)
        info[metric] = {"before": base, "after": after, "removed_frac": 1 - after / base if base else 0.0}
    if target is not None and threshold is None:
        achieved = info[metric]["removed_frac"]
        if achieved + 1e-9 < target:
            rigid = (f" and {len(graph.rigid)} layer group{'s' if len(graph.rigid) > 1 else ''} that cannot be "
                     "pruned (prune.json's rigid_groups says why)" if graph.rigid else "")
            info["budget"]["unmet"] = (f"the guards (--min-keep-frac, --round-to){rigid} allow removing only "
                                       f"{achieved:.3f} of {metric} (asked {target:.3f})")
        elif achieved > target + OVERSHOOT_WARN:
            info["budget"]["overshoot"] = (f"removes {achieved:.3f} of {metric} (asked {target:.3f}): the "
                                           f"allocation's steps (round_to {guards.round_to}) are that coarse")
            log.warning("plan %s: %s", allocation, info["budget"]["overshoot"])
    return Plan(groups, info)


def plan_warnings(report: dict[str, Any], aligned: bool) -> list[str]:
    """What a user must read about a chosen plan (prune.json's ``warnings``): a budget it does not
    meet, and (``aligned`` False: widths not chosen on a grid) widths moved off the 8-channel grid."""
    out = []
    if unmet := (report.get("budget") or {}).get("unmet"):
        out.append(f"budget not met: {unmet}")
    odd = [f"{r['layer']}: {r['channels_before']} -> {r['channels_after']}" for r in report["layers"]
           if r["channels_after"] != r["channels_before"] and r["channels_before"] % 8 == 0 and r["channels_after"] % 8]
    if odd and not aligned:
        out.append(f"kept widths off the 8-channel grid ({', '.join(odd[:3])}{', ...' if len(odd) > 3 else ''}): CPU "
                   "and GPU kernels run such widths slowly, and fewer MACs need not mean less time (ResNet-20 with 44 % "
                   "fewer MACs ran 8 % slower on ONNX Runtime CPU); prune to a measured --target-latency, or give "
                   "--round-to 8")
    return out
