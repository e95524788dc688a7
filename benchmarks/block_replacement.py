"""Residual blocks replaced by one least-squares convolution (no labels, no fine-tuning),
against tvsprune's channel-pruning latency budget at the same measured latency: ResNet-20 on
ONNX Runtime CPU; the first measurement of what ``prune --structure blocks`` now does.

Channel pruning cannot make ResNet-20 1.5x faster on this CPU without losing most of its
accuracy: its widths are 16/32/64 and a 16-channel block is already the smallest kernel-friendly
width. A residual block whose input and output have the same shape (ResNet-20's blocks 0, 1,
2, 4, 5, 7 and 8) can instead go whole. Each such block gets three cheaper forms:

- ``3x3``: one 3x3 convolution (with bias) + ReLU, fitted by least squares so that it maps the
  block's input *in the network as changed so far* to the unpruned block's output before its
  final ReLU (``bn2(conv2(...)) + x``, read by hooks), on 1,000 calibration images x 256 random
  positions (ridge 1e-4 of the mean diagonal);
- ``1x1``: the same with a 1x1 convolution;
- ``identity``: the block removed (its shortcut alone).

Every BatchNorm is then re-estimated on the same repair images tvsprune uses. Choice, label
free: greedy, each step takes the change (any block to any cheaper form) with the least
increase of KL(unpruned || changed) on 1,000 held-out calibration images per unit of latency
saved, the latency saved by each change being measured once, alone, A/B against the base
(additive model). Each target's network is the first on the greedy path whose predicted
latency is at or under it; it is then measured A/B interleaved against the unpruned network
(``measure_speedup``, 5 rounds x 10 iterations) at batch 32 and 1, and its top-1 counted on all
10,000 CIFAR-10 test images. Beside it, ``prune(target_latency=T)`` with every default, as the
CLI runs it, and the product's own ``prune(structure="blocks", target_latency=T)`` (``--rows``
picks among the three).

    python benchmarks/block_replacement.py [--targets 0.85,0.67,0.5] [--rows script,product,channels]
        [--out benchmarks/results/block_replacement.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import CHECKPOINTS, cifar10, machine  # noqa: E402
from accuracy_vs_sparsity import accuracy, decode  # noqa: E402

from tvsprune.calibration import DataOptions, calibrate  # noqa: E402
from tvsprune.compare.logits import chunks, collect_logits, forward_fn  # noqa: E402
from tvsprune.compare.on_backend import measure_speedup  # noqa: E402
from tvsprune.models import load_model  # noqa: E402
from tvsprune.pruning import PruneOptions, load_pruned, prune  # noqa: E402
from tvsprune.pruning.context import repair_batches  # noqa: E402
from tvsprune.pruning.latency import cpu_capability, isa_block  # noqa: E402
from tvsprune.pruning.repairs import recalibrate_batchnorm  # noqa: E402
from tvsprune.pruning.selection import fidelity  # noqa: E402

BACKEND, SHAPE = "ort-cpu", [3, 32, 32]
FORMS = ("3x3", "1x1", "identity")  # cheaper to the right


class ConvReLU(nn.Module):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))


def block_io(model: nn.Module, i: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Block ``i``'s input and (for a BasicBlock) its output before the final ReLU."""
    out: dict[str, torch.Tensor] = {}
    blk = model.layers[i]
    hooks = [blk.register_forward_pre_hook(lambda m, a: out.__setitem__("x", a[0]))]
    if hasattr(blk, "bn2"):
        hooks.append(blk.bn2.register_forward_hook(lambda m, a, o: out.__setitem__("b", o)))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    if "b" in out:
        out["z"] = out["b"] + out["x"]
    return out


def fit_conv(x: torch.Tensor, z: torch.Tensor, k: int, positions: int = 256) -> nn.Conv2d:
    """The k x k convolution (with bias) closest to ``z`` from ``x`` in least squares."""
    n, c, h, w = x.shape
    pick = torch.randint(0, h * w, (n, positions), generator=torch.Generator().manual_seed(0))
    a_parts, b_parts = [], []
    for s in range(0, n, 200):  # unfolded in slices: 1,000 images x 144 x 1,024 would be 590 MB
        cols, sel = F.unfold(x[s:s + 200], k, padding=k // 2), pick[s:s + 200, None]
        a_parts.append(torch.gather(cols, 2, sel.expand(-1, cols.shape[1], -1)).permute(0, 2, 1).reshape(-1, cols.shape[1]))
        zs = z[s:s + 200].reshape(len(sel), c, -1)
        b_parts.append(torch.gather(zs, 2, sel.expand(-1, c, -1)).permute(0, 2, 1).reshape(-1, c))
    a, b = torch.cat(a_parts), torch.cat(b_parts)
    a = torch.cat([a, torch.ones(len(a), 1)], 1).double()
    g = a.T @ a
    g += 1e-4 * g.diagonal().mean() * torch.eye(len(g), dtype=g.dtype)
    sol = torch.linalg.solve(g, a.T @ b.double()).float()
    conv = nn.Conv2d(c, c, k, padding=k // 2)
    conv.weight.data = sol[:-1].T.reshape(c, c, k, k).contiguous()
    conv.bias.data = sol[-1].contiguous()
    return conv


def build(base: nn.Module, forms: dict[int, str], xfit: torch.Tensor, repair) -> nn.Module:
    m = copy.deepcopy(base).eval()
    for i in sorted(forms):
        if forms[i] == "identity":
            m.layers[i] = nn.Identity()
            continue
        conv = fit_conv(block_io(m, i, xfit)["x"], block_io(base, i, xfit)["z"], int(forms[i][0]))
        m.layers[i] = ConvReLU(conv)
    recalibrate_batchnorm(m, repair)
    return m.eval()


def kl(ref: np.ndarray, model: nn.Module, x: torch.Tensor) -> float:
    """KL(unpruned || model) on ``x``, as prune's choice among candidates reads it."""
    return fidelity(ref, collect_logits(forward_fn(model), chunks(x))[0])["kl"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="0.85,0.67,0.5")
    ap.add_argument("--test-per-class", type=int, default=None, help="default: all 1,000 per class")
    ap.add_argument("--rows", default="script,product,channels",
                    help="script: this file's greedy path; product: prune(structure='blocks'); channels: prune's "
                         "channel latency budget")
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
    repair = list(repair_batches(calib, lm, PruneOptions.default("repair_samples_per_class"))[1])
    xfit = torch.cat([x for x, _ in repair])[:1000]
    xheld, _ = decode(DataOptions(path=str(root / "train")), lm, 100, seed=7)
    xt, yt = decode(DataOptions(path=str(root / "test")), lm, args.test_per_class)
    ref = collect_logits(forward_fn(base), chunks(xheld))[0]
    base_acc = accuracy(base, xt, yt)
    blocks = [i for i, b in enumerate(base.layers) if not len(getattr(b, "shortcut", [])) and hasattr(b, "bn2")]
    res = {"machine": machine(), "isa": cpu_capability(), "block": isa_block(), "torch": torch.__version__,
           "unpruned": base_acc, "blocks": blocks, "args": vars(args)}
    print(f"# ResNet-20 residual blocks replaced by least squares on {BACKEND}; {res['machine']}; "
          f"{res['isa']}; unpruned {base_acc:.2f} % on {len(yt)} test images; replaceable blocks {blocks}")

    saved, path = {}, []
    for i in blocks if "script" in kinds else []:
        for f in FORMS:
            s = measure_speedup(BACKEND, base, build(base, {i: f}, xfit, repair), SHAPE, 32)
            saved[(i, f)] = 1 - 1 / s["speedup"]
    res["saved_alone"] = {f"{i}:{f}": round(v, 4) for (i, f), v in saved.items()}
    print("latency saved by each change alone, batch 32: " +
          ", ".join(f"{i}:{f} {v:.3f}" for (i, f), v in saved.items()), flush=True)

    def predicted(forms):
        return 1 - sum(saved[(i, f)] for i, f in forms.items())

    forms: dict[int, str] = {}
    while "script" in kinds and predicted(forms) > min(targets) - 0.02:
        now, best = kl(ref, build(base, forms, xfit, repair), xheld) if forms else 0.0, None
        for i in blocks:
            for f in FORMS[FORMS.index(forms[i]) + 1 if i in forms else 0:]:
                trial = {**forms, i: f}
                gain = predicted(forms) - predicted(trial)
                if gain <= 0:
                    continue
                score = (kl(ref, build(base, trial, xfit, repair), xheld) - now) / gain
                if best is None or score < best[0]:
                    best = (score, trial)
        if best is None:
            break
        forms = best[1]
        path.append({"forms": dict(forms), "predicted": round(predicted(forms), 4)})
        print(f"greedy: {forms} predicted {predicted(forms):.3f}", flush=True)
    res["path"] = [{"forms": {str(k): v for k, v in p["forms"].items()}, "predicted": p["predicted"]} for p in path]

    rows = res["rows"] = []
    tmp = Path(tempfile.mkdtemp(prefix="tvsprune-blocks-"))
    mpath = tmp / "resnet20.moments.safetensors"
    if kinds & {"product", "channels"}:
        calibrate(lm, calib, mpath, "pool:4")
    print("| target | method | measured latency (speedup, range) | at batch 1 | top-1 % (drop) | seconds |")
    print("|---|---|---|---|---|---|")
    for target in targets:
        runs = []
        if "script" in kinds:
            pick = next((p for p in path if p["predicted"] <= target), path[-1])
            runs.append(("blocks " + ", ".join(f"{i}:{f}" for i, f in sorted(pick["forms"].items())),
                         lambda pick=pick: build(base, pick["forms"], xfit, repair)))

        def by_prune(structure, target=target):
            out = tmp / f"{structure}-{target}"
            rep = prune(lm, mpath, out, PruneOptions.build(target_latency=target, latency_batch=32, structure=structure,
                                                           compare_criteria=False), calib)
            print(f"prune --structure {structure} --target-latency {target}: measured {rep['latency']['measured']}, "
                  f"predicted {rep['latency']['predicted']}, replaced {rep['latency'].get('replaced')}", flush=True)
            return load_pruned(out).module
        for structure in [k for k in ("product", "channels") if k in kinds]:
            name = "prune --structure blocks" if structure == "product" else "tvs latency (channels)"
            runs.append((name, lambda s=structure: by_prune("blocks" if s == "product" else "channels")))
        for method, make in runs:
            t1 = time.time()
            model = make()
            m32 = measure_speedup(BACKEND, base, model, SHAPE, 32)
            m1 = measure_speedup(BACKEND, base, model, SHAPE, 1)
            acc = accuracy(model, xt, yt)
            row = {"target": target, "method": method, "ratio": round(1 / m32["speedup"], 4),
                   "speedup": round(m32["speedup"], 3),
                   "range": [round(m32["speedup_min"], 3), round(m32["speedup_max"], 3)],
                   "speedup_b1": round(m1["speedup"], 3), "top1": round(acc, 2), "drop": round(base_acc - acc, 2),
                   "kl_heldout": round(kl(ref, model, xheld), 4), "seconds": round(time.time() - t1)}
            rows.append(row)
            print(f"| {target} | {method} | {row['ratio']:.3f} ({row['speedup']:.2f}x, {row['range'][0]:.2f}-"
                  f"{row['range'][1]:.2f}) | {row['speedup_b1']:.2f}x | {row['top1']:.2f} ({-row['drop']:+.2f}) | "
                  f"{row['seconds']} |", flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
