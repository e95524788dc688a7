"""``tvsprune doctor``: what this machine has for each backend, and what is missing."""
from __future__ import annotations

import argparse
import logging
from typing import Any


log = logging.getLogger("tvsprune")


def cmd_doctor(args: argparse.Namespace) -> int:
    from ..exporters.probe import ort_providers_that_load, probe_environment

    env = probe_environment()
    rows = [{"component": "python", "status": env.get("python", "?")},
            {"component": "torch", "status": f"{env.get('torch', 'missing')} (CUDA {env.get('torch_cuda') or 'none'})"}]
    for g in env.get("gpus", []):
        rows.append({"component": "GPU", "status": f"{g['name']} sm {g['compute_capability']}, "
                                                   f"{g['memory_bytes'] / 2**30:.0f} GiB"})
    if not env.get("gpus"):
        rows.append({"component": "GPU", "status": "none visible to torch"})
    rows.append({"component": "CPU", "status": _cpu_status()})
    rows.append({"component": "onnxruntime", "status": env.get("onnxruntime", env.get("onnxruntime_error", "missing"))})
    try:
        for p, st in ort_providers_that_load().items():
            rows.append({"component": f"  ORT {p}", "status": st})
    except Exception as e:  # reported, not fatal
        rows.append({"component": "  ORT providers", "status": f"probe failed: {e}"})
    trt_status = env.get("tensorrt") or "missing"
    if env.get("tensorrt") and not env.get("tensorrt_builder"):
        trt_status += f" (builder unusable: {env.get('tensorrt_error')})"
    rows.append({"component": "tensorrt", "status": trt_status})
    needs = []
    if not env.get("gpus"):
        needs.append("torch-cuda / ort-cuda / TensorRT backends need an NVIDIA GPU")
    if "tensorrt" not in env:
        needs.append("TensorRT engines: pip install tensorrt (NVIDIA index) or use the container")
    if "CUDAExecutionProvider" not in env.get("ort_providers", []):
        needs.append("ONNX Runtime on GPU: pip install 'tvsprune[gpu]' (onnxruntime-gpu)")
    from ..console import print_table

    print_table(rows, title="tvsprune doctor")
    for n in needs:
        print(f"missing: {n}")
    return 0


def _cpu_status() -> str:
    """The CPU, the instruction set PyTorch dispatches to, the channel block latency budgets
    align INT8 to, and whether INT8 exports need 7-bit weights here (exporters.int8)."""
    from ..backends.blocks import cpu_capability, cpu_name, int8_dot_saturates, isa_block

    int8 = ("INT8 exports use 7-bit weights (AVX2 without VNNI: ONNX Runtime's uint8 x int8 kernels saturate)"
            if int8_dot_saturates() else "INT8 exports use 8-bit weights")
    return f"{cpu_name()}, {cpu_capability()}, channel block {isa_block()}; {int8}"


def register(sub: Any) -> None:
    p = sub.add_parser("doctor", help="what this machine has for each backend, and what is missing")
    p.set_defaults(func=cmd_doctor)
