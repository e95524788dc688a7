"""TensorRT engines from ONNX with the TensorRT Python API (10.x and 11.x).

- 10.x: FP16 / BF16 via builder flags on a weakly typed network (or ``strongly_typed``);
  INT8 from the QDQ model (explicit quantization) with the INT8 flag.
- 11.x: every network is strongly typed and precision flags / calibrators are gone:
  FP16 / BF16 convert the ONNX model first (ModelOpt AutoCast, or onnxconverter-common);
  INT8 means the QDQ model from ``tvsprune export int8``.
The engine is specific to the GPU and TensorRT version; a sidecar ``engine.json``
records both.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from ..artifacts import atomic_path, sha256_file, write_json
from .defaults import MAX_BATCH, MIN_BATCH, OPT_BATCH
from ..errors import MissingDependencyError, TvsError
from .probe import INSTALL_TRT, require_tensorrt

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError(INSTALL_TRT) from None
    return trt


def convert_low_precision(onnx_path: Path, precision: str, out: Path) -> Path:
    """FP32 ONNX -> FP16/BF16 ONNX with float32 I/O (for strongly typed builds)."""
    import onnx

    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision

        model = convert_to_mixed_precision(onnx_path=str(onnx_path), low_precision_type=precision,
                                           keep_io_types=True)
    except ImportError:
        if precision != "fp16":
            raise MissingDependencyError("BF16 on TensorRT 11 needs NVIDIA ModelOpt (pip install nvidia-modelopt)") from None
        try:
            from onnxconverter_common import float16
        except ImportError:
            raise MissingDependencyError("FP16 on TensorRT 11 needs NVIDIA ModelOpt (pip install nvidia-modelopt) "
                                         "or onnxconverter-common (pip install onnxconverter-common)") from None
        model = float16.convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    onnx.save(model, str(out))
    return out


def build_engine(onnx_path: str | Path, out: str | Path, precision: str = "fp16", min_batch: int = MIN_BATCH,
                 opt_batch: int = OPT_BATCH, max_batch: int = MAX_BATCH, workspace_mib: int | None = None,
                 timing_cache: str | Path | None = None, opt_level: int | None = None,
                 strongly_typed: bool = False) -> dict[str, Any]:
    """Build and serialize an engine; writes ``out`` and ``<out>.json``; returns the sidecar."""
    if precision not in PRECISIONS:
        raise TvsError(f"unknown precision {precision!r} (one of {', '.join(PRECISIONS)})")
    if not (1 <= min_batch <= opt_batch <= max_batch):
        raise TvsError(f"batch profile must satisfy 1 <= min <= opt <= max, got {min_batch}/{opt_batch}/{max_batch}")
    onnx_path, out = Path(onnx_path), Path(out)
    if not onnx_path.is_file():
        raise TvsError(f"ONNX model not found: {onnx_path}")
    if precision == "int8":
        _check_qdq(onnx_path)
    env = require_tensorrt()  # in a child process: a broken driver cannot crash us
    trt = _import_trt()
    major = int(trt.__version__.split(".")[0])
    strong = major >= 11 or strongly_typed
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if strong and major < 11:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    config = builder.create_builder_config()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as td:
        src = onnx_path
        if strong and precision in ("fp16", "bf16"):
            src = convert_low_precision(onnx_path, precision, Path(td) / f"model.{precision}.onnx")
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(src)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise TvsError(f"TensorRT could not parse {src}: {errors}")
    if not strong:
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)
        elif precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    if workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    if opt_level is not None:
        if not 0 <= opt_level <= 5:
            raise TvsError("--opt-level must be 0..5")
        config.builder_optimization_level = int(opt_level)
    profile = builder.create_optimization_profile()
    profiles = {}
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        dims = list(inp.shape)
        rest = dims[1:]
        if any(d < 0 for d in rest):
            raise TvsError(f"input {inp.name} has dynamic non-batch dimensions {dims}: export with a fixed --input-shape")
        shapes = [tuple([b] + rest) for b in (min_batch, opt_batch, max_batch)]
        if dims[0] >= 0:
            shapes = [tuple(dims)] * 3
        profile.set_shape(inp.name, *shapes)
        profiles[inp.name] = {"min": shapes[0], "opt": shapes[1], "max": shapes[2]}
    config.add_optimization_profile(profile)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TvsError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    build_s = time.perf_counter() - t0
    with atomic_path(out) as tmp:
        tmp.write_bytes(bytes(serialized))
    if timing_cache:
        with atomic_path(timing_cache) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(out.read_bytes())
    device_mem = getattr(engine, "device_memory_size_v2", None)
    if device_mem is None:
        device_mem = getattr(engine, "device_memory_size", None)
    gpu = (env.get("gpus") or [{}])[0]
    report = {"file": str(out), "onnx": str(onnx_path), "onnx_sha256": sha256_file(onnx_path),
              "tensorrt": trt.__version__, "gpu": gpu.get("name"), "compute_capability": gpu.get("compute_capability"),
              "precision": precision, "strongly_typed": strong, "profiles": profiles,
              "build_seconds": round(build_s, 2), "size_bytes": out.stat().st_size, "sha256": sha256_file(out),
              "device_memory_size_v2": int(device_mem) if device_mem is not None else None,
              "timing_cache": str(timing_cache) if timing_cache else None,
              "opt_level": opt_level, "workspace_mib": workspace_mib}
    write_json(Path(str(out) + ".json") if not str(out).endswith(".engine") else out.with_suffix(".engine.json"), report)
    return report


def _check_qdq(path: Path) -> None:
    """An INT8 engine is built from a QDQ model with symmetric int8 activations (zero point 0)."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(path), load_external_data=False)
    quant = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    if not quant:
        raise TvsError(f"INT8 needs a QDQ model (tvsprune export int8 {path} ...): {path} has no "
                       "QuantizeLinear nodes")
    types = {i.name: i.data_type for i in model.graph.initializer}
    if any(len(n.input) > 2 and types.get(n.input[2]) == TensorProto.UINT8 for n in quant):
        raise TvsError(f"{path} quantizes activations to uint8 (ONNX Runtime CPU's scheme); TensorRT needs "
                       "symmetric int8: quantize again with `tvsprune export int8 ... --activations int8`")
