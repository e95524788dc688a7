"""How far one network's measured speedup moves between measurements on this machine.

ResNet-20 with residual blocks 0, 2 and 5 removed (the network ``--structure blocks`` chose at
1.53-1.54x; ``--forms`` gives another, e.g. ``0:1x1,2:identity,5:identity``; weights do not
change its time) is measured against the unpruned ResNet-20 with
prune's own check (``measure_speedup``: A/B interleaved on the latency backend, its default
rounds) again and again, each time beside an A/A pair (the base against a copy of itself). The
script prints every measurement, the range of the ratio, and the fit of the pruned network's
milliseconds on the base's: a slope near the ratio with no offset means the machine slowed
both alike; an offset means something per call or per operator (which the smaller network
pays nearly as often) moved, and then the ratio itself moves with the machine.

    python benchmarks/speedup_drift.py [--repeats 12] [--batch 32] [--backend ort-cpu]
        [--forms 0:identity,2:identity,5:identity] [--rounds 5] [--iters 10]
        [--out results/speedup_drift.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from tvsprune.compare.on_backend import measure_speedup  # noqa: E402
from tvsprune.models import build_module  # noqa: E402
from tvsprune.pruning.blocks import unfitted  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--backend", default="ort-cpu")
    ap.add_argument("--forms", default="0:identity,2:identity,5:identity",
                    help="BLOCK:FORM,...: ResNet-20's blocks (0-8) removed (identity) or one 3x3 / 1x1 convolution")
    ap.add_argument("--rounds", type=int, default=5, help="A/B rounds per measurement (prune's default: 5)")
    ap.add_argument("--iters", type=int, default=10, help="timed runs per network per round (prune's default: 10)")
    ap.add_argument("--out", type=Path, default=None, help="write the measurements as JSON here")
    args = ap.parse_args()

    base = build_module("resnet20").eval()
    pruned = copy.deepcopy(base)
    forms = {int(b): f for b, f in (item.split(":") for item in args.forms.split(","))}
    for i, form in forms.items():
        pruned.layers[i] = unfitted(pruned.layers[i].conv1.in_channels, form)
    twin = copy.deepcopy(base)
    shape = [3, 32, 32]
    print(f"# {machine()}; {args.backend}, batch {args.batch}, {args.rounds} rounds x {args.iters} runs; "
          f"ResNet-20 with {args.forms} vs ResNet-20, and an A/A pair", flush=True)
    print("| # | base ms | pruned ms | ratio | speedup | A/A ratio | s |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for k in range(args.repeats):
        t0 = time.perf_counter()
        ab = measure_speedup(args.backend, base, pruned, shape, args.batch, "fp32", args.rounds, args.iters)
        aa = measure_speedup(args.backend, base, twin, shape, args.batch, "fp32", args.rounds, args.iters)
        row = {"base_ms": ab["base_ms"], "pruned_ms": ab["pruned_ms"], "ratio": 1 / ab["speedup"],
               "speedup": ab["speedup"], "aa_ratio": 1 / aa["speedup"], "s": time.perf_counter() - t0}
        rows.append(row)
        print(f"| {k + 1} | {row['base_ms']:.2f} | {row['pruned_ms']:.2f} | {row['ratio']:.4f} | "
              f"{row['speedup']:.3f}x | {row['aa_ratio']:.4f} | {row['s']:.0f} |", flush=True)
    r, aa = np.array([x["ratio"] for x in rows]), np.array([x["aa_ratio"] for x in rows])
    b, p = np.array([x["base_ms"] for x in rows]), np.array([x["pruned_ms"] for x in rows])
    slope, offset = np.polyfit(b, p, 1) if np.ptp(b) > 0 else (float("nan"), float("nan"))
    corr = float(np.corrcoef(b, r)[0, 1]) if np.ptp(b) > 0 and np.ptp(r) > 0 else float("nan")
    summary = {"ratio_min": float(r.min()), "ratio_max": float(r.max()), "speedup_min": float(1 / r.max()),
               "speedup_max": float(1 / r.min()), "aa_min": float(aa.min()), "aa_max": float(aa.max()),
               "base_ms_min": float(b.min()), "base_ms_max": float(b.max()), "corr_base_ms_ratio": corr,
               "pruned_ms_fit": {"slope": float(slope), "offset_ms": float(offset)}}
    print(f"\nratio {r.min():.4f}-{r.max():.4f} (speedup {1 / r.max():.3f}-{1 / r.min():.3f}x), A/A "
          f"{aa.min():.4f}-{aa.max():.4f}; base {b.min():.2f}-{b.max():.2f} ms; correlation of the ratio with the "
          f"base's ms {corr:+.2f}; pruned ms = {slope:.3f} x base ms {offset:+.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                        "forms": forms, "rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
