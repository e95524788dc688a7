"""The ``tvsprune`` command line: parse, call the library, print, exit.

Exit codes: 0 success, 1 user error (bad input, unwritable output), 2 missing optional
dependency / hardware, 3 a check failed (e.g. parity outside tolerance with --strict),
64 usage error (unknown flag, bad flag value; EX_USAGE), 130 interrupted (Ctrl-C, SIGTERM).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any, Callable

from . import __version__
from .errors import TvsError

log = logging.getLogger("tvsprune")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    """Comma-separated positive integers (batch sizes, shapes)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (1 for sizes and counts, 0 for worker processes)."""
    what = "a positive integer" if low == 1 else f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value
    return parse


_count, _nonneg = _int_at_least(1), _int_at_least(0)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="zoo name (resnet20, vgg11_bn, ...), file.py:Name, module:Name, "
                        "torchvision:NAME, timm:NAME, or a pruned artifact directory")
    p.add_argument("--weights", help="checkpoint (.pt/.pth via torch.load(weights_only=True), or .safetensors)")
    p.add_argument("--model-kwargs", nargs="*", metavar="K=V",
                   help="keyword arguments for the model constructor (key=value pairs or one JSON object)")


def add_data_args(p: argparse.ArgumentParser, required: bool = True, flag: str = "--data") -> None:
    from .calibration.stage import DataOptions as D

    g = p.add_argument_group("data")
    g.add_argument(flag, dest="data", required=required,
                   help="image folder (root/<class>/*.jpg), .npz with x and y, or CIFAR python batches")
    g.add_argument("--split", default=D.split, choices=["train", "test"], help="split for CIFAR batch folders")
    g.add_argument("--samples-per-class", type=_count, help="seeded stratified subset of N images per class")
    g.add_argument("--seed", type=int, default=D.seed, help=f"seed for sampling (default {D.seed})")
    _add_image_flags(g)


def _add_image_flags(g: Any) -> None:
    """Resize, crop, normalisation and loading flags, shared by every command that reads images."""
    from .calibration.stage import DataOptions as D

    g.add_argument("--resize", type=_count, help="resize the shorter side to N pixels")
    g.add_argument("--crop", type=_count, help="center-crop to N x N")
    g.add_argument("--mean", type=_floats, help="normalisation mean, e.g. 0.485,0.456,0.406 (default: checkpoint's)")
    g.add_argument("--std", type=_floats, help="normalisation std (default: checkpoint's)")
    g.add_argument("--batch-size", type=_count, default=D.batch_size, help=f"default {D.batch_size}")
    g.add_argument("--workers", type=_nonneg, default=D.workers, help="data-loading worker processes")
    g.add_argument("--skip-bad", action="store_true", help="skip and count undecodable files instead of failing")


def data_options(args: argparse.Namespace):
    from .calibration import DataOptions

    return DataOptions(path=args.data, resize=args.resize, crop=args.crop, mean=args.mean, std=args.std,
                       split=args.split, samples_per_class=args.samples_per_class, seed=args.seed,
                       batch_size=args.batch_size, workers=args.workers, skip_bad=args.skip_bad)


def data_options_for(args: argparse.Namespace, path: str):
    """The same data flags, applied to another folder (--calib-data, --val-data)."""
    return data_options(argparse.Namespace(**{**vars(args), "data": path}))


def add_preprocess_args(p: argparse.ArgumentParser, what: str) -> None:
    """Preprocessing flags for commands whose data comes from other folders (--calib-data, --val-data)."""
    from .calibration.stage import DataOptions as D

    g = p.add_argument_group(f"preprocessing of {what} (default: as recorded in the moments file / checkpoint)")
    _add_image_flags(g)
    p.set_defaults(split=D.split, samples_per_class=D.samples_per_class)


def loaded_model(args: argparse.Namespace):
    from .models import load_model, parse_kwargs

    return load_model(args.model, args.weights, parse_kwargs(args.model_kwargs))


# ----------------------------------------------------------------------------- commands
def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibration import calibrate
    from .calibration.stage import moments_table
    from .console import print_table, progress_bar, short_list
    from .pruning.artifact import is_pruned_artifact

    if not args.weights and not args.allow_random_weights and not is_pruned_artifact(args.model):
        raise TvsError(f"no --weights given: {args.model} would be calibrated with its random initial weights; "
                       "give --weights, or --allow-random-weights if the model loads its own")
    model = loaded_model(args)
    with progress_bar("calibrate") as bar:
        moments = calibrate(model, data_options(args), args.out, args.resolution, args.layers, args.device,
                            progress=bar.update, on_total=lambda n: setattr(bar, "total", n))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return 0
    print_table(moments_table(moments), title=f"moments at {args.resolution} ({moments.meta['samples']} images, "
                f"{moments.meta['elapsed_s']:.1f} s)")
    counts = moments.meta["class_counts"]
    print(f"classes: {len(counts)}; samples per class min {min(counts)} max {max(counts)}"
          + (f"; skipped files: {moments.meta['skipped']}" if moments.meta.get("skipped") else "")
          + (f"; EMPTY classes: {short_list(moments.meta['empty_classes'])}" if moments.meta.get("empty_classes") else ""))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def cmd_merge_moments(args: argparse.Namespace) -> int:
    from .calibration import merge_moment_files

    m = merge_moment_files(args.inputs, args.out)
    print(f"merged {len(args.inputs)} files ({m.meta['samples']} samples) -> {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .bench.accuracy import evaluate
    from .console import print_table, progress_bar

    model = loaded_model(args)
    with progress_bar("eval") as bar:
        res = evaluate(model, data_options(args), device=args.device, progress=bar.update)
    print(f"top-1 {res['top1'] * 100:.2f} %   top-5 {res['top5'] * 100:.2f} %   on {res['samples']} images")
    print_table([{"class": c, "images": n, "top-1 %": a * 100}
                 for c, n, a in zip(res["classes"], res["class_counts"], res["per_class"])], title="per-class accuracy")
    if args.json:
        from .artifacts import write_json

        write_json(args.json, res)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .calibration.stage import DEFAULT_RESOLUTION

    parser = _Parser(prog="tvsprune", description=__doc__.splitlines()[0].replace("``", ""),
                     epilog="exit codes: 0 passed, 1 bad input, 2 missing optional backend, 3 check failed "
                            "(--strict), 64 usage, 130 interrupted")
    parser.add_argument("--version", action="version", version=f"tvsprune {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="errors and the final PASSED/FAILED line only")
    parser.add_argument("--log-file", help="also write the log (info level, debug with -vv) to this file")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("calibrate", help="collect class-conditional filter moments in one streaming pass")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--out", required=True, help="moments file to write (.safetensors)")
    p.add_argument("--resolution", default=DEFAULT_RESOLUTION,
                   help=f"global | pool:K | full (default {DEFAULT_RESOLUTION})")
    p.add_argument("--layers", help="comma-separated globs of layer names (default: every prunable layer)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]; moments accumulate on that device")
    p.add_argument("--allow-random-weights", action="store_true",
                   help="calibrate without --weights (only for a model that loads its own weights)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("merge-moments", help="merge moments files collected on disjoint shards")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_merge_moments)

    p = sub.add_parser("eval", help="top-1 / top-5 / per-class accuracy of a model or pruned artifact")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_eval)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


_EXTRA_COMMANDS: list[Callable[[Any], None]] = []


EXIT_USAGE = 64  # sysexits.h EX_USAGE; 2 stays "a missing optional backend"
DIR_OUTPUTS = {"prune", "replay", "bench"}  # commands whose --out is a directory (run/demo lock in Pipeline)


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on exit code 64 and the usual FAILED line."""

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        print(f"FAILED | usage | {self.prog.removeprefix('tvsprune').strip() or 'tvsprune'}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _setup_logging(args: argparse.Namespace) -> None:
    """-q: errors only; default: warnings; -v: info; -vv: debug; --log-file: everything, to a file."""
    level = logging.ERROR if args.quiet else logging.WARNING - 10 * min(args.verbose, 2)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    handlers[0].setLevel(level)
    if args.log_file:
        try:
            fh = logging.FileHandler(args.log_file)
        except OSError as e:
            raise TvsError(f"cannot open --log-file {args.log_file}: {e.strerror}") from None
        fh.setLevel(logging.DEBUG if args.verbose >= 2 else logging.INFO)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(fh)
    logging.basicConfig(level=min(h.level for h in handlers), format="%(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)
    for noisy in ("torch", "onnx", "onnxruntime", "onnxscript", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv) == ["--version"]:  # without importing torch
        print(f"tvsprune {__version__}")
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        print("tvsprune: error: no command given", file=sys.stderr)
        print("FAILED | usage | tvsprune", file=sys.stderr)
        return EXIT_USAGE
    import contextlib
    import os
    import signal

    from .artifacts import output_lock

    t0 = time.perf_counter()
    label = args.command + (f" {args.target}" if getattr(args, "target", None) else "")

    def failed(message: str, code: int) -> int:
        print(f"tvsprune {label}: error: {message}", file=sys.stderr)
        print(f"FAILED | {label} | {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        return code

    old_term = signal.signal(signal.SIGTERM, _interrupt) if hasattr(signal, "SIGTERM") else None
    try:
        _setup_logging(args)
        with contextlib.ExitStack() as stack:
            rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 writes the output
            if getattr(args, "out", None) and args.command not in ("run", "demo") and rank0:
                stack.enter_context(output_lock(args.out, "dir" if args.command in DIR_OUTPUTS else "file"))
            if args.quiet:
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            else:
                from .console import activity

                stack.enter_context(activity(f"tvsprune {label}"))
            code = args.func(args)
    except TvsError as e:
        return failed(str(e), e.exit_code)
    except OSError as e:  # the environment, not a bug: unwritable output, disk full, missing file
        what = f"cannot use {e.filename}: " if e.filename else ""
        return failed(f"{what}{e.strerror or e}", 1)
    except KeyboardInterrupt:
        return failed("interrupted; no partial output was kept", 130)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    status = "PASSED" if code == 0 else "FAILED"
    print(f"{status} | {label} | {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return code


def prune_options(args: argparse.Namespace):
    """The PruneOptions that ``tvsprune prune`` flags describe (defaults: PruneOptions' own)."""
    from .pruning import Guards, PruneOptions

    return PruneOptions(method=args.method, target_params=args.target_params, target_flops=args.target_flops,
                        threshold=args.threshold, allocation=args.allocation, cost_power=args.cost_power,
                        guards=Guards(args.min_keep_frac, args.min_keep, args.round_to),
                        pair_reduce=args.pair_reduce, seed=args.seed, tvs_saliency=args.tvs_saliency,
                        **repair_options(args), repair_samples_per_class=args.repair_samples_per_class,
                        max_acc_drop=args.max_acc_drop, step=args.step, device=args.device)


def cmd_prune(args: argparse.Namespace) -> int:
    from .console import print_table
    from .pruning import prune

    opts = prune_options(args)
    calib = val = None
    if args.calib_data:
        calib = data_options_for(args, args.calib_data)
    if args.val_data:
        val = data_options_for(argparse.Namespace(**{**vars(args), "samples_per_class": args.val_samples_per_class}),
                               args.val_data)
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
    if (report.get("budget") or {}).get("unmet"):
        print(f"note: {report['budget']['unmet']}")
    print(f"wrote {args.out}/plan.json, pruned.safetensors, prune.json")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from .pruning import replay

    calib = data_options_for(args, args.calib_data) if args.calib_data else None
    module = replay(loaded_model(args), args.plan, args.out, calib, args.structure_only, args.moments)
    print(f"plan applied: {sum(p.numel() for p in module.parameters()):,} parameters; wrote {args.out}")
    return 0


def repair_options(args: argparse.Namespace) -> dict[str, Any]:
    """--compensation / --bn-recalibrate / --no-repair / --ridge as PruneOptions keywords."""
    if args.no_repair:
        return {"compensation": "none", "bn_recalibrate": False, "ridge": args.ridge}
    return {"compensation": args.compensation, "mean_compensation": args.mean_compensation,
            "bn_recalibrate": args.bn_recalibrate, "ridge": args.ridge}


def _register_prune(sub: Any) -> None:
    from .pruning.compensation import COMPENSATIONS
    from .pruning.plan import Guards
    from .pruning.stage import DEFAULT_TARGET_PARAMS, TVS_SALIENCY, PruneOptions, allocation_choices, methods

    P = PruneOptions
    p = sub.add_parser("prune", help="remove non-discriminative filters (TVSPrune) or baseline-ranked ones")
    add_model_args(p)
    p.add_argument("--moments", help="moments file from calibrate (needed by tvs, iter-tvs, mean-distance)")
    p.add_argument("--method", default=P.method, choices=methods())
    p.add_argument("--out", required=True, help="output directory (plan.json, pruned.safetensors, prune.json)")
    b = p.add_argument_group("budget")
    b.add_argument("--target-params", type=float,
                   help=f"fraction of parameters to remove, e.g. 0.5 (default {DEFAULT_TARGET_PARAMS} when no budget "
                        "is given)")
    b.add_argument("--target-flops", type=float, help="fraction of MACs to remove")
    b.add_argument("--threshold", type=float, help="remove filters whose score is below ETA (no budget)")
    b.add_argument("--allocation", default=PruneOptions.allocation, choices=allocation_choices(),
                   help="how the budget is spread over layers: auto (default: cost for --target-params, global for "
                        "--target-flops), global (one threshold on the scores normalised by each layer's maximum), "
                        "cost (a channel goes when its "
                        "normalised score is low relative to what removing it saves), cost-rank (the same with "
                        "scores replaced by within-layer ranks: the saving decides how many, the criterion which), "
                        "alpha (the reference rule t_j <= alpha * mean(t)), global, uniform, ldiff")
    b.add_argument("--cost-power", type=float, default=P.cost_power, help="exponent of the saving in --allocation cost")
    b.add_argument("--min-keep-frac", type=float, default=Guards.min_keep_frac,
                   help="keep at least this fraction per layer")
    b.add_argument("--min-keep", type=_count, default=Guards.min_keep, help="keep at least this many channels per layer")
    b.add_argument("--round-to", type=_count, default=Guards.round_to,
                   help="round kept widths up to a multiple (8/16/32)")
    p.add_argument("--pair-reduce", default=P.pair_reduce, choices=["min", "mean"],
                   help="reduction over class pairs")
    p.add_argument("--tvs-saliency", default=PruneOptions.tvs_saliency, choices=TVS_SALIENCY,
                   help="tvs/iter-tvs: none (default) ranks by the TV score alone; ls multiplies the per-layer normalised "
                        "TV score by the least-squares saliency (what removing the channel costs once compensated)")
    p.add_argument("--seed", type=int, default=P.seed)
    r = p.add_argument_group("repairs (no fine-tuning; the defaults are the best the accuracy benchmark found)")
    r.add_argument("--compensation", default=PruneOptions.compensation, choices=COMPENSATIONS,
                   help="rebuild removed channels from kept ones at every consumer: ls (default; ridge regression "
                        "on the moments file's input second moments, no images), ls-seq (re-fit consumer by "
                        "consumer on calibration images: slower, corrects upstream errors), mean, none")
    r.add_argument("--bn-recalibrate", action=argparse.BooleanOptionalAction, default=PruneOptions.bn_recalibrate,
                   help="re-estimate BatchNorm statistics on calibration images after the fold")
    r.add_argument("--no-repair", action="store_true", help="no compensation, no BatchNorm re-estimation (studies)")
    r.add_argument("--ridge", type=float, default=PruneOptions.ridge,
                   help="ridge strength of the least-squares fits, relative to the mean input variance")
    r.add_argument("--mean-compensation", action="store_true", help=argparse.SUPPRESS)  # old spelling
    r.add_argument("--calib-data", help="images for the repairs (default: the moments file's data)")
    r.add_argument("--repair-samples-per-class", type=_count, default=P.repair_samples_per_class)
    i = p.add_argument_group("iter-tvs / validation")
    i.add_argument("--val-data", help="held-out labelled images (accuracy before/after; required by iter-tvs)")
    i.add_argument("--val-samples-per-class", type=_count)
    i.add_argument("--max-acc-drop", type=float, default=P.max_acc_drop, help="accuracy points iter-tvs may lose")
    i.add_argument("--step", type=float, default=P.step, help="fraction removed per iter-tvs round")
    add_preprocess_args(p, "--calib-data and --val-data")
    p.add_argument("--device", default=P.device, help="device for scoring")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("replay", help="apply a saved plan.json to a fresh model, redoing its repairs")
    add_model_args(p)
    p.add_argument("--plan", required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--calib-data", help="images for the plan's repairs (default: the folder recorded in the plan)")
    p.add_argument("--structure-only", action="store_true", help="remove the channels, skip the repairs")
    p.add_argument("--moments", help="moments file for the plan's compensation (default: the one recorded in the plan)")
    add_preprocess_args(p, "--calib-data")
    p.set_defaults(func=cmd_replay, seed=0)


_EXTRA_COMMANDS.append(_register_prune)


def _onnx_data(args: argparse.Namespace, path: str, meta: dict[str, str]):
    """Data options for an ONNX model: normalisation from flags, else from the file's metadata."""
    from .calibration import DataOptions

    mean = args.mean or ([float(v) for v in meta["normalize_mean"].split(",")] if "normalize_mean" in meta else None)
    std = args.std or ([float(v) for v in meta["normalize_std"].split(",")] if "normalize_std" in meta else None)
    return DataOptions(path=path, resize=args.resize, crop=args.crop, mean=mean, std=std, split=args.split,
                       batch_size=args.batch_size, workers=args.workers, skip_bad=args.skip_bad)


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from .data import take_images
    from .exporters import export_onnx

    model = loaded_model(args)
    shape = args.input_shape or (list(model.input_shape) if model.input_shape else None)
    inputs = None
    if args.data:
        src = data_options(args).open(model)
        inputs, _ = take_images(src, args.parity_samples)
        shape = shape or list(inputs.shape[1:])
    batch = "dynamic" if args.batch == "dynamic" else int(args.batch)
    rep = export_onnx(model, args.out, args.opset, batch, shape, inputs, args.tolerance, args.exporter)
    p = rep["parity"]
    print(f"wrote {args.out} ({rep['size_bytes'] / 1e6:.2f} MB, {rep['parameters']:,} parameters, opset {rep['opset']}, "
          f"{rep['exporter']} exporter); checker {rep['checker']}")
    print(f"parity vs PyTorch on {p['samples']} {p['inputs']}: max |diff| {p['max_abs_diff']:.3g} for logits up to "
          f"{p['max_abs_logit']:.3g} (scaled {p['max_scaled_diff']:.3g}, tolerance {p['tolerance']:g}), top-1 agreement {p['top1_agreement'] * 100:.2f} %, "
          f"batch sizes {p['batch_sizes']}")
    if not p["within_tolerance"]:
        print("WARNING: parity outside tolerance (recorded in the report)")
        return 3 if args.strict else 0
    return 0


def cmd_export_int8(args: argparse.Namespace) -> int:
    from .bench.ort_eval import compare_int8
    from .data import take_images
    from .exporters.int8 import quantize_int8, write_report
    from .exporters.onnx_export import onnx_metadata

    meta = onnx_metadata(args.model)
    src = _onnx_data(args, args.calib_data, meta).open()
    x, _ = take_images(src, args.calib_samples, seed=args.seed)
    batches = [x[i:i + 32].numpy() for i in range(0, len(x), 32)]
    rep = quantize_int8(args.model, batches, args.out, args.method, per_channel=not args.per_tensor)
    if args.eval_data:
        esrc = _onnx_data(args, args.eval_data, meta).open()
        rep["evaluation"] = e = compare_int8(args.model, args.out, esrc, args.eval_samples)
        if e["latency_ratio_int8_over_fp32"] > 1.0:
            rep.setdefault("warnings", []).append(
                f"INT8 is slower than FP32 on this CPU ({e['latency_ratio_int8_over_fp32']:.2f}x the latency at batch "
                f"{e['latency_batch']}): ONNX Runtime has no fast INT8 kernels for some layers (e.g. depthwise); "
                "deploy FP32 here, or measure INT8 on the target (TensorRT)")
    write_report(args.out, rep)
    print(f"wrote {args.out} (QDQ, {rep['calibration_method']}, {rep['calibration_images']} calibration images, "
          f"{rep['size_bytes'] / 1e6:.2f} MB)")
    if "evaluation" in rep:
        e = rep["evaluation"]
        print(f"top-1 FP32 {e['fp32_top1'] * 100:.2f} % -> INT8 {e['int8_top1'] * 100:.2f} % "
              f"({e['change_points']:+.2f} points) on {e['samples']} images; CPU latency INT8/FP32 at batch "
              f"{e['latency_batch']}: {e['latency_ratio_int8_over_fp32']:.2f}")
    for w in rep.get("warnings", []):
        print(f"WARNING: {w}")
    return 0


def cmd_export_trt(args: argparse.Namespace) -> int:
    from .exporters.tensorrt import build_engine

    rep = build_engine(args.model, args.out, args.precision, args.min_batch, args.opt_batch, args.max_batch,
                       args.workspace, args.timing_cache, args.opt_level, args.strongly_typed)
    print(f"wrote {args.out}: TensorRT {rep['tensorrt']} on {rep['gpu']} (sm {rep['compute_capability']}), "
          f"{rep['precision']}, {rep['size_bytes'] / 1e6:.2f} MB, built in {rep['build_seconds']:.1f} s")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .exporters.probe import ort_providers_that_load, probe_environment

    env = probe_environment()
    rows = [{"component": "python", "status": env.get("python", "?")},
            {"component": "torch", "status": f"{env.get('torch', 'missing')} (CUDA {env.get('torch_cuda') or 'none'})"}]
    for g in env.get("gpus", []):
        rows.append({"component": "GPU", "status": f"{g['name']} sm {g['compute_capability']}, "
                                                   f"{g['memory_bytes'] / 2**30:.0f} GiB"})
    if not env.get("gpus"):
        rows.append({"component": "GPU", "status": "none visible to torch"})
    rows.append({"component": "onnxruntime", "status": env.get("onnxruntime", env.get("onnxruntime_error", "missing"))})
    try:
        for p, st in ort_providers_that_load().items():
            rows.append({"component": f"  ORT {p}", "status": st})
    except Exception as e:  # reported, not fatal
        rows.append({"component": "  ORT providers", "status": f"probe failed: {e}"})
    trt_status = env.get("tensorrt") or "missing"
    if env.get("tensorrt") and not env.get("tensorrt_builder"):
        trt_status += f" (builder unusable: {env.get('tensorrt_error')})"
    rows.append({"component": "tensorrt", "status": trt_status})
    needs = []
    if not env.get("gpus"):
        needs.append("torch-cuda / ort-cuda / TensorRT backends need an NVIDIA GPU")
    if "tensorrt" not in env:
        needs.append("TensorRT engines: pip install tensorrt (NVIDIA index) or use the container")
    if "CUDAExecutionProvider" not in env.get("ort_providers", []):
        needs.append("ONNX Runtime on GPU: pip install 'tvsprune[gpu]' (onnxruntime-gpu)")
    from .console import print_table

    print_table(rows, title="tvsprune doctor")
    for n in needs:
        print(f"missing: {n}")
    return 0


def _register_export(sub: Any) -> None:
    from .exporters import defaults as ED
    from .exporters.int8 import METHODS as INT8_METHODS
    from .exporters.tensorrt import PRECISIONS

    exp = sub.add_parser("export", help="export to ONNX, INT8 (QDQ) ONNX, or a TensorRT engine")
    esub = exp.add_subparsers(dest="target", metavar="TARGET", required=True)

    p = esub.add_parser("onnx", help="ONNX with checker, graphsurgeon clean-up and ORT parity")
    add_model_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--batch", default="dynamic", help="dynamic (default) or a fixed batch size")
    p.add_argument("--input-shape", type=_ints, help="C,H,W (default: the model's, or the data's)")
    p.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "torchscript"],
                   help="auto: torch.export-based, TorchScript when that fails")
    p.add_argument("--parity-samples", type=_count, default=ED.PARITY_SAMPLES,
                   help=f"images from --data compared on ONNX Runtime (default {ED.PARITY_SAMPLES})")
    p.add_argument("--tolerance", type=float, default=ED.TOLERANCE,
                   help="max logit difference over max(1, largest |logit|): absolute for logits within "
                        f"+-1, relative beyond (default {ED.TOLERANCE:g})")
    p.add_argument("--strict", action="store_true", help="exit 3 when parity is outside tolerance")
    add_data_args(p, required=False)
    p.set_defaults(func=cmd_export_onnx)

    p = esub.add_parser("int8", help="static INT8 quantization to a QDQ model (ONNX Runtime)")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--out", required=True)
    p.add_argument("--calib-data", required=True)
    p.add_argument("--calib-samples", type=_count, default=ED.INT8_SAMPLES)
    p.add_argument("--method", default=ED.INT8_METHOD, choices=INT8_METHODS)
    p.add_argument("--per-tensor", action="store_true", help="per-tensor weights (default per-channel)")
    p.add_argument("--eval-data", help="labelled images: FP32 vs INT8 accuracy and CPU latency")
    p.add_argument("--eval-samples", type=_count, help="limit evaluation images (default all)")
    add_preprocess_args(p, "--calib-data and --eval-data")
    p.set_defaults(func=cmd_export_int8, seed=0)

    p = esub.add_parser("trt", help="TensorRT engine (needs TensorRT and an NVIDIA GPU; see the Dockerfile)")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--out", required=True)
    p.add_argument("--precision", default="fp16", choices=PRECISIONS)
    p.add_argument("--min-batch", type=_count, default=ED.MIN_BATCH)
    p.add_argument("--opt-batch", type=_count, default=ED.OPT_BATCH)
    p.add_argument("--max-batch", type=_count, default=ED.MAX_BATCH)
    p.add_argument("--workspace", type=_count, help="workspace limit in MiB")
    p.add_argument("--timing-cache", help="timing cache file, read and updated (kept across builds)")
    p.add_argument("--opt-level", type=int, help="builder optimization level 0-5")
    p.add_argument("--strongly-typed", action="store_true", help="TensorRT 10: build a strongly typed network")
    p.set_defaults(func=cmd_export_trt)

    p = sub.add_parser("doctor", help="what this machine has for each backend, and what is missing")
    p.set_defaults(func=cmd_doctor)


_EXTRA_COMMANDS.append(_register_export)


def bench_options(args: argparse.Namespace):
    """The BenchOptions that ``tvsprune bench`` flags describe (defaults: BenchOptions' own)."""
    from .bench.latency import LatencyConfig
    from .bench.stage import BenchOptions

    return BenchOptions(backends=args.backend.split(",") if args.backend else None, batch_sizes=args.batch_sizes,
                        latency=LatencyConfig(rounds=args.rounds, iters=args.iters),
                        eval_samples=args.eval_samples, trt_precision=args.trt_precision, threads=args.threads,
                        input_shape=args.input_shape)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.report import summary_rows
    from .bench.stage import bench
    from .console import print_table

    opts = bench_options(args)
    data = data_options(args) if args.data else None
    report = bench([args.base, *args.pruned], args.out, data, args.weights, opts,
                   progress=lambda s: print(f"... {s}", file=sys.stderr))
    print_table(summary_rows(report), title="tvsprune bench")
    for b, why in report["skipped_backends"].items():
        print(f"skipped {b}: {why}")
    print(f"wrote {args.out}/report.json, report.md, report.html")
    return 0


def _register_bench(sub: Any) -> None:
    from .bench.stage import BenchOptions

    B = BenchOptions()
    p = sub.add_parser("bench", help="latency, memory and accuracy of base vs pruned models on every backend")
    p.add_argument("base", metavar="BASE", help="the unpruned model (zoo name / spec / .onnx)")
    p.add_argument("pruned", nargs="*", metavar="PRUNED", help="pruned artifact directories or .onnx files")
    p.add_argument("--weights", help="checkpoint of BASE")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--backend", help="comma-separated: " + ", ".join(__import__("tvsprune.backends",
                   fromlist=["BACKENDS"]).BACKENDS.names()) + " (default: every backend present)")
    p.add_argument("--batch-sizes", type=_ints, default=B.batch_sizes)
    p.add_argument("--rounds", type=_count, default=B.latency.rounds, help="A/B interleaved rounds")
    p.add_argument("--iters", type=_count, default=B.latency.iters, help="timed iterations per model per round")
    p.add_argument("--threads", type=_count, help="CPU threads for torch and ONNX Runtime")
    p.add_argument("--eval-samples", type=_count, default=B.eval_samples, help="images for accuracy (stratified)")
    p.add_argument("--trt-precision", default=B.trt_precision, choices=["fp32", "fp16", "bf16", "int8"],
                   help="precision of the engines built for the tensorrt backend; fp16 also turns on fp16 in "
                        "ONNX Runtime's TensorRT provider (ort-trt), whose engines are cached under OUT/models")
    p.add_argument("--input-shape", type=_ints, help="C,H,W when neither the models nor --data tell it")
    add_data_args(p, required=False)
    p.set_defaults(func=cmd_bench)


_EXTRA_COMMANDS.append(_register_bench)


def _run_pipeline(cfg_path: str | None, overrides: list[str], force: list[str], dry_run: bool,
                  raw: dict | None = None, base_dir: Any = None) -> Any:
    from .pipeline import Pipeline, load_config, resolve_paths

    cfg, base = load_config(cfg_path, overrides, raw=raw, base_dir=base_dir)
    cfg = resolve_paths(cfg, base)
    pipe = Pipeline(cfg)
    if dry_run:
        for stage, will_run in pipe.plan(set(force)):
            print(f"{'RUN ' if will_run else 'SKIP'} {stage}")
        print(f"output directory: {cfg.output_dir}")
        return None
    pipe.run(set(force))
    return pipe


def cmd_run(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    if args.out:
        overrides.append(f'output_dir="{args.out}"')
    pipe = _run_pipeline(args.config, overrides, args.force or [], args.dry_run)
    if pipe is not None:
        print(f"artifacts in {pipe.out} (manifest.json lists them with their hashes)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .console import print_table
    from .pipeline.demo import CONFIG, summary

    out = Path(args.out).resolve()
    overrides = [f'output_dir="{out}"'] + list(args.set or [])
    pipe = _run_pipeline(str(CONFIG), overrides, args.force or [], args.dry_run)
    if pipe is None:
        return 0
    print_table(summary(out), title="tvsprune demo: ResNet-20 / CIFAR-10, before and after pruning")
    print(f"report: {out / 'report' / 'report.html'} (and report.md, report.json)")
    print(f"pruned model: {out / 'pruned'}; ONNX: {out / 'export'}")
    return 0


def _register_run(sub: Any) -> None:
    from .pipeline.run import STAGES

    for name, helptext in (("run", "the whole pipeline from one TOML config"),
                           ("demo", "the whole pipeline on the bundled ResNet-20 and CIFAR-10 images")):
        p = sub.add_parser(name, help=helptext)
        if name == "run":
            p.add_argument("config", metavar="CONFIG.toml")
            p.add_argument("--out", help="output directory (overrides output_dir)")
        else:
            p.add_argument("--out", default="demo-out", help="output directory (default demo-out)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config value, e.g. --set prune.target_params=0.4 (repeatable)")
        p.add_argument("--force", action="append", choices=STAGES, help="redo this stage (repeatable)")
        p.add_argument("--dry-run", action="store_true", help="print which stages would run, run nothing")
        p.set_defaults(func=cmd_run if name == "run" else cmd_demo)


_EXTRA_COMMANDS.append(_register_run)


if __name__ == "__main__":
    sys.exit(main())
