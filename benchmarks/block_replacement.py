"""Residual blocks replaced (``prune --structure blocks``) against tvsprune's channel-pruning
latency budget at the same targets: ResNet-20 on ONNX Runtime CPU, no labels, no fine-tuning.

Channel pruning cannot make ResNet-20 1.5x faster on this CPU without losing most of its
accuracy: its widths are 16/32/64 and a 16-channel block is already the smallest kernel-friendly
width. A residual block whose input and output have the same shape (ResNet-20's blocks 0, 1,
2, 4, 5, 7 and 8) can instead become one 3x3 or 1x1 convolution fitted by least squares, or
go (pruning/blocks.py says how they are fitted and chosen). Each row is
``prune(structure="blocks" | "channels", target_latency=T, latency_batch=32)`` with every other
option at its default, as the CLI runs it; the network is then measured A/B interleaved
against the unpruned one (``measure_speedup``, 5 rounds x 10 iterations) at batch 32 and 1,
and its top-1 counted on all 10,000 CIFAR-10 test images (``--rows`` picks the structures).
The first version of this script (c1cd4e5) had its own greedy path; its figures are in
RESULTS.md.

    python benchmarks/block_replacement.py [--targets 0.85,0.67,0.5] [--rows blocks,channels]
        [--out benchmarks/results/block_replacement.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import CHECKPOINTS, cifar10, machine  # noqa: E402
from accuracy_vs_sparsity import accuracy, decode  # noqa: E402

from tvsprune.calibration import DataOptions, calibrate  # noqa: E402
from tvsprune.compare.logits import chunks, collect_logits, forward_fn  # noqa: E402
from tvsprune.compare.on_backend import measure_speedup  # noqa: E402
from tvsprune.models import load_model  # noqa: E402
from tvsprune.pruning import PruneOptions, load_pruned, prune  # noqa: E402
from tvsprune.pruning.latency import cpu_capability, isa_block  # noqa: E402
from tvsprune.pruning.selection import fidelity  # noqa: E402

BACKEND, SHAPE = "ort-cpu", [3, 32, 32]


def kl(ref: np.ndarray, model: nn.Module, x: torch.Tensor) -> float:
    """KL(unpruned || model) on ``x``, as prune's choice among candidates reads it."""
    return fidelity(ref, collect_logits(forward_fn(model), chunks(x))[0])["kl"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="0.85,0.67,0.5")
    ap.add_argument("--test-per-class", type=int, default=None, help="default: all 1,000 per class")
    ap.add_argument("--rows", default="blocks,channels",
                    help="blocks: prune(structure='blocks'); channels: prune's channel latency budget")
    ap.add_argument("--out", default="benchmarks/results/block_replacement.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    targets = [float(t) for t in args.targets.split(",")]
    kinds = set(args.rows.split(","))
    root = cifar10()
    lm = load_model("resnet20", str(CHECKPOINTS["resnet20"]))
    base = lm.module.eval()
    calib = DataOptions(path=str(root / "train"), samples_per_class=200, seed=1, batch_size=250)
    xheld, _ = decode(DataOptions(path=str(root / "train")), lm, 100, seed=7)
    xt, yt = decode(DataOptions(path=str(root / "test")), lm, args.test_per_class)
    ref = collect_logits(forward_fn(base), chunks(xheld))[0]
    base_acc = accuracy(base, xt, yt)
    res = {"machine": machine(), "isa": cpu_capability(), "block": isa_block(), "torch": torch.__version__,
           "unpruned": base_acc, "args": vars(args), "rows": []}
    print(f"# ResNet-20: blocks replaced vs channels removed for a latency budget on {BACKEND}; {res['machine']}; "
          f"{res['isa']}; unpruned {base_acc:.2f} % on {len(yt)} test images")
    tmp = Path(tempfile.mkdtemp(prefix="tvsprune-blocks-"))
    mpath = tmp / "resnet20.moments.safetensors"
    if "channels" in kinds:  # blocks need no moments
        calibrate(lm, calib, mpath, "pool:4")
    print("| target | structure | replaced | measured latency (speedup, range) | at batch 1 | top-1 % (drop) | seconds |")
    print("|---|---|---|---|---|---|---|")
    for target in targets:
        for structure in [k for k in ("blocks", "channels") if k in kinds]:
            t1, out = time.time(), tmp / f"{structure}-{target}"
            rep = prune(lm, mpath if structure == "channels" else None, out,
                        PruneOptions.build(target_latency=target, latency_batch=32, structure=structure,
                                           compare_criteria=False), calib)
            model = load_pruned(out).module
            seconds = round(time.time() - t1)
            m32 = measure_speedup(BACKEND, base, model, SHAPE, 32)
            m1 = measure_speedup(BACKEND, base, model, SHAPE, 1)
            acc = accuracy(model, xt, yt)
            lat = rep["latency"]
            row = {"target": target, "structure": structure, "replaced": lat.get("replaced"),
                   "prune_measured": lat["measured"], "prune_predicted": lat["predicted"],
                   "ratio": round(1 / m32["speedup"], 4), "speedup": round(m32["speedup"], 3),
                   "range": [round(m32["speedup_min"], 3), round(m32["speedup_max"], 3)],
                   "speedup_b1": round(m1["speedup"], 3), "top1": round(acc, 2), "drop": round(base_acc - acc, 2),
                   "kl_heldout": round(kl(ref, model, xheld), 4), "prune_seconds": seconds,
                   "path": lat.get("path")}
            res["rows"].append(row)
            replaced = ", ".join(f"{k.rsplit('.', 1)[-1]}: {v}" for k, v in (row["replaced"] or {}).items()) or "-"
            print(f"| {target} | {structure} | {replaced} | {row['ratio']:.3f} ({row['speedup']:.2f}x, "
                  f"{row['range'][0]:.2f}-{row['range'][1]:.2f}) | {row['speedup_b1']:.2f}x | {row['top1']:.2f} "
                  f"({-row['drop']:+.2f}) | {seconds} |", flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
