"""Top-1 accuracy at fixed budgets: tvsprune's defaults against Torch-Pruning's own criteria.

No fine-tuning anywhere. For every model and budget (a fraction of parameters or MACs to
remove) it prints one row per method with the accuracy on all 10,000 CIFAR-10 test images
and the parameters AND MACs actually removed (both counted by torch_pruning.utils for every
row, so the columns compare like with like):

- tvsprune rows go through the real ``prune()`` path (the CLI's), with its defaults
  unless the row says otherwise: ``tvs`` (the defaults: ``--tvs-saliency auto``,
  ``--allocation auto``, ``--compensation auto`` + BatchNorm re-estimation: the candidates
  are pruned and repaired and the one most faithful to the unpruned network on held-out
  calibration images is kept; the row names the choice), ``tvs TV-alone`` (the previous
  default: TV score, cost rule for parameter budgets and global for MAC budgets, ls +
  BatchNorm), ``tvs bn-only`` (no compensation: BatchNorm re-estimation only), ``l2``
  (tvsprune's plan path and repairs with an L2 ranking, allocation and compensation auto).
- Torch-Pruning rows: MagnitudeImportance L1/L2, BNScaleImportance, LAMPImportance and
  GroupTaylorImportance (gradients of the cross-entropy on the calibration images), each
  uniform (one ratio per layer) and global, the ratio bisected until the removed fraction
  is within 0.5 point of the budget, then the *same* BatchNorm re-estimation on the same
  calibration images that tvsprune's repairs use.

Moments from 200 training images per class (pool:4); repairs on 100 per class of them.

    python benchmarks/accuracy_vs_sparsity.py [--models resnet20,vgg11_bn] [--test-per-class N]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CHECKPOINTS, cifar10, machine  # noqa: E402

from tvsprune.calibration import DataOptions, calibrate  # noqa: E402
from tvsprune.data import BatchStream, stratified_indices  # noqa: E402
from tvsprune.models import load_model  # noqa: E402
from tvsprune.models.probe import probe_model  # noqa: E402
from tvsprune.pruning import PruneOptions, load_pruned, prune  # noqa: E402
from tvsprune.pruning.repairs import recalibrate_batchnorm  # noqa: E402
from tvsprune.pruning.context import repair_batches  # noqa: E402

BUDGETS = {"resnet20": "params:0.1,params:0.2,params:0.3,macs:0.3",
           "vgg11_bn": "params:0.5,params:0.6,params:0.7,macs:0.5"}
TVSPRUNE_ROWS = {
    "tvs": {},
    "tvs TV-alone": {"tvs_saliency": "none", "compensation": "ls", "allocation": {"params": "cost", "macs": "global"}},
    "tvs bn-only": {"compensation": "none"},
    "l2": {"method": "l2"},
}
TP_CRITERIA = ("tp-l1", "tp-l2", "tp-bnscale", "tp-lamp", "tp-taylor")


def decode(data: DataOptions, model, per_class=None, seed=0):
    src = data.open(model)
    idx = stratified_indices(src.labels, per_class, seed)
    xs, ys = zip(*BatchStream(src, idx, 500))
    return torch.cat(xs), torch.cat(ys)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 500) -> float:
    from tvsprune.compare.logits import chunks, collect_logits, forward_fn

    logits, _ = collect_logits(forward_fn(model), chunks(x, bs))
    return float((logits.argmax(1) == y.numpy()).mean()) * 100


def count(model: nn.Module) -> tuple[int, int]:
    """(MACs, params) as Torch-Pruning counts them, for every row alike."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, 3, 32, 32))
    return int(macs), int(params)


def tp_importance(name: str):
    import torch_pruning as tp

    return {"tp-l1": lambda: tp.importance.MagnitudeImportance(p=1),
            "tp-l2": lambda: tp.importance.MagnitudeImportance(p=2),
            "tp-bnscale": lambda: tp.importance.BNScaleImportance(),
            "tp-lamp": lambda: tp.importance.LAMPImportance(p=2),
            "tp-taylor": lambda: tp.importance.GroupTaylorImportance()}[name]()


def tp_prune(base: nn.Module, logits: str, crit: str, global_: bool, ratio: float, grad_batches) -> nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(base).eval()
    ignored = [dict(model.named_modules())[logits]]
    pruner = tp.pruner.MetaPruner(model, torch.zeros(1, 3, 32, 32), tp_importance(crit), global_pruning=global_,
                                  pruning_ratio=ratio, ignored_layers=ignored)
    if crit == "tp-taylor":
        model.zero_grad()
        for x, y in grad_batches:
            nn.functional.cross_entropy(model(x), y).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def tp_bisect(base, logits, crit, global_, metric, target, base_cost, grad_batches):
    """The pruning ratio whose removed fraction is closest to ``target`` (within 0.5 point when reachable)."""
    lo, hi, best = 0.0, 0.95, None
    for _ in range(14):
        mid = (lo + hi) / 2
        model = tp_prune(base, logits, crit, global_, mid, grad_batches)
        macs, params = count(model)
        frac = 1 - (params if metric == "params" else macs) / base_cost[metric]
        if best is None or abs(frac - target) < abs(best[1] - target):
            best = (model, frac, mid)
        if abs(frac - target) <= 0.004:
            break
        lo, hi = (mid, hi) if frac < target else (lo, mid)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,vgg11_bn")
    ap.add_argument("--budgets", action="append", metavar="MODEL=metric:frac,...",
                    help="override the budgets of one model, e.g. resnet20=params:0.2,macs:0.3")
    ap.add_argument("--rows", default=",".join(list(TVSPRUNE_ROWS) + list(TP_CRITERIA)))
    ap.add_argument("--samples-per-class", type=int, default=200, help="calibration images per class")
    ap.add_argument("--resolution", default="pool:4")
    ap.add_argument("--test-per-class", type=int, default=None, help="default: all 1,000 per class")
    ap.add_argument("--out", default="accuracy_vs_sparsity.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    budgets = dict(BUDGETS)
    for b in args.budgets or []:
        k, _, v = b.partition("=")
        budgets[k] = v
    rows = args.rows.split(",")
    root = cifar10()
    results = {"machine": machine(), "args": vars(args), "models": {}}
    print(f"# accuracy at fixed budgets, no fine-tuning; {results['machine']}; torch {torch.__version__}")
    tmp = Path(tempfile.mkdtemp(prefix="tvsprune-avs-"))
    for name in args.models.split(","):
        t0 = time.time()
        lm = load_model(name, str(CHECKPOINTS[name]))
        calib = DataOptions(path=str(root / "train"), samples_per_class=args.samples_per_class, seed=1, batch_size=250)
        mpath = tmp / f"{name}.moments.safetensors"
        calibrate(lm, calib, mpath, args.resolution)
        xt, yt = decode(DataOptions(path=str(root / "test")), lm, args.test_per_class)
        # the same repair images, in the same seeded mixed-class order, as tvsprune's own repairs
        repair = list(repair_batches(calib, lm, PruneOptions.default("repair_samples_per_class"))[1])
        base = accuracy(lm.module, xt, yt)
        bmacs, bparams = count(lm.module)
        base_cost = {"params": bparams, "macs": bmacs}
        logits = probe_model(lm.module, torch.zeros(1, 3, 32, 32)).logits_layer
        table = []
        print(f"\n## {name}: unpruned {base:.2f} % on {len(yt)} test images, {bparams:,} params, {bmacs:,} MACs; "
              f"moments from {args.samples_per_class * 10} train images at {args.resolution}", flush=True)
        print("| budget | method | top-1 % | drop (points) | params removed % | MACs removed % | seconds |")
        print("|---|---|---|---|---|---|---|")
        for budget in budgets[name].split(","):
            metric, frac = budget.split(":")
            frac = float(frac)
            for row in rows:
                t1 = time.time()
                if row in TVSPRUNE_ROWS:
                    kw = {"target_params" if metric == "params" else "target_flops": frac, "compare_criteria": False}
                    kw.update({k: v[metric] if isinstance(v, dict) else v for k, v in TVSPRUNE_ROWS[row].items()})
                    out = tmp / f"{name}-{budget}-{row.replace(' ', '_').replace(',', '')}"
                    rep = prune(lm, mpath, out, PruneOptions(**kw), calib)
                    model = load_pruned(out).module
                    chosen = [t for t in rep.get("selection", {}).get("candidates", []) if t.get("chosen")]
                    if chosen:  # what auto chose: tvs combination / allocation / compensation
                        row = f"{row} [{'/'.join(str(chosen[0][k]) for k in ('tvs_saliency', 'allocation', 'compensation') if chosen[0].get(k))}]"
                else:
                    crit, _, scope = row.partition(":")
                    model = None
                    for glob in ((False, True) if not scope else ((scope == "global"),)):
                        pm, got, ratio = tp_bisect(lm.module, logits, crit, glob, metric, frac, base_cost,
                                                   repair[:4])
                        recalibrate_batchnorm(pm, repair)
                        _emit(table, budget, f"{crit} {'global' if glob else 'uniform'} (ratio {ratio:.3f})",
                              pm, xt, yt, base, base_cost, t1)
                        t1 = time.time()
                    continue
                _emit(table, budget, row, model, xt, yt, base, base_cost, t1)
        results["models"][name] = {"unpruned": base, "params": bparams, "macs": bmacs, "rows": table,
                                   "seconds": round(time.time() - t0)}
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"({time.time() - t0:.0f} s)", flush=True)


def _emit(table, budget, label, model, xt, yt, base, base_cost, t1) -> None:
    acc = accuracy(model, xt, yt)
    macs, params = count(model)
    row = {"budget": budget, "method": label, "top1": round(acc, 2), "drop": round(base - acc, 2),
           "params_removed": round(100 * (1 - params / base_cost["params"]), 1),
           "macs_removed": round(100 * (1 - macs / base_cost["macs"]), 1), "seconds": round(time.time() - t1, 1)}
    table.append(row)
    print(f"| {budget} | {label} | {row['top1']:.2f} | {row['drop']:.2f} | {row['params_removed']:.1f} | "
          f"{row['macs_removed']:.1f} | {row['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
