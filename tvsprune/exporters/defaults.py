"""The export stage's defaults, in one place: the CLI, the Python API and `run` read them here."""

PARITY_SAMPLES = 512      # images (or random inputs) compared between PyTorch and ONNX Runtime
TOLERANCE = 1e-4          # max |logit difference| / max(1, largest |logit|)
INT8_METHOD = "minmax"    # ONNX Runtime static calibration method
INT8_SAMPLES = 512        # calibration images for INT8
INT8_REDUCE_RANGE = "auto"  # 7-bit weights where ONNX Runtime's U8S8 kernels saturate (no VNNI)
INT8_ACTIVATIONS = "auto"  # int8 (symmetric) when a TensorRT INT8 engine is built from it, else uint8
MIN_BATCH, OPT_BATCH, MAX_BATCH = 1, 8, 64  # TensorRT optimisation profile
