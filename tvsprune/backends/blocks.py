"""The channel blocks backends' fast kernels want: what ``round_to auto`` aligns kept widths to
for a latency budget (read by PruneOptions and the latency table; imports nothing of pruning)."""
from __future__ import annotations

CPU_BACKENDS = ("ort-cpu", "torch-cpu")


def cpu_capability() -> str:
    """The vector instruction set PyTorch dispatches to here (AVX512, AVX2, DEFAULT, ...)."""
    try:
        import torch  # here, not above: ONNX Runtime's memory probe imports this module and needs no torch

        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # older builds
        return "DEFAULT"


def _cpuinfo() -> str:
    """/proc/cpuinfo, or "" where there is none."""
    from pathlib import Path

    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_name() -> str:
    """The CPU's model name (what the latency cache is keyed by, with the instruction set)."""
    import platform

    name = next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name")),
                None)
    return name or platform.processor() or platform.machine()


def int8_dot_saturates(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """Whether ONNX Runtime's U8S8 kernels here multiply with AVX2's VPMADDUBSW, whose pair sums
    saturate at int16 (255 x 127 x 2 > 32767): an x86 CPU with AVX2 and no VNNI (VPDPBUSD does
    not saturate). Read from /proc/cpuinfo's flags (``cpuinfo``, ``machine``: given in tests);
    elsewhere (ARM, macOS, no /proc) False."""
    import platform

    if (machine or platform.machine()).lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))
    return "avx2" in flags and not {"avx512_vnni", "avx_vnni", "amx_int8"} & flags


def isa_block() -> int:
    """The channel block of ONNX Runtime's blocked (NCHWc) CPU convolutions: 16 with AVX-512, 8
    with AVX2 (MLAS; oneDNN under PyTorch blocks the same way)."""
    return 16 if "AVX512" in cpu_capability().upper() else 8


def backend_block(backend: str, precision: str = "fp32") -> int:
    """What ``round_to auto`` aligns kept widths to for a latency budget on ``backend``.

    CPUs: 8, on AVX-512 too, where MLAS blocks by 16. The latency table prices every aligned
    width as measured, so a width that misses the 16-block costs what it costs; 8 leaves
    narrow networks choices that 16 takes away (ResNet-20's 16-channel stage cannot be cut at
    16). Measured on this project's AVX-512 CPU (benchmarks/latency_budget.py): ResNet-20 at
    0.8 of the latency lost far fewer points at 8 than at 16, VGG-11 at half the latency the
    same at both. INT8 on ONNX Runtime CPU: the ISA's block (16 on AVX-512): its QLinearConv
    is not faster at 8 channels than at 16, nor at 24 than at 16 (one 3x3 layer at 32x32,
    batch 32: 1.18 / 0.79 / 1.26 ms; FP32: 0.52 / 0.84 / 2.23), so a finer grid offers cuts that
    slow the network down. GPUs: TensorRT stores FP16 tensors in multiples of 8, and its INT8
    tensor-core kernels want 32."""
    if backend == "ort-cpu" and precision == "int8":
        return isa_block()
    if backend in CPU_BACKENDS:
        return 8
    return 32 if precision == "int8" else 8
