"""``tvsprune eval``: accuracy of a model or pruned artifact."""
from __future__ import annotations

import argparse
import logging
from typing import Any

from .common import _device, add_data_args, add_model_args, data_options, loaded_model

log = logging.getLogger("tvsprune")


def cmd_eval(args: argparse.Namespace) -> int:
    from ..bench.accuracy import evaluate
    from ..console import print_table, progress_bar

    model = loaded_model(args)
    with progress_bar("eval") as bar:
        res = evaluate(model, data_options(args), device=args.device, progress=bar.update)
    print(f"top-1 {res['top1'] * 100:.2f} %   top-5 {res['top5'] * 100:.2f} %   on {res['samples']} images")
    print_table([{"class": c, "images": n, "top-1 %": a * 100}
                 for c, n, a in zip(res["classes"], res["class_counts"], res["per_class"])], title="per-class accuracy")
    if args.json:
        from ..artifacts import write_json

        write_json(args.json, res)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("eval", help="top-1 / top-5 / per-class accuracy of a model or pruned artifact")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--device", type=_device, default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_eval)
