"""Plans: which channels each coupled group keeps, decided from scores and a budget.

A plan is data (JSON): per group its root layer, member layers, original width and the
kept root-channel indices. It can be saved, diffed and re-applied to a fresh model built
from the same spec and weights.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import write_json
from ..errors import TvsError
from .allocations import ALLOCATIONS, Allocator, removal_order  # noqa: F401 (ALLOCATIONS re-exported)
from .costs import COSTS, CostModel
from .graph import ChannelGraph

FORMAT = "tvsprune.plan/1"
OVERSHOOT_WARN = 0.05  # a plan removing more than target + this is recorded and logged

log = logging.getLogger(__name__)


@dataclass
class Guards:
    """Limits that keep a pruned network usable."""

    min_keep_frac: float = 0.1
    min_keep: int = 1
    round_to: int = 1

    def max_removable(self, channels: int) -> int:
        keep = max(self.min_keep, math.ceil(self.min_keep_frac * channels))
        return max(0, channels - min(channels, keep))

    def clamp(self, channels: int, n_remove: int) -> int:
        n = min(max(0, n_remove), self.max_removable(channels))
        if self.round_to > 1 and n > 0:
            kept = channels - n
            kept = min(channels, int(math.ceil(kept / self.round_to) * self.round_to))
            n = channels - kept
        return n


@dataclass
class Plan:
    groups: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def layers(self) -> dict[str, list[int]]:
        """Kept root-channel indices per member layer (coupled members share them)."""
        return {m: g["kept"] for g in self.groups for m in g["members"]}

    def removed(self) -> list[np.ndarray]:
        return [np.setdiff1d(np.arange(g["channels"]), np.asarray(g["kept"], dtype=np.int64)) for g in self.groups]

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **self.meta, "groups": self.groups}

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "plan") -> "Plan":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise TvsError(f"{source}: not a tvsprune plan (format {d.get('format') if isinstance(d, dict) else None!r},"
                           f" expected {FORMAT})")
        groups = d.get("groups")
        if not isinstance(groups, list):
            raise TvsError(f"{source}: 'groups' must be a list")
        for i, g in enumerate(groups):
            try:
                c, kept = g["channels"], list(g["kept"])
                str(g["root"]), list(g["members"])
            except (KeyError, TypeError, ValueError) as e:
                raise TvsError(f"{source}: group {i} is malformed ({e})") from None
            bad = [k for k in [c, *kept] if type(k) is not int]  # noqa: E721 (bool and float are refused)
            if bad:
                raise TvsError(f"{source}: group {g.get('root')!r} holds non-integer channel indices or width "
                               f"({bad[0]!r}): refusing to cast them")
            if not kept:
                raise TvsError(f"{source}: group {g['root']!r} keeps no channel")
            if len(set(kept)) != len(kept):
                dup = next(k for k in kept if kept.count(k) > 1)
                raise TvsError(f"{source}: group {g['root']!r} keeps channel {dup} twice (duplicate index)")
            outside = [k for k in kept if not 0 <= k < c]
            if outside:
                raise TvsError(f"{source}: group {g['root']!r} keeps channel {outside[0]}, outside its width {c}")
            g["kept"] = sorted(kept)
        meta = {k: v for k, v in d.items() if k not in ("format", "groups")}
        return cls(groups, meta)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise TvsError(f"plan not found: {path}") from None
        except json.JSONDecodeError as e:
            raise TvsError(f"{path}: corrupt plan (invalid JSON: {e})") from None
        return cls.from_dict(d, str(path))


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


def plan_groups(graph: ChannelGraph, removed: list[np.ndarray]) -> list[dict[str, Any]]:
    """A plan's groups: per group of ``graph``, the root-channel indices it keeps once ``removed`` go."""
    return [{"root": g.root, "members": list(g.members), "channels": g.channels,
             "kept": [int(k) for k in np.setdiff1d(np.arange(g.channels), rm)]}
            for g, rm in zip(graph.groups, removed)]


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
        from .stage import PruneOptions

        cost_power = PruneOptions.cost_power
    guards = guards or Guards()
    channels = [g.block_size for g in graph.groups]  # what the allocation counts: block-local channels
    base_params, base_macs = cost.cost()
    base = COSTS.get(metric)(base_params, base_macs)
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
        unit = []
        for i, g in enumerate(graph.groups):  # what removing one channel of each group saves
            one = [np.empty(0, dtype=np.int64)] * len(graph.groups)
            one[i] = g.expand(np.array([0]))
            unit.append(float(base - cost.metric(metric, one)))
        if count_scores is None and getattr(ALLOCATIONS.get(allocation), "counts_by_magnitude", False):
            count_scores = {n: graph.modules[n].weight.detach().double().flatten(1).norm(dim=1).numpy()
                            for n in scores if n in graph.modules}
        cs = block_scores(graph, group_scores(graph, count_scores)) if count_scores is not None else None
        alloc = Allocator(allocation, gs, channels, guards, gl, unit, cost_power, cs, curves)

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
    if target is not None and threshold is None:
        achieved = info[metric]["removed_frac"]
        if achieved + 1e-9 < target:
            info["budget"]["unmet"] = (f"guards allow removing only {achieved:.3f} of {metric} "
                                       f"(asked {target:.3f})")
        elif achieved > target + OVERSHOOT_WARN:
            info["budget"]["overshoot"] = (f"removes {achieved:.3f} of {metric} (asked {target:.3f}): the "
                                           f"allocation's steps (round_to {guards.round_to}) are that coarse")
            log.warning("plan %s: %s", allocation, info["budget"]["overshoot"])
    return Plan(groups, info)
