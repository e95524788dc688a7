"""``tvsprune export onnx|int8|trt``."""
from __future__ import annotations

import argparse
import logging
from typing import Any

from .common import (_count, _ints, add_data_args, add_model_args, add_preprocess_args, data_options, defaults_from,
                     loaded_model)

log = logging.getLogger("tvsprune")


def _batch(text: str) -> str | int:
    """``dynamic`` or a positive batch size."""
    return text if text == "dynamic" else _count(text)


def _onnx_data(args: argparse.Namespace, path: str, meta: dict[str, str]):
    """Data options for an ONNX model: normalisation from flags, else from the file's metadata."""
    from ..data.options import DataOptions

    mean = args.mean or ([float(v) for v in meta["normalize_mean"].split(",")] if "normalize_mean" in meta else None)
    std = args.std or ([float(v) for v in meta["normalize_std"].split(",")] if "normalize_std" in meta else None)
    return DataOptions.from_args(args, path=path, mean=mean, std=std, samples_per_class=None, seed=0)


def _onnx_channels(meta: dict[str, str]) -> int | None:
    """The channels an ONNX model tvsprune wrote reads (its ``input_shape`` metadata)."""
    shape = meta.get("input_shape", "").split(",")
    return int(shape[0]) if shape[0].isdigit() else None


def _export_options(args: argparse.Namespace):
    """The ExportOptions the flags of an export subcommand describe (its other fields at their defaults)."""
    from ..exporters.options import ExportOptions

    return ExportOptions.from_args(args)


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from ..data import take_images
    from ..exporters import export_onnx

    opts = _export_options(args)
    data = data_options(args) if args.data else None
    model = loaded_model(args)
    shape = args.input_shape or (list(model.input_shape) if model.input_shape else None)
    inputs = None
    if data is not None:
        src = data.open(model)
        inputs, _ = take_images(src, opts.parity_samples)
        shape = shape or list(inputs.shape[1:])
    batch = args.batch
    rep = export_onnx(model, args.out, opts.opset, batch, shape, inputs, opts.tolerance, args.exporter)
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
    from ..bench.ort_eval import compare_int8
    from ..data import take_images
    from ..exporters.int8 import calibration_batches, quantize_int8, write_report
    from ..exporters.onnx_export import onnx_metadata

    opts = _export_options(args)
    meta = onnx_metadata(args.model)
    src = _onnx_data(args, args.calib_data, meta).open(channels=_onnx_channels(meta))
    x, _ = take_images(src, opts.int8_samples, seed=args.seed)
    rep = quantize_int8(args.model, calibration_batches(x), args.out, opts.int8_method, per_channel=not args.per_tensor,
                        activations=opts.activations, reduce_range=opts.int8_reduce_range)
    if args.eval_data:
        esrc = _onnx_data(args, args.eval_data, meta).open(channels=_onnx_channels(meta))
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
    from ..exporters.tensorrt import build_engine

    o = _export_options(args)
    rep = build_engine(args.model, args.out, args.precision, o.min_batch, o.opt_batch, o.max_batch,
                       o.workspace_mib, args.timing_cache, o.opt_level, args.strongly_typed)
    print(f"wrote {args.out}: TensorRT {rep['tensorrt']} on {rep['gpu']} (sm {rep['compute_capability']}), "
          f"{rep['precision']}, {rep['size_bytes'] / 1e6:.2f} MB, built in {rep['build_seconds']:.1f} s")
    return 0


def _register_export(sub: Any) -> None:
    from ..exporters.int8 import ACTIVATIONS, REDUCE_RANGE
    from ..exporters.int8 import METHODS as INT8_METHODS
    from ..exporters.options import ExportOptions
    from ..exporters.tensorrt import PRECISIONS

    exp = sub.add_parser("export", help="export to ONNX, INT8 (QDQ) ONNX, or a TensorRT engine")
    esub = exp.add_subparsers(dest="target", metavar="TARGET", required=True)

    p = esub.add_parser("onnx", help="ONNX with checker, graphsurgeon clean-up and ORT parity")
    add_model_args(p)
    p.add_argument("--out", required=True, help="ONNX file to write (an .export.json sidecar goes beside it)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's, opset 18 with torch 2.x)")
    p.add_argument("--batch", type=_batch, default="dynamic", help="dynamic (default) or a fixed batch size")
    p.add_argument("--input-shape", type=_ints, help="C,H,W (default: the model's, or the data's)")
    p.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "torchscript"],
                   help="auto: torch.export-based, TorchScript when that fails")
    p.add_argument("--parity-samples", type=_count,
                   help="images from --data compared on ONNX Runtime (default %(default)s)")
    p.add_argument("--tolerance", type=float,
                   help="max logit difference over max(1, largest |logit|): absolute for logits within "
                        "+-1, relative beyond (default %(default)g)")
    p.add_argument("--strict", action="store_true", help="exit 3 when parity is outside tolerance")
    add_data_args(p, required=False)
    defaults_from(p, ExportOptions)
    p.set_defaults(func=cmd_export_onnx)

    p = esub.add_parser("int8", help="static INT8 quantization to a QDQ model (ONNX Runtime)")
    p.add_argument("model", metavar="MODEL.onnx", help="the FP32 ONNX model (from export onnx)")
    p.add_argument("--out", required=True, help="QDQ INT8 ONNX file to write")
    p.add_argument("--calib-data", required=True, help="calibration images (one folder per class)")
    p.add_argument("--calib-samples", "--int8-samples", dest="int8_samples", type=_count,
                   help="calibration images (default %(default)s)")
    p.add_argument("--method", "--int8-method", dest="int8_method", choices=INT8_METHODS,
                   help="ONNX Runtime calibration method (default %(default)s)")
    p.add_argument("--per-tensor", action="store_true", help="per-tensor weights (default per-channel)")
    p.add_argument("--activations", "--int8-activations", dest="int8_activations", choices=("auto", *ACTIVATIONS),
                   help="activation scheme: uint8 (asymmetric, fast on ONNX Runtime CPU), int8 (symmetric, for "
                        "TensorRT); auto: uint8 here (default %(default)s)")
    p.add_argument("--reduce-range", "--int8-reduce-range", dest="int8_reduce_range", choices=REDUCE_RANGE,
                   help="7-bit weights, so that ONNX Runtime's uint8 x int8 kernels on x86 CPUs without VNNI do not "
                        "saturate; auto: on for uint8 activations when this CPU lacks VNNI; on: quantizing here for "
                        "such a target (default %(default)s)")
    p.add_argument("--eval-data", help="labelled images: FP32 vs INT8 accuracy and CPU latency")
    p.add_argument("--eval-samples", type=_count, help="limit evaluation images (default all)")
    add_preprocess_args(p, "--calib-data and --eval-data")
    defaults_from(p, ExportOptions)
    p.set_defaults(func=cmd_export_int8, seed=0)

    p = esub.add_parser("trt", help="TensorRT engine (needs TensorRT and an NVIDIA GPU; see the Dockerfile)")
    p.add_argument("model", metavar="MODEL.onnx", help="the ONNX model (an INT8 QDQ one for --precision int8)")
    p.add_argument("--out", required=True, help="engine file to write (built for this GPU and TensorRT version)")
    p.add_argument("--precision", default="fp16", choices=PRECISIONS, help="engine precision")
    p.add_argument("--min-batch", type=_count, help="smallest batch of the optimisation profile (default %(default)s)")
    p.add_argument("--opt-batch", type=_count, help="batch the engine is tuned for (default %(default)s)")
    p.add_argument("--max-batch", type=_count, help="largest batch of the optimisation profile (default %(default)s)")
    p.add_argument("--workspace", "--workspace-mib", dest="workspace_mib", type=_count,
                   help="workspace limit in MiB (default: TensorRT's, the GPU's memory)")
    p.add_argument("--timing-cache", help="timing cache file, read and updated (kept across builds)")
    p.add_argument("--opt-level", type=int, help="builder optimization level 0-5")
    p.add_argument("--strongly-typed", action="store_true", help="TensorRT 10: build a strongly typed network")
    defaults_from(p, ExportOptions)
    p.set_defaults(func=cmd_export_trt)


register = _register_export
