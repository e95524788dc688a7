"""``tvsprune run`` and ``tvsprune demo``."""
from __future__ import annotations

import argparse
import logging
from typing import Any


log = logging.getLogger("tvsprune")


def _run_pipeline(cfg_path: str | None, overrides: list[str], force: list[str], dry_run: bool,
                  raw: dict | None = None, base_dir: Any = None) -> Any:
    from ..pipeline import Pipeline, load_config, resolve_paths

    cfg, base = load_config(cfg_path, overrides, raw=raw, base_dir=base_dir)
    cfg = resolve_paths(cfg, base)
    pipe = Pipeline(cfg)
    if dry_run:
        import json

        print("resolved settings (defaults filled in, paths made absolute):")
        for section, values in cfg.model_dump().items():
            for key, value in (values.items() if isinstance(values, dict) else [(None, values)]):
                print(f"  {section}{'.' + key if key else ''} = {json.dumps(value)}")
        for stage, will_run in pipe.plan(set(force)):
            print(f"{'RUN ' if will_run else 'SKIP'} {stage}")
        print(f"output directory: {cfg.output_dir}")
        return None
    pipe.run(set(force))
    return pipe


def _the_result(pipe: Any, title: str) -> None:
    """What a run ends with: the end table, where everything is, the verdict last; then the
    config's ``[bench] fail_if`` gate (exit 4 when the verdict misses it)."""
    import json

    from ..bench.report import end_table
    from ..bench.verdict import check_gate
    from ..console import print_table

    report_json = pipe.out / "report" / "report.json"
    report = json.loads(report_json.read_text()) if report_json.is_file() else None
    if report is not None:
        print_table(end_table(report), title=title)
        print(f"report: {report_json.parent / 'report.html'} (and report.md, report.json)")
    print(f"pruned model: {pipe.out / 'pruned'}" + (f"; ONNX: {pipe.out / 'export'}" if (pipe.out / "export").is_dir()
                                                     else "") + " (manifest.json lists every file with its hash)")
    if report is not None:
        from ..bench.verdict import summarize

        summary = report.get("summary") or summarize(report, pipe.cfg.bench.max_drop)
        rec, best = summary.get("recommended"), summary.get("best") or {}
        if rec:  # the artifact the verdict is about, as its backend runs it
            onnx = pipe.out / "export" / f"{rec}.onnx"
            kind = "onnx" if onnx.is_file() and str(best.get("backend", "")).startswith("ort") else "model"
            where = onnx if kind == "onnx" else pipe.out / "pruned" if rec == "pruned" else rec
            print(f"deploy: {where} (the fastest on {best.get('backend')} at batch {summary.get('batch')}"
                  + (f" within {summary['max_drop']:g} points of top-1)" if summary.get("max_drop") is not None else ")"))
        elif best:
            print(f"deploy: the base; every pruned model lost more than {summary.get('max_drop'):g} points of top-1 "
                  "([bench] max_drop)")
        print(f"verdict: {summary['sentence']}")
        check_gate(summary, pipe.cfg.bench.fail_if)


def cmd_run(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    if args.out:
        overrides.append(f'output_dir="{args.out}"')
    pipe = _run_pipeline(args.config, overrides, args.force or [], args.dry_run)
    if pipe is not None:
        _the_result(pipe, "tvsprune run")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..pipeline.demo import CONFIG

    out = Path(args.out).resolve()
    overrides = [f'output_dir="{out}"'] + list(args.set or [])
    pipe = _run_pipeline(str(CONFIG), overrides, args.force or [], args.dry_run)
    if pipe is not None:
        _the_result(pipe, "tvsprune demo: ResNet-20 / CIFAR-10, base and pruned")
    return 0


def _register_run(sub: Any) -> None:
    from ..pipeline.run import STAGES

    for name, helptext in (("run", "the whole pipeline from one TOML config"),
                           ("demo", "the whole pipeline on the bundled ResNet-20 and CIFAR-10 images")):
        p = sub.add_parser(name, help=helptext)
        if name == "run":
            p.add_argument("config", metavar="CONFIG.toml", help="the run's config (see the README's config reference)")
            p.add_argument("--out", help="output directory (overrides output_dir)")
        else:
            p.add_argument("--out", default="demo-out", help="output directory (default demo-out)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config value, e.g. --set prune.keep_macs=0.5 (repeatable)")
        p.add_argument("--force", action="append", choices=STAGES, help="redo this stage (repeatable)")
        p.add_argument("--dry-run", action="store_true", help="print which stages would run, run nothing")
        p.set_defaults(func=cmd_run if name == "run" else cmd_demo)


register = _register_run
