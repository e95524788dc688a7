"""Export stage: ONNX (checked, cleaned, parity-tested), INT8 QDQ, TensorRT engines.

Heavy optional packages (tensorrt, onnxruntime-gpu, modelopt) are imported inside the
functions that need them.
"""
from ..models.costs import count_params_macs
from .onnx_export import ParityShapeError, export_onnx, parity_check

__all__ = ["ParityShapeError", "count_params_macs", "export_onnx", "parity_check"]
