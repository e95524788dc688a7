"""``tvsprune bench``."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from .common import (_add_image_flags, add_base_model_arg, _count, _floats, _int_at_least, _ints, _nonneg,  # noqa: F401
                     add_data_args, add_model_args, add_preprocess_args, data_options, data_options_for,
                     loaded_model)

log = logging.getLogger("tvsprune")


def bench_options(args: argparse.Namespace):
    """The BenchOptions that ``tvsprune bench`` flags describe (defaults: BenchOptions' own)."""
    from ..compare.latency import LatencyConfig
    from ..bench.stage import BenchOptions

    return BenchOptions(backends=args.backend.split(",") if args.backend else None, batch_sizes=args.batch_sizes,
                        latency=LatencyConfig(rounds=args.rounds, iters=args.iters),
                        eval_samples=args.eval_samples, trt_precision=args.trt_precision, threads=args.threads,
                        input_shape=args.input_shape)


def cmd_bench(args: argparse.Namespace) -> int:
    from ..bench.report import summary_rows
    from ..bench.stage import bench
    from ..console import print_table

    opts = bench_options(args)
    data = data_options(args) if args.data else None
    report = bench([args.base, *args.pruned], args.out, data, args.weights, opts,
                   progress=lambda s: print(f"... {s}", file=sys.stderr), base_model=args.base_model)
    print_table(summary_rows(report), title="tvsprune bench")
    for b, why in report["skipped_backends"].items():
        print(f"skipped {b}: {why}")
    print(f"wrote {args.out}/report.json, report.md, report.html")
    return 0


def _register_bench(sub: Any) -> None:
    from ..bench.stage import BenchOptions

    B = BenchOptions()
    p = sub.add_parser("bench", help="latency, memory and accuracy of base vs pruned models on every backend")
    p.add_argument("base", metavar="BASE", help="the unpruned model (zoo name / spec / .onnx)")
    p.add_argument("pruned", nargs="*", metavar="PRUNED", help="pruned artifact directories or .onnx files")
    p.add_argument("--weights", help="checkpoint of BASE")
    add_base_model_arg(p)
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


register = _register_bench
