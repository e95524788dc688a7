"""``tvsprune prune`` and ``tvsprune replay``."""
from __future__ import annotations

import argparse
import logging
from typing import Any

from .common import (_count, _device, _limited, _nonneg, add_model_args, add_preprocess_args, data_options,
                     defaults_from, loaded_model)

log = logging.getLogger("tvsprune")


def prune_options(args: argparse.Namespace):
    """The PruneOptions that ``tvsprune prune`` flags describe (defaults: PruneOptions' own)."""
    from ..pruning import PruneOptions

    if args.no_repair:
        return PruneOptions.from_args(args, compensation="none", bn_recalibrate=False)
    return PruneOptions.from_args(args)


def cmd_prune(args: argparse.Namespace) -> int:
    from ..console import print_table
    from ..pruning import prune

    opts = prune_options(args)
    _model_from_moments(args)
    calib = val = None
    if args.calib_data:
        calib = data_options(args, args.calib_data)
    if args.val_data:
        val = data_options(args, args.val_data, samples_per_class=args.val_samples_per_class)
    report = prune(loaded_model(args), args.moments, args.out, opts, calib, val,
                   log_round=lambda r: print("round " + "  ".join(f"{k}={v}" for k, v in r.items())))
    print_table([{k: v for k, v in row.items() if k != "score_quantiles"} for row in report["layers"]],
                title=f"{args.method}: channels per layer")
    p, m = report["params"], report["macs"]
    print(f"params {p['before']:,} -> {p['after']:,} ({p['removed_frac'] * 100:.1f} % removed); "
          f"MACs {m['before']:,} -> {m['after']:,} ({m['removed_frac'] * 100:.1f} % removed)")
    if "accuracy" in report:
        a = report["accuracy"]
        print(f"accuracy {a['before'] * 100:.2f} % -> {a['after'] * 100:.2f} % "
              f"({a['drop_points']:.2f} points lost) on {a['samples']} held-out images")
    lat = report.get("latency")
    if lat:
        lo, hi = lat["measured_range"]
        print(f"latency on {lat['backend']} at batch {lat['batch']}: {lat['measured']:.3f} of the base measured "
              f"({lat['speedup']:.2f}x faster, rounds {1 / hi:.2f}-{1 / lo:.2f}x), {lat['predicted']:.3f} predicted, "
              f"{lat['target']:.3f} asked" + ("" if lat["hit"] else ": MISSED"))
        if lat.get("replaced"):
            print("blocks replaced: " + ", ".join(f"{n} ({f})" for n, f in lat["replaced"].items()))
    print(f"wrote {args.out}/plan.json, pruned.safetensors, prune.json")
    return 0


def _round_to(text: str) -> int | str:
    return "auto" if text == "auto" else _count(text)


_round_to.__name__ = "round_to"  # argparse names the type in its message


def _backend_names() -> list[str]:
    from ..backends import BACKENDS

    return list(BACKENDS.names())


def _model_from_moments(args: argparse.Namespace) -> None:
    """MODEL left out: the spec, kwargs and weights the moments file records (said on stderr)."""
    import sys

    from ..errors import TvsError

    if args.model is not None:
        return
    if not args.moments:
        raise TvsError("give MODEL, or --moments whose file records the model it was collected from", 64)
    from ..artifacts import read_safetensors
    from ..calibration.moments import FORMATS

    recorded = read_safetensors(args.moments, "moments file", FORMATS, tensors=False)[0].get("model") or {}
    if not isinstance(recorded.get("spec"), str) or recorded["spec"].startswith("<"):
        raise TvsError(f"{args.moments} records no model spec that can be rebuilt: give MODEL (and --weights)")
    from ..models.sources import SOURCES

    try:
        names_code = SOURCES.find(recorded["spec"]).names_code
    except TvsError:
        names_code = True
    if names_code:  # a file never chooses code to run: the user names it
        raise TvsError(f"{args.moments} was collected from {recorded['spec']!r}, which is code: name it yourself "
                       f"as MODEL (tvsprune prune {recorded['spec']} --moments ...)")
    args.model = recorded["spec"]
    args.model_kwargs = args.model_kwargs or ([__import__("json").dumps(recorded["kwargs"])]
                                              if recorded.get("kwargs") else None)
    args.weights = args.weights or recorded.get("weights")
    print(f"model from {args.moments}: {args.model}" + (f" with weights {args.weights}" if args.weights else ""),
          file=sys.stderr)


def cmd_replay(args: argparse.Namespace) -> int:
    from ..pruning import replay

    calib = data_options(args, args.calib_data) if args.calib_data else None
    module = replay(loaded_model(args), args.plan, args.out, calib, args.structure_only, args.moments)
    print(f"plan applied: {sum(p.numel() for p in module.parameters()):,} parameters; wrote {args.out}")
    return 0


def _budget_args(p: Any) -> None:
    """prune's budget group: the budget, the latency target's backend, the allocation and the guards."""
    from ..pruning.options import DEFAULT_TARGET_PARAMS, allocation_choices

    b = p.add_argument_group("budget")
    b.add_argument("--keep-params", type=_limited("keep_params"),
                   help="fraction of the parameters KEPT, e.g. 0.5: half of them, 2x fewer (default: "
                        f"--target-params {DEFAULT_TARGET_PARAMS} when no budget is given)")
    b.add_argument("--keep-macs", type=_limited("keep_macs"),
                   help="fraction of the MACs KEPT, e.g. 0.5: half the multiply-adds, 2x fewer")
    b.add_argument("--target-params", type=_limited("target_params"),
                   help="alias, as a fraction REMOVED: --target-params 0.3 is --keep-params 0.7")
    b.add_argument("--target-flops", type=_limited("target_flops"),
                   help="alias, as a fraction of MACs REMOVED: --target-flops 0.5 is --keep-macs 0.5")
    b.add_argument("--threshold", type=_limited("threshold"), help="remove filters whose score is below ETA (no budget)")
    b.add_argument("--target-latency", type=_limited("target_latency"),
                   help="fraction of the unpruned network's latency KEPT on --latency-backend at --latency-batch, "
                        "e.g. 0.5: twice as fast; per-layer latencies are measured there (cached), and the pruned "
                        "network is measured against the base and re-planned if it misses")
    b.add_argument("--structure", choices=["channels", "blocks"],
                   help="what a --target-latency budget removes: channels (default), or blocks: whole residual "
                        "blocks whose input and output have the same shape, each replaced by one 3x3 or 1x1 "
                        "convolution fitted by least squares, or removed, and the convolutions after them re-fitted "
                        "(off with --compensation none or mean); benchmarks/RESULTS.md has ResNet-20's figures")
    b.add_argument("--latency-backend", choices=_backend_names(),
                   help="the backend a latency budget is measured on (default %(default)s)")
    b.add_argument("--latency-batch", type=_count, help="the batch size a latency budget is measured at "
                                                        "(default %(default)s)")
    b.add_argument("--latency-precision", choices=["fp32", "int8"],
                   help="time FP32 or INT8 (QDQ) graphs for a latency budget: int8 when you deploy the INT8 "
                        "model (default %(default)s)")
    b.add_argument("--latency-model", choices=["network", "layer"],
                   help="how the latency table is measured: layer (each layer alone, summed) or network (the "
                        "whole network with one coupled group narrowed at a time); default %(default)s")
    b.add_argument("--allocation", choices=allocation_choices(declared=True),
                   help="how the budget is spread over layers: auto (default: try the allocations that suit the "
                        "budget and keep the pruned network most faithful to the unpruned one on calibration "
                        "images the repairs did not use, see prune.json 'selection'; without images: cost for "
                        "--target-params, global for --target-flops), global (one threshold on the scores normalised by each layer's "
                        "maximum), cost (a channel goes when its normalised score is low relative to what removing "
                        "it saves), cost-rank (the same with scores replaced by within-layer ranks: the saving "
                        "decides how many, the criterion which), magnitude (how many: one global threshold on "
                        "layer-normalised filter L2 norms; which: the criterion), sensitivity (how many: each "
                        "group's measured KL when cut alone, one price per unit saved; needs calibration images), "
                        "alpha (the reference rule "
                        "t_j <= alpha * mean(t)), uniform, ldiff")
    b.add_argument("--cost-power", type=_limited("cost_power"),
                   help="exponent of the saving in --allocation cost (default %(default)s)")
    b.add_argument("--min-keep-frac", type=_limited("min_keep_frac"),
                   help="keep at least this fraction per layer (default %(default)s)")
    b.add_argument("--min-keep", type=_count, help="keep at least this many channels per layer (default %(default)s)")
    b.add_argument("--round-to", type=_round_to,
                   help="kept widths in multiples of N (8/16/32), or auto (default): the latency backend's channel "
                        "block for --target-latency (8 on CPUs, whose measured table prices widths that miss AVX-512's "
                        "16; 8 for GPU FP16, 32 for INT8 on GPUs), 1 (no rounding) for a parameter or MAC budget")


def _register_prune(sub: Any) -> None:
    from ..pruning.options import COMPENSATIONS, TVS_SALIENCY, PruneOptions, methods

    p = sub.add_parser("prune", help="remove non-discriminative filters (TVSPrune) or baseline-ranked ones")
    add_model_args(p, optional="default: the model, kwargs and weights the --moments file was collected from")
    p.add_argument("--moments", help="moments file from calibrate (needed by tvs, iter-tvs, mean-distance)")
    p.add_argument("--method", choices=methods(declared=True), help="tvs (default), iter-tvs, or a baseline criterion")
    p.add_argument("--out", required=True, help="output directory (plan.json, pruned.safetensors, prune.json)")
    _budget_args(p)
    p.add_argument("--pair-reduce", choices=["min", "mean"], help="reduction over class pairs (default %(default)s)")
    p.add_argument("--tvs-saliency", choices=TVS_SALIENCY,
                   help="tvs: how the TV score is combined: auto (default: the most faithful of the others, "
                        "chosen with --allocation auto), none (the TV score alone), l2 (times the filter's L2 norm), "
                        "ls (times the least-squares saliency: what removing the channel costs once compensated), "
                        "l1 (the filter's L1 norm alone, no TV: the candidate auto keeps where the TV score ranks "
                        "channels less faithfully than their size); "
                        "iter-tvs uses the TV score alone")
    p.add_argument("--seed", type=_nonneg, help="seed of the random criterion and of image sampling (default %(default)s)")
    r = p.add_argument_group("repairs (no fine-tuning; the defaults are the best the accuracy benchmark found)")
    r.add_argument("--compensation", choices=COMPENSATIONS,
                   help="rebuild removed channels from kept ones at every consumer: auto (default: ls, and "
                        "ls-seq too when there are at most 5,000 repair images and the folder holds images "
                        "beyond them, keeping the more faithful), ls "
                        "(ridge regression on the moments file's input second moments, no images), ls-seq (re-fit "
                        "consumer by consumer on calibration images: slower, corrects upstream errors), mean, none")
    r.add_argument("--bn-recalibrate", action=argparse.BooleanOptionalAction,
                   help="re-estimate BatchNorm statistics on calibration images after the fold (default: on)")
    r.add_argument("--no-repair", action="store_true", help="no compensation, no BatchNorm re-estimation (studies)")
    r.add_argument("--ridge", type=_limited("ridge"),
                   help="ridge strength of the least-squares fits, relative to the mean input variance (default "
                        "%(default)s)")
    r.add_argument("--mean-compensation", action="store_true", help=argparse.SUPPRESS)  # old spelling
    r.add_argument("--calib-data", help="images for the repairs (default: the moments file's data)")
    r.add_argument("--repair-samples-per-class", type=_count,
                   help="calibration images per class the repairs use; the rest are held out to choose among "
                        "candidates (default %(default)s)")
    i = p.add_argument_group("iter-tvs / validation")
    i.add_argument("--val-data", help="held-out labelled images (accuracy before/after; required by iter-tvs)")
    i.add_argument("--val-samples-per-class", type=_count, help="images per class of --val-data (default: every image)")
    i.add_argument("--max-acc-drop", type=_limited("max_acc_drop"),
                   help="accuracy points iter-tvs may lose (default %(default)s)")
    i.add_argument("--step", type=_limited("step"), help="fraction removed per iter-tvs round (default %(default)s)")
    i.add_argument("--step-decrease", type=_limited("step_decrease"),
                   help="how much iter-tvs shrinks its step after a rejected round (default %(default)s)")
    i.add_argument("--max-rounds", type=_count, help="iter-tvs rounds at most (default %(default)s)")
    i.add_argument("--compare-criteria", action=argparse.BooleanOptionalAction,
                   help="iter-tvs: also try the baseline criteria each round and keep the best (default: on)")
    add_preprocess_args(p, "--calib-data and --val-data")
    p.add_argument("--device", type=_device, help="device for scoring (default %(default)s)")
    defaults_from(p, PruneOptions)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("replay", help="apply a saved plan.json to a fresh model, redoing its repairs")
    add_model_args(p)
    p.add_argument("--plan", required=True, help="plan.json written by prune")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--calib-data", help="images for the plan's repairs (default: the folder recorded in the plan)")
    p.add_argument("--structure-only", action="store_true", help="remove the channels, skip the repairs")
    p.add_argument("--moments", help="moments file for the plan's compensation (default: the one recorded in the plan)")
    add_preprocess_args(p, "--calib-data")
    p.set_defaults(func=cmd_replay, seed=0)


register = _register_prune
