"""Export to ONNX: torch.onnx (torch.export-based, TorchScript fallback), checker, shape
inference, onnx-graphsurgeon clean-up, metadata, and parity against ONNX Runtime (CPU)."""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..version import __version__
from ..artifacts import atomic_path, sha256_file, sha256_json, write_json
from .defaults import TOLERANCE
from ..console import step
from ..errors import TvsError
from ..models import LoadedModel
from ..models.probe import run_forward

log = logging.getLogger(__name__)
TWO_GB = 2 * 1024 ** 3
INPUT, OUTPUT = "input", "logits"


class ParityShapeError(TvsError):
    """ONNX Runtime and PyTorch disagree on the output shape: the export is wrong."""


@dataclass
class ParityResult:
    samples: int
    max_abs_diff: float
    top1_agreement: float
    tolerance: float
    batch_sizes: list[int]
    max_abs_logit: float = 0.0

    @property
    def max_scaled_diff(self) -> float:
        """The largest difference over max(1, largest |logit|): absolute for logits within +-1,
        relative to the output's scale beyond (float32 rounding grows with the values)."""
        return self.max_abs_diff / max(1.0, self.max_abs_logit)

    @property
    def ok(self) -> bool:
        return self.max_scaled_diff <= self.tolerance and self.top1_agreement == 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "max_abs_diff": self.max_abs_diff, "max_abs_logit": self.max_abs_logit,
                "max_scaled_diff": self.max_scaled_diff, "top1_agreement": self.top1_agreement,
                "tolerance": self.tolerance, "batch_sizes": self.batch_sizes, "within_tolerance": self.ok}


def _export_dynamo(model, example, opset, dynamic) -> Any:
    from torch.export import Dim

    shapes = ({0: Dim("batch", min=1, max=65536)},) if dynamic else None
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                                    opset_version=opset, dynamic_shapes=shapes, optimize=True, verbose=False)
    return program.model_proto


def _export_torchscript(model, example, opset, dynamic, tmpdir: Path):
    import onnx

    f = tmpdir / "ts.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(f), dynamo=False, input_names=[INPUT], output_names=[OUTPUT],
                          opset_version=opset or 17,
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}} if dynamic else None)
    return onnx.load(str(f))


def clean_graph(model_proto):
    """Shape inference, then graphsurgeon: fold constants, drop dead nodes, toposort."""
    import onnx
    import onnx_graphsurgeon as gs

    model_proto = onnx.shape_inference.infer_shapes(model_proto)
    graph = gs.import_onnx(model_proto)
    graph.fold_constants().cleanup().toposort()
    cleaned = gs.export_onnx(graph)
    cleaned.ir_version = model_proto.ir_version
    del cleaned.opset_import[:]
    cleaned.opset_import.extend(model_proto.opset_import)
    return onnx.shape_inference.infer_shapes(cleaned)


def parity_check(model: torch.nn.Module, onnx_path: str | Path, inputs: torch.Tensor, tolerance: float = TOLERANCE,
                 batch_sizes: tuple[int, ...] = (1, 7, 64)) -> ParityResult:
    """Compare PyTorch and ONNX Runtime (CPU) logits on ``inputs``, at several batch sizes."""
    from ..backends import make_runner
    from ..compare.logits import forward_fn

    with make_runner("ort-cpu", onnx_path) as runner:
        return _parity(forward_fn(model), forward_fn(runner), inputs, tolerance, batch_sizes)


def _parity(torch_fn, ort_fn, inputs: torch.Tensor, tolerance: float, batch_sizes: tuple[int, ...]) -> ParityResult:
    from ..compare.logits import chunks, collect_logits

    worst, scale = 0.0, 0.0
    used = []

    def compare(ref: np.ndarray, got: np.ndarray, where: str) -> None:
        nonlocal worst, scale
        if got.shape != ref.shape:
            raise ParityShapeError(f"ONNX Runtime output shape {list(got.shape)} differs from PyTorch's "
                                   f"{list(ref.shape)}{where}")
        worst = max(worst, float(np.abs(got - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))

    for bs in batch_sizes:  # dynamic batch: the same answers at several batch sizes
        chunk = inputs[:bs] if bs <= len(inputs) else inputs.repeat((bs + len(inputs) - 1) // len(inputs), 1, 1, 1)[:bs]
        compare(torch_fn(chunk), ort_fn(chunk), f" at batch {bs}")
        used.append(bs)
    ref, _ = collect_logits(torch_fn, chunks(inputs, 64))
    got, _ = collect_logits(ort_fn, chunks(inputs, 64))
    compare(ref, got, "")
    n, agree = len(ref), int((got.argmax(1) == ref.argmax(1)).sum())
    return ParityResult(n, worst, agree / max(1, n), tolerance, used, scale)


def onnx_metadata(path: str | Path) -> dict[str, str]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise TvsError(f"{path} is not a readable ONNX model: {str(e)[:200]}") from None
    _check_external_data(model, Path(path))
    return {p.key: p.value for p in model.metadata_props}


def _check_external_data(model: Any, path: Path) -> None:
    """Tensors stored beside the model must be files inside its folder (no absolute path, no
    ``..``), and present: a received model never reads another file of this machine."""
    folder = path.resolve().parent
    for t in model.graph.initializer:
        if t.data_location != 1:  # TensorProto.EXTERNAL
            continue
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or folder not in target.parents:
            raise TvsError(f"{path}: tensor {t.name!r} is stored outside the model's folder ({location!r}): refused")
        if not target.is_file():
            raise TvsError(f"{path}: tensor {t.name!r} is stored in {location}, which is missing beside the model")


MIN_OPSET = 11  # the oldest opset whose Conv/Gemm/Resize semantics the parity check relies on


def export_onnx(loaded: LoadedModel, out: str | Path, opset: int | None = None, batch: str | int = "dynamic",
                input_shape: list[int] | None = None, parity_inputs: torch.Tensor | None = None,
                tolerance: float = TOLERANCE, exporter: str = "auto") -> dict[str, Any]:
    """Write ``out`` (ONNX) and ``out``'s ``export.json`` sidecar; returns the sidecar's content."""
    import onnx

    out = Path(out)
    if opset is not None:
        newest = onnx.defs.onnx_opset_version()
        if not MIN_OPSET <= opset <= newest:
            raise TvsError(f"--opset {opset} is not supported: give {MIN_OPSET}..{newest} (this onnx package's newest)")
    shape = list(input_shape or loaded.input_shape or [])
    if not shape:
        raise TvsError("the input shape is unknown: pass --input-shape C,H,W")
    dynamic = batch == "dynamic"
    n = 2 if dynamic else int(batch)
    model = loaded.module.eval()
    example = torch.randn(n, *shape)
    with torch.no_grad():
        run_forward(model, example, f"model {loaded.spec.spec}")
    t0 = time.perf_counter()
    fallback_reason = None
    used = exporter
    import tempfile

    with tempfile.TemporaryDirectory() as td:
        if exporter in ("auto", "dynamo"):
            try:
                proto = _export_dynamo(model, example, opset, dynamic)
                used = "dynamo"
            except Exception as e:  # torch.export cannot capture every model
                if exporter == "dynamo":
                    raise TvsError(f"torch.export-based ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from None
                fallback_reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log.warning("torch.export-based exporter failed (%s); using the TorchScript exporter", fallback_reason)
                proto = _export_torchscript(model, example, opset, dynamic, Path(td))
                used = "torchscript"
        else:
            proto = _export_torchscript(model, example, opset, dynamic, Path(td))
            used = "torchscript"
    proto = clean_graph(proto)
    from ..models.costs import count_params_macs

    params, macs = count_params_macs(model, shape)
    meta = {"tvsprune_version": __version__, "source_spec": loaded.spec.spec,
            "weights_sha256": loaded.weights_sha256 or "", "plan_sha256": sha256_json(loaded.plan) if loaded.plan else "",
            "parameters": str(params), "macs": str(macs), "input_shape": ",".join(map(str, shape))}
    if loaded.normalize:
        meta["normalize_mean"] = ",".join(map(str, loaded.normalize["mean"]))
        meta["normalize_std"] = ",".join(map(str, loaded.normalize["std"]))
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=k, value=str(v)))
    proto.producer_name = "tvsprune"
    proto.producer_version = __version__
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and written != opset:
        raise TvsError(f"asked for opset {opset}, but the {used} exporter wrote opset {written}: "
                       f"give --opset {written}, or --exporter torchscript for older opsets")
    if proto.ByteSize() >= TWO_GB:
        raise TvsError("the model is larger than 2 GB: external-data export is not supported yet")
    report: dict[str, Any] = {"file": str(out), "exporter": used, "fallback_reason": fallback_reason,
                              "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
                              "batch": batch, "input_shape": shape, "input": INPUT, "output": OUTPUT,
                              "parameters": params, "macs": macs, "metadata": meta}
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
        step("checking the ONNX model")
        onnx.checker.check_model(str(tmp), full_check=True)
        report["checker"] = "passed (full_check)"
        inputs = parity_inputs if parity_inputs is not None else torch.randn(64, *shape)
        sizes = (1, 7, 64) if dynamic else (n,)
        step("parity on ONNX Runtime")
        parity = parity_check(model, tmp, inputs, tolerance, sizes)  # a shape mismatch raises: no file is kept
        report["parity"] = parity.to_dict() | {"inputs": "calibration images" if parity_inputs is not None else
                                               "random normal inputs"}
        if not parity.ok:
            log.warning("parity outside tolerance (%s): max |diff| %.3g for logits up to %.3g (scaled %.3g, tolerance "
                        "%.1g), top-1 agreement %.4f", out.name, parity.max_abs_diff, parity.max_abs_logit,
                        parity.max_scaled_diff, tolerance, parity.top1_agreement)
            report["warnings"] = [f"parity outside tolerance: max abs diff {parity.max_abs_diff:.3g} "
                                  f"(scaled {parity.max_scaled_diff:.3g})"]
    report["size_bytes"] = out.stat().st_size
    report["sha256"] = sha256_file(out)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(out.with_suffix(".export.json") if out.suffix == ".onnx" else Path(str(out) + ".export.json"), report)
    return report
