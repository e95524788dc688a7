"""How ``auto`` chooses: each candidate (TV combination, allocation) is planned, pruned and
repaired, and the network most faithful to the unpruned one (KL, no labels) on calibration
images the repairs did not use is kept; the sensitivity allocation's single-group cuts."""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from ..calibration.moments import Moments
from ..data.options import DataOptions
from ..console import phase, step
from ..data import BatchStream, stratified_indices
from ..errors import TvsError
from ..models import LoadedModel
from .allocations import removal_order
from .budget import make_plan
from .context import Context
from .options import PruneOptions
from .plan import Plan, plan_groups
from .repairs import build_pruned
from .scores import tvs_scores

log = logging.getLogger(__name__)

FIDELITY_IMAGES = 1000  # calibration images the choice is measured on (at most; see fidelity_images)
AUTO_SEQ_IMAGES = 5000  # compensation auto tries ls-seq (a pruned-network pass per consumer) up to this many repair images
SENSITIVITY_FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.9)  # of a group's channels, one cut each
SENSITIVITY_IMAGES = 256  # of those images, what each single-group cut is measured on (at most)
SENSITIVITY_MIN_IMAGES = 128  # fewer grid points before fewer images than this
SENSITIVITY_BUILDS = 96  # at most this many single-group cuts (fewer grid points per group beyond 13 groups)
SENSITIVITY_WORK = 3e12  # at most cuts x images x the network's MACs (VGG-11 on CIFAR-10: 2.8e12)
SENSITIVITY_MIN_POINTS = 3  # auto skips the sensitivity candidate where fewer than this fit per group



def fidelity_images(calib: DataOptions, loaded: LoadedModel, opts: "PruneOptions",
                    cap: int = FIDELITY_IMAGES) -> tuple[torch.Tensor, bool]:
    """Images to compare candidate networks on (at most ``cap``, stratified), and whether
    the repairs did not see them: calibration images that neither the moments nor the
    repairs used; else those only the moments used (the folds read their statistics, but
    ``ls-seq`` and BatchNorm re-estimation never saw them); else the repair images
    themselves (False)."""
    source = calib.open(loaded)
    repair = stratified_indices(source.labels, opts.repair_samples_per_class, calib.seed)
    used = repair
    if calib.samples_per_class is not None:
        used = np.union1d(used, stratified_indices(source.labels, calib.samples_per_class, calib.seed))
    per_class = max(1, cap // max(1, len(np.unique(source.labels))))
    idx = stratified_indices(source.labels, per_class, calib.seed + 1, exclude=used)
    if len(idx) == 0:
        idx = stratified_indices(source.labels, per_class, calib.seed + 1, exclude=repair)
        if len(idx):
            log.info("no calibration images beyond those of the moments and repairs: the candidates are "
                     "compared on %d images only the moments used", len(idx))
    held_out = len(idx) > 0
    if not held_out:
        counts = np.bincount(source.labels)
        log.warning("every calibration image (%d per class at least) is a repair image: the candidate networks are "
                    "compared on the images they were fitted on, and ls-seq is not tried; give a folder with more than "
                    "%d images per class (--repair-samples-per-class, default 100), or lower "
                    "--repair-samples-per-class", int(counts[counts > 0].min()), opts.repair_samples_per_class or 0)
        idx = np.random.default_rng(calib.seed).permutation(repair)[:cap]
    xs = torch.cat([x for x, _ in BatchStream(source, idx, calib.batch_size, calib.workers, calib.skip_bad)])
    return xs, held_out


def fidelity(base_logits: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """How faithful a pruned network is to the unpruned one, without labels: the mean
    KL(unpruned || pruned) of their softmax outputs, and top-1 agreement."""
    p, q = (torch.log_softmax(torch.from_numpy(np.asarray(z, dtype=np.float64)), 1) for z in (base_logits, logits))
    kl = float(torch.nn.functional.kl_div(q, p, reduction="batchmean", log_target=True))
    agree = float((base_logits.argmax(1) == logits.argmax(1)).mean())
    return {"kl": kl if np.isfinite(kl) else float("inf"), "agreement": agree}


def sensitivity_curves(ctx: Context, scores: dict[str, np.ndarray], opts: "PruneOptions", calib: DataOptions | None,
                       moments: Moments | None, xs: torch.Tensor, base_logits: np.ndarray,
                       points: int = len(SENSITIVITY_FRACTIONS), images: int = SENSITIVITY_IMAGES
                       ) -> tuple[list[list[tuple[int, float]] | None], int]:
    """Per group of ``ctx.graph``: (channels removed, KL(unpruned || pruned)) for the network
    with only that group cut, its lowest-scored channels first, at ``points`` fractions of
    its width (the sensitivity allocation's input). Each cut gets the plan's compensation
    fold from the moments file (ls, or mean; none with ``--compensation none``) and no
    BatchNorm re-estimation; KL on the first ``images`` of ``xs``. Returns the curves and
    the number of cuts measured."""
    from ..compare.logits import chunks, collect_logits, forward_fn
    from .budget import alone, block_scores, group_scores

    fold = "none" if opts.compensation == "none" else "mean" if opts.compensation == "mean" else "ls"
    if fold != "none" and not (moments is not None and moments.inputs):
        fold = "none"  # a fold without second moments would read the calibration images per cut
    quick = opts.model_copy(update={"compensation": fold, "bn_recalibrate": False})
    fractions = SENSITIVITY_FRACTIONS if points >= len(SENSITIVITY_FRACTIONS) else \
        tuple(np.linspace(SENSITIVITY_FRACTIONS[0], SENSITIVITY_FRACTIONS[-1], points))
    xs, base_logits = xs[:max(1, images)], base_logits[:max(1, images)]
    gs = block_scores(ctx.graph, group_scores(ctx.graph, scores))
    curves: list[list[tuple[int, float]] | None] = []
    cuts = 0
    quiet = logging.getLogger("tvsprune.pruning.compensation")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the per-consumer fit warnings, once per cut, say nothing new
    try:
        for i, t in enumerate(gs):
            if t is None:
                curves.append(None)
                continue
            order = removal_order(t)
            cap = opts.guards.max_removable(len(t))
            curve: list[tuple[int, float]] = []
            for f in fractions:
                n = min(cap, max(1, int(round(f * len(t)))))
                n = opts.guards.clamp(len(t), n)  # a cut the plan can make: the kept width aligned (round_to)
                if n <= (curve[-1][0] if curve else 0):
                    continue
                cut = alone(ctx.graph, i, np.sort(order[:n]))
                model = build_pruned(ctx, Plan(plan_groups(ctx.graph, cut), {}), quick, calib, moments, {})
                curve.append((n, fidelity(base_logits, collect_logits(forward_fn(model), chunks(xs))[0])["kl"]))
                cuts += 1
            curves.append(curve or None)
    finally:
        quiet.setLevel(level)
    return curves, cuts


def sensitivity_budget(ctx: Context, images: int) -> tuple[int, int]:
    """(grid points per group, images per cut) that fit SENSITIVITY_BUILDS cuts and
    SENSITIVITY_WORK: the full grid on 256 images for CIFAR-sized networks; fewer images
    (down to SENSITIVITY_MIN_IMAGES), then fewer points, for larger ones. Deterministic:
    it depends on the network and the image count, not on the machine."""
    live = max(1, sum(1 for g in ctx.graph.groups if g.root not in ctx.graph.rigid))
    macs = max(1.0, float(ctx.cost.cost()[1]))
    points = min(len(SENSITIVITY_FRACTIONS), SENSITIVITY_BUILDS // live)
    while points > 0:
        n = int(min(SENSITIVITY_IMAGES, images, SENSITIVITY_WORK / (points * live * macs)))
        if n >= min(SENSITIVITY_MIN_IMAGES, images):
            return points, n
        points -= 1
    return 0, 0


def select_plan(ctx: Context, moments: Moments | None, opts: "PruneOptions", calib: DataOptions | None,
                cands: list[tuple[str | None, str]], tv: dict[str, np.ndarray], scores: dict[str, np.ndarray],
                plan_kw: dict[str, Any]) -> dict[str, Any]:
    """Plan, prune and repair each candidate (tvs combination, allocation); keep the one whose
    repaired network is most faithful to the unpruned one on calibration images the repairs
    did not use (lowest KL divergence; no labels needed). One candidate: no selection."""
    from ..compare.logits import chunks, collect_logits, forward_fn

    xs = base = None
    auto_comp = opts.compensation == "auto"
    if auto_comp:
        opts = opts.model_copy(update={"compensation": "ls"})
        n_repair = 0
        if calib is not None:
            labels = calib.open(ctx.loaded).labels
            n_repair = len(stratified_indices(labels, opts.repair_samples_per_class, calib.seed))
        auto_comp = calib is not None and 0 < n_repair <= AUTO_SEQ_IMAGES
        if calib is not None and not auto_comp:
            log.info("compensation auto: ls (ls-seq is tried up to %d repair images; these are %d)", AUTO_SEQ_IMAGES,
                     n_repair)
    sensitive = any(a == "sensitivity" for _, a in cands)
    if sensitive and calib is None:
        raise TvsError("the sensitivity allocation measures the network on calibration images: give --calib-data")
    held_out = False
    if len(cands) > 1 or auto_comp or sensitive:
        xs, held_out = fidelity_images(calib, ctx.loaded, opts)
        base = collect_logits(forward_fn(ctx.loaded.module), chunks(xs))[0]
    if auto_comp and not held_out:
        # ls-seq is fitted on the repair images: compared on those same images it wins by
        # fitting them (measured: weights grown 5x, float32 error 4x, on 16 images per class)
        log.info("compensation auto: ls (ls-seq is tried only when the folder has images beyond the repair images)")
        auto_comp = False
    points, images = sensitivity_budget(ctx, len(xs)) if sensitive else (0, 0)
    if sensitive and len(cands) > 1 and points < SENSITIVITY_MIN_POINTS:
        log.info("allocation auto: no sensitivity candidate (this network needs more than %d single-group cuts "
                 "or %.0e MAC-images to measure)", SENSITIVITY_BUILDS, SENSITIVITY_WORK)
        cands = [c for c in cands if c[1] != "sensitivity"]
    best: dict[str, Any] | None = None
    trials = []
    total = len(cands) + auto_comp
    for k, (combine, allocation) in enumerate(cands, 1):
        with phase(f"candidate {k}/{total} ({combine or 'criterion'} scores, {allocation} allocation)"):
            best = _try_candidate(ctx, moments, opts, tv, scores, calib, xs, base, plan_kw, combine, allocation,
                                  points, images, trials, best)
    assert best is not None
    if auto_comp:  # the chosen plan again, re-fitted consumer by consumer
        t0 = time.perf_counter()
        report = {}
        with phase(f"candidate {total}/{total} (the chosen plan, re-fitted by ls-seq)"):
            model = build_pruned(ctx, best["plan"], opts.model_copy(update={"compensation": "ls-seq"}), calib,
                                 moments, report)
        trial = {**{k: best["trial"][k] for k in ("tvs_saliency", "allocation", "params_removed", "macs_removed",
                                                  "budget_met")},
                 "compensation": "ls-seq", **fidelity(base, collect_logits(forward_fn(model), chunks(xs))[0]),
                 "seconds": round(time.perf_counter() - t0, 2)}
        best["trial"]["compensation"] = "ls"
        trials.append(trial)
        if trial["kl"] < best["trial"]["kl"]:
            best.update(trial=trial, model=model, report=report, compensation="ls-seq")
    if len(trials) > 1:
        best["trial"]["chosen"] = True
        log.info("chose %s", ", ".join(f"{k}={best['trial'][k]}" for k in ("tvs_saliency", "allocation") if
                                       best["trial"][k] is not None))
        tv_kl = [t["kl"] for t in trials if t["tvs_saliency"] not in (None, "l1")]
        if best["combine"] == "l1" and tv_kl:
            log.info("tvs: the L1 filter norm ranks this network's channels more faithfully than the TV score "
                     "(held-out KL %.4f against %.4f at best); the plan uses it (prune.json: criterion.tvs_saliency)",
                     best["trial"]["kl"], min(tv_kl))
        best["selection"] = {"measure": "mean KL(unpruned || pruned) on " + (
                                 "calibration images the repairs did not use" if held_out else
                                 "the repair images (the folder holds no others)"),
                             "images": int(len(xs)), "held_out": held_out, "candidates": trials}
    return best


def _try_candidate(ctx: Context, moments: Moments | None, opts: PruneOptions, tv: dict, scores: dict,
                   calib: DataOptions | None, xs: Any, base: Any, plan_kw: dict[str, Any], combine: str | None,
                   allocation: str, points: int, images: int, trials: list,
                   best: dict[str, Any] | None) -> dict[str, Any] | None:
    """Build one candidate pruned network, measure its fidelity, and keep it when it ranks first."""
    from ..compare.logits import chunks, collect_logits, forward_fn

    t0 = time.perf_counter()
    sc = scores if combine is None else tvs_scores(ctx, moments, opts, tv, combine)
    extra: dict[str, Any] = {}
    curves = None
    if allocation == "sensitivity":
        step("measuring each group's sensitivity")
        images = images or min(SENSITIVITY_MIN_IMAGES, len(xs))  # asked for by name: the least grid
        key = ("curves", combine, max(1, points), images, opts.compensation)
        if key not in ctx.memo:  # a latency budget's re-plans cut the same groups again
            ctx.memo[key] = sensitivity_curves(ctx, sc, opts, calib, moments, xs, base, max(1, points), images)
        curves, cuts = ctx.memo[key]
        extra = {"sensitivity": {"cuts": cuts, "images": int(min(images, len(xs))),
                                 "seconds": round(time.perf_counter() - t0, 2)}}
    plan = make_plan(ctx.graph, ctx.cost, sc, allocation=allocation, curves=curves, **plan_kw)
    report: dict[str, Any] = {}
    model = build_pruned(ctx, plan, opts, calib, moments, report)
    trial = {"tvs_saliency": combine, "allocation": allocation,
             "params_removed": round(plan.meta["params"]["removed_frac"], 4),
             "macs_removed": round(plan.meta["macs"]["removed_frac"], 4),
             "budget_met": "unmet" not in plan.meta["budget"], **extra}
    if xs is not None:
        trial.update(fidelity(base, collect_logits(forward_fn(model), chunks(xs))[0]))
    trial["seconds"] = round(time.perf_counter() - t0, 2)
    trials.append(trial)
    # a candidate that misses the budget (its rule cannot reach it) ranks after every one that
    # meets it: removing less is always more faithful, and would otherwise win by not pruning
    rank = (not trial["budget_met"], trial.get("kl", 0.0))
    if best is None or rank < best["rank"]:
        best = {"trial": trial, "plan": plan, "model": model, "report": report, "scores": sc,
                "combine": combine, "compensation": opts.compensation, "rank": rank}
    else:
        del model
    return best
