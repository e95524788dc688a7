"""Repairs after surgery, without labels or gradients, and :func:`build_pruned`, which applies a
plan to a copy of the network and runs them.

- BatchNorm re-estimation: running statistics recomputed on calibration images.
- Mean compensation: the mean input a consumer received from removed channels is folded
  into its bias (or the running mean of the BatchNorm after it), so it keeps receiving it.
"""
from __future__ import annotations

import copy
import logging
import time
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import torch
import torch.nn as nn

from ..calibration.moments import Moments
from ..data.options import DataOptions
from ..console import step
from ..errors import TvsError
from .compensation import fold_from_moments, refit_sequential, removed_inputs
from .context import repair_batches
from .graph import ChannelGraph
from .options import DEFAULT_RIDGE, NEEDS_IMAGES, PruneOptions
from .plan import Plan
from .surgery import apply_plan

if TYPE_CHECKING:
    from .context import Context

log = logging.getLogger(__name__)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                          device: str = "cpu") -> int:
    """Re-estimate every BatchNorm's running mean/var (cumulative average); returns images seen."""
    norms = [m for m in model.modules() if isinstance(m, NORMS)]
    if not norms:
        return 0
    saved = {m: (m.momentum, m.training) for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the exact mean over all batches
    model.eval()
    for m in norms:
        m.train()
    seen = 0
    try:
        for x, _ in batches:
            model(x.to(device))
            seen += len(x)
    finally:
        for m, (momentum, training) in saved.items():
            m.momentum = momentum
            m.train(training)
        model.eval()
    return seen


@torch.no_grad()
def consumer_input_means(model: nn.Module, consumers: list[str],
                         batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: str = "cpu"
                         ) -> dict[str, np.ndarray]:
    """Mean input per input channel (Conv2d: over batch and space) or feature (Linear)."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def fn(m, inp):
            x = inp[0].detach().double()
            if x.dim() == 4 and not isinstance(m, nn.Linear):
                s, n = x.sum(dim=(0, 2, 3)), x.shape[0] * x.shape[2] * x.shape[3]
            else:
                x = x.reshape(-1, x.shape[-1])
                s, n = x.sum(0), x.shape[0]
            sums[name] = sums.get(name, 0) + s
            counts[name] = counts.get(name, 0) + n
        return fn

    handles = [modules[c].register_forward_pre_hook(hook(c)) for c in consumers]
    model.eval()
    try:
        for x, _ in batches:
            model(x.to(device))
    finally:
        for h in handles:
            h.remove()
    return {c: (sums[c] / counts[c]).cpu().numpy() for c in consumers if c in sums}


def repairs_of(meta: dict[str, Any]) -> dict[str, Any]:
    """The repairs a plan records; plans of format 1 said ``mean_compensation: bool``."""
    r = dict(meta.get("repairs") or {})
    if "compensation" not in r:
        r["compensation"] = "mean" if r.pop("mean_compensation", False) else "none"
    r.pop("mean_compensation", None)
    return {"compensation": r["compensation"], "bn_recalibrate": bool(r.get("bn_recalibrate")),
            "ridge": float(r.get("ridge", DEFAULT_RIDGE))}


def build_pruned(ctx: Context, plan: Plan, opts: PruneOptions, calib: DataOptions | None,
                 moments: Moments | None = None, report: dict[str, Any] | None = None) -> torch.nn.Module:
    """Copy the model, apply the plan, run the requested repairs.

    ``mean``/``ls`` compensation fold into the consumers before surgery, from the moments
    file's input statistics (``mean`` falls back to a pass over calibration images for
    moments files of format 1, ``ls`` to ``mean``); ``ls-seq`` re-fits after surgery on
    calibration images; BatchNorm re-estimation comes last. ``report`` receives what each
    step did and cost.
    """
    try:
        graph = ctx.graph.copy()  # the model's copy with its traced graph (no second trace)
    except (TypeError, RecursionError, copy.Error) as e:  # something in the graph does not copy
        log.debug("tracing the copy again (the traced graph does not copy: %s)", e)
        graph = ChannelGraph(copy.deepcopy(ctx.loaded.module), ctx.example, ctx.probe.logits_layer)
    model = graph.model.eval()
    report = report if report is not None else {}
    method = "ls" if opts.compensation == "auto" else opts.compensation  # auto's choice is select_plan's
    inputs = moments.inputs if moments is not None else {}
    if method == "ls" and not inputs:
        log.warning("the moments file has no input second moments (made by an older tvsprune, or none given): "
                    "least-squares compensation falls back to mean compensation")
        report["compensation_fallback"] = "mean: no input second moments in the moments file"
        method = "mean"
    if (opts.needs_images or (method == "mean" and not inputs)) and calib is None:
        raise TvsError(NEEDS_IMAGES)
    t0 = time.perf_counter()
    if method in ("mean", "ls"):
        fallback = None
        if not inputs:
            _, stream = repair_batches(calib, ctx.loaded, opts.repair_samples_per_class)
            fallback = consumer_input_means(ctx.loaded.module, list(removed_inputs(ctx.graph, plan)), stream, "cpu")
        fold = fold_from_moments(graph, plan, inputs, method, ctx.stat_modules, opts.ridge, fallback)
        report["compensation"] = fold.to_dict()
    step("removing channels")
    apply_plan(model, plan, ctx.example, ctx.probe.logits_layer, graph=graph)
    repair = None  # ls-seq holds the repair images in memory; BatchNorm re-estimation reuses them
    if method == "ls-seq":
        repair = list(repair_batches(calib, ctx.loaded, opts.repair_samples_per_class)[1])
        order = [l.name for l in ctx.probe.layers] + ([ctx.probe.logits_layer] if ctx.probe.logits_layer else [])
        fold = refit_sequential(ctx.loaded.module, model, ctx.graph, plan, order, repair, ctx.stat_modules,
                                opts.ridge)
        report["compensation"] = fold.to_dict()
    if "compensation" in report:
        report["compensation"]["seconds"] = round(time.perf_counter() - t0, 3)
    if opts.bn_recalibrate:
        t0 = time.perf_counter()
        step("re-estimating BatchNorm statistics")
        seen = recalibrate_batchnorm(model, repair or repair_batches(calib, ctx.loaded, opts.repair_samples_per_class)[1])
        report["bn_recalibrate"] = {"images": seen, "seconds": round(time.perf_counter() - t0, 3)}
    return model.eval()
