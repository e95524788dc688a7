"""INT8 by explicit quantization: ONNX Runtime static quantization to a QDQ model.

Weights are int8, symmetric, per channel. Activations are one of two schemes:
- ``uint8``: asymmetric (ONNX Runtime's U8S8). ONNX Runtime's CPU provider fuses every
  Conv of a ResNet into a QLinearConv with it; with int8 activations it left half of them
  float between Q/DQ pairs and ran slower than FP32 (benchmarks/int8_profile.py).
- ``int8``: symmetric, zero point 0, what TensorRT requires of a QDQ model.

With uint8 activations on an x86 CPU without VNNI, ONNX Runtime's U8S8 kernels multiply with
AVX2's VPMADDUBSW, whose pairwise int16 sums saturate (255 x 127 x 2 > 32767): results are
silently clipped. ``reduce_range`` (ONNX Runtime's remedy: 7-bit weights, 255 x 63 x 2 fits)
is then on by default (``reduce_range_for``); it costs a bit of weight precision, no speed.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, get_args

import numpy as np

from ..artifacts import atomic_path, sha256_file, write_json
from ..errors import TvsError
from .options import ExportOptions

log = logging.getLogger(__name__)
METHODS = ("minmax", "entropy", "percentile")
ACTIVATIONS = ("uint8", "int8")  # the activation schemes (module docstring)
REDUCE_RANGE = get_args(ExportOptions.model_fields["int8_reduce_range"].annotation)  # auto, on, off


class _Reader:
    """ONNX Runtime CalibrationDataReader over batches of images."""

    def __init__(self, name: str, batches: Iterator[np.ndarray]) -> None:
        self.name, self.batches = name, iter(batches)

    def get_next(self):
        x = next(self.batches, None)
        return None if x is None else {self.name: x}

    def rewind(self) -> None:  # pragma: no cover - only used by some calibrators
        pass


def activations_for(backend: str) -> str:
    """The activation scheme a backend runs fastest or at all: uint8 on ONNX Runtime's CPU
    provider, symmetric int8 on the GPU ones and TensorRT (which requires it)."""
    return "uint8" if backend == "ort-cpu" else "int8"


def reduce_range_for(activations: str, setting: str = "auto") -> bool:
    """Whether weights are quantized to 7 bits: ``setting`` "on" / "off", or "auto": for uint8
    activations on a CPU whose U8S8 kernels saturate (module docstring)."""
    if setting not in REDUCE_RANGE:
        raise TvsError(f"unknown reduce-range setting {setting!r} (one of {', '.join(REDUCE_RANGE)})")
    if setting != "auto":
        return setting == "on"
    from ..backends.blocks import int8_dot_saturates

    return activations == "uint8" and int8_dot_saturates()


def calibration_batches(images: Any, size: int = 32) -> list[np.ndarray]:
    """Preprocessed images [N, C, H, W] as the float32 batches ONNX Runtime's calibrator reads."""
    return [images[i:i + size].numpy() for i in range(0, len(images), size)]


def quantize_int8(onnx_path: str | Path, calib_batches: list[np.ndarray], out: str | Path, method: str = "minmax",
                  per_channel: bool = True, activations: str = "uint8", reduce_range: str = "auto") -> dict[str, Any]:
    """Write a QDQ INT8 model calibrated on ``calib_batches``; returns a report.
    ``activations``: "uint8" (asymmetric, for ONNX Runtime CPU) or "int8" (symmetric, for
    TensorRT); ``reduce_range``: 7-bit weights, "auto" | "on" | "off" (reduce_range_for)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise TvsError(f"unknown calibration method {method!r} (one of {', '.join(METHODS)})")
    if activations not in ACTIVATIONS:
        raise TvsError(f"unknown INT8 activation scheme {activations!r} (one of {', '.join(ACTIVATIONS)})")
    symmetric = activations == "int8"
    reduced = reduce_range_for(activations, reduce_range)
    onnx_path, out = Path(onnx_path), Path(out)
    if not onnx_path.is_file():
        raise TvsError(f"ONNX model not found: {onnx_path}")
    import onnx

    model = onnx.load(str(onnx_path))
    name = model.graph.input[0].name
    t0 = time.perf_counter()
    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    with tempfile.TemporaryDirectory() as td:
        src = Path(td) / "pre.onnx"
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(onnx_path), str(src), skip_symbolic_shape=True)
        except Exception as e:  # pre-processing is an optimisation; quantize the original if it fails
            log.warning("quant_pre_process failed (%s); quantizing the model as exported", e)
            src = onnx_path
        with atomic_path(out) as tmp:
            quantize_static(str(src), str(tmp), _Reader(name, calib_batches), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, reduce_range=reduced, weight_type=QuantType.QInt8,
                            calibrate_method=calib,
                            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
            onnx.checker.check_model(str(tmp))
    report = {"file": str(out), "source": str(onnx_path), "source_sha256": sha256_file(onnx_path),
              "format": "QDQ",
              "activations": "int8 symmetric" if symmetric else "uint8 asymmetric", "weights": "int8 symmetric" +
              (" per-channel" if per_channel else "") + (", 7-bit (reduce_range)" if reduced else ""),
              "reduce_range": reduced, "calibration_method": method,
              "calibration_images": int(sum(len(b) for b in calib_batches)),
              "size_bytes": out.stat().st_size, "sha256": sha256_file(out),
              "seconds": round(time.perf_counter() - t0, 2)}
    return report


def write_report(out: str | Path, report: dict[str, Any]) -> None:
    write_json(Path(str(out).removesuffix(".onnx") + ".int8.json") if not str(out).endswith(".int8.onnx")
               else Path(str(out).removesuffix(".onnx") + ".json"), report)
