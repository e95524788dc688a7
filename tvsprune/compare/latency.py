"""Latency statistics and A/B-interleaved measurement of several runners."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends import Runner

log = logging.getLogger(__name__)


def summarize(seconds: list[float] | np.ndarray, batch: int) -> dict[str, float]:
    """mean/std/min/percentiles/max in milliseconds, coefficient of variation, images/s."""
    s = np.asarray(seconds, dtype=np.float64) * 1e3
    if s.size == 0:
        return {}
    mean = float(s.mean())
    out = {"n": int(s.size), "mean_ms": mean, "std_ms": float(s.std(ddof=1)) if s.size > 1 else 0.0,
           "min_ms": float(s.min()), "max_ms": float(s.max())}
    for p in (50, 90, 95, 99):
        out[f"p{p}_ms"] = float(np.percentile(s, p))
    out["cv"] = out["std_ms"] / mean if mean > 0 else 0.0
    out["throughput_ips"] = batch / (out["p50_ms"] / 1e3) if out["p50_ms"] > 0 else float("inf")
    return out


@dataclass
class LatencyConfig:
    warmup_iters: int = 5
    warmup_s: float = 0.3
    rounds: int = 5          # A B A B ... rounds
    iters: int = 10          # timed iterations per runner per round
    budget_s: float | None = None  # optional time cap per runner per round
    cv_warn: float = 0.15
    max_repeats: int = 1


def _warmup(runner: Runner, x: np.ndarray, cfg: LatencyConfig) -> None:
    t_end = time.perf_counter() + cfg.warmup_s
    i = 0
    while i < cfg.warmup_iters or time.perf_counter() < t_end:
        runner.infer(x)
        i += 1


def _round(runner: Runner, x: np.ndarray, cfg: LatencyConfig) -> list[dict[str, float]]:
    out = []
    t0 = time.perf_counter()
    for _ in range(cfg.iters):
        out.append(runner.infer_timed(x))
        if cfg.budget_s is not None and time.perf_counter() - t0 > cfg.budget_s:
            break
    return out


def measure_interleaved(runners: dict[str, Runner], x: np.ndarray, cfg: LatencyConfig | None = None
                        ) -> dict[str, Any]:
    """Time every runner on the same batch, alternating A B A B ... so drift cancels.

    Returns per-label statistics of the compute time (plus h2d / d2h means for GPU
    backends), and per-round ratios of each label's median to the first label's.
    """
    cfg = cfg or LatencyConfig()
    batch = int(x.shape[0])
    labels = list(runners)
    for attempt in range(cfg.max_repeats + 1):
        for r in runners.values():
            _warmup(r, x, cfg)
        samples: dict[str, list[dict[str, float]]] = {k: [] for k in labels}
        round_medians: dict[str, list[float]] = {k: [] for k in labels}
        for i in range(cfg.rounds):
            order = labels if i % 2 == 0 else labels[::-1]
            for k in order:
                res = _round(runners[k], x, cfg)
                samples[k] += res
                round_medians[k].append(float(np.median([r["compute"] for r in res])))
        stats = {}
        unstable = []
        for k in labels:
            comp = [r["compute"] for r in samples[k]]
            st = summarize(comp, batch)
            st["h2d_ms"] = float(np.mean([r["h2d"] for r in samples[k]]) * 1e3)
            st["d2h_ms"] = float(np.mean([r["d2h"] for r in samples[k]]) * 1e3)
            stats[k] = st
            if st["cv"] > cfg.cv_warn:
                unstable.append(k)
        if not unstable or attempt == cfg.max_repeats:
            break
        log.warning("unstable timings (cv > %.2f) for %s at batch %d: repeating", cfg.cv_warn, unstable, batch)
    ref = labels[0]
    ratios = {}
    for k in labels[1:]:
        r = np.asarray(round_medians[ref]) / np.asarray(round_medians[k])  # speedup of k over ref
        ratios[k] = {"speedup_median": float(np.median(r)), "speedup_min": float(r.min()),
                     "speedup_max": float(r.max()), "rounds": len(r)}
    result = {"batch": batch, "stats": stats, "speedup_vs_" + ref: ratios}
    if unstable:
        result["warnings"] = [f"unstable timings (cv > {cfg.cv_warn}) for {', '.join(unstable)} after a repeat"]
    return result
