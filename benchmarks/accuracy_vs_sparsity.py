"""Test accuracy vs fraction of parameters removed, for every criterion, with and without repairs.

Moments come from at most 500 training images per class (default 200); accuracy is on
all 10,000 CIFAR-10 test images; no fine-tuning anywhere. Every criterion goes through
the same plan path (allocation, guards, surgery). Also prints the Spearman correlation
between LDIFF and the accuracy kept when one layer alone is pruned at random.

    python benchmarks/accuracy_vs_sparsity.py [--models vgg11_bn,resnet20] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CHECKPOINTS, cifar10, machine  # noqa: E402

from tvsprune.calibration import DataOptions, calibrate  # noqa: E402
from tvsprune.data import BatchStream, stratified_indices  # noqa: E402
from tvsprune.models import load_model  # noqa: E402
from tvsprune.pruning import layer_scores, ldiff, make_plan, spearman  # noqa: E402
from tvsprune.pruning.stage import Context, PruneOptions, build_pruned, iterative  # noqa: E402

REPAIRS = {"none": (False, False), "bn": (True, False), "mc": (False, True), "both": (True, True)}


def decode(data: DataOptions, model, per_class=None, seed=0, exclude=None):
    src = data.open(model)
    idx = stratified_indices(src.labels, per_class, seed, exclude)
    xs, ys = zip(*BatchStream(src, idx, 500))
    return torch.cat(xs), torch.cat(ys), idx


@torch.no_grad()
def accuracy(model, x, y, bs=500) -> float:
    model.eval()
    hits = sum(int((model(x[i:i + bs]).argmax(1) == y[i:i + bs]).sum()) for i in range(0, len(x), bs))
    return hits / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg11_bn,resnet20")
    ap.add_argument("--sparsities", default="0.1,0.2,0.3,0.4,0.5,0.6")
    ap.add_argument("--criteria", default="tvs,mean-distance,l1,l2,random,bn-scale,fpgm")
    ap.add_argument("--repairs", default="none,both", help="for every criterion")
    ap.add_argument("--ablation", default="tvs,l1", help="criteria that also get bn-only and mc-only")
    ap.add_argument("--samples-per-class", type=int, default=200, help="calibration images per class (<= 500)")
    ap.add_argument("--resolution", default="pool:4")
    ap.add_argument("--allocation", default="cost")
    ap.add_argument("--test-per-class", type=int, default=None, help="default: all 1,000 per class")
    ap.add_argument("--ldiff-frac", type=float, default=0.3, help="fraction of one layer removed at random")
    ap.add_argument("--iter-max-drop", type=float, default=2.0)
    ap.add_argument("--out", default="accuracy_vs_sparsity.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    root = cifar10()
    sparsities = [float(s) for s in args.sparsities.split(",")]
    criteria = args.criteria.split(",")
    results = {"machine": machine(), "args": vars(args), "models": {}}
    print(f"# accuracy vs parameters removed (no fine-tuning) on {results['machine']}")
    for name in args.models.split(","):
        t0 = time.time()
        lm = load_model(name, str(CHECKPOINTS[name]))
        calib = DataOptions(str(root / "train"), samples_per_class=args.samples_per_class, seed=1, batch_size=250)
        moments = calibrate(lm, calib, None, args.resolution)
        test = DataOptions(str(root / "test"))
        xt, yt, _ = decode(test, lm, args.test_per_class)
        cal_idx = stratified_indices(calib.open(lm).labels, args.samples_per_class, 1)
        xv, yv, _ = decode(DataOptions(str(root / "train")), lm, 100, seed=2, exclude=cal_idx)  # iter-tvs val
        ctx = Context.build(lm, [3, 32, 32])
        base = accuracy(lm.module, xt, yt)
        layers = [l.name for l in ctx.probe.layers]
        table: dict[str, dict[str, list]] = {}
        print(f"\n## {name}: unpruned {base * 100:.2f} % on {len(yt)} test images; moments from "
              f"{moments.meta['samples']} train images at {args.resolution}; allocation {args.allocation}")
        for crit in criteria:
            scores = layer_scores(crit, lm.module, moments, layers, ctx.stat_modules, seed=0)
            lds = {n: ldiff(s) for n, s in scores.items()}
            reps = args.repairs.split(",") + (["bn", "mc"] if crit in args.ablation.split(",") else [])
            for s in sparsities:
                plan = make_plan(ctx.graph, ctx.cost, scores, target=s, allocation=args.allocation, ldiffs=lds)
                for rep in reps:
                    bn, mc = REPAIRS[rep]
                    model = build_pruned(ctx, plan, PruneOptions(bn_recalibrate=bn, mean_compensation=mc,
                                                                 repair_samples_per_class=100), calib)
                    table.setdefault(f"{crit}+{rep}", {})[f"{s:.1f}"] = round(accuracy(model, xt, yt) * 100, 2)
            print(f"  {crit} done ({time.time() - t0:.0f} s)", flush=True)
        # IterTVSPrune: moments re-collected on the pruned network each round, step 0.1
        for rep in ("both",):
            bn, mc = REPAIRS[rep]
            opts = PruneOptions(method="iter-tvs", target_params=max(sparsities), step=0.1,
                                max_acc_drop=1000.0, bn_recalibrate=bn, mean_compensation=mc,
                                repair_samples_per_class=100, allocation=args.allocation)
            row: dict[str, float] = {}

            def record(plan, frac, row=row, opts=opts):
                model = build_pruned(ctx, plan, opts, calib)
                row[f"{round(frac, 1):.1f}"] = round(accuracy(model, xt, yt) * 100, 2)

            iterative(ctx, moments, opts, calib, list(zip(xv.split(500), yv.split(500))),
                      accuracy(lm.module, xv, yv), on_accept=record)
            table[f"iter-tvs+{rep}"] = row
            bounded = PruneOptions(method="iter-tvs", target_params=max(sparsities), step=0.05,
                                   max_acc_drop=args.iter_max_drop, bn_recalibrate=bn, mean_compensation=mc,
                                   repair_samples_per_class=100, allocation=args.allocation)
            plan, rounds = iterative(ctx, moments, bounded, calib, list(zip(xv.split(500), yv.split(500))),
                                     accuracy(lm.module, xv, yv))
            final = build_pruned(ctx, plan, bounded, calib)
            p_after = ctx.cost.cost(plan.removed())[0]
            results.setdefault("iter_bounded", {})[name] = {
                "max_acc_drop_on_val": args.iter_max_drop, "rounds": rounds,
                "params_removed": 1 - p_after / ctx.cost.cost()[0], "test_accuracy": accuracy(final, xt, yt) * 100}
        print(f"  iter-tvs done ({time.time() - t0:.0f} s)", flush=True)
        # LDIFF vs per-layer random pruning
        tv = layer_scores("tvs", None, moments, layers)
        lds, kept = [], []
        rng = np.random.default_rng(0)
        xs, ys = xt[:2000], yt[:2000]
        for g in ctx.graph.groups:
            if g.root in ctx.graph.rigid or not g.members:
                continue
            accs = []
            for rep in range(2):
                rm = np.sort(rng.permutation(g.channels)[: int(round(args.ldiff_frac * g.channels))])
                from tvsprune.pruning import Plan

                plan = Plan([{"root": gg.root, "members": gg.members, "channels": gg.channels,
                              "kept": [int(k) for k in np.setdiff1d(np.arange(gg.channels), rm)]
                              if gg.root == g.root else list(range(gg.channels))} for gg in ctx.graph.groups])
                accs.append(accuracy(build_pruned(ctx, plan, PruneOptions(), calib), xs, ys))
            lds.append(max(ldiff(tv[m]) for m in g.members if m in tv))
            kept.append(float(np.mean(accs)) / accuracy(lm.module, xs, ys))
        rho = spearman(np.array(lds), np.array(kept))
        results["models"][name] = {"unpruned": base * 100, "table": table, "ldiff": lds, "random_kept": kept,
                                   "spearman_ldiff_random": rho, "seconds": time.time() - t0}
        header = "| criterion+repair | " + " | ".join(f"{int(s * 100)} %" for s in sparsities) + " |"
        print(header)
        print("|" + "---|" * (len(sparsities) + 1))
        for key, row in table.items():
            print(f"| {key} | " + " | ".join(f"{row.get(f'{s:.1f}', float('nan')):.2f}" for s in sparsities) + " |")
        ib = results["iter_bounded"][name]
        print(f"iter-tvs bounded by {args.iter_max_drop} points on val: {ib['params_removed'] * 100:.1f} % params "
              f"removed, test {ib['test_accuracy']:.2f} % in {len(ib['rounds'])} rounds")
        print(f"Spearman(LDIFF, accuracy kept under {args.ldiff_frac:.0%} random pruning of one layer) over "
              f"{len(lds)} layers/groups: {rho:.3f}")
        print(f"({time.time() - t0:.0f} s)", flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
