"""The prune stage: model + moments -> plan.json, pruned.safetensors, prune.json; and replay."""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..artifacts import atomic_paths, sha256_file, write_json
from ..calibration.moments import Moments
from ..data.options import DataOptions
from ..console import step
from ..data import BatchStream, stratified_indices
from ..errors import TvsError
from ..models import LoadedModel, load_model
from ..registry import unknown
from ..version import __version__
from .artifact import SOURCE_FILE, WEIGHTS_FILE, keeps_source, refuse_repruning, save_pruned
from .budget import plan_warnings
from .context import Context, calib_options_from, repair_batches  # noqa: F401 (repair_batches re-exported)
from .criteria import criteria_needing
from .iterative import _accuracy, iterative
from .options import (LARGE_LOSS_POINTS, NEEDS_IMAGES, PruneOptions, allocation_choices, budget_record,  # noqa: F401
                      methods)
from .plan import Plan
from .repairs import build_pruned, repairs_of
from .scores import layer_scores, ldiff, spearman, tv_bound, tvs_scores
from .selection import select_plan
from .surgery import apply_plan

log = logging.getLogger(__name__)


def _quantiles(s: np.ndarray) -> dict[str, float]:
    q = np.quantile(s, [0.0, 0.25, 0.5, 0.75, 1.0])
    return dict(zip(["min", "q25", "median", "q75", "max"], map(float, q)))


def prune(model: str | LoadedModel, moments_path: str | Path | None, out_dir: str | Path,
          opts: PruneOptions, calib: DataOptions | None = None, val: DataOptions | None = None,
          log_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run one pruning method end to end and write its three artifacts into ``out_dir``; returns prune.json."""
    return prune_model(model, moments_path, out_dir, opts, calib, val, log_round)[0]


def _inputs(model: str | LoadedModel, moments_path: str | Path | None, opts: PruneOptions
            ) -> tuple[LoadedModel, Moments | None, list[int]]:
    """The model, its moments (checked against its weights) and the input shape."""
    if opts.method not in methods():
        raise TvsError(unknown("method", opts.method, methods()))
    loaded = refuse_repruning(model if isinstance(model, LoadedModel) else load_model(model))
    moments = Moments.load(moments_path) if moments_path else None
    needs_moments = opts.method in ("tvs", "iter-tvs", "mean-distance") and opts.structure == "channels"
    if needs_moments and moments is None:
        raise TvsError(f"method {opts.method!r} needs --moments (from tvsprune calibrate)")
    if moments is not None and loaded.weights_sha256 and moments.meta.get("weights_sha256") \
            and moments.meta["weights_sha256"] != loaded.weights_sha256:
        raise TvsError(f"{moments_path} was collected from other weights than {loaded.spec.weights} "
                       "(weights_sha256 differs): calibrate again")
    input_shape = (moments.meta.get("input_shape") if moments else None) or list(loaded.input_shape or [])
    if not input_shape:
        raise TvsError("the input shape is unknown: calibrate first, or use a zoo model")
    return loaded, moments, input_shape


def _check_moments_fit(ctx: Context, moments: Moments, path: Any) -> None:
    """Every layer of the moments file is one of the model's, with its number of channels."""
    layers = {l.name: l for l in ctx.probe.layers}
    for name, lm in moments.layers.items():
        info = layers.get(name)
        if info is None:
            raise TvsError(f"{path}: layer {name!r} is not a prunable layer of {ctx.loaded.spec.spec}: moments of "
                           "another model")
        if lm.mean.shape[1] != info.channels:
            raise TvsError(f"{path}: layer {name!r} has {lm.mean.shape[1]} channels in the moments, "
                           f"{info.channels} in the model: moments of another model")


def _scores(ctx: Context, moments: Moments | None, opts: PruneOptions, criterion: str
            ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, float]]:
    """The TV bound (when there are moments), the criterion's scores, and LDIFF per layer."""
    layers = [l.name for l in ctx.probe.layers]
    step("scoring filters")
    tv = tv_bound(moments, layers, opts.pair_reduce, opts.device, required=criterion == "tvs") if moments else {}
    if criterion == "tvs":
        scores = tvs_scores(ctx, moments, opts, tv)
    else:
        scores = layer_scores(criterion, ctx.loaded.module, moments, layers, ctx.stat_modules, opts.seed,
                              opts.pair_reduce, opts.device)
    if not scores:
        raise TvsError("no layer has scores: the moments file covers none of the model's prunable layers")
    return tv, scores, {n: ldiff(s) for n, s in (tv or scores).items()}


def _validation(val: DataOptions | None, calib: DataOptions | None, loaded: LoadedModel,
                classes: list[str] | None) -> tuple[list | None, list[str] | None]:
    """Validation batches (calibration images excluded when it is the same folder) and class names,
    which must be the calibration data's (``classes``): labels are positions in that list."""
    if val is None:
        return None, None
    exclude = None
    vsrc = val.open(loaded)
    if classes is not None and list(vsrc.classes) != list(classes):
        extra = sorted(set(vsrc.classes) - set(classes))[:3]
        missing = sorted(set(classes) - set(vsrc.classes))[:3]
        detail = (f"only in it: {', '.join(extra)}; missing: {', '.join(missing)}" if extra or missing
                  else "the same names in another order")
        raise TvsError(f"--val-data {val.path}: its classes are not the calibration data's ({detail}): labels would "
                       "be compared by position and the accuracy would be wrong")
    if calib is not None and Path(val.path).resolve() == Path(calib.path).resolve():
        csrc = calib.open(loaded)
        exclude = stratified_indices(csrc.labels, calib.samples_per_class, calib.seed)
        log.info("validation data is the calibration folder: excluding its %d calibration images", len(exclude))
    vidx = stratified_indices(vsrc.labels, val.samples_per_class, val.seed, exclude)
    if len(vidx) == 0:
        n = 0 if exclude is None else len(exclude)
        raise TvsError(f"no validation images left in {val.path} once its {n} calibration images are excluded: give "
                       "a held-out folder (prune --val-data, run's [data] evaluation) or calibrate on fewer per class")
    return list(BatchStream(vsrc, vidx, val.batch_size, val.workers, val.skip_bad)), vsrc.classes


def _record(loaded: LoadedModel, ctx: Context, moments: Moments | None, moments_path: str | Path | None,
            opts: PruneOptions, criterion: str, input_shape: list[int], calib: DataOptions | None) -> dict[str, Any]:
    """What the plan records of how it was made (and what ``replay`` needs to redo it)."""
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
        meta["repair_data"] = {**calib.model_dump(), "repair_samples_per_class": opts.repair_samples_per_class}
    return meta


def _iterative_plan(ctx: Context, moments: Moments | None, opts: PruneOptions, calib: DataOptions | None,
                    val_batches: list | None, base_acc: float | None, target: float | None, metric: str,
                    log_round: Callable[[dict[str, Any]], None] | None) -> tuple[Plan, list[dict[str, Any]]]:
    """iter-tvs: the accepted rounds' plan, with its budget and costs recorded."""
    if val_batches is None or calib is None:
        raise TvsError("iter-tvs needs --val-data (held-out images) and calibration data")
    plan, rounds = iterative(ctx, moments, opts, calib, val_batches, base_acc, log_round)
    p, m = ctx.cost.cost(plan.removed())
    bp, bm = ctx.cost.cost()
    plan.meta = {"allocation": opts.allocation_for(metric), "budget": {"metric": metric, "target": target,
                                                                       "stop": rounds[-1]["stop"]},
                 "params": {"before": bp, "after": p, "removed_frac": 1 - p / bp},
                 "macs": {"before": bm, "after": m, "removed_frac": 1 - m / bm}}
    return plan, rounds


def _chosen_plan(ctx: Context, moments: Moments | None, opts: PruneOptions, calib: DataOptions | None,
                 criterion: str, tv: dict[str, np.ndarray], scores: dict[str, np.ndarray],
                 ldiffs: dict[str, float], target: float | None, metric: str) -> dict[str, Any]:
    """One-shot: the candidates ``auto`` compares (or the one asked for), planned, pruned, repaired."""
    plain = "none" if opts.tvs_saliency == "auto" else opts.tvs_saliency
    cands = [(plain if criterion == "tvs" else None, opts.allocation_for(metric))]
    if opts.threshold is None:
        cands = [(c, a) for c, a in opts.candidates(metric, criterion)
                 if not (c == "ls" and not (moments and moments.inputs))]  # no second moments: no ls
    if len(cands) > 1 and calib is None:
        log.info("no calibration images to choose the allocation on: using %s", cands[0][1])
        cands = cands[:1]
    return select_plan(ctx, moments, opts, calib, cands, tv, scores, dict(target=target, metric=metric,
                       threshold=opts.threshold, guards=opts.guards, ldiffs=ldiffs, cost_power=opts.cost_power))


def _fit_latency(ctx: Context, moments: Moments | None, opts: PruneOptions, calib: DataOptions | None,
                 criterion: str, tv: dict[str, np.ndarray], scores: dict[str, np.ndarray], ldiffs: dict[str, float],
                 chosen: dict[str, Any], input_shape: list[int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A latency budget: the chosen network measured against the base on the latency backend,
    and re-planned (the chosen candidate only) until it lands on the target (:func:`.latency.fit`)."""
    from ..compare.on_backend import measure_speedup
    from .latency import fit

    fixed = {"allocation": chosen["trial"]["allocation"], "compensation": chosen["compensation"]}
    if criterion == "tvs":
        fixed["tvs_saliency"] = chosen["combine"]
    narrowed = opts.model_copy(update=fixed)

    def build(removed: float) -> dict[str, Any]:
        again = _chosen_plan(ctx, moments, narrowed, calib, criterion, tv, scores, ldiffs, removed, "latency")
        return {**again, "selection": chosen.get("selection"), "combine": chosen["combine"]}

    def measure(model: torch.nn.Module) -> dict[str, float]:
        step(f"measuring the pruned network against the base on {opts.latency_backend} at batch "
             f"{opts.latency_batch}")
        return measure_speedup(opts.latency_backend, ctx.loaded.module, model, input_shape, opts.latency_batch,
                               opts.latency_precision)

    best, record = fit(chosen, build, measure, opts.target_latency)
    table = ctx.cost.table.latency
    record = {"backend": opts.latency_backend, "batch": opts.latency_batch, "precision": opts.latency_precision,
              "round_to": opts.block, **record, "table": table.info}
    return best, record


def prune_model(model: str | LoadedModel, moments_path: str | Path | None, out_dir: str | Path,
                opts: PruneOptions, calib: DataOptions | None = None, val: DataOptions | None = None,
                log_round: Callable[[dict[str, Any]], None] | None = None
                ) -> tuple[dict[str, Any], torch.nn.Module, Plan]:
    """:func:`prune`, also returning the pruned module and its plan."""
    t_start = time.perf_counter()
    if opts.target_latency is not None:  # a backend that cannot run here: said before anything loads
        from .latency import check_backend

        check_backend(opts.latency_backend)
    loaded, moments, input_shape = _inputs(model, moments_path, opts)
    step("tracing the channel dependency graph")
    ctx = Context.build(loaded, input_shape)
    if moments is not None:
        _check_moments_fit(ctx, moments, moments_path)
    calib = calib_options_from(moments, calib) if moments is not None else calib
    target, metric = opts.budget()
    if target is None and opts.threshold is None:
        raise TvsError("give a budget (--keep-params F or --keep-macs F) or --threshold ETA")
    if metric == "latency" and opts.structure == "channels":  # the blocks walk times whole networks instead
        from .latency import measure_table

        ctx.cost.table.latency = measure_table(loaded.module, ctx.cost.table, ctx.graph, input_shape,
                                               opts.latency_backend, opts.latency_batch, opts.guards,
                                               opts.latency_precision, opts.latency_model, ctx.probe.logits_layer)
    criterion = "tvs" if opts.method == "iter-tvs" else opts.method
    tv, scores, ldiffs = _scores(ctx, moments, opts, criterion) if opts.structure == "channels" else ({}, {}, {})
    val_batches, val_classes = _validation(val, calib, loaded, moments.classes if moments else None)
    source_classes = val_classes or (moments.classes if moments else None)
    n_classes = ctx.probe.num_outputs
    base_acc = base_per = None
    if val_batches is not None:
        base_acc, base_per, _ = _accuracy(loaded.module, val_batches, n_classes)
    meta = _record(loaded, ctx, moments, moments_path, opts, criterion, input_shape, calib)
    rounds: list[dict[str, Any]] = []
    selection = None
    if opts.method == "iter-tvs":
        plan, rounds = _iterative_plan(ctx, moments, opts, calib, val_batches, base_acc, target, metric, log_round)
    else:
        if opts.structure == "blocks":  # whole blocks replaced, no channel removed (pruning/blocks.py)
            from .block_walk import blocks_chosen

            chosen, latency_record = blocks_chosen(loaded, opts, calib, input_shape)
        else:
            chosen = _chosen_plan(ctx, moments, opts, calib, criterion, tv, scores, ldiffs, target, metric)
        if metric == "latency" and opts.structure == "channels":
            chosen, latency_record = _fit_latency(ctx, moments, opts, calib, criterion, tv, scores, ldiffs, chosen,
                                                  input_shape)
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
    report = _report(loaded, ctx, opts, plan, meta, repair_report, selection, scores, ldiffs, tv)
    if metric == "latency":
        report["latency"] = latency_record
        report["budget"]["in_words"] += f" on {opts.latency_backend} at batch {opts.latency_batch}"
    for msg in plan_warnings(report, aligned=metric == "latency" or opts.block != 1):
        report.setdefault("warnings", []).append(msg)
        log.warning(msg)
    if val_batches is not None:
        step("measuring accuracy")
        acc, per, _ = _accuracy(pruned, val_batches, n_classes)
        report["accuracy"] = {"before": base_acc, "after": acc, "drop_points": (base_acc - acc) * 100,
                              "samples": sum(len(y) for _, y in val_batches)}
        report["per_class"] = [{"class": c, "before": b, "after": a, "change_points": (a - b) * 100}
                               for c, b, a in zip(source_classes or range(n_classes), base_per, per)]
        lost = report["accuracy"]["drop_points"]
        if lost > max(LARGE_LOSS_POINTS, opts.max_acc_drop if opts.method == "iter-tvs" else LARGE_LOSS_POINTS):
            log.warning("the pruned network loses %.1f points of top-1 on %d held-out images: keep more (a larger "
                        "--keep-macs / --keep-params / --target-latency), give calibrate more images per class, or compare "
                        "--allocation sensitivity", lost, report["accuracy"]["samples"])
    if rounds:
        report["rounds"] = [r for r in rounds if "stop" not in r]
        report["stop"] = rounds[-1]["stop"]
    report["elapsed_s"] = round(time.perf_counter() - t_start, 2)
    if moments is not None:  # what a logit means: bench refuses evaluation data of other classes
        report["classes"] = list(moments.classes)
    _write(Path(out_dir), pruned, plan, loaded, input_shape, meta, report)
    return report, pruned, plan


def _report(loaded: LoadedModel, ctx: Context, opts: PruneOptions, plan: Plan, meta: dict[str, Any],
            repair_report: dict[str, Any], selection: dict[str, Any] | None, scores: dict[str, np.ndarray],
            ldiffs: dict[str, float], tv: dict[str, np.ndarray]) -> dict[str, Any]:
    """prune.json's content before accuracy: budget, repairs, selection, per-layer widths and scores."""
    report: dict[str, Any] = {"tvsprune_version": __version__, "method": opts.method,
                              "model": loaded.spec.to_dict(), "params": plan.meta["params"],
                              "macs": plan.meta["macs"], "budget": budget_record(plan.meta.get("budget")),
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
    return report


def _write(out_dir: Path, pruned: torch.nn.Module, plan: Plan, loaded: LoadedModel, input_shape: list[int],
           meta: dict[str, Any], report: dict[str, Any]) -> None:
    """The files of one artifact, each written beside its target and renamed onto it once all are
    written: a failure (disk full) leaves none of the new files, and an earlier artifact whole."""
    final = [out_dir / WEIGHTS_FILE, out_dir / "plan.json", out_dir / "prune.json"]
    final += [out_dir / SOURCE_FILE] if keeps_source(loaded) else []
    with atomic_paths(final) as tmps:
        save_pruned(tmps[0], pruned, plan, loaded, input_shape, {"repairs": meta["repairs"]},
                    source_copy=tmps[3] if len(tmps) > 3 else None)
        plan.save(tmps[1])
        report["artifacts"] = {"plan": str(final[1]), "weights": str(final[0]), "weights_sha256": sha256_file(tmps[0]),
                               "plan_sha256": sha256_file(tmps[1])}
        write_json(tmps[2], report)


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
    if plan.meta.get("replaced"):
        raise TvsError(f"{plan_path} replaces whole blocks by fitted convolutions: load its artifact folder")
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
        per_class = recorded.pop("repair_samples_per_class", PruneOptions.default("repair_samples_per_class"))
        opts = PruneOptions.build(repair_samples_per_class=per_class, **repairs)
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
            calib = DataOptions.build(**recorded)
        if calib is None and (opts.needs_images or (moments is not None and not moments.inputs)):
            where = recorded.get("path") or "not recorded"
            raise TvsError(f"{plan_path} was made with repairs that need its calibration images ({where}): "
                           "give --calib-data, or --structure-only")
        module = build_pruned(Context.build(loaded, shape), plan, opts, calib, moments)
    if out_dir is not None:
        save_pruned(Path(out_dir) / WEIGHTS_FILE, module, plan, loaded, shape, {"repairs": repairs})
    return module


__all__ = ["PruneOptions", "allocation_choices", "methods", "prune", "repair_batches", "replay"]
