"""INT8 (QDQ) vs FP32 ONNX of a pruned vgg11_bn on all 10,000 CIFAR-10 test images, and the
CPU latency ratio INT8/FP32 at batch 32 (ONNX Runtime, interleaved rounds).

Uses the pruned model from benchmarks/bench_speed.py (run that first, same --out).

    python benchmarks/int8_accuracy.py [--out bench-out] [--method minmax]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cifar10, machine  # noqa: E402

from tvsprune.cli import main as cli  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--pruned", default="vgg11_tvs_params0.5")
    ap.add_argument("--method", default="minmax")
    args = ap.parse_args()
    root, out = cifar10(), Path(args.out)
    pruned = out / args.pruned
    fp32 = out / "export" / "pruned.onnx"
    cli(["export", "onnx", str(pruned), "--out", str(fp32), "--data", str(root / "test")])
    int8 = out / "export" / f"pruned.{args.method}.int8.onnx"
    cli(["export", "int8", str(fp32), "--calib-data", str(root / "train"), "--calib-samples", "512",
         "--method", args.method, "--out", str(int8), "--eval-data", str(root / "test")])
    rep = json.loads(Path(str(int8).removesuffix(".onnx") + ".json").read_text())
    e = rep["evaluation"]
    print(f"\n# on {machine()}")
    print(f"{e['samples']} test images: FP32 {e['fp32_top1'] * 100:.2f} %, INT8 {e['int8_top1'] * 100:.2f} % "
          f"({e['change_points']:+.2f} points; goal within 1 point: "
          f"{'met' if abs(e['change_points']) <= 1 else 'NOT met'}); prediction agreement "
          f"{e['prediction_agreement'] * 100:.2f} %; CPU latency INT8/FP32 at batch {e['latency_batch']}: "
          f"{e['latency_ratio_int8_over_fp32']:.2f} [{e['latency_ratio_spread'][0]:.2f}-{e['latency_ratio_spread'][1]:.2f}]")


if __name__ == "__main__":
    main()
