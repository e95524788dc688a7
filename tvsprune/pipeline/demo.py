"""``tvsprune demo``: the full pipeline on the ResNet-20 and CIFAR-10 images shipped in the package."""
from __future__ import annotations

from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parents[1] / "demo_assets"
CONFIG = ASSETS / "demo.toml"


def summary(out: Path) -> list[dict[str, Any]]:
    """Before/after rows from the run's prune.json and report.json."""
    import json

    from ..pruning.artifact import read_prune_report

    prune = read_prune_report(out / "pruned")
    rep_path = out / "report" / "report.json"
    report = json.loads(rep_path.read_text()) if rep_path.is_file() else {}
    acc = (report.get("accuracy") or {}).get("models", {})
    rows = []
    for label, key in (("before", "before"), ("after", "after")):
        row: dict[str, Any] = {"": label, "params": f"{prune['params'][key]:,}", "MACs": f"{prune['macs'][key]:,}"}
        model = "base" if label == "before" else "pruned"
        if model in acc:
            row["top-1 % (eval)"] = f"{acc[model]['top1'] * 100:.2f}"
        for backend, per_batch in report.get("latency", {}).items():
            bs = max(per_batch, key=int)
            st = per_batch[bs]["stats"].get(model)
            if st:
                row[f"{backend} ms (b{bs})"] = f"{st['p50_ms']:.2f}"
        rows.append(row)
    return rows
