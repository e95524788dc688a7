"""What this machine can run: GPUs, TensorRT, ONNX Runtime providers.

GPU and TensorRT probing runs in a child process, so a broken driver or library can
crash the child but never the tvsprune process itself.
"""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from ..errors import MissingDependencyError

INSTALL_TRT = ("TensorRT is not installed: install the 'tensorrt' package from NVIDIA's index "
               "(pip install tensorrt --extra-index-url https://pypi.nvidia.com) with a CUDA GPU, "
               "or use the container (docker build -t tvsprune . ; see README)")

_PROBE = r"""
import json, sys
out = {"python": sys.version.split()[0]}
try:
    import torch
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = bool(torch.cuda.is_available())
    out["gpus"] = [{"name": torch.cuda.get_device_name(i),
                    "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                    "memory_bytes": torch.cuda.get_device_properties(i).total_memory}
                   for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
except Exception as e:
    out["torch_error"] = f"{type(e).__name__}: {e}"
try:
    import tensorrt as trt
    out["tensorrt"] = trt.__version__
    try:
        trt.Builder(trt.Logger(trt.Logger.ERROR))
        out["tensorrt_builder"] = True
    except Exception as e:
        out["tensorrt_builder"] = False
        out["tensorrt_error"] = f"{type(e).__name__}: {e}"
except Exception as e:
    out["tensorrt_error"] = f"{type(e).__name__}: {e}"
try:
    import onnxruntime as ort
    out["onnxruntime"] = ort.__version__
    out["ort_providers"] = ort.get_available_providers()
except Exception as e:
    out["onnxruntime_error"] = f"{type(e).__name__}: {e}"
print("TVSPRUNE_PROBE " + json.dumps(out))
"""


def probe_environment(timeout: float = 120.0) -> dict[str, Any]:
    """Run the probe in a child process; a crash there is reported, not propagated."""
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"probe_error": f"the GPU/TensorRT probe did not answer within {timeout:.0f} s"}
    for line in r.stdout.splitlines():
        if line.startswith("TVSPRUNE_PROBE "):
            return json.loads(line[len("TVSPRUNE_PROBE "):])
    return {"probe_error": f"the GPU/TensorRT probe crashed (exit code {r.returncode}): "
                           + (r.stderr.strip().splitlines() or ["no output"])[-1]}


def require_tensorrt(env: dict[str, Any] | None = None) -> dict[str, Any]:
    """The probe's answer when TensorRT and a GPU are usable; otherwise a clean error (exit 2)."""
    env = env if env is not None else probe_environment()
    if "tensorrt" not in env:
        raise MissingDependencyError(INSTALL_TRT)
    if not env.get("tensorrt_builder", False) or not env.get("gpus"):
        why = env.get("tensorrt_error") or env.get("probe_error") or "no CUDA GPU is visible"
        raise MissingDependencyError(f"TensorRT {env['tensorrt']} is installed but cannot build engines here "
                                     f"({why}); run on a machine with an NVIDIA GPU or in the container")
    return env


def ort_providers_that_load() -> dict[str, str]:
    """Each available ONNX Runtime provider -> 'ok' or why a session on it did not load it."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    data = model.SerializeToString()
    out = {}
    for p in ort.get_available_providers():
        if p == "AzureExecutionProvider":
            continue
        try:
            s = ort.InferenceSession(data, providers=[p, "CPUExecutionProvider"] if p != "CPUExecutionProvider" else [p])
            out[p] = "ok" if p in s.get_providers() else "fell back to CPU (libraries missing?)"
        except Exception as e:
            out[p] = f"failed: {str(e).splitlines()[0][:160]}"
    del onnx
    return out
