"""Latency as a budget metric: what the network costs on the backend that will run it, measured
there, as a function of its kept widths.

The default table (``--latency-model layer``, :mod:`.layer_latency`) times each Conv2d / Linear
alone on a grid of kept (input, output) widths aligned to ``round_to`` and sums them;
``--latency-model network`` times the whole network with one coupled group narrowed at a
time, A/B interleaved with the unpruned network, and predicts the base's latency times what
each group's width keeps alone. ``benchmarks/latency_budget.py`` prints both predictions'
errors against the networks it measures (the layer model's were the smaller: mean 0.115
against 0.167 over ResNet-20 and VGG-11).

The points are cached per backend, precision, batch, library versions and machine (CPU model
and instruction set, GPU name) under ``$TVSPRUNE_HOME/latency/``, keyed by each layer's
geometry (the network model: the network's), so a second prune on the same machine measures
nothing. :func:`fit` then measures the pruned network against the base and re-plans until it
lands on the target.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from ..artifacts import home, sha256_json, versions, write_json
from ..backends import BACKENDS, backend_kind
from ..backends.blocks import (CPU_BACKENDS, backend_block, cpu_capability, cpu_name,  # noqa: F401 (re-exported)
                               isa_block)
from ..console import step
from ..errors import MissingDependencyError, TvsError
from ..models.costs import CostTable, Widths
from .graph import ChannelGraph
from .layer_latency import LatencyTable, layer_table, width_grid
from .options import Guards

log = logging.getLogger(__name__)

FORMAT = "tvsprune.latency/2"  # 2: INT8 points time the backend's activation scheme


def machine(backend: str) -> dict[str, Any]:
    """What a timing depends on besides the software: the CPU (and the GPU a GPU backend runs on)."""
    out: dict[str, Any] = {"cpu": cpu_name(), "isa": cpu_capability(), "isa_block": isa_block(),
                           "cores": os.cpu_count()}
    if backend not in CPU_BACKENDS and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def backend_versions(backend: str) -> dict[str, str]:
    v = versions()
    return {k: v[k] for k in ("python", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt") if k in v}


def identity(backend: str, precision: str, batch: int) -> dict[str, Any]:
    """What the cached timings are valid for; another value of any of it measures afresh."""
    return {"format": FORMAT, "backend": backend, "precision": precision, "batch": batch,
            "threads": torch.get_num_threads() if backend_kind(backend) == "torch" else "backend default",
            "versions": backend_versions(backend), "machine": machine(backend)}


def cache_path(ident: dict[str, Any], folder: Path | None = None) -> Path:
    folder = Path(folder) if folder else home() / "latency"
    return folder / f"{ident['backend']}.{ident['precision']}.b{ident['batch']}.{sha256_json(ident)[:16]}.json"


def _read_cache(path: Path, ident: dict[str, Any]) -> dict[str, float]:
    """The cached points (key -> ms); nothing when absent, unreadable or for another identity."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict) or data.get("identity") != ident or not isinstance(data.get("points"), dict):
        return {}
    return {k: float(v) for k, v in data["points"].items()  # a saving may be 0, or below it within the noise
            if isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def check_backend(backend: str) -> None:
    """A backend that cannot run here is one error line (exit 2) before anything is measured."""
    if backend not in BACKENDS:
        raise TvsError(f"unknown --latency-backend {backend!r} (known: {', '.join(BACKENDS.names())})", 64)
    why = BACKENDS.get(backend).unavailable()
    if why:
        raise MissingDependencyError(f"--latency-backend {backend} is not available here: {why}")


def measure_table(model: nn.Module, table: CostTable, graph: ChannelGraph, input_shape: list[int], backend: str,
                  batch: int, guards: Guards, precision: str = "fp32", how: str = "layer",
                  logits_layer: str | None = None, cache_dir: Path | None = None) -> "LatencyTable | NetworkTable":
    """The latency table of ``model`` on ``backend`` (``how``: "network", one group narrowed at a
    time, or "layer", each layer alone), from the cache where it has the points and measured
    (then cached) where not."""
    check_backend(backend)
    t0 = time.perf_counter()
    ident = identity(backend, precision, batch)
    path = cache_path(ident, cache_dir)
    cached = _read_cache(path, ident)

    def save(points: dict[str, float]) -> None:  # kept as it grows: an interrupted run resumes
        cached.update(points)
        write_json(path, {"identity": ident, "points": cached})

    if how == "layer":
        result, measured, used = layer_table(model, table, graph, input_shape, backend, batch, guards, precision,
                                              cached, save)
    else:
        result, measured, used = _network_table(model, table, graph, input_shape, backend, batch, guards, precision,
                                                cached, save, logits_layer)
    result.info = {"model": how, "cache": str(path), "points_measured": measured, "points_reused": used - measured,
                   "seconds": round(time.perf_counter() - t0, 2), "round_to": max(1, guards.round_to),
                   "machine": ident["machine"]}
    log.info("latency table (%s): %d points measured, %d from %s", how, measured, used - measured, path)
    return result


@dataclass
class GroupCurve:
    """What narrowing one coupled group alone saves: milliseconds at each kept width of its grid."""

    layer: str          # the layer whose kept output width tells the group's
    full: int           # that layer's full output width
    local: int          # the group's block-local channels (what the grid counts)
    grid: list[int]     # kept block-local widths, ascending, the full width last
    saved: list[float]  # milliseconds saved at each (0 at the full width)

    def at(self, widths: Widths) -> float:
        kept = widths[self.layer][0] * self.local / self.full
        return float(np.interp(kept, self.grid, self.saved))


@dataclass
class NetworkTable:
    """The whole network measured with one group narrowed at a time; a network's predicted
    latency is the base's scaled by what each of its groups' widths keeps alone."""

    backend: str
    precision: str
    batch: int
    base_ms: float
    groups: dict[str, GroupCurve]
    info: dict[str, Any] = field(default_factory=dict)

    def predict(self, widths: Widths) -> float:
        """The base's milliseconds times, per group, the fraction its width keeps when narrowed alone.
        The product, not the sum of the savings: two groups that meet in a layer (its input
        and its output) each save a share of it, and the sum counts that layer's saving twice
        (measured on the final plans of benchmarks/latency_budget.py: VGG-11 at half the latency
        predicted 0.31 by the sum, 0.48 by the product, measured 0.51; ResNet-20 0.60 / 0.66 / 0.69)."""
        kept = np.prod([max(0.0, 1.0 - g.at(widths) / self.base_ms) for g in self.groups.values()])
        return float(self.base_ms * kept)


def structure_key(table: CostTable, input_shape: list[int]) -> str:
    """What a network's timings depend on apart from the machine: its layers' geometry and input."""
    return sha256_json({"input": list(input_shape), "layers": [[n, c.kind, c.out, c.inp, c.k, c.spatial, c.groups]
                                                               for n, c in table.layers.items()]})[:16]


def _network_table(model, table, graph, input_shape, backend, batch, guards, precision, cached, save,
                   logits_layer) -> tuple[NetworkTable, int, int]:
    import copy

    from ..compare.on_backend import time_networks
    from .plan import Plan, plan_groups
    from .surgery import apply_plan

    net = structure_key(table, input_shape)
    step_ = max(1, guards.round_to)
    curves: dict[str, GroupCurve] = {}
    for g in graph.groups:
        outs = [it for it in g.items if it.dim == "out" and it.module in table.layers]
        if g.root in graph.rigid or not outs:
            continue
        layer = max(outs, key=lambda it: len(it.idxs)).module
        grid = width_grid(g.block_size, step_, guards)
        curves[g.root] = GroupCurve(layer, table.layers[layer].out, g.block_size, grid, [0.0] * len(grid))
    keys = {r: [f"net:{net}:{r}@{w}" for w in c.grid[:-1]] for r, c in curves.items()}
    missing = [r for r in curves if any(k not in cached for k in keys[r])]
    measured = 0
    if missing:
        points = sum(len(keys[r]) for r in missing)
        step(f"measuring {points} narrowed networks on {backend} at batch {batch} (cached for the next prune)")
        none = np.empty(0, dtype=np.int64)
        example = torch.zeros(1, *input_shape)
        for k, r in enumerate(missing, 1):
            step(f"latency table: group {k}/{len(missing)} ({r}) at {len(keys[r])} narrower widths")
            gi = next(i for i, g in enumerate(graph.groups) if g.root == r)
            g, c = graph.groups[gi], curves[r]
            nets = {"base": model}
            for w in c.grid[:-1]:
                local = np.arange(w, g.block_size)
                cut = [g.expand(local) if j == gi and g.blocks > 1 else local if j == gi else none
                       for j in range(len(graph.groups))]
                nets[str(w)] = apply_plan(copy.deepcopy(model), Plan(plan_groups(graph, cut), {}), example,
                                          logits_layer)
            times = time_networks(backend, precision, nets, input_shape, batch)
            base = np.asarray(times["base"])
            save({f"net:{net}:base": float(np.median(base)),
                  **{k: float(np.median(base - np.asarray(times[str(w)]))) for k, w in zip(keys[r], c.grid[:-1])}})
            measured += len(keys[r])
    if f"net:{net}:base" not in cached:  # nothing prunable: the base alone
        save({f"net:{net}:base": float(np.median(time_networks(backend, precision, {"base": model}, input_shape,
                                                               batch)["base"]))})
    for r, c in curves.items():  # a narrower width saves at least what a wider one does (the noise aside)
        c.saved = np.maximum.accumulate(np.array([cached[k] for k in keys[r]] + [0.0])[::-1])[::-1].tolist()
    used = sum(len(k) for k in keys.values())
    return NetworkTable(backend, precision, batch, cached[f"net:{net}:base"], curves), measured, used


TOLERANCE = 0.05  # a measured latency ratio this close to the target (relative) is a hit, whatever the noise
CORRECTIONS = 3   # plans re-made at most, after the first, when the measured network misses the target
NOISE_CAP = 0.10  # a noisy measurement (target inside its per-round range) is a hit only this close (relative)


def _next_ask(attempts: list[dict[str, Any]], target: float) -> float:
    """The predicted ratio to plan for next: between the two closest attempts that measured on
    either side of the target, linearly (plans differ in structure, so the response is not
    smooth: VGG-11 asked 0.50 measured 0.54, asked 0.46 measured 0.42); with no such pair, the
    last prediction scaled by the last miss (the error taken as a constant factor)."""
    below = [a for a in attempts if a["measured"] <= target]
    above = [a for a in attempts if a["measured"] > target]
    if below and above:
        lo, hi = max(below, key=lambda a: a["measured"]), min(above, key=lambda a: a["measured"])
        span = hi["measured"] - lo["measured"]
        t = (target - lo["measured"]) / span if span > 0 else 0.5
        asked = lo["asked_predicted"] + t * (hi["asked_predicted"] - lo["asked_predicted"])
    else:
        last = attempts[-1]
        asked = last["predicted"] * target / last["measured"]
    return float(min(0.999, max(0.01, asked)))


def fit(first: dict[str, Any], build: Callable[[float], dict[str, Any]],
        measure: Callable[[nn.Module], dict[str, float]], target_kept: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Measure the chosen network (``first``: a candidate of ``select_plan``) against the base;
    when its latency ratio misses ``target_kept`` by more than the per-round range of the
    measurement (capped at NOISE_CAP: a range wide enough to hold anything proves nothing) and
    TOLERANCE, ask the table for the predicted ratio that the attempts so far
    say would land on the target (:func:`_next_ask`; ``build(fraction removed)``), at most
    CORRECTIONS times. Returns
    the candidate closest to the target (a hit first) and the record of every attempt."""
    attempts: list[dict[str, Any]] = []
    chosen, best, best_rank = first, first, None
    asked = target_kept
    for k in range(CORRECTIONS + 1):
        lat = chosen["plan"].meta["latency"]
        predicted = lat["after"] / lat["before"]
        m = measure(chosen["model"])
        measured = 1.0 / m["speedup"]
        band = (1.0 / m["speedup_max"], 1.0 / m["speedup_min"])
        miss = abs(measured / target_kept - 1.0)
        hit = miss <= TOLERANCE or (band[0] <= target_kept <= band[1] and miss <= NOISE_CAP)
        attempts.append({"asked_predicted": round(asked, 4), "predicted": round(predicted, 4),
                         "measured": round(measured, 4), "measured_range": [round(b, 4) for b in band],
                         "speedup": round(m["speedup"], 4), "base_ms": round(m["base_ms"], 4),
                         "pruned_ms": round(m["pruned_ms"], 4), "hit": hit,
                         "macs_removed": round(chosen["plan"].meta["macs"]["removed_frac"], 4)})
        rank = (not hit, abs(measured / target_kept - 1.0))
        if best_rank is None or rank < best_rank:
            best, best_rank, best_k = chosen, rank, k
        if hit or k == CORRECTIONS:
            break
        asked = _next_ask(attempts, target_kept)
        step(f"measured {measured:.3f} of the base latency, asked {target_kept:.3f}: planning for a predicted "
             f"{asked:.3f}")
        chosen = build(1.0 - asked)
    final = attempts[best_k]
    record = {"target": target_kept, "predicted": final["predicted"], "measured": final["measured"],
              "measured_range": final["measured_range"], "speedup": final["speedup"], "hit": final["hit"],
              "prediction_error": round(final["predicted"] / final["measured"] - 1.0, 4), "attempts": attempts}
    if final["measured"] >= 1.0 > target_kept:
        raise TvsError(f"no pruned network was faster than the base: the closest of {len(attempts)} attempts runs at "
                       f"{final['measured']:.3f} of its latency (asked {target_kept:.3f}); the backend's kernels are "
                       "slower at the widths the table offered: give --round-to with a larger block, or another "
                       "--latency-precision / --latency-backend")
    if not final["hit"]:
        log.warning("the pruned network runs at %.3f of the base latency (asked %.3f) after %d attempts: "
                    "the guards or the widths the backend likes do not allow closer", final["measured"], target_kept,
                    len(attempts))
    return best, record
