"""Latency budgets on ONNX Runtime CPU: tvsprune's --target-latency against its own MAC budget
and Torch-Pruning at the same measured latency. No fine-tuning anywhere.

For each model, target (a fraction of the unpruned latency kept) and latency batch:

- ``tvs latency``: ``prune(target_latency=T, latency_batch=B)`` with every other option at
  its default (round_to auto: the CPU's channel block), as the CLI runs it;
- at batch 32 only (to bound the run), at the latency that row measured:
  - ``tvs macs``: tvsprune's own MAC budget (``keep_macs``, defaults), the fraction kept
    found by secant steps on the measured latency;
  - ``tp-l2 global r8``: Torch-Pruning's MagnitudeImportance(p=2), global, ``round_to=8``,
    then the same BatchNorm re-estimation on the same repair images as tvsprune's, its
    pruning ratio found the same way;
- alignment: ``tvs latency`` at the first target and batch 32 with ``round_to`` 1 and 8 (and
  16 where the CPU's block is 16) beside auto.

Every ratio is measured by ``tvsprune.compare.on_backend.measure_speedup``: the row's network
and the unpruned one A/B interleaved on ort-cpu (5 rounds x 10 iterations, sessions that do
not spin), at the row's batch and at the other one. Top-1 on all 10,000 CIFAR-10 test images
(``--test-per-class`` shortens it). The prediction error of both latency models ("network":
one group narrowed at a time, prune's default; "layer": each layer alone) is printed for every
network measured: predicted ratio / measured ratio - 1.

    python benchmarks/latency_budget.py [--models resnet20,vgg11_bn] [--targets 0.67,0.5]
        [--batches 32,1] [--test-per-class N] [--out benchmarks/results/latency_budget.json]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CHECKPOINTS, cifar10, machine  # noqa: E402
from accuracy_vs_sparsity import accuracy, decode  # noqa: E402

from tvsprune.calibration import DataOptions, calibrate  # noqa: E402
from tvsprune.compare.on_backend import measure_speedup  # noqa: E402
from tvsprune.errors import TvsError  # noqa: E402
from tvsprune.models import load_model  # noqa: E402
from tvsprune.pruning import PruneOptions, load_pruned, prune  # noqa: E402
from tvsprune.pruning.context import Context, repair_batches  # noqa: E402
from tvsprune.pruning.latency import backend_block, cpu_capability, isa_block, measure_table  # noqa: E402
from tvsprune.pruning.repairs import recalibrate_batchnorm  # noqa: E402

SHAPE = [3, 32, 32]
BACKEND = "ort-cpu"


def widths_of(module: nn.Module, base_ctx: Context) -> dict[str, tuple[int, int]]:
    """Kept (output, input) width of every layer of the base's cost table, read off a pruned module."""
    mods = dict(module.named_modules())
    out = {}
    for n, c in base_ctx.cost.table.layers.items():
        m = mods[n]
        if isinstance(m, nn.Conv2d):
            out[n] = (m.out_channels, m.in_channels)
        elif isinstance(m, nn.Linear):
            out[n] = (m.out_features, m.in_features)
        else:
            out[n] = (m.num_features, m.num_features)
    return out


class Predictors:
    """Both latency models of one network at one batch (cached tables, measured once)."""

    def __init__(self, lm, ctx: Context, batch: int) -> None:
        guards = PruneOptions.build(target_latency=0.5).guards
        self.ctx = ctx
        self.tables = {how: measure_table(lm.module, ctx.cost.table, ctx.graph, SHAPE, BACKEND, batch, guards,
                                          how=how, logits_layer=ctx.probe.logits_layer)
                       for how in ("network", "layer")}
        self.base = {how: t.predict(ctx.cost.table.widths()) for how, t in self.tables.items()}

    def errors(self, module: nn.Module, measured: float) -> dict[str, float]:
        w = widths_of(module, self.ctx)
        return {how: round(t.predict(w) / self.base[how] / measured - 1, 4) for how, t in self.tables.items()}


def measured_ratio(base: nn.Module, model: nn.Module, batch: int) -> dict[str, float]:
    m = measure_speedup(BACKEND, base, model, SHAPE, batch)
    return {"ratio": 1 / m["speedup"], "speedup": m["speedup"], "range": [m["speedup_min"], m["speedup_max"]]}


def match_latency(make, k0: float, goal: float, base: nn.Module, batch: int, steps: int, power: float = 1.0):
    """The fraction kept (k, a knob the latency rises with) whose network measures closest to
    ``goal`` (a latency ratio): secant steps from ``k0``; returns (model, k, measurement)."""
    pts = []
    k = k0
    for _ in range(steps):
        model = make(k)
        m = measured_ratio(base, model, batch)
        pts.append((k, m["ratio"], model, m))
        print(f"    kept {k:.3f}: {m['ratio']:.3f} of the base latency (goal {goal:.3f})", flush=True)
        if abs(m["ratio"] / goal - 1) <= 0.03:
            break
        if len(pts) == 1 or pts[-1][1] == pts[-2][1]:
            k = k * (goal / m["ratio"]) ** (1 / power)
        else:
            (k1, r1, *_), (k2, r2, *_) = pts[-2], pts[-1]
            k = k2 + (goal - r2) * (k2 - k1) / (r2 - r1)
        k = float(min(0.98, max(0.05, k)))
    k, _, model, m = min(pts, key=lambda p: abs(p[1] / goal - 1))
    return model, k, m


def tp_l2_global(base: nn.Module, logits: str, kept: float, repair) -> nn.Module:
    """Torch-Pruning: L2 magnitude, global, round_to=8, pruning ratio 1 - kept; then the same
    BatchNorm re-estimation as tvsprune's repairs."""
    import torch_pruning as tp

    model = copy.deepcopy(base).eval()
    pruner = tp.pruner.MetaPruner(model, torch.zeros(1, *SHAPE), tp.importance.MagnitudeImportance(p=2),
                                  global_pruning=True, pruning_ratio=1 - kept, round_to=8,
                                  ignored_layers=[dict(model.named_modules())[logits]])
    pruner.step()
    recalibrate_batchnorm(model, repair)
    return model.eval()


def macs_params(model: nn.Module) -> tuple[int, int]:
    from tvsprune.models.costs import count_params_macs

    p, m = count_params_macs(model, SHAPE)
    return m, p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,vgg11_bn")
    ap.add_argument("--targets", default="0.67,0.5")
    ap.add_argument("--batches", default="32,1")
    ap.add_argument("--test-per-class", type=int, default=None, help="default: all 1,000 per class")
    ap.add_argument("--steps", type=int, default=3, help="secant steps to match a measured latency")
    ap.add_argument("--no-compare", action="store_true", help="the tvs latency rows only")
    ap.add_argument("--out", default="benchmarks/results/latency_budget.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    targets = [float(t) for t in args.targets.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    root = cifar10()
    block = backend_block(BACKEND)
    results = {"machine": machine(), "isa": cpu_capability(), "round_to_auto": block, "torch": torch.__version__,
               "args": vars(args), "models": {}}
    print(f"# latency budgets on {BACKEND}, no fine-tuning; {results['machine']}; {cpu_capability()} (ONNX "
          f"Runtime's channel block {isa_block()}, round_to auto {block}); torch {torch.__version__}")
    tmp = Path(tempfile.mkdtemp(prefix="tvsprune-lat-"))
    for name in args.models.split(","):
        t0 = time.time()
        lm = load_model(name, str(CHECKPOINTS[name]))
        calib = DataOptions(path=str(root / "train"), samples_per_class=200, seed=1, batch_size=250)
        mpath = tmp / f"{name}.moments.safetensors"
        calibrate(lm, calib, mpath, "pool:4")
        xt, yt = decode(DataOptions(path=str(root / "test")), lm, args.test_per_class)
        repair = list(repair_batches(calib, lm, PruneOptions.default("repair_samples_per_class"))[1])
        base_acc = accuracy(lm.module, xt, yt)
        bmacs, bparams = macs_params(lm.module)
        ctx = Context.build(lm, SHAPE)
        rows: list[dict] = []
        print(f"\n## {name}: unpruned {base_acc:.2f} % on {len(yt)} test images, {bmacs:,} MACs", flush=True)
        print("| latency batch | target | method | measured latency (speedup, rounds) | at the other batch | "
              "top-1 % (drop) | MACs removed % | prediction error network / layer | seconds |")
        print("|---|---|---|---|---|---|---|---|---|")

        def emit(batch, target, method, model, m, t1, extra=None):
            other = 1 if batch != 1 else 32
            mo = measured_ratio(lm.module, model, other)
            acc = accuracy(model, xt, yt)
            macs, params = macs_params(model)
            err = predictors[batch].errors(model, m["ratio"])
            row = {"batch": batch, "target": target, "method": method, "ratio": round(m["ratio"], 4),
                   "speedup": round(m["speedup"], 3), "speedup_range": [round(x, 3) for x in m["range"]],
                   "other_batch": other, "speedup_other": round(mo["speedup"], 3), "top1": round(acc, 2),
                   "drop": round(base_acc - acc, 2), "macs_removed": round(100 * (1 - macs / bmacs), 1),
                   "params_removed": round(100 * (1 - params / bparams), 1), "prediction_error": err,
                   "seconds": round(time.time() - t1), **(extra or {})}
            rows.append(row)
            print(f"| {batch} | {target} | {method} | {row['ratio']:.3f} ({row['speedup']:.2f}x, "
                  f"{row['speedup_range'][0]:.2f}-{row['speedup_range'][1]:.2f}) | {row['speedup_other']:.2f}x at "
                  f"{other} | {row['top1']:.2f} ({row['drop']:+.2f}) | {row['macs_removed']:.1f} | "
                  f"{err['network']:+.3f} / {err['layer']:+.3f} | {row['seconds']} |", flush=True)
            results["models"][name] = {"unpruned": base_acc, "macs": bmacs, "params": bparams, "rows": rows}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))
            return row

        predictors = {b: Predictors(lm, ctx, b) for b in sorted(set(batches) | {1, 32})}
        for batch in batches:
            for target in targets:
                t1 = time.time()
                out = tmp / f"{name}-lat-{target}-b{batch}"
                rep = prune(lm, mpath, out, PruneOptions.build(target_latency=target, latency_batch=batch,
                                                               compare_criteria=False), calib)
                model = load_pruned(out).module
                lat = rep["latency"]
                m = {"ratio": lat["measured"], "speedup": lat["speedup"],
                     "range": [1 / lat["measured_range"][1], 1 / lat["measured_range"][0]]}
                chosen = [t for t in rep.get("selection", {}).get("candidates", []) if t.get("chosen")]
                how = "/".join(str(chosen[0][k]) for k in ("tvs_saliency", "allocation", "compensation")
                               if chosen and chosen[0].get(k))
                row = emit(batch, target, f"tvs latency [{how}]", model, m, t1,
                           {"attempts": lat["attempts"], "table_seconds": lat["table"]["seconds"]})
                if batch != 32 or args.no_compare:
                    continue
                goal = row["ratio"]
                t1 = time.time()
                k0 = 1 - row["macs_removed"] / 100

                def by_macs(k, target=target):
                    o = tmp / f"{name}-macs-{k:.4f}"
                    prune(lm, mpath, o, PruneOptions.build(keep_macs=k, compare_criteria=False), calib)
                    return load_pruned(o).module

                model, k, m = match_latency(by_macs, k0, goal, lm.module, 32, args.steps)
                emit(32, target, f"tvs macs (keep_macs {k:.3f})", model, m, t1)
                t1 = time.time()
                model, k, m = match_latency(lambda k: tp_l2_global(lm.module, ctx.probe.logits_layer, k, repair),
                                            0.8, goal, lm.module, 32, args.steps + 1, power=2.0)
                emit(32, target, f"tp-l2 global r8 (ratio {1 - k:.3f})", model, m, t1)
        if 32 in batches:
            for rt in sorted({1, 8, isa_block()} - {block}):
                t1 = time.time()
                out = tmp / f"{name}-lat-r{rt}"
                try:
                    rep = prune(lm, mpath, out, PruneOptions.build(target_latency=targets[0], latency_batch=32,
                                                                   round_to=rt, compare_criteria=False), calib)
                except TvsError as e:  # prune's refusal is this row's result
                    print(f"| 32 | {targets[0]} | tvs latency round_to {rt} | refused: {e} |", flush=True)
                    rows.append({"batch": 32, "target": targets[0], "method": f"tvs latency round_to {rt}",
                                 "refused": str(e)})
                    continue
                lat = rep["latency"]
                emit(32, targets[0], f"tvs latency round_to {rt}", load_pruned(out).module,
                     {"ratio": lat["measured"], "speedup": lat["speedup"],
                      "range": [1 / lat["measured_range"][1], 1 / lat["measured_range"][0]]}, t1)
        errs = np.array([[abs(r["prediction_error"]["network"]), abs(r["prediction_error"]["layer"])] for r in rows
                         if "prediction_error" in r])
        print(f"mean |prediction error| over {len(rows)} measured networks: network {errs[:, 0].mean():.3f}, "
              f"layer {errs[:, 1].mean():.3f}  ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
