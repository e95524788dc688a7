"""ONNX Runtime evaluation helpers: accuracy of an ONNX file, FP32 vs INT8 comparison."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..data import BatchStream, Source, stratified_indices


def onnx_logits(path: str | Path, source: Source, max_samples: int | None = None, batch_size: int = 256,
                providers: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    from ..exporters.onnx_export import ort_session

    sess = ort_session(path, providers)
    name = sess.get_inputs()[0].name
    idx = stratified_indices(source.labels, None)
    if max_samples is not None and max_samples < len(idx):
        per_class = -(-max_samples // len(source.classes))
        idx = stratified_indices(source.labels, per_class)[:max_samples]
    logits, labels = [], []
    for x, y in BatchStream(source, idx, batch_size):
        logits.append(sess.run(None, {name: x.numpy()})[0])
        labels.append(y.numpy())
    return np.concatenate(logits), np.concatenate(labels)


def _latency(sess, x: np.ndarray, iters: int) -> float:
    name = sess.get_inputs()[0].name
    t = time.perf_counter()
    for _ in range(iters):
        sess.run(None, {name: x})
    return (time.perf_counter() - t) / iters


def compare_int8(fp32: str | Path, int8: str | Path, source: Source, max_samples: int | None = None,
                 latency_batch: int = 32, rounds: int = 5, iters: int = 10) -> dict[str, Any]:
    """Top-1 of both models on ``source`` and their CPU latency ratio (A/B interleaved)."""
    from ..exporters.onnx_export import ort_session

    lf, y = onnx_logits(fp32, source, max_samples)
    li, _ = onnx_logits(int8, source, max_samples)
    a, b = float((lf.argmax(1) == y).mean()), float((li.argmax(1) == y).mean())
    sf, si = ort_session(fp32), ort_session(int8)
    x = np.random.default_rng(0).standard_normal((latency_batch, *sf.get_inputs()[0].shape[1:])).astype(np.float32)
    _latency(sf, x, 2), _latency(si, x, 2)
    ratios = []
    for r in range(rounds):  # A B, then B A: drift and cache effects cancel
        if r % 2 == 0:
            tf, ti = _latency(sf, x, iters), _latency(si, x, iters)
        else:
            ti, tf = _latency(si, x, iters), _latency(sf, x, iters)
        ratios.append(ti / tf)
    return {"samples": int(len(y)), "fp32_top1": a, "int8_top1": b, "change_points": (b - a) * 100,
            "prediction_agreement": float((lf.argmax(1) == li.argmax(1)).mean()),
            "latency_batch": latency_batch, "latency_ratio_int8_over_fp32": float(np.median(ratios)),
            "latency_ratio_spread": [float(min(ratios)), float(max(ratios))]}
