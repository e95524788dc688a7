"""The report's warnings: few, each one line saying what was seen and what to do about it.

One line per kind and model, not per measurement point: unstable timings, a model slower
than the base, a speedup far below the MACs ratio, an INT8 model slower than its FP32
version, and a large accuracy loss.
"""
from __future__ import annotations

from typing import Any

from ..console import short_list
from ..pruning.options import LARGE_LOSS_POINTS
MACS_GAP = 0.75  # a speedup below this share of the MACs ratio is "far below" it
MEMORY_GAP = 1.1  # a pruned model's peak memory above this share of the base's is worth saying


def _drop(report: dict[str, Any], label: str) -> dict[str, Any] | None:
    acc = ((report.get("accuracy") or {}).get("models") or {}).get(label)
    if acc and acc.get("drop_points") is not None:
        return acc
    for per_model in (report.get("accuracy_by_backend") or {}).values():
        if (per_model.get(label) or {}).get("drop_points") is not None:
            return per_model[label]
    return None


def report_warnings(report: dict[str, Any]) -> list[str]:
    """What a reader must not miss, one actionable line each (ratios are base / model: below 1
    is slower)."""
    base = report["models"][0]["label"]
    macs = {m["label"]: m.get("macs") for m in report["models"]}
    points, unstable, other = 0, [], []
    slower: dict[str, list[str]] = {}
    below_macs: dict[str, list[str]] = {}
    int8: dict[str, list[str]] = {}
    for backend, per_batch in report.get("latency", {}).items():
        for bs in sorted(per_batch, key=int):
            lat, where = per_batch[bs], f"{backend} b{bs}"
            points += 1
            for w in lat.get("warnings", []):
                (unstable if "unstable" in w else other).append(where if "unstable" in w else f"{where}: {w}")
            stats = lat.get("stats", {})
            for label, sp in lat.get(f"speedup_vs_{base}", {}).items():
                if label == base or (label.endswith(".int8") and label.removesuffix(".int8") in stats):
                    continue  # an INT8 model is compared with its own FP32 model (below)
                p50, base_p50 = stats.get(label, {}).get("p50_ms"), stats.get(base, {}).get("p50_ms")
                x = sp["speedup_median"]
                if x < 1.0 or (p50 is not None and base_p50 is not None and p50 > base_p50):
                    slower.setdefault(label, []).append(f"{where} {x:.2f}x [{sp['speedup_min']:.2f}-"
                                                        f"{sp['speedup_max']:.2f}], p50 {p50:.3g} vs {base_p50:.3g} ms")
                elif macs.get(label) and macs.get(base) and x < MACS_GAP * macs[base] / macs[label]:
                    below_macs.setdefault(label, []).append(f"{where} {x:.2f}x")
            for label, st in stats.items():  # an INT8 model against its own FP32 version
                fp32 = stats.get(label.removesuffix(".int8")) if label.endswith(".int8") else None
                if fp32 and st["p50_ms"] > fp32["p50_ms"]:
                    int8.setdefault(label, []).append(f"{where} {st['p50_ms']:.3g} vs {fp32['p50_ms']:.3g} ms")
    out = []
    if unstable:
        out.append(f"timings unstable (cv > 0.15 after a repeat) at {len(unstable)} of {points} points "
                   f"({short_list(unstable, 4)}): the machine was busy or its clock varied; stop other jobs, or rerun "
                   "with more --rounds, before trusting these speedups")
    out += other
    for label, where in slower.items():
        out.append(f"{label} is slower than {base} at {short_list(where, 3)}: pruning did not pay off there; "
                   "keep fewer channels (a smaller --keep-macs) or deploy the base model on that backend")
    for label, where in below_macs.items():
        ratio = macs[base] / macs[label]
        out.append(f"{label} has {ratio:.2f}x fewer MACs but runs only {short_list(where, 3)} faster: the backend "
                   "does not turn the removed MACs into time (kept widths off its kernels' channel blocks, "
                   "memory-bound layers); prune to a latency instead (--target-latency: widths measured on the "
                   "target), or --round-to 8 (32 for TensorRT INT8)")
    for label, where in int8.items():
        out.append(f"{label} is slower than its FP32 model ({short_list(where, 3)}): this backend lacks fast INT8 "
                   "kernels for some layers; deploy the FP32 model here, or measure INT8 on the target (TensorRT)")
    out += _memory_warnings(report, base)
    for m in report["models"][1:]:
        acc = _drop(report, m["label"])
        if acc and acc["drop_points"] > LARGE_LOSS_POINTS:
            ci = acc.get("drop_ci95") or [float("nan")] * 2
            out.append(f"{m['label']} loses {acc['drop_points']:.1f} points of top-1 (95 % CI {ci[0]:.1f} to "
                       f"{ci[1]:.1f}): keep more (a larger --keep-macs / --keep-params / --target-latency), give calibrate more images "
                       "per class, or let prune hold some out (--repair-samples-per-class below the images per class)")
    return out


def _block(backend: str) -> int:
    """The channel block a width should be a multiple of on ``backend``: this CPU's for a CPU
    backend (16 with AVX-512), 8 otherwise (FP16 tensor cores)."""
    from ..backends.blocks import isa_block

    return isa_block() if backend.endswith("cpu") else 8


def _memory_warnings(report: dict[str, Any], base: str) -> list[str]:
    """A model whose peak memory of inference (fresh process, largest batch) is above the base's."""
    out = []
    for backend, per_model in (report.get("memory") or {}).items():
        peaks = {label: (m.get("fresh") or {}).get("peak_bytes") or {} for label, m in per_model.items()
                 if isinstance(m, dict)}
        batches = sorted(peaks.get(base, {}), key=int)
        if not batches:
            continue
        bs, ref = batches[-1], peaks[base][batches[-1]]
        for label, peak in peaks.items():
            if label != base and ref and (peak.get(bs) or 0) > MEMORY_GAP * ref:
                out.append(f"{label} peaks at {peak[bs] / 2**20:.1f} MiB of inference memory on {backend} at batch {bs}, "
                           f"above the base's {ref / 2**20:.1f} MiB: widths off the backend's channel block run on "
                           f"kernels with larger buffers; prune with --round-to {_block(backend)} (with "
                           "--target-latency too: its auto rounding is 8)")
    return out

