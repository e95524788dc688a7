"""The Python API on a model you already hold: calibrate, prune, export in a few lines.

    import tvsprune
    moments = tvsprune.calibrate(model, "calib_images/")        # an nn.Module, its weights loaded
    pruned = tvsprune.prune(model, moments, target_flops=0.3)   # -> Pruned(module, plan, report)
    tvsprune.export_onnx(pruned, "pruned.onnx")

Each function also takes what the CLI takes (a spec string such as ``resnet20`` or
``my_models.py:Net`` with ``weights=``, a pruned artifact folder) and uses the same
defaults as the CLI and the TOML config: keywords are validated by the stage's options
model (``CalibrateOptions``, ``PruneOptions``, ``ExportOptions``, ``BenchOptions``).
The stages underneath are the CLI's: nothing here is a second implementation.
"""
from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .artifacts import read_safetensors
from .calibration.moments import FORMATS, Moments
from .bench.options import BenchOptions
from .calibration.options import CalibrateOptions
from .data.options import DataOptions, ReadOptions
from .errors import TvsError
from .exporters import defaults as export_defaults
from .exporters.options import ExportOptions
from .models import LoadedModel, load_model
from .models.spec import ModelSpec, reparametrized
from .pruning.options import PruneOptions
from .pruning.plan import Plan
from .registry import unknown

@dataclass
class Pruned:
    """A pruned network: the module itself, the plan that made it, and prune.json's content."""

    module: nn.Module
    plan: Plan
    report: dict[str, Any]
    out_dir: Path
    normalize: dict[str, list[float]] | None = None
    input_shape: list[int] | None = None


def state_sha256(module: nn.Module) -> str:
    """Content hash of a module's state (names, shapes, dtypes and bytes), for in-memory models."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def as_loaded(model: Any, weights: str | None = None, normalize: dict[str, list[float]] | None = None,
              input_shape: list[int] | None = None) -> LoadedModel:
    """An nn.Module, a LoadedModel, a :class:`Pruned` or a spec string -> LoadedModel."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, Pruned):
        return LoadedModel(module=model.module.eval(), spec=ModelSpec(spec=str(model.out_dir)),
                           normalize=normalize or model.normalize,
                           input_shape=tuple(input_shape or model.input_shape or ()) or None,
                           plan=model.plan.to_dict())
    if isinstance(model, nn.Module):
        if found := reparametrized(model):
            raise TvsError(f"model: {found[0][0] or '(the model)'}.{found[0][2]} is computed at each call (weight or "
                           "spectral norm): bake it first (torch.nn.utils.parametrize.remove_parametrizations(m, "
                           "'weight'), or remove_weight_norm / remove_spectral_norm); tvsprune bakes it where it "
                           "builds the model from a spec, and leaves the module you pass as it is")
        return LoadedModel(module=model.eval(), spec=ModelSpec(spec=f"<in-memory {type(model).__name__}>"),
                           weights_sha256=state_sha256(model), normalize=normalize,
                           input_shape=tuple(input_shape) if input_shape else None)
    if isinstance(model, (str, Path)):
        return load_model(str(model), weights)
    raise TvsError(f"model must be an nn.Module, a spec string or a pruned result, not {type(model).__name__}")


def _split(options: dict[str, Any], *models: Any, what: str) -> list[dict[str, Any]]:
    """``options`` shared out among the options ``models`` by field name; a key no model has
    is one TvsError naming it and the closest valid key."""
    known = [name for m in models for name in m.model_fields]
    bad = sorted(k for k in options if k not in known)
    if bad:
        raise TvsError("; ".join(unknown(f"{what} option", k, tuple(known)) for k in bad))
    return [{k: v for k, v in options.items() if k in m.model_fields} for m in models]


def _data(data: Any, **read: Any) -> DataOptions:
    if isinstance(data, DataOptions):
        return data
    if isinstance(data, (str, Path)):
        return DataOptions.build(path=str(data), **read)
    raise TvsError(f"data must be an image folder path or DataOptions, not {type(data).__name__}")


def calibrate(model: Any, data: Any, *, out: str | Path | None = None, weights: str | None = None,
              **options: Any) -> Moments:
    """Class-conditional moments (and the consumers' second moments) of ``model`` on ``data``.

    ``data``: an image folder (one sub-folder per class), an .npz, CIFAR batches, or
    :class:`DataOptions`. ``options``: :class:`CalibrateOptions` fields (``resolution``,
    ``layers``, ``device``) and :class:`DataOptions` reading fields (``samples_per_class``,
    ``mean``, ``std``, ``resize``, ``crop``, ``batch_size``, ...). ``out`` also writes the
    moments file.
    """
    from .calibration.stage import calibrate as _calibrate

    cal, read = _split(options, CalibrateOptions, ReadOptions, what="calibrate")
    opts = CalibrateOptions.build(**cal)
    return _calibrate(as_loaded(model, weights), _data(data, **read), out, opts.resolution, opts.layers,
                      opts.device)


def prune(model: Any, moments: Moments | str | Path | None = None, *, out: str | Path | None = None,
          weights: str | None = None, calib_data: Any = None, **options: Any) -> Pruned:
    """Prune ``model`` with the moments from :func:`calibrate`; returns the pruned module and its plan.
    ``moments`` may be None where nothing reads them (``structure="blocks"``, or a method
    such as ``l1``, with ``calib_data`` for the repairs); the stage says when one is needed.

    ``options`` are :class:`PruneOptions` fields (``target_params``, ``target_flops``,
    ``method``, ``allocation``, ``compensation``, ``bn_recalibrate``, ``min_keep_frac``,
    ``round_to``, ...); a parameter budget of 0.3 applies when none is given. ``out``
    keeps plan.json, pruned.safetensors and prune.json (a temporary folder otherwise).
    """
    from .pruning.stage import prune_model

    opts = PruneOptions.build(**_split(options, PruneOptions, what="prune")[0])
    out_dir = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="tvsprune-"))
    if isinstance(moments, Moments):
        path = out_dir / "moments.safetensors"
        out_dir.mkdir(parents=True, exist_ok=True)
        moments.save(path)
        mom_meta = moments.meta
    elif moments is None:
        path, mom_meta = None, {}
    else:
        path = Path(moments)
        mom_meta = read_safetensors(path, "moments file", FORMATS, tensors=False)[0]
    loaded = as_loaded(model, weights)
    calib = _data(calib_data) if calib_data is not None else None
    if path is None and calib is not None and not loaded.input_shape:  # no moments file to say it: an image does
        from .data import take_images

        loaded.input_shape = tuple(take_images(calib.open(loaded), 1)[0].shape[1:])
    report, module, plan = prune_model(loaded, path, out_dir, opts, calib)
    pre = (mom_meta.get("data") or {}).get("preprocess") or {}
    norm = loaded.normalize or ({"mean": pre["mean"], "std": pre["std"]} if pre.get("mean") else None)
    shape = mom_meta.get("input_shape") or (list(loaded.input_shape) if loaded.input_shape else None)
    return Pruned(module.eval(), plan, report, out_dir, norm, shape)


def export(model: Any, out: str | Path, data: Any, *, label: str = "model", weights: str | None = None,
           calib_data: Any = None, **options: Any) -> list[Path]:
    """Everything :class:`ExportOptions` asks for, for one model: ``OUT/<label>.onnx`` (parity
    on ONNX Runtime with images of ``data``), ``<label>.int8.onnx`` when ``int8=True``
    (calibrated on ``calib_data``, else ``data``), engines for ``tensorrt=["fp16", ...]``.
    ``options``: :class:`ExportOptions` fields. Returns the files written.
    """
    from .data import take_images
    from .exporters.int8 import calibration_batches
    from .exporters.stage import export_model

    opts = ExportOptions.build(**_split(options, ExportOptions, what="export")[0])
    loaded = as_loaded(model, weights)
    parity, _ = take_images(_data(data).open(loaded), opts.parity_samples)

    def calib_batches() -> list:
        x, _ = take_images(_data(calib_data if calib_data is not None else data).open(loaded), opts.int8_samples,
                           seed=1)
        return calibration_batches(x)

    Path(out).mkdir(parents=True, exist_ok=True)
    return export_model(loaded, out, label, opts, parity, calib_batches)[0]


def export_onnx(model: Any, out: str | Path, *, input_shape: list[int] | None = None, opset: int | None = None,
                batch: str | int = "dynamic", tolerance: float = export_defaults.TOLERANCE,
                parity_inputs: torch.Tensor | None = None) -> dict[str, Any]:
    """Write an ONNX file (checked, cleaned, parity-tested on ONNX Runtime); returns its sidecar.

    ``parity_inputs`` (preprocessed images, [N, C, H, W]) replace the random normal inputs
    of the parity check, as ``tvsprune export onnx --data`` does.
    """
    from .exporters.onnx_export import export_onnx as _export

    loaded = as_loaded(model, input_shape=input_shape)
    return _export(loaded, out, opset, batch, list(input_shape) if input_shape else None, parity_inputs,
                   tolerance=tolerance)


def bench(base: Any, *pruned: Any, out: str | Path, data: Any = None, weights: str | None = None,
          **options: Any) -> dict[str, Any]:
    """Latency, memory and accuracy of ``base`` against each ``pruned`` on every backend present.

    Models are nn.Modules, spec strings (zoo name, file.py:Name, ...), pruned artifact
    folders, .onnx files or :class:`Pruned` results; ``options`` are :class:`~tvsprune.bench.stage.BenchOptions`
    fields. Writes report.json, report.md and report.html under ``out``; returns the report.
    """
    from .bench.stage import bench as _bench

    opts = BenchOptions.build(**_split(options, BenchOptions, what="bench")[0])
    models = [base, *pruned]
    reports = {i: m.report for i, m in enumerate(models) if isinstance(m, Pruned)}
    specs = [str(m) if isinstance(m, (str, Path)) else as_loaded(m, weights if i == 0 else None)
             for i, m in enumerate(models)]
    return _bench(specs, out, _data(data) if data is not None else None, weights, opts,
                  prune_reports=reports)


__all__ = ["Pruned", "as_loaded", "bench", "calibrate", "export", "export_onnx", "prune", "state_sha256"]
