"""tvs against l1 on the tutorial-style CNN, trained from several seeds: is the gap the network's or one checkpoint's?

Each checkpoint (benchmarks/train_tutorial_cnn.py --seed S) is calibrated on 100 images per
class, pruned with tvs and with l1 at 30 % parameters and at 30 % MACs (every other option at
its default, repairs included), and evaluated on all 10,000 CIFAR-10 test images:

    python benchmarks/tutorial_seeds.py tests/data/tutorial_cnn_cifar10.pt /tmp/tut_s1.pt ...
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, cifar10, machine  # noqa: E402

import tvsprune  # noqa: E402
from tvsprune.api import as_loaded  # noqa: E402
from tvsprune.bench.accuracy import evaluate  # noqa: E402
from tvsprune.data.options import DataOptions  # noqa: E402
from tvsprune.models import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--per-class", type=int, default=100, help="calibration images per class")
    args = ap.parse_args()
    root = cifar10()
    test = DataOptions(path=str(root / "test"))
    calib = DataOptions(path=str(root / "train"), samples_per_class=args.per_class)
    spec = f"{REPO / 'tests' / 'user_patterns.py'}:TutorialNet"
    print(f"# {machine()}; tvsprune {tvsprune.__version__}; calibration {args.per_class}/class; top-1 on 10,000")
    print("| checkpoint | base | budget | tvs | l1 | tvs - l1 |")
    print("|---|---|---|---|---|---|")
    for ckpt in args.checkpoints:
        model = load_model(spec, ckpt, {"num_classes": 10, "width": 32})
        base = evaluate(as_loaded(model), test)["top1"] * 100
        moments = tvsprune.calibrate(model, calib)
        for budget in ("target_params", "target_flops"):
            acc = {}
            with tempfile.TemporaryDirectory() as tmp:
                for method in ("tvs", "l1"):
                    pruned = tvsprune.prune(model, moments, method=method, calib_data=calib,
                                            out=Path(tmp) / method, **{budget: 0.3})
                    acc[method] = evaluate(as_loaded(pruned), test)["top1"] * 100
            print(f"| {Path(ckpt).name} | {base:.2f} | {budget} 0.3 | {acc['tvs']:.2f} | {acc['l1']:.2f} | "
                  f"{acc['tvs'] - acc['l1']:+.2f} |", flush=True)


if __name__ == "__main__":
    main()
