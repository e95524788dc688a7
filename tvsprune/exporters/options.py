"""``ExportOptions``: which exports to write and how (the ``[export]`` section, the export
flags and :func:`tvsprune.export`). Its defaults are the constants of :mod:`.defaults`,
which the export functions' own signatures read too."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from ..options import Options
from . import defaults as D

Precision = Literal["fp32", "fp16", "bf16", "int8"]


class ExportOptions(Options):
    # what to write (on the CLI the subcommand says it: export onnx | int8 | trt)
    onnx: bool = True
    int8: bool = False
    tensorrt: list[Precision] = []
    # ONNX
    opset: int | None = None  # None: the exporter's; the exporter checks the range it supports
    parity_samples: PositiveInt = D.PARITY_SAMPLES
    tolerance: float = Field(D.TOLERANCE, gt=0)
    # INT8 (ONNX Runtime static quantization, QDQ)
    int8_method: Literal["minmax", "entropy", "percentile"] = D.INT8_METHOD
    int8_samples: PositiveInt = D.INT8_SAMPLES
    # activations: "uint8" (asymmetric; ONNX Runtime CPU fuses every Conv with it), "int8"
    # (symmetric, zero point 0: what TensorRT requires); "auto": int8 when a TensorRT INT8
    # engine is built from the QDQ model, else uint8
    int8_activations: Literal["auto", "uint8", "int8"] = D.INT8_ACTIVATIONS
    # 7-bit weights: "auto" turns it on for uint8 activations on an x86 CPU without VNNI, whose
    # ONNX Runtime U8S8 kernels saturate (exporters.int8); "on" when quantizing for such a target elsewhere
    int8_reduce_range: Literal["auto", "on", "off"] = D.INT8_REDUCE_RANGE
    # TensorRT
    min_batch: PositiveInt = D.MIN_BATCH
    opt_batch: PositiveInt = D.OPT_BATCH
    max_batch: PositiveInt = D.MAX_BATCH
    workspace_mib: PositiveInt | None = None
    opt_level: int | None = Field(None, ge=0, le=5)

    @model_validator(mode="after")
    def _profile(self) -> "ExportOptions":
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"TensorRT batch profile needs min_batch <= opt_batch <= max_batch, got "
                             f"{self.min_batch} / {self.opt_batch} / {self.max_batch}")
        return self

    @property
    def activations(self) -> str:
        """The INT8 activation scheme ``auto`` resolves to (exporters.int8)."""
        if self.int8_activations != "auto":
            return self.int8_activations
        return "int8" if "int8" in self.tensorrt else "uint8"

    @property
    def any(self) -> bool:
        """Whether anything is exported (INT8 and engines start from the ONNX file)."""
        return bool(self.onnx or self.int8 or self.tensorrt)
