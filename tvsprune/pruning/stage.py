"""The prune stage: model + moments -> plan.json, pruned.safetensors, prune.json."""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import __version__
from ..artifacts import sha256_file, write_json
from ..calibration.collector import collect_moments
from ..calibration.moments import Moments
from ..calibration.stage import DataOptions
from ..data import BatchStream, stratified_indices
from ..console import short_list, step
from ..errors import TvsError
from ..registry import unknown
from ..models import LoadedModel, load_model
from ..models.probe import ModelProbe, probe_model
from .artifact import SOURCE_FILE, WEIGHTS_FILE, save_pruned
from .costs import CostModel, output_shapes
from .graph import ChannelGraph
from .plan import ALLOCATIONS, Guards, Plan, make_plan, plan_groups, removal_order
from .criteria import CRITERIA, criteria_needing
from .compensation import COMPENSATIONS, DEFAULT_RIDGE, fold_from_moments, refit_sequential, removed_inputs
from .repairs import consumer_input_means, recalibrate_batchnorm
from .saliency import ls_saliency
from .scores import layer_scores, ldiff, spearman
from .surgery import apply_plan

log = logging.getLogger(__name__)
def methods() -> tuple[str, ...]:
    """tvs, iter-tvs, then every other registered criterion (read when asked: a criterion
    registered later is a method too)."""
    return ("tvs", "iter-tvs") + tuple(c for c in CRITERIA.names() if c != "tvs")


def allocation_choices() -> tuple[str, ...]:
    return ("auto",) + ALLOCATIONS.names()

# how the TV score is combined before allocation: "none" (the TV score alone), "ls" (times the
# least-squares saliency: least discriminative *and* most reconstructable), "l2" (times the
# filter's L2 norm), "auto" (the most faithful of them, see select_plan)
TVS_SALIENCY = ("auto", "ls", "l2", "none")
DEFAULT_TARGET_PARAMS = 0.3  # the budget when none is given (CLI, Python API and run alike)
NEEDS_IMAGES = ("the repairs need calibration images (BatchNorm re-estimation, ls-seq, or mean compensation from an "
                "old moments file): give --calib-data (the moments file's data folder was not found) or --no-repair")


def _by_max(t: np.ndarray) -> np.ndarray:
    top = t.max()
    return t / top if top > 0 else np.ones_like(t)


def tvs_scores(ctx: "Context", moments: Moments, opts: "PruneOptions",
               tv: dict[str, np.ndarray] | None = None, combine: str | None = None) -> dict[str, np.ndarray]:
    """TVSPrune's per-layer scores: the TV lower bound (``tv`` when already computed), combined
    as ``combine`` (default ``opts.tvs_saliency``; "auto" here means the TV score alone)."""
    layers = [l.name for l in ctx.probe.layers]
    combine = combine or opts.tvs_saliency
    if tv is None:
        tv = layer_scores("tvs", None, moments, layers, pair_reduce=opts.pair_reduce, device=opts.device)
    if combine in ("none", "auto") or opts.threshold is not None:
        return tv
    if combine == "l2":
        other = layer_scores("l2", ctx.loaded.module, None, layers, ctx.stat_modules)
    elif not moments.inputs:
        log.warning("the moments file has no input second moments: tvs ranks by the TV score alone")
        return tv
    else:
        other = ls_saliency(ctx.graph, moments.inputs, layers, opts.ridge)
    out = {}
    for name, t in tv.items():
        s = other.get(name)
        # no consumer statistics for this layer: TV alone
        out[name] = _by_max(t) if s is None or not (s.max() > 0) else _by_max(t) * (s / s.max())
    return out


@dataclass
class PruneOptions:
    method: str = "tvs"
    target_params: float | None = None
    target_flops: float | None = None
    threshold: float | None = None
    # "auto": the candidates of AUTO_CANDIDATES / AUTO_ALLOCATIONS, chosen by fidelity (select_plan);
    # without calibration images cost for parameter budgets, global for MAC budgets (cost
    # keeps VGG-11 within 1 point at 60 % of parameters where global loses 4; it drains
    # ResNet-20's fragile early layers under a MAC budget, where global does not)
    allocation: str = "auto"
    cost_power: float = 2.0
    guards: Guards = field(default_factory=Guards)
    pair_reduce: str = "min"
    seed: int = 0
    # repairs: the defaults are the best configuration the accuracy benchmark found
    # "auto": ls, and ls-seq too when the repair images are few enough (AUTO_SEQ_IMAGES) and
    # others are held out to compare on; the more faithful network is kept (ls-seq won on
    # ResNet-20 and tied on VGG-11)
    compensation: str = "auto"
    bn_recalibrate: bool = True
    ridge: float = DEFAULT_RIDGE
    mean_compensation: bool = False  # deprecated spelling of compensation="mean"
    repair_samples_per_class: int | None = 100
    # iterative
    max_acc_drop: float = 2.0     # points
    step: float = 0.05            # fraction of the original metric removed per round
    step_decrease: float = 0.025  # the reference code's step shrink on rejection
    max_rounds: int = 50
    compare_criteria: bool = True
    # tvs: how the TV score is combined (TVS_SALIENCY); "auto" tries the combinations with the
    # allocations that suit the budget (AUTO_CANDIDATES) and keeps the most faithful pruned
    # network: no single one won on both ResNet-20 and VGG-11 in the accuracy benchmark
    tvs_saliency: str = "auto"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.target_params is None and self.target_flops is None and self.threshold is None:
            self.target_params = DEFAULT_TARGET_PARAMS  # one default budget for the CLI, the API and run
        if self.tvs_saliency not in TVS_SALIENCY:
            raise TvsError(f"unknown tvs saliency {self.tvs_saliency!r} (one of {', '.join(TVS_SALIENCY)})")
        if self.mean_compensation:
            self.compensation, self.mean_compensation = "mean", False
        if self.allocation not in allocation_choices():
            raise TvsError(unknown("allocation", self.allocation, allocation_choices()))
        if self.compensation not in COMPENSATIONS:
            raise TvsError(f"unknown compensation {self.compensation!r} (one of {', '.join(COMPENSATIONS)})")

    @property
    def repairs(self) -> dict[str, Any]:
        return {"compensation": self.compensation, "bn_recalibrate": self.bn_recalibrate, "ridge": self.ridge}

    @property
    def needs_images(self) -> bool:
        return self.bn_recalibrate or self.compensation == "ls-seq"

    @classmethod
    def no_repair(cls, **kw: Any) -> "PruneOptions":
        return cls(compensation="none", bn_recalibrate=False, **kw)

    def allocation_for(self, metric: str) -> str:
        """The allocation used for a budget in ``metric`` (params or macs) where no selection runs."""
        if self.allocation != "auto":
            return self.allocation
        return "cost" if metric == "params" else "global"

    def candidates(self, metric: str, criterion: str) -> list[tuple[str | None, str]]:
        """(tvs combination or None, allocation) pairs that ``auto`` chooses among
        (select_plan leaves ``sensitivity`` out on networks with too many groups)."""
        combos = [None] if criterion != "tvs" else None if self.tvs_saliency == "auto" else [self.tvs_saliency]
        if self.allocation == "auto" and combos is None:
            return list(AUTO_CANDIDATES[metric])
        allocs = AUTO_ALLOCATIONS[metric] if self.allocation == "auto" else (self.allocation,)
        return [(c, a) for c in (combos or ("none", "l2", "ls")) for a in allocs]

    def budget(self) -> tuple[float | None, str]:
        if self.target_params is not None and self.target_flops is not None:
            raise TvsError("give --target-params or --target-flops, not both")
        if self.target_flops is not None:
            return self.target_flops, "macs"
        return self.target_params, "params"


# what ``auto`` tries, by budget metric (benchmarks/accuracy_vs_sparsity.py): the TV score
# with the cost rule wins VGG-11's parameter budgets, TV x L2 with one global threshold
# ResNet-20's, and TV x LS saliency counted by filter magnitude ResNet-20's MAC budgets; the
# cost rule is ruinous under MAC budgets on both (it drains the MAC-heavy early layers);
# TV x LS saliency with measured per-group sensitivity wins VGG-11's MAC budget
AUTO_CANDIDATES = {"params": (("none", "cost"), ("l2", "global"), ("ls", "magnitude"), ("ls", "sensitivity")),
                   "macs": (("none", "global"), ("l2", "global"), ("ls", "magnitude"), ("ls", "sensitivity"))}
AUTO_ALLOCATIONS = {"params": ("cost", "global", "magnitude", "sensitivity"),
                    "macs": ("global", "magnitude", "sensitivity")}
FIDELITY_IMAGES = 1000  # calibration images the choice is measured on (at most; see fidelity_images)
AUTO_SEQ_IMAGES = 5000  # compensation auto tries ls-seq (a pass per consumer) up to this many repair images
SENSITIVITY_FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.9)  # of a group's channels, one cut each
SENSITIVITY_IMAGES = 256  # of those images, what each single-group cut is measured on (at most)
SENSITIVITY_MIN_IMAGES = 128  # fewer grid points before fewer images than this
SENSITIVITY_BUILDS = 96  # at most this many single-group cuts (fewer grid points per group beyond 13 groups)
SENSITIVITY_WORK = 3e12  # at most cuts x images x the network's MACs (VGG-11 on CIFAR-10: 2.8e12)
SENSITIVITY_MIN_POINTS = 3  # auto skips the sensitivity candidate where fewer than this fit per group


@dataclass
class Context:
    """What every step needs: the model, its probe, graph and cost model."""

    loaded: LoadedModel
    example: torch.Tensor
    probe: ModelProbe
    graph: ChannelGraph
    cost: CostModel

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
    return DataOptions(path=src, resize=pre.get("resize"), crop=pre.get("crop"), mean=pre.get("mean"),
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
        log.info("no calibration images beyond the repair images: the candidates are compared on those")
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
    from .plan import block_scores, group_scores

    fold = "none" if opts.compensation == "none" else "mean" if opts.compensation == "mean" else "ls"
    if fold != "none" and not (moments is not None and moments.inputs):
        fold = "none"  # a fold without second moments would read the calibration images per cut
    quick = replace(opts, compensation=fold, bn_recalibrate=False)
    fractions = SENSITIVITY_FRACTIONS if points >= len(SENSITIVITY_FRACTIONS) else \
        tuple(np.linspace(SENSITIVITY_FRACTIONS[0], SENSITIVITY_FRACTIONS[-1], points))
    xs, base_logits = xs[:max(1, images)], base_logits[:max(1, images)]
    gs = block_scores(ctx.graph, group_scores(ctx.graph, scores))
    none = np.empty(0, dtype=np.int64)
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
                if n <= (curve[-1][0] if curve else 0):
                    continue
                cut = [ctx.graph.groups[i].expand(np.sort(order[:n])) if j == i else none
                       for j in range(len(ctx.graph.groups))]
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
        opts = replace(opts, compensation="ls")
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
    if len(cands) > 1 or auto_comp:
        step(f"choosing among {len(cands) + auto_comp} candidate pruned networks on calibration images")
    best: dict[str, Any] | None = None
    trials = []
    for combine, allocation in cands:
        t0 = time.perf_counter()
        sc = scores if combine is None else tvs_scores(ctx, moments, opts, tv, combine)
        extra: dict[str, Any] = {}
        curves = None
        if allocation == "sensitivity":
            step("measuring each group's sensitivity")
            images = images or min(SENSITIVITY_MIN_IMAGES, len(xs))  # asked for by name: the least grid
            curves, cuts = sensitivity_curves(ctx, sc, opts, calib, moments, xs, base, max(1, points), images)
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
    assert best is not None
    if auto_comp:  # the chosen plan again, re-fitted consumer by consumer
        t0 = time.perf_counter()
        report = {}
        model = build_pruned(ctx, best["plan"], replace(opts, compensation="ls-seq"), calib, moments, report)
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
        best["selection"] = {"measure": "mean KL(unpruned || pruned) on " + (
                                 "calibration images the repairs did not use" if held_out else
                                 "the repair images (the folder holds no others)"),
                             "images": int(len(xs)), "held_out": held_out, "candidates": trials}
    return best


def _quantiles(s: np.ndarray) -> dict[str, float]:
    q = np.quantile(s, [0.0, 0.25, 0.5, 0.75, 1.0])
    return dict(zip(["min", "q25", "median", "q75", "max"], map(float, q)))


def prune(model: str | LoadedModel, moments_path: str | Path | None, out_dir: str | Path,
          opts: PruneOptions, calib: DataOptions | None = None, val: DataOptions | None = None,
          log_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run one pruning method end to end and write its three artifacts into ``out_dir``; returns prune.json."""
    return prune_model(model, moments_path, out_dir, opts, calib, val, log_round)[0]


def prune_model(model: str | LoadedModel, moments_path: str | Path | None, out_dir: str | Path,
                opts: PruneOptions, calib: DataOptions | None = None, val: DataOptions | None = None,
                log_round: Callable[[dict[str, Any]], None] | None = None
                ) -> tuple[dict[str, Any], torch.nn.Module, Plan]:
    """:func:`prune`, also returning the pruned module and its plan."""
    t_start = time.perf_counter()
    if opts.method not in methods():
        raise TvsError(unknown("method", opts.method, methods()))
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    moments = Moments.load(moments_path) if moments_path else None
    needs_moments = opts.method in ("tvs", "iter-tvs", "mean-distance")
    if needs_moments and moments is None:
        raise TvsError(f"method {opts.method!r} needs --moments (from tvsprune calibrate)")
    if moments is not None and loaded.weights_sha256 and moments.meta.get("weights_sha256") \
            and moments.meta["weights_sha256"] != loaded.weights_sha256:
        raise TvsError(f"{moments_path} was collected from other weights than {loaded.spec.weights} "
                       "(weights_sha256 differs): calibrate again")
    input_shape = (moments.meta.get("input_shape") if moments else None) or list(loaded.input_shape or [])
    if not input_shape:
        raise TvsError("the input shape is unknown: calibrate first, or use a zoo model")
    step("tracing the channel dependency graph")
    ctx = Context.build(loaded, input_shape)
    calib = calib_options_from(moments, calib) if moments is not None else calib
    target, metric = opts.budget()
    if target is None and opts.threshold is None:
        raise TvsError("give a budget (--target-params F or --target-flops F) or --threshold ETA")
    layers = [l.name for l in ctx.probe.layers]
    criterion = "tvs" if opts.method == "iter-tvs" else opts.method
    step("scoring filters")
    tv = layer_scores("tvs", None, moments, layers, pair_reduce=opts.pair_reduce, device=opts.device) \
        if moments else {}
    if criterion == "tvs":
        scores = tvs_scores(ctx, moments, opts, tv)
    else:
        scores = layer_scores(criterion, loaded.module, moments, layers, ctx.stat_modules, opts.seed,
                              opts.pair_reduce, opts.device)
    if not scores:
        raise TvsError("no layer has scores: the moments file covers none of the model's prunable layers")
    ldiffs = {n: ldiff(s) for n, s in (tv or scores).items()}

    val_batches: list | None = None
    source_classes = moments.classes if moments else None
    if val is not None:
        exclude = None
        vsrc = val.open(loaded)
        if calib is not None and Path(val.path).resolve() == Path(calib.path).resolve():
            csrc = calib.open(loaded)
            exclude = stratified_indices(csrc.labels, calib.samples_per_class, calib.seed)
            log.info("validation data is the calibration folder: excluding its %d calibration images", len(exclude))
        vidx = stratified_indices(vsrc.labels, val.samples_per_class, val.seed, exclude)
        if len(vidx) == 0:
            raise TvsError(f"no validation images left in {val.path} once the {len(exclude or [])} calibration "
                           "images are excluded: give --val-data a held-out folder")
        val_batches = list(BatchStream(vsrc, vidx, val.batch_size, val.workers, val.skip_bad))
        source_classes = vsrc.classes
    n_classes = ctx.probe.num_outputs
    base_acc = base_per = None
    if val_batches is not None:
        base_acc, base_per, _ = _accuracy(loaded.module, val_batches, n_classes)

    meta = {"tvsprune_version": __version__, "model": loaded.spec.to_dict(), "weights_sha256": loaded.weights_sha256,
            "input_shape": input_shape, "logits_layer": ctx.probe.logits_layer,
            "moments_sha256": sha256_file(moments_path) if moments_path else None,
            "criterion": {"method": opts.method, "pair_reduce": opts.pair_reduce, "seed": opts.seed,
                          "tvs_saliency": opts.tvs_saliency if criterion == "tvs" else None,
                          "resolution": moments.meta.get("resolution") if moments else None},
            "repairs": opts.repairs}
    if moments_path and opts.compensation in ("mean", "ls", "auto"):
        meta["moments_path"] = str(Path(moments_path).resolve())  # what `replay` reads the fold from
    if calib is None and opts.needs_images:
        raise TvsError(NEEDS_IMAGES)
    if calib is not None and (opts.compensation != "none" or opts.bn_recalibrate):
        # what `replay` needs to redo the repairs bit for bit (batch size included: BatchNorm
        # re-estimation averages per-batch statistics)
        meta["repair_data"] = {**asdict(calib), "repair_samples_per_class": opts.repair_samples_per_class}
    rounds: list[dict[str, Any]] = []
    selection = None
    if opts.method == "iter-tvs":
        if val_batches is None or calib is None:
            raise TvsError("iter-tvs needs --val-data (held-out images) and calibration data")
        plan, rounds = iterative(ctx, moments, opts, calib, val_batches, base_acc, log_round)
        p, m = ctx.cost.cost(plan.removed())
        bp, bm = ctx.cost.cost()
        plan.meta = {"allocation": opts.allocation_for(metric), "budget": {"metric": metric, "target": target,
                                                               "stop": rounds[-1]["stop"]},
                     "params": {"before": bp, "after": p, "removed_frac": 1 - p / bp},
                     "macs": {"before": bm, "after": m, "removed_frac": 1 - m / bm}}
    else:
        plain = "none" if opts.tvs_saliency == "auto" else opts.tvs_saliency
        cands = [(plain if criterion == "tvs" else None, opts.allocation_for(metric))]
        if opts.threshold is None:
            cands = [(c, a) for c, a in opts.candidates(metric, criterion)
                     if not (c == "ls" and not (moments and moments.inputs))]  # no second moments: no ls
        if len(cands) > 1 and calib is None:
            log.info("no calibration images to choose the allocation on: using %s", cands[0][1])
            cands = cands[:1]
        chosen = select_plan(ctx, moments, opts, calib, cands, tv, scores, dict(target=target, metric=metric,
                             threshold=opts.threshold, guards=opts.guards, ldiffs=ldiffs, cost_power=opts.cost_power))
        plan, pruned, repair_report, scores = chosen["plan"], chosen["model"], chosen["report"], chosen["scores"]
        if criterion == "tvs":
            meta["criterion"]["tvs_saliency"] = chosen["combine"]
        meta["repairs"]["compensation"] = chosen["compensation"]
        selection = chosen.get("selection")
    if opts.method == "iter-tvs" and meta["repairs"]["compensation"] == "auto":
        meta["repairs"]["compensation"] = "ls"  # what build_pruned does with auto outside select_plan
    plan.meta = {**meta, **plan.meta}
    if opts.method == "iter-tvs":
        repair_report = {}
        pruned = build_pruned(ctx, plan, opts, calib, moments, repair_report)

    out_dir = Path(out_dir)
    report: dict[str, Any] = {"tvsprune_version": __version__, "method": opts.method,
                              "model": loaded.spec.to_dict(), "params": plan.meta["params"],
                              "macs": plan.meta["macs"], "budget": plan.meta.get("budget"),
                              "allocation": plan.meta.get("allocation"), "repairs": meta["repairs"],
                              "repair_steps": repair_report}
    if selection:
        report["selection"] = selection
    kept = plan.layers()
    layers_report = []
    for l in ctx.probe.layers:
        s = scores.get(l.name)
        row = {"layer": l.name, "channels_before": l.channels,
               "channels_after": len(kept[l.name]) if l.name in kept else l.channels,
               "ldiff": ldiffs.get(l.name)}
        if s is not None:
            row["score_quantiles"] = _quantiles(s)
        layers_report.append(row)
    report["layers"] = layers_report
    if opts.compare_criteria and tv:
        corr: dict[str, dict[str, float]] = {}
        for c in criteria_needing("weights"):
            other = layer_scores(c, loaded.module, None, list(tv), ctx.stat_modules, opts.seed)
            corr[c] = {n: spearman(tv[n], other[n]) for n in tv}
        report["spearman_tvs_vs"] = corr
    if val_batches is not None:
        step("measuring accuracy")
        acc, per, _ = _accuracy(pruned, val_batches, n_classes)
        report["accuracy"] = {"before": base_acc, "after": acc, "drop_points": (base_acc - acc) * 100,
                              "samples": sum(len(y) for _, y in val_batches)}
        report["per_class"] = [{"class": c, "before": b, "after": a, "change_points": (a - b) * 100}
                               for c, b, a in zip(source_classes or range(n_classes), base_per, per)]
    if rounds:
        report["rounds"] = [r for r in rounds if "stop" not in r]
        report["stop"] = rounds[-1]["stop"]
    report["elapsed_s"] = round(time.perf_counter() - t_start, 2)

    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / WEIGHTS_FILE, out_dir / "plan.json", out_dir / "prune.json", out_dir / SOURCE_FILE]
    try:  # the three files are one artifact: a failure (disk full) leaves none of them
        save_pruned(files[0], pruned, plan, loaded, input_shape, {"repairs": meta["repairs"]})
        plan.save(files[1])
        report["artifacts"] = {"plan": str(files[1]), "weights": str(files[0]), "weights_sha256": sha256_file(files[0]),
                               "plan_sha256": sha256_file(files[1])}
        write_json(files[2], report)
    except BaseException:
        for f in files:
            f.unlink(missing_ok=True)
        raise
    return report, pruned, plan


def replay(model: str | LoadedModel, plan_path: str | Path, out_dir: str | Path | None = None,
           calib: DataOptions | None = None, structure_only: bool = False,
           moments_path: str | Path | None = None) -> torch.nn.Module:
    """Apply a saved plan to a fresh model built from the same spec and weights.

    When the plan was made with repairs (BatchNorm re-estimation, mean compensation),
    they are redone on the same calibration images (recorded in the plan, or ``calib``),
    which reproduces the pruned model exactly; ``structure_only`` skips them.
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    plan = Plan.load(plan_path)
    if plan.meta.get("weights_sha256") and loaded.weights_sha256 and plan.meta["weights_sha256"] != loaded.weights_sha256:
        raise TvsError(f"{plan_path} was made for other weights (weights_sha256 differs)")
    shape = plan.meta.get("input_shape") or list(loaded.input_shape or [])
    if not shape:
        raise TvsError(f"{plan_path} records no input shape and the model does not know its own")
    repairs = repairs_of(plan.meta)
    if structure_only or (repairs["compensation"] == "none" and not repairs["bn_recalibrate"]):
        module = apply_plan(copy.deepcopy(loaded.module), plan, torch.zeros(1, *shape), plan.meta.get("logits_layer"))
        repairs = {"compensation": "none", "bn_recalibrate": False, "ridge": repairs["ridge"]}
    else:
        recorded = dict(plan.meta.get("repair_data") or {})
        per_class = recorded.pop("repair_samples_per_class", PruneOptions.repair_samples_per_class)
        opts = PruneOptions(repair_samples_per_class=per_class, **repairs)
        moments = None
        if repairs["compensation"] in ("mean", "ls"):
            mpath = moments_path or plan.meta.get("moments_path")
            if not mpath or not Path(mpath).exists():
                raise TvsError(f"{plan_path} was made with {repairs['compensation']} compensation, which reads its "
                               f"moments file ({mpath or 'not recorded'}): give --moments, or --structure-only")
            moments = Moments.load(mpath)
            if plan.meta.get("moments_sha256") and sha256_file(mpath) != plan.meta["moments_sha256"]:
                raise TvsError(f"{mpath} is not the moments file {plan_path} was made with (sha256 differs)")
        if calib is None and recorded.get("path") and Path(recorded["path"]).exists():
            calib = DataOptions(**recorded)
        if calib is None and (opts.needs_images or (moments is not None and not moments.inputs)):
            where = recorded.get("path") or "not recorded"
            raise TvsError(f"{plan_path} was made with repairs that need its calibration images ({where}): "
                           "give --calib-data, or --structure-only")
        module = build_pruned(Context.build(loaded, shape), plan, opts, calib, moments)
    if out_dir is not None:
        save_pruned(Path(out_dir) / WEIGHTS_FILE, module, plan, loaded, shape, {"repairs": repairs})
    return module


__all__ = ["PruneOptions", "allocation_choices", "methods", "prune", "repair_batches", "replay"]
