"""IterTVSPrune: collect moments on the current network, remove a step, keep it if the
validation accuracy stays within the budget, else shrink the step."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np
import torch

from ..calibration.collector import collect_moments
from ..calibration.moments import Moments
from ..data.options import DataOptions
from ..data import BatchStream, stratified_indices
from ..errors import TvsError
from ..models import LoadedModel
from .budget import make_plan
from .context import Context
from .costs import CostModel
from .options import PruneOptions
from .plan import Plan
from .repairs import build_pruned
from .scores import tvs_scores

log = logging.getLogger(__name__)


@torch.no_grad()
def _accuracy(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], classes: int
              ) -> tuple[float, list[float], np.ndarray]:
    from ..compare.logits import collect_logits, forward_fn

    logits, y = collect_logits(forward_fn(model), batches)
    p = logits.argmax(1)
    per = [float((p[y == k] == k).mean()) if (y == k).any() else float("nan") for k in range(classes)]
    return float((p == y).mean()), per, p


def _compose(prev: Plan, step: Plan) -> Plan:
    """A plan made on an already-pruned model, expressed on the original model's channels."""
    by_root = {g["root"]: g for g in step.groups}
    groups = []
    for g in prev.groups:
        s = by_root.get(g["root"])
        kept = g["kept"] if s is None else [g["kept"][i] for i in s["kept"]]
        groups.append({**g, "kept": kept})
    return Plan(groups, dict(step.meta))


def _full_plan(ctx: Context) -> Plan:
    return Plan([{"root": g.root, "members": g.members, "channels": g.channels, "kept": list(range(g.channels))}
                 for g in ctx.graph.groups], {})


def iterative(ctx: Context, moments: Moments, opts: PruneOptions, calib: DataOptions,
              val: list[tuple[torch.Tensor, torch.Tensor]], base_acc: float,
              log_round: Callable[[dict[str, Any]], None] | None = None,
              on_accept: Callable[[Plan, float], None] | None = None) -> tuple[Plan, list[dict[str, Any]]]:
    """IterTVSPrune: collect -> step -> evaluate, accepting steps within the accuracy budget."""
    target, metric = opts.budget()
    if target is None:
        raise TvsError("iter-tvs needs a budget: --target-params or --target-flops")
    base_cost = ctx.cost.metric(metric)
    plan = _full_plan(ctx)
    current = ctx.loaded
    current_ctx = ctx
    removed_frac, step = 0.0, opts.step
    rounds: list[dict[str, Any]] = []
    n_classes = len(moments.classes)
    source = calib.open(ctx.loaded)
    cal_idx = stratified_indices(source.labels, calib.samples_per_class, calib.seed)
    resolution = moments.meta.get("resolution", "global")
    for r in range(1, opts.max_rounds + 1):
        if removed_frac >= target - 1e-9 or step <= 1e-9:
            break
        t0 = time.perf_counter()
        mom = moments if r == 1 else collect_moments(
            current.module, current_ctx.probe, BatchStream(source, cal_idx, calib.batch_size, calib.workers),
            source.classes, resolution)
        scores = tvs_scores(current_ctx, mom, opts)
        goal = min(target, removed_frac + step)
        # the budget of this round, relative to the current (already pruned) model
        cur_cost = current_ctx.cost.metric(metric)
        local = max(0.0, 1.0 - (1.0 - goal) * base_cost / cur_cost)
        step_plan = make_plan(current_ctx.graph, current_ctx.cost, scores, target=local, metric=metric,
                              allocation=opts.allocation_for(metric), guards=opts.guards, cost_power=opts.cost_power)
        candidate = _compose(plan, step_plan)
        model = build_pruned(ctx, candidate, opts, calib, moments)
        acc, _, _ = _accuracy(model, val, n_classes)
        new_cost = CostModel(model, None, ctx.cost.shapes).metric(metric)
        frac = 1.0 - new_cost / base_cost
        accepted = (base_acc - acc) * 100 <= opts.max_acc_drop and frac > removed_frac + 1e-9
        row = {"round": r, "step": round(step, 4), "removed_frac": round(frac, 4), "accuracy": round(acc, 4),
               "drop_points": round((base_acc - acc) * 100, 3), "accepted": accepted,
               "seconds": round(time.perf_counter() - t0, 2)}
        rounds.append(row)
        log.info("iter-tvs round %s", row)
        if log_round:
            log_round(row)
        if accepted:
            plan, removed_frac = candidate, frac
            if on_accept:
                on_accept(plan, frac)
            current = LoadedModel(module=model, spec=ctx.loaded.spec, normalize=ctx.loaded.normalize)
            current_ctx = Context.build(current, list(ctx.example.shape[1:]))
        else:
            step -= opts.step_decrease
    if removed_frac >= target - 1e-9:
        reason = f"reached the target ({removed_frac:.3f} of {metric} removed)"
    elif step <= 1e-9:
        reason = (f"stopped short of the target: every step down to {opts.step_decrease:g} of {metric} lost more than "
                  f"{opts.max_acc_drop:g} accuracy points on the validation images (raise --max-acc-drop)")
    else:
        reason = f"stopped short of the target: --max-rounds {opts.max_rounds} used up"
    if removed_frac < target - 1e-9:
        log.warning("iter-tvs %s; removed %.3f of %s, asked %.3f", reason, removed_frac, metric, target)
    rounds.append({"stop": reason, "removed_frac": round(removed_frac, 4), "target": target})
    return plan, rounds
