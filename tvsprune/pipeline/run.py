"""``tvsprune run``: calibrate -> prune -> export -> bench from one config, with a manifest.

Each stage records in ``manifest.json`` the hash of its inputs (its config section, the
upstream artifacts' hashes) and of its outputs. A stage whose inputs and outputs are
unchanged is skipped; a run killed mid-stage leaves that stage unrecorded (its outputs
are written atomically), so the next run resumes there.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..version import __version__
from ..artifacts import TMP_SUFFIX, content_digest, output_lock, sha256_file, sha256_json, versions, write_json
from ..console import step
from ..errors import TvsError
from .config import RunConfig

log = logging.getLogger(__name__)
STAGES = ("calibrate", "prune", "export", "bench")
FAULT_ENV = "TVSPRUNE_FAULT_AT"  # testing hook: simulate a kill at the start ("prune") or the end
#                                    ("prune:end", outputs written, manifest not yet updated) of a stage


def _fault_point(point: str) -> None:
    """Testing hook: a simulated kill (like SIGKILL: no cleanup, no manifest update) at ``point``."""
    if os.environ.get(FAULT_ENV) == point:
        os._exit(137)


@dataclass
class StageResult:
    name: str
    status: str           # passed | skipped | failed
    seconds: float
    detail: str = ""


class Pipeline:
    def __init__(self, cfg: RunConfig, echo: Callable[[str], None] | None = None) -> None:
        # status lines (PASSED / SKIPPED / RERUN / FAILED) go with the logs and progress on stderr;
        # results (tables, the verdict) go to stdout
        echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
        self.cfg, self.echo = cfg, echo
        self.out = Path(cfg.output_dir)
        self.manifest_path = self.out / "manifest.json"
        self.manifest: dict[str, Any] = {}
        self._digests: dict[str, str | None] = {}

    # ------------------------------------------------------------------ manifest
    def _load_manifest(self) -> None:
        import json

        if self.manifest_path.is_file():
            try:
                self.manifest = json.loads(self.manifest_path.read_text())
            except (ValueError, RecursionError):
                self.manifest = None  # type: ignore[assignment]
            if not isinstance(self.manifest, dict) or not isinstance(self.manifest.get("stages", {}), dict) \
                    or not all(isinstance(v, dict) for v in self.manifest.get("stages", {}).values()):
                log.warning("manifest.json unreadable or not a manifest: running every stage")
                self.manifest = {}
        self.manifest.setdefault("stages", {})
        self.manifest.update({"tvsprune_version": __version__, "config": self.cfg.model_dump(),
                              "versions": versions()})

    def _save_manifest(self) -> None:
        write_json(self.manifest_path, self.manifest)

    def _inputs(self, stage: str) -> dict[str, Any]:
        from ..models.sources.code import user_file  # imports torch: not when the CLI's parser reads STAGES

        c = self.cfg
        ups = {s: self.manifest["stages"].get(s, {}).get("outputs", {}) for s in STAGES[:STAGES.index(stage)]}
        source = user_file(c.model.spec)
        base = {"tvsprune": __version__, "model": c.model.model_dump(),
                "weights_sha256": sha256_file(c.model.weights) if c.model.weights else None,
                "model_source_sha256": sha256_file(source[0]) if source and source[0].is_file() else None}
        calibration = {"calibration_files": self._digest(c.data.calibration)}
        evaluation = {"evaluation_files": self._digest(c.data.evaluation)} if c.data.evaluation else {}
        section = {"calibrate": {"data": c.data.model_dump(), "calibrate": c.calibrate.model_dump(), **calibration},
                   "prune": {"prune": self.prune_options().model_dump(), "evaluation": c.data.evaluation,
                             **calibration, **evaluation, **self._latency_identity()},
                   "export": {"export": c.export.model_dump(), "calibration": c.data.calibration, **calibration},
                   "bench": {"bench": self.bench_options().model_dump(), "evaluation": c.data.evaluation,
                             **evaluation}}[stage]
        return {**base, **section, "upstream": ups}

    def prune_options(self):
        """The [prune] section, with the latency measured on INT8 graphs when the run exports INT8 and
        the section does not say (pruning and INT8 as one decision)."""
        p = self.cfg.prune
        if self.cfg.export.int8 and p.target_latency is not None and "latency_precision" not in p.model_fields_set:
            return p.model_copy(update={"latency_precision": "int8"})
        return p

    def bench_options(self):
        """The [bench] section, measuring the backend and batch a latency budget was measured on
        too (the verdict is stated there): a run pruned for batch 32 on ort-cpu is judged there."""
        b, p = self.cfg.bench, self.prune_options()
        if p.target_latency is None:
            return b
        update = {}
        if p.latency_batch not in b.batch_sizes:
            update["batch_sizes"] = sorted({*b.batch_sizes, p.latency_batch})
        if b.backends is not None and p.latency_backend not in b.backends:
            update["backends"] = [*b.backends, p.latency_backend]
        return b.model_copy(update=update)

    def _latency_identity(self) -> dict[str, Any]:
        """A latency budget's plan depends on the machine it was measured on: another machine re-runs prune."""
        p = self.prune_options()
        if p.target_latency is None:
            return {}
        from ..pruning.latency import identity

        return {"latency_identity": identity(p.latency_backend, p.latency_precision, p.latency_batch)}

    def _relative(self, path: Path) -> str:
        """An output's path relative to the output folder: the manifest survives a move."""
        try:
            return Path(path).resolve().relative_to(self.out.resolve()).as_posix()
        except ValueError:
            return str(path)

    def _digest(self, path: str) -> str | None:
        """content_digest of a data folder, read once per run."""
        if path not in self._digests:
            self._digests[path] = content_digest(path)
        return self._digests[path]

    def _changed(self, stage: str, inputs: dict[str, Any]) -> list[str]:
        """Which of ``stage``'s inputs differ from those its last run recorded (for the re-run line)."""
        before = (self.manifest["stages"].get(stage) or {}).get("inputs") or {}
        return [k for k, v in inputs.items() if before.get(k) != sha256_json(v)] if before else []

    def _up_to_date(self, stage: str, inputs_hash: str) -> bool:
        rec = self.manifest["stages"].get(stage)
        if not rec or rec.get("status") != "passed" or rec.get("inputs_sha256") != inputs_hash:
            return False
        return all((self.out / p).is_file() and sha256_file(self.out / p) == h for p, h in rec.get("outputs", {}).items())

    # ------------------------------------------------------------------ stages
    def stage_calibrate(self) -> list[Path]:
        from ..calibration import calibrate
        from ..models import load_model

        c = self.cfg
        model = load_model(c.model.spec, c.model.weights, c.model.kwargs)
        out = self.out / "moments.safetensors"
        calibrate(model, c.data.at(c.data.calibration), out, c.calibrate.resolution, c.calibrate.layers,
                  c.calibrate.device)
        return [out]

    def stage_prune(self) -> list[Path]:
        from ..models import load_model
        from ..pruning import prune

        c = self.cfg
        model = load_model(c.model.spec, c.model.weights, c.model.kwargs)
        val = c.data.at(c.data.evaluation, samples_per_class=None) if c.data.evaluation else None
        out = self.out / "pruned"
        opts = self.prune_options()
        if opts is not c.prune:
            log.info("the run exports INT8: the latency budget is measured on INT8 graphs (set [prune] "
                     "latency_precision to choose)")
        report = prune(model, self.out / "moments.safetensors", out, opts, c.data.at(c.data.calibration), val)
        self.summary_prune = report
        return [out / "plan.json", out / "pruned.safetensors", out / "prune.json"]

    def stage_export(self) -> list[Path]:
        from ..data import take_images
        from ..exporters.int8 import calibration_batches
        from ..exporters.stage import export_model
        from ..models import ModelSpec, load_model

        c, e = self.cfg, self.cfg.export
        exp = self.out / "export"
        base = load_model(c.model.spec, c.model.weights, c.model.kwargs)
        pruned = load_model(str(self.out / "pruned"), base=ModelSpec(spec=c.model.spec, kwargs=dict(c.model.kwargs)))
        parity, _ = take_images(c.data.at(c.data.evaluation or c.data.calibration, samples_per_class=None).open(base), e.parity_samples)

        def calib_batches() -> list:
            x, _ = take_images(c.data.at(c.data.calibration, samples_per_class=None).open(base), e.int8_samples, seed=1)
            return calibration_batches(x)

        # the base is exported INT8 too when INT8 is asked: the report compares all four (FP32 and INT8, base and pruned)
        outs, _ = export_model(base, exp, "base", e.model_copy(update={"tensorrt": []}), parity, calib_batches)
        more, self.skipped_engines = export_model(pruned, exp, "pruned", e, parity, calib_batches, self.echo)
        return outs + more

    def stage_bench(self) -> list[Path]:
        from ..bench.stage import bench
        from ..models import ModelSpec

        c = self.cfg
        exp = self.out / "export"
        onnx = {i: exp / f"{label}.onnx" for i, label in enumerate(("base", "pruned"))
                if (exp / f"{label}.onnx").is_file()}
        data = c.data.at(c.data.evaluation, samples_per_class=None) if c.data.evaluation else None
        specs = [c.model.spec, str(self.out / "pruned")]
        for label in ("base", "pruned"):  # the INT8 models are measured too (ONNX Runtime backends)
            if (exp / f"{label}.int8.onnx").is_file():
                specs.append(str(exp / f"{label}.int8.onnx"))
        opts = self.bench_options()  # read for the input hash too: said once, here
        if opts != c.bench:
            p = self.prune_options()
            log.info("bench also measures backends %s at batches %s: the latency budget was measured on %s at batch "
                     "%d", opts.backends or "present", opts.batch_sizes, p.latency_backend, p.latency_batch)
        report = bench(specs, self.out / "report", data, c.model.weights, opts, onnx_paths=onnx,
                       model_kwargs=c.model.kwargs, base_model=ModelSpec(spec=c.model.spec, kwargs=dict(c.model.kwargs)))
        self.bench_report = report
        r = self.out / "report"
        return [r / "report.json", r / "report.md", r / "report.html"]

    # ------------------------------------------------------------------ driver
    def plan(self, force: set[str]) -> list[tuple[str, bool]]:
        """(stage, will_run) for each enabled stage, computed from the manifest."""
        self._load_manifest()
        out = []
        stale = False
        for s in self.enabled():
            run = stale or s in force or not self._up_to_date(s, sha256_json(self._inputs(s)))
            stale = stale or run
            out.append((s, run))
        return out

    def enabled(self) -> list[str]:
        stages = ["calibrate", "prune"]
        if self.cfg.export.any:
            stages.append("export")
        if self.cfg.bench.enabled:
            stages.append("bench")
        return stages

    def run(self, force: set[str] | None = None) -> list[StageResult]:
        """Run the stages that are stale (or forced), holding the output directory's lock."""
        force = set(force or ())
        unknown = force - set(STAGES)
        if unknown:
            raise TvsError(f"--force: unknown stage(s) {', '.join(sorted(unknown))} (stages: {', '.join(STAGES)})")
        with output_lock(self.out, "dir"):
            return self._run(force)

    def _run(self, force: set[str]) -> list[StageResult]:
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in self.out.rglob(f".*{TMP_SUFFIX}"):  # this tool's temporary files of a run killed mid-write
            stale.unlink()
        self._load_manifest()
        results = []
        stale = False
        for stage in self.enabled():
            t0 = time.perf_counter()
            inputs = self._inputs(stage)
            inputs_hash = sha256_json(inputs)
            if not stale and stage not in force and self._up_to_date(stage, inputs_hash):
                results.append(StageResult(stage, "skipped", 0.0, "inputs and outputs unchanged"))
                self.echo(f"SKIPPED | {stage} | inputs and outputs unchanged")
                continue
            changed = self._changed(stage, inputs)
            if changed:
                self.echo(f"RERUN | {stage} | changed since its last run: {', '.join(changed)}")
            stale = True
            self.manifest["stages"][stage] = {"status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
            self._save_manifest()
            _fault_point(stage)
            step(stage)
            try:
                outputs = getattr(self, f"stage_{stage}")()
            except Exception as err:
                secs = time.perf_counter() - t0
                msg = str(err) if isinstance(err, TvsError) else f"{type(err).__name__}: {err}"
                self.manifest["stages"][stage] = {"status": "failed", "error": msg, "seconds": round(secs, 2),
                                                  "inputs_sha256": inputs_hash}
                if not isinstance(err, TvsError):
                    self.manifest["stages"][stage]["traceback"] = traceback.format_exc()
                self._save_manifest()
                self.echo(f"FAILED | {stage} | {secs:.1f} s | {msg}")
                raise
            _fault_point(f"{stage}:end")
            secs = time.perf_counter() - t0
            self.manifest["stages"][stage] = {"status": "passed", "inputs_sha256": inputs_hash,
                                              "inputs": {k: sha256_json(v) for k, v in inputs.items()},
                                              "outputs": {self._relative(p): sha256_file(p) for p in outputs},
                                              "seconds": round(secs, 2)}
            self._save_manifest()
            results.append(StageResult(stage, "passed", secs))
            self.echo(f"PASSED | {stage} | {secs:.1f} s")
        return results
