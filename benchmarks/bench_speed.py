"""Speedup of a ~50 %-pruned vgg11_bn over the unpruned one on this CPU, next to the MACs ratio.

Prunes with tvs (moments from 100 training images per class at pool:4, both repairs),
then runs `tvsprune bench` on torch-cpu and ort-cpu at batch 1, 8 and 32 (A/B interleaved)
and prints the ORT CPU speedup at batch 32 beside the MACs ratio (goal: >= 0.8 x).

    python benchmarks/bench_speed.py [--target 0.5] [--out bench-out]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CHECKPOINTS, cifar10, machine  # noqa: E402

from tvsprune.cli import main as cli  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="0.5")
    ap.add_argument("--metric", default="params", choices=["params", "flops"])
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    root, out = cifar10(), Path(args.out)
    w = str(CHECKPOINTS["vgg11_bn"])
    if not (out / "moments.safetensors").exists():
        cli(["calibrate", "vgg11_bn", "--weights", w, "--data", str(root / "train"), "--samples-per-class", "100",
             "--resolution", "pool:4", "--out", str(out / "moments.safetensors")])
    pruned = out / f"vgg11_tvs_{args.metric}{args.target}"
    if not (pruned / "prune.json").exists():
        cli(["prune", "vgg11_bn", "--weights", w, "--moments", str(out / "moments.safetensors"),
             f"--target-{args.metric}", args.target, "--bn-recalibrate", "--mean-compensation", "--out", str(pruned)])
    cli(["bench", "vgg11_bn", str(pruned), "--weights", w, "--data", str(root / "test"), "--out",
         str(out / "report"), "--backend", "torch-cpu,ort-cpu", "--batch-sizes", "1,8,32", "--eval-samples", "2000"])
    rep = json.loads((out / "report" / "report.json").read_text())
    base, pr = rep["models"]
    macs_ratio = base["macs"] / pr["macs"]
    print(f"\n# on {machine()}")
    print(f"params {base['params']:,} -> {pr['params']:,} ({1 - pr['params'] / base['params']:.1%} removed); "
          f"MACs ratio {macs_ratio:.2f}")
    for backend in rep["latency"]:
        for bs, lat in rep["latency"][backend].items():
            sp = lat["speedup_vs_base"][pr["label"]]
            print(f"{backend:9s} batch {bs:>2}: speedup {sp['speedup_median']:.2f} [{sp['speedup_min']:.2f}-"
                  f"{sp['speedup_max']:.2f}] = {sp['speedup_median'] / macs_ratio:.2f} x MACs ratio")
    sp = rep["latency"]["ort-cpu"]["32"]["speedup_vs_base"][pr["label"]]["speedup_median"]
    verdict = "met" if sp >= 0.8 * macs_ratio else "NOT met"
    print(f"ORT CPU batch 32: speedup {sp:.2f} vs MACs ratio {macs_ratio:.2f}: goal >= 0.8 x MACs ratio {verdict}")


if __name__ == "__main__":
    main()
