"""The bench stage: base vs pruned models on every backend present -> report.json (+ md/html)."""
from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..version import __version__
from ..artifacts import removed_on_failure, versions, write_json
from ..data.options import DataOptions
from ..data import take_images
from ..errors import MissingDependencyError, TvsError
from ..models import LoadedModel, load_model
from ..pruning.artifact import prune_record, read_prune_report
from ..compare.latency import measure_interleaved
from .advice import report_warnings  # noqa: F401 (re-exported)
from .options import BenchOptions
from .memory import peak_rss
from ..backends import BACKENDS, backend_availability, backend_kind, default_backends, make_runner

log = logging.getLogger(__name__)


@dataclass
class Entry:
    label: str
    spec: str
    loaded: LoadedModel | None = None
    onnx: Path | None = None
    engine: Path | None = None
    prune_report: dict[str, Any] | None = None
    files: dict[str, int] = field(default_factory=dict)


def _label_for(spec: str, i: int, used: set[str]) -> str:
    base = "base" if i == 0 else Path(spec.rstrip("/")).name.replace(".onnx", "") or f"pruned{i}"
    label, k = base, 2
    while label in used:
        label, k = f"{base}-{k}", k + 1
    used.add(label)
    return label


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"hostname": platform.node(), "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        info["cpu"] = platform.processor()
    if shutil.which("nvidia-smi"):
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["gpus"] = [dict(zip(["name", "driver", "sm_clock", "mem_clock", "max_sm_clock"],
                                     [v.strip() for v in line.split(",")])) for line in q.stdout.strip().splitlines()]
        except Exception as e:  # reported, never fatal
            info["gpus_error"] = str(e)
    elif torch.cuda.is_available():
        info["gpus"] = [{"name": torch.cuda.get_device_name(i)} for i in range(torch.cuda.device_count())]
    return info


def _load_entries(specs: list[str | LoadedModel], weights: str | None, onnx_paths: dict[int, Path] | None = None,
                  model_kwargs: dict[str, Any] | None = None,
                  prune_reports: dict[int, dict[str, Any]] | None = None, base_model: Any = None) -> list[Entry]:
    entries, used = [], set()
    for i, spec in enumerate(specs):
        if isinstance(spec, LoadedModel):  # a module held in memory (Python API)
            name = "base" if i == 0 else f"pruned{i}"
            e = Entry(_label_for(name, i, used), spec.spec.spec, loaded=spec,
                      prune_report=(prune_reports or {}).get(i))
            entries.append(e)
            continue
        e = Entry(_label_for(spec, i, used), spec)
        if spec.endswith(".onnx"):
            e.onnx = Path(spec)
        else:
            e.loaded = (load_model(spec, weights, model_kwargs) if i == 0 else
                        load_model(spec, base=base_model))
            if onnx_paths and i in onnx_paths:
                e.onnx = Path(onnx_paths[i])
            pdir = Path(spec)
            if (pdir / "prune.json").is_file():
                e.prune_report = read_prune_report(pdir)
                e.files["weights"] = (pdir / "pruned.safetensors").stat().st_size
            elif weights and i == 0:
                e.files["weights"] = Path(weights).stat().st_size
        entries.append(e)
    return entries


def _input_shape(entries: list[Entry], data: DataOptions | None, given: list[int] | None) -> list[int]:
    """From --input-shape, a model that knows it, an ONNX file, or the data's first image."""
    if given:
        return list(given)
    for e in entries:
        if e.loaded is not None and e.loaded.input_shape:
            return list(e.loaded.input_shape)
    for e in entries:
        if e.onnx is not None:
            with make_runner("ort-cpu", e.onnx) as runner:
                if runner.input_shape:
                    return [int(d) for d in runner.input_shape]
    if data is not None:
        ref = next((e.loaded for e in entries if e.loaded is not None), None)
        src = data.open(ref)
        return list(src.load(0).shape)
    raise TvsError("the input shape is unknown: pass --input-shape C,H,W or --data")


def _prepare(entries: list[Entry], shape: list[int], out: Path, needs_onnx: bool, needs_engine: bool,
             trt_precision: str, progress: Callable[[str], None]) -> None:
    from ..exporters import export_onnx

    for e in entries:
        if e.loaded is not None and not e.loaded.input_shape:
            e.loaded.input_shape = tuple(shape)
        if needs_onnx and e.onnx is None:
            progress(f"exporting {e.label} to ONNX for the ONNX Runtime backends (give an .onnx file to reuse an "
                     "export of yours)")
            e.onnx = out / "models" / f"{e.label}.onnx"
            export_onnx(e.loaded, e.onnx, input_shape=shape)
        elif needs_onnx:
            progress(f"{e.label}: using the ONNX file given, {e.onnx} (not exported again)")
        if e.onnx is not None:
            e.files["onnx"] = e.onnx.stat().st_size
        if needs_engine and e.onnx is not None:
            from ..exporters.tensorrt import build_engine

            progress(f"building a {trt_precision} TensorRT engine for {e.label}")
            e.engine = out / "models" / f"{e.label}.{trt_precision}.engine"
            build_engine(e.onnx, e.engine, trt_precision, 1, 8, 64, timing_cache=out / "models" / "timing.cache")
            e.files["engine"] = e.engine.stat().st_size


def _runner_options(backend: str, opts: BenchOptions, out: Path) -> dict[str, Any]:
    """ONNX Runtime: thread count; its TensorRT provider also gets fp16 (when the TensorRT
    precision is fp16) and an engine cache under ``out/models`` so repeated runs skip the build."""
    if not backend.startswith("ort"):
        return {}
    options: dict[str, Any] = {"threads": opts.threads}
    if backend == "ort-trt":
        options.update(fp16=opts.trt_precision == "fp16", engine_cache=str(out / "models" / "ort-trt-cache"))
    return options


def _artifact(entry: Entry, kind: str) -> Any:
    return {"torch": entry.loaded, "onnx": entry.onnx, "engine": entry.engine}[kind]


@torch.no_grad()
def _accuracy_block(entries: list[Entry], data: DataOptions, opts: BenchOptions,
                    evaluation: tuple[torch.Tensor, np.ndarray]) -> dict[str, Any]:
    """Accuracy, agreement with the base model, and functional similarity under input noise."""
    from ..compare.logits import chunks, collect_logits, forward_fn
    from .accuracy import accuracy_from_logits, paired_drop

    ref = entries[0]
    src = data.open(ref.loaded)
    for e in entries:
        known = (e.prune_report or {}).get("classes")
        if known and list(known) != list(src.classes):
            raise TvsError(f"{data.path}: its classes are not those {e.label} was pruned with (class folders named "
                           f"or ordered differently: {list(src.classes)[:3]}... vs {list(known)[:3]}...): labels "
                           "would be compared with the wrong logits")
    x, labels = evaluation

    def logits_of(e: Entry, inputs: torch.Tensor) -> np.ndarray:
        if e.loaded is not None:
            return collect_logits(forward_fn(e.loaded.module), chunks(inputs))[0]
        with make_runner("ort-cpu", e.onnx) as runner:
            return collect_logits(forward_fn(runner), chunks(inputs))[0]

    out: dict[str, Any] = {"samples": int(len(labels)), "classes": src.classes, "models": {}}
    base_logits = logits_of(ref, x)
    g = torch.Generator().manual_seed(opts.seed)
    noises = {s: torch.randn(x.shape, generator=g) * s for s in opts.noise}
    base_noisy = {s: logits_of(ref, x + nz) for s, nz in noises.items()}
    for e in entries:
        lg = base_logits if e is ref else logits_of(e, x)
        acc = accuracy_from_logits(lg, labels, src.classes)
        acc["agreement_with_base"] = float((lg.argmax(1) == base_logits.argmax(1)).mean())
        acc.update(paired_drop(base_logits.argmax(1) == labels, lg.argmax(1) == labels))
        sim = []
        for s, nz in noises.items():
            ln = base_noisy[s] if e is ref else logits_of(e, x + nz)
            b = base_noisy[s]
            pb = torch.softmax(torch.from_numpy(b), 1)
            pn = torch.softmax(torch.from_numpy(ln), 1)
            sim.append({"noise_std": s, "agreement": float((ln.argmax(1) == b.argmax(1)).mean()),
                        "accuracy": float((ln.argmax(1) == labels).mean()),
                        "prob_l1_distance": float((pb - pn).abs().sum(1).mean() / 2)})
        acc["noise_similarity"] = sim
        out["models"][e.label] = acc
    return out


def bench(specs: list[str | LoadedModel], out_dir: str | Path, data: DataOptions | None = None,
          weights: str | None = None, opts: BenchOptions | None = None, progress: Callable[[str], None] | None = None,
          onnx_paths: dict[int, Path] | None = None, model_kwargs: dict[str, Any] | None = None,
          prune_reports: dict[int, dict[str, Any]] | None = None, base_model: Any = None) -> dict[str, Any]:
    """Measure every model on every backend present; write report.json, report.md, report.html.

    ``specs``: the base model first; each a spec string, an .onnx path or a LoadedModel.
    ``base_model``: the base model of pruned artifacts that need one named (:mod:`tvsprune.models.trust`)."""
    with removed_on_failure(out_dir):  # a failed bench leaves no exported models or half a report
        return _bench(specs, Path(out_dir), data, weights, opts or BenchOptions(), progress, onnx_paths,
                      model_kwargs, prune_reports, base_model)


FRESH_MEMORY_BACKENDS = ("torch-cpu", "ort-cpu")  # GPU backends report their allocators' own figures


def _fresh_memory(backend: str, kind: str, e: Entry, shape: list[int], opts: BenchOptions,
                  base_model: Any) -> dict[str, Any] | None:
    """The model's own memory on ``backend``, measured in a fresh process (:mod:`.memprobe`);
    None for a model held only in memory (the Python API's nn.Module)."""
    from .memprobe import measure

    request: dict[str, Any] = {"backend": backend, "shape": shape, "batch_sizes": opts.batch_sizes}
    if kind == "onnx" and e.onnx is not None:
        request["onnx"] = str(e.onnx)
    elif kind == "torch" and e.loaded is not None and not e.loaded.spec.spec.startswith("<"):
        request.update(spec=e.loaded.spec.spec, weights=e.loaded.spec.weights, kwargs=dict(e.loaded.spec.kwargs))
        if base_model is not None:
            request["base"] = base_model.to_dict() if hasattr(base_model, "to_dict") else {"spec": str(base_model)}
    else:
        return None
    return measure(request)


def _eval_images(entries: list[Entry], data: DataOptions, opts: BenchOptions) -> tuple[torch.Tensor, np.ndarray]:
    """The evaluation images every backend's accuracy is measured on (the same ones for all)."""
    src = data.open(entries[0].loaded)
    n = opts.eval_samples or len(src)
    x, y = take_images(src, min(n, len(src)), seed=opts.seed)
    return x, y.numpy()


def _measure_backend(b: str, kind: str, usable: list[Entry], shape: list[int], opts: BenchOptions, out: Path,
                     rng: np.random.Generator, progress: Callable[[str], None],
                     evaluation: tuple[torch.Tensor, np.ndarray] | None
                     ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Latency per batch size, memory and (with ``evaluation``) top-1 and agreement with the base
    model, every model run through this backend's runner; runners are deactivated on every path."""
    from ..compare.logits import chunks, collect_logits, forward_fn
    from .accuracy import paired_drop, wilson_interval

    runners: dict[str, Any] = {}
    memory: dict[str, Any] = {}
    per_batch: dict[str, Any] = {}
    accuracy: dict[str, Any] = {}
    try:
        for e in usable:
            with peak_rss() as mem:
                r = make_runner(b, _artifact(e, kind), **_runner_options(b, opts, out))
                runners[e.label] = r
                r.activate()
                r.infer(rng.standard_normal((max(opts.batch_sizes), *shape)).astype(np.float32))
            # the process holds every model: its own memory is what the peak rose by while it
            # loaded and ran one batch (the process-wide peak is kept for reference)
            grown = max(0, mem["peak"] - mem["before"]) if mem["peak"] and mem["before"] else None
            memory[e.label] = {"model_rss_bytes": grown, "peak_rss_bytes": mem["peak"],
                               "rss_before_bytes": mem["before"], "method": mem.get("method"), **r.info}
        for bs in opts.batch_sizes:
            progress(f"{b}: batch {bs}")
            x = rng.standard_normal((bs, *shape)).astype(np.float32)
            per_batch[str(bs)] = measure_interleaved(runners, x, opts.latency)
        if evaluation is not None:
            progress(f"{b}: accuracy")
            images, labels = evaluation
            logits = {label: collect_logits(forward_fn(r), chunks(images, max(opts.batch_sizes)))[0]
                      for label, r in runners.items()}
            base = logits.get(usable[0].label)
            for label, lg in logits.items():
                correct = lg.argmax(1) == labels
                accuracy[label] = {"top1": float(correct.mean()), "top1_ci95": wilson_interval(correct),
                                   "samples": int(len(labels)), "agreement_with_base": None if base is None else
                                   float((lg.argmax(1) == base.argmax(1)).mean())}
                if base is not None:
                    accuracy[label].update(paired_drop(base.argmax(1) == labels, correct))
    finally:
        for label, r in runners.items():
            r.deactivate()
            if label in memory:
                memory[label].update(r.info)
    return per_batch, memory, accuracy


def _bench(specs: list[str | LoadedModel], out: Path, data: DataOptions | None, weights: str | None,
           opts: BenchOptions, progress: Callable[[str], None] | None, onnx_paths: dict[int, Path] | None,
           model_kwargs: dict[str, Any] | None, prune_reports: dict[int, dict[str, Any]] | None,
           base_model: Any = None) -> dict[str, Any]:
    progress = progress or (lambda s: log.info(s))
    if not specs:
        raise TvsError("bench needs at least one model")
    t0 = time.perf_counter()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    avail = backend_availability()
    order = default_backends()
    requested = opts.backends or [b for b in order if avail.get(b) is None]
    unknown = [b for b in requested if b not in BACKENDS]
    if unknown:
        raise TvsError(f"unknown backend(s) {', '.join(unknown)} (known: {', '.join(BACKENDS.names())})")
    skipped = {b: avail[b] for b in order if b not in requested or avail.get(b)}
    for b in list(skipped):
        if b not in requested and avail.get(b) is None:
            skipped[b] = "not requested (--backend)"
    run = [b for b in requested if avail.get(b) is None]
    missing = [b for b in requested if avail.get(b)]
    if missing:  # only a backend asked for by name can be missing: an error, not a silent skip
        raise MissingDependencyError("; ".join(f"backend {b} is not available: {avail[b]}" for b in missing))
    kinds = {backend_kind(b) for b in run}
    progress(f"measuring {len(specs)} models on {', '.join(run) or 'no backend'} at batches "
             f"{','.join(map(str, opts.batch_sizes))}: {opts.rounds} A/B rounds x {opts.iters} iterations each, "
             f"accuracy on {opts.eval_samples or 'every'} images (the demo's three ResNet-20 models take about 30 s "
             "on 2 quiet CPU cores; --rounds, --iters, --batch-sizes and --eval-samples shorten it)")
    entries = _load_entries(specs, weights, onnx_paths, model_kwargs, prune_reports, base_model)
    shape = _input_shape(entries, data, opts.input_shape)
    _prepare(entries, shape, out, "onnx" in kinds, "engine" in kinds, opts.trt_precision, progress)
    report: dict[str, Any] = {"tvsprune_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "machine": machine_info(), "versions": versions(),
                              "flags": {"backends": run, "batch_sizes": opts.batch_sizes,
                                        "latency": vars(opts.latency), "eval_samples": opts.eval_samples,
                                        "noise": opts.noise, "threads": opts.threads or torch.get_num_threads()},
                              "input_shape": shape, "skipped_backends": skipped, "models": [], "latency": {},
                              "memory": {}}
    from ..models.costs import count_params_macs

    for e in entries:
        m: dict[str, Any] = {"label": e.label, "spec": e.spec, "files_bytes": e.files}
        if e.loaded is not None:
            m["params"], m["macs"] = count_params_macs(e.loaded.module, shape)
        if e.prune_report:
            m["prune"] = prune_record(e.prune_report)
        report["models"].append(m)
    rng = np.random.default_rng(opts.seed)
    evaluation = _eval_images(entries, data, opts) if data is not None and entries[0].loaded is not None else None
    for b in run:
        kind = backend_kind(b)
        usable = [e for e in entries if _artifact(e, kind) is not None]
        if not usable:
            report["skipped_backends"][b] = f"no {kind} artifact for any model"
            continue
        try:
            report["latency"][b], report["memory"][b], accuracy = _measure_backend(b, kind, usable, shape, opts, out,
                                                                                  rng, progress, evaluation)
        except MissingDependencyError as err:
            report["skipped_backends"][b] = str(err)
            report["memory"].pop(b, None)
            continue
        if accuracy:
            report.setdefault("accuracy_by_backend", {})[b] = accuracy
        if b in FRESH_MEMORY_BACKENDS:
            progress(f"{b}: memory, one fresh process per model")
            for e in usable:
                report["memory"][b].setdefault(e.label, {})["fresh"] = _fresh_memory(b, kind, e, shape, opts,
                                                                                      base_model)
    if data is not None and entries[0].loaded is not None:
        progress("accuracy and functional similarity")
        report["accuracy"] = _accuracy_block(entries, data, opts, evaluation)
    report["data"] = data.path if data is not None else None
    report["warnings"] = report_warnings(report)
    from .verdict import summarize

    report["summary"] = summarize(report, opts.max_drop)
    for w in report["warnings"]:
        log.warning(w)
    report["elapsed_s"] = round(time.perf_counter() - t0, 1)
    from .report import render

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    render(report, out)
    return report
