"""``tvsprune bench``."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from .common import _count, _floats, _ints, add_base_model_arg, add_data_args, data_options, defaults_from

log = logging.getLogger("tvsprune")


def bench_options(args: argparse.Namespace):
    """The BenchOptions that ``tvsprune bench`` flags describe (defaults: BenchOptions' own)."""
    from ..bench.options import BenchOptions

    return BenchOptions.from_args(args)


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cmd_bench(args: argparse.Namespace) -> int:
    from ..bench.report import end_table
    from ..bench.stage import bench
    from ..bench.verdict import check_gate
    from ..console import print_table

    opts = bench_options(args)
    data = data_options(args) if args.data else None
    from ..models import parse_kwargs

    report = bench([args.base, *args.pruned], args.out, data, args.weights, opts,
                   progress=lambda s: print(f"... {s}", file=sys.stderr), base_model=args.base_model,
                   model_kwargs=parse_kwargs(args.model_kwargs))
    print_table(end_table(report), title="tvsprune bench")
    for b, why in report["skipped_backends"].items():
        print(f"skipped {b}: {why}")
    print(f"wrote {args.out}/report.json, report.md, report.html")
    print(f"verdict: {report['summary']['sentence']}")
    check_gate(report["summary"], opts.fail_if)
    return 0


def _register_bench(sub: Any) -> None:
    from ..bench.options import BenchOptions

    p = sub.add_parser("bench", help="latency, memory and accuracy of base vs pruned models on every backend")
    p.add_argument("base", metavar="BASE", help="the unpruned model (zoo name / spec / .onnx)")
    p.add_argument("pruned", nargs="*", metavar="PRUNED", help="pruned artifact directories or .onnx files")
    p.add_argument("--weights", help="checkpoint of BASE")
    p.add_argument("--model-kwargs", nargs="*", metavar="K=V",
                   help="keyword arguments for BASE's constructor (key=value pairs or one JSON object)")
    add_base_model_arg(p)
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--backend", "--backends", dest="backends", type=_names, help="comma-separated: " + ", ".join(__import__("tvsprune.backends",
                   fromlist=["BACKENDS"]).BACKENDS.names()) + " (default: every backend present)")
    p.add_argument("--batch-sizes", type=_ints, help="batch sizes timed (default %(default)s)")
    p.add_argument("--rounds", type=_count, help="A/B interleaved rounds (default %(default)s)")
    p.add_argument("--iters", type=_count, help="timed iterations per model per round (default %(default)s)")
    p.add_argument("--threads", type=_count, help="CPU threads for torch and ONNX Runtime (default: the libraries')")
    p.add_argument("--eval-samples", type=_count, help="images for accuracy, stratified (default %(default)s)")
    p.add_argument("--trt-precision", choices=["fp32", "fp16", "bf16", "int8"],
                   help="precision of the engines built for the tensorrt backend; fp16 also turns on fp16 in "
                        "ONNX Runtime's TensorRT provider (ort-trt), whose engines are cached under OUT/models (default %(default)s)")
    p.add_argument("--input-shape", type=_ints, help="C,H,W when neither the models nor --data tell it")
    p.add_argument("--max-drop", type=float, metavar="POINTS",
                   help="the verdict recommends the fastest model that lost at most POINTS of top-1 and names the "
                        "faster ones it passed over (default %(default)s)")
    p.add_argument("--fail-if", metavar="GATE",
                   help="exit 4 when the verdict misses GATE, e.g. max_drop=1.5,min_speedup=1.3 (points of top-1 "
                        "lost at most, median speedup at least; default: no gate)")
    p.add_argument("--noise", type=_floats,
                   help="input noise levels (std, relative to the input's) at which pruned and base outputs are "
                        "compared (default %(default)s)")
    add_data_args(p, required=False)
    defaults_from(p, BenchOptions)
    p.set_defaults(func=cmd_bench)


register = _register_bench
