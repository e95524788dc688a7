"""The architecture matrix: torchvision and timm classifiers through calibrate -> prune -> ONNX.

Every model (and a tutorial-style user CNN, tests/user_patterns.py) is randomly initialised
with 10 classes, its BatchNorm statistics estimated on the same synthetic images, saved as a
``{"state_dict": ...}`` checkpoint and loaded back through tvsprune's loader, then calibrated, pruned (tvs and l1, 30 % of parameters,
default repairs) and exported to ONNX with a parity check on ONNX Runtime. A row is
``ok``, ``refused`` (one clean line; only attention models may be) or ``error`` (a bug).

    .venv/bin/pip install --no-deps torchvision timm
    .venv/bin/python benchmarks/architectures.py [NAME ...] [--per-class 16] [--json out.json]

torchvision needs the test-environment workaround in tests/hub_models.py on a CPU-only
torch (see its docstring).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _common import machine  # noqa: E402
from helpers import write_image_folder  # noqa: E402
from hub_models import ATTENTION, TIMM, TORCHVISION, USER, import_hub, run_case  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="hub:name (default: the whole matrix)")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "architectures.json"))
    ap.add_argument("--per-class", type=int, default=16,
                    help="synthetic calibration images per class (10 classes); 4 is the tests' size, where "
                         "ridge-dominated least-squares fits on the widest layers cost parity on some models")
    args = ap.parse_args()
    cases = [("torchvision", n) for n in TORCHVISION] + [("timm", n) for n in TIMM] + [("user", n) for n in USER]
    if args.names:
        cases = [tuple(n.split(":", 1)) for n in args.names]
    missing = sorted({hub for hub, _ in cases if hub != "user" and import_hub(hub) is None})
    if missing:
        print(f"not installed: {', '.join(missing)} (pip install --no-deps {' '.join(missing)})")
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as td:
        folder = write_image_folder(Path(td) / "images", classes=10, per_class=args.per_class, size=64)
        for hub, name in cases:
            row = run_case(hub, name, folder, Path(td) / "out")
            rows.append(row)
            detail = row.get("reason", "")[:160] if row["status"] != "ok" else "  ".join(
                f"{m}: params -{row[m]['params_removed']:.0%} MACs -{row[m]['macs_removed']:.0%} "
                f"parity {row[m]['parity_scaled']:.1e}{'' if row[m]['parity_ok'] else ' (OUT)'}"
                f"{' unpruned groups ' + str(row[m]['unpruned_groups']) if row[m]['unpruned_groups'] else ''}"
                for m in ("tvs", "l1"))
            if "base_parity_scaled" in row:
                detail = f"base parity {row['base_parity_scaled']:.1e}  " + detail
            print(f"{row['model']:32s} {row['status']:8s} {row['seconds']:6.1f}s  {detail}", flush=True)
    out = {"machine": machine(), "per_class": args.per_class, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    bad = [r["model"] for r in rows if r["status"] == "error" or
           (r["status"] == "refused" and r["model"].split(":")[1] not in ATTENTION)]
    print(f"{len(rows)} models: {sum(r['status'] == 'ok' for r in rows)} ok, "
          f"{sum(r['status'] == 'refused' for r in rows)} refused, {len(bad)} failing {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
