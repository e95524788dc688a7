"""ONNX Runtime evaluation helpers: accuracy of an ONNX file, FP32 vs INT8 comparison."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..backends import make_runner
from ..compare.latency import LatencyConfig, measure_interleaved
from ..compare.logits import collect_logits, forward_fn
from ..data import BatchStream, Source, stratified_indices


def onnx_logits(path: str | Path, source: Source, max_samples: int | None = None, batch_size: int = 256,
                backend: str = "ort-cpu") -> tuple[np.ndarray, np.ndarray]:
    idx = stratified_indices(source.labels, None)
    if max_samples is not None and max_samples < len(idx):
        per_class = -(-max_samples // len(source.classes))
        idx = stratified_indices(source.labels, per_class)[:max_samples]
    with make_runner(backend, path) as runner:
        return collect_logits(forward_fn(runner), BatchStream(source, idx, batch_size))


def compare_int8(fp32: str | Path, int8: str | Path, source: Source, max_samples: int | None = None,
                 latency_batch: int = 32, rounds: int = 5, iters: int = 10) -> dict[str, Any]:
    """Top-1 of both models on ``source`` and their CPU latency ratio (A/B interleaved)."""
    lf, y = onnx_logits(fp32, source, max_samples)
    li, _ = onnx_logits(int8, source, max_samples)
    a, b = float((lf.argmax(1) == y).mean()), float((li.argmax(1) == y).mean())
    with make_runner("ort-cpu", fp32) as rf, make_runner("ort-cpu", int8) as ri:
        shape = rf.input_shape or tuple(lf.shape[1:])
        x = np.random.default_rng(0).standard_normal((latency_batch, *shape)).astype(np.float32)
        lat = measure_interleaved({"fp32": rf, "int8": ri}, x, LatencyConfig(warmup_iters=2, warmup_s=0.0,
                                                                             rounds=rounds, iters=iters))
    sp = lat["speedup_vs_fp32"]["int8"]  # fp32 time / int8 time, per round
    return {"samples": int(len(y)), "fp32_top1": a, "int8_top1": b, "change_points": (b - a) * 100,
            "prediction_agreement": float((lf.argmax(1) == li.argmax(1)).mean()),
            "latency_batch": latency_batch, "latency_ratio_int8_over_fp32": 1.0 / sp["speedup_median"],
            "latency_ratio_spread": [1.0 / sp["speedup_max"], 1.0 / sp["speedup_min"]]}
