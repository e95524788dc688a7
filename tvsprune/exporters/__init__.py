"""Export stage: ONNX (checked, cleaned, parity-tested), INT8 QDQ, TensorRT engines.
Heavy optional packages (tensorrt, onnxruntime-gpu, modelopt) are imported inside the
functions that need them; the names here import on first use (the CLI's parser reads
``exporters.options`` and ``exporters.int8``'s choices without torch).
"""
from __future__ import annotations

from ..lazy import lazy

_WHERE = {"count_params_macs": "..models.costs", "ParityShapeError": ".onnx_export", "export_onnx": ".onnx_export",
          "parity_check": ".onnx_export"}
__getattr__ = lazy(__name__, _WHERE)

__all__ = sorted(_WHERE)
