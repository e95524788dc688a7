"""The export stage for one model: ONNX (with parity), then INT8 QDQ and TensorRT engines as
:class:`ExportOptions` asks. ``run`` and :func:`tvsprune.export` call it."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import MissingDependencyError
from ..models import LoadedModel
from .onnx_export import export_onnx
from .options import ExportOptions


def export_model(model: LoadedModel, out_dir: str | Path, label: str, opts: ExportOptions, parity: torch.Tensor,
                 calib_batches: Callable[[], list[np.ndarray]] | None = None,
                 echo: Callable[[str], None] = print) -> tuple[list[Path], dict[str, str]]:
    """Write ``<label>.onnx`` (and its sidecar), ``<label>.int8.onnx`` and
    ``<label>.<precision>.engine`` under ``out_dir``; returns the files written and the
    engines skipped for want of TensorRT (precision -> why)."""
    exp = Path(out_dir)
    outs: list[Path] = []
    skipped: dict[str, str] = {}
    if not opts.any:
        return outs, skipped
    onnx = exp / f"{label}.onnx"
    export_onnx(model, onnx, opts.opset, "dynamic", list(parity.shape[1:]), parity, opts.tolerance)
    outs += [onnx, onnx.with_suffix(".export.json")]
    if opts.int8:
        from .int8 import quantize_int8, write_report

        if calib_batches is None:
            from ..errors import TvsError

            raise TvsError("INT8 export needs calibration images")
        f = exp / f"{label}.int8.onnx"
        rep = quantize_int8(onnx, calib_batches(), f, opts.int8_method, activations=opts.activations,
                            reduce_range=opts.int8_reduce_range)
        write_report(f, rep)
        outs.append(f)
    for precision in opts.tensorrt:
        from .tensorrt import build_engine

        src = exp / (f"{label}.int8.onnx" if precision == "int8" else f"{label}.onnx")
        try:
            f = exp / f"{label}.{precision}.engine"
            build_engine(src, f, precision, opts.min_batch, opts.opt_batch, opts.max_batch, opts.workspace_mib,
                         exp / "timing.cache", opts.opt_level)
            outs.append(f)
        except MissingDependencyError as err:
            skipped[precision] = str(err)
            echo(f"  TensorRT {precision} engine skipped: {err}")
    return outs, skipped
