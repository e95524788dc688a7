"""The verdict: what the user gets, computed once into report.json's ``summary`` and printed
the same everywhere (first line of report.md/html, last line of bench, run and demo), and
the ``--fail-if`` gate CI scripts check it with.

``summary`` fields (documented in the README, "Reading the report"):

- ``sentence``: the verdict in words.
- ``batch``: the batch size it is stated at: the one a pruned model's latency budget was
  measured at (``prune --latency-batch``) where bench measured it, else the largest one measured.
- ``max_drop``: the points of top-1 a model may lose to be recommended (``--max-drop``;
  null: the fastest model is recommended whatever it lost).
- ``backends``: per backend, the fastest model at that batch that lost at most ``max_drop``
  points of top-1 (``model``; a model whose accuracy was not measured counts as within), its median
  speedup over the base with the min-max of the per-round ratios (``speedup``,
  ``speedup_range``), whether the timings were stable (``stable``), and its points of
  top-1 lost with their paired 95 % interval (``drop_points``, ``drop_ci95``, on
  ``samples`` images; null without evaluation data); ``within_max_drop``: false when every
  model lost more (``model`` is then the fastest of all); ``rejected``: the faster models
  passed over for losing more (``model``, ``speedup``, ``drop_points``), fastest first.
- ``best``: the backend entry with the highest speedup among those whose timings were
  stable (among all when none was), one within ``max_drop`` before one that is not, and the
  backend a pruned model's latency budget was measured on (``prune --latency-backend``;
  ``target_backend``) before any other, with its ``backend`` name.
- ``macs_saved``, ``params_saved``, ``weights_bytes_saved``: fractions saved by that
  model (null when unknown, e.g. an .onnx file without its PyTorch model).
- ``trustworthy``: the timings behind the verdict (the best entry's) were stable;
  ``all_stable``: every backend's were.
- ``int8``: per backend that ran INT8 models, at that batch, each one's speedup over its
  own FP32 model (``<label>.int8`` over ``<label>``); below 1 the sentence says INT8 is slower
  there. ``recommended``: the model to deploy on that backend (the best entry's; null when
  every model lost more than ``max_drop``).
- a backend entry whose fastest model is the base's own INT8 model also has ``pruned``: the
  fastest pruned model there (``model``, ``speedup``, ``drop_points``), which the sentence
  states: pruning did not pay beyond INT8 on that backend.
"""
from __future__ import annotations

import math
from typing import Any

from ..errors import TvsError

GATES = {"max_drop": "points of top-1 lost at most", "min_speedup": "median speedup at least"}


def _accuracy(report: dict[str, Any], backend: str, label: str) -> dict[str, Any] | None:
    acc = (report.get("accuracy_by_backend") or {}).get(backend, {}).get(label)
    if acc and acc.get("drop_points") is not None:
        return acc
    acc = ((report.get("accuracy") or {}).get("models") or {}).get(label)
    return acc if acc and acc.get("drop_points") is not None else None


def _saved(model: dict[str, Any], base: dict[str, Any], key: str) -> float | None:
    a, b = model.get(key), base.get(key)
    return 1 - a / b if a and b else None


def summarize(report: dict[str, Any], max_drop: float | None = None) -> dict[str, Any]:
    """report.json's ``summary`` (see the module docstring); ``max_drop``: points of top-1 a
    recommended model may lose (None: the fastest is recommended)."""
    models = {m["label"]: m for m in report["models"]}
    base = report["models"][0]
    batches = [int(b) for per in report.get("latency", {}).values() for b in per]
    target = _latency_target(report["models"])
    batch = target.get("batch") if target.get("batch") in batches else max(batches) if batches else None
    out: dict[str, Any] = {"batch": batch, "max_drop": max_drop, "backends": {}, "best": None, "trustworthy": False,
                           "all_stable": True}
    for backend, per_batch in report.get("latency", {}).items():
        lat = per_batch.get(str(batch))
        if not lat:
            continue
        speedups = lat.get(f"speedup_vs_{base['label']}") or {}
        if not speedups:
            continue
        drops = {k: (_accuracy(report, backend, k) or {}).get("drop_points") for k in speedups}
        ranked = sorted(speedups, key=lambda k: -speedups[k]["speedup_median"])
        within = [k for k in ranked if max_drop is None or drops[k] is None or drops[k] <= max_drop]
        label = (within or ranked)[0]
        sp = speedups[label]
        unstable = [w for w in lat.get("warnings", []) if "unstable" in w]
        entry = {"model": label, "speedup": sp["speedup_median"],
                 "speedup_range": [sp["speedup_min"], sp["speedup_max"]], "stable": not unstable,
                 "drop_points": None, "drop_ci95": None, "samples": None, "within_max_drop": bool(within),
                 "rejected": [_brief(k, speedups, drops) for k in ranked[:ranked.index(label)]]}
        acc = _accuracy(report, backend, label)
        if acc:
            entry.update(drop_points=acc["drop_points"], drop_ci95=acc.get("drop_ci95"), samples=acc.get("samples"))
        pruned = [k for k in (within or ranked) if not k.startswith(base["label"] + ".")]
        if label.startswith(base["label"] + ".") and pruned:  # the base's own INT8 model won: what pruning gives
            entry["pruned"] = _brief(pruned[0], speedups, drops)
        out["backends"][backend] = entry
        out["all_stable"] = out["all_stable"] and entry["stable"]
    if out["backends"]:
        stable = {k: v for k, v in out["backends"].items() if v["stable"]} or out["backends"]
        out["target_backend"] = target.get("backend")
        # a stable timing before a faster one, a model within max_drop before one that lost more, the backend the
        # models were pruned for before a faster one
        name, best = max(stable.items(), key=lambda kv: (kv[1]["within_max_drop"], kv[0] == out["target_backend"],
                                                         kv[1]["speedup"]))
        out["best"] = {"backend": name, **best}
        out["trustworthy"] = best["stable"]
        m = models.get(best["model"], {})
        ref = models.get(best["model"].removesuffix(".int8"), m)  # an INT8 file: its FP32 model's structure
        out["macs_saved"] = _saved(ref, base, "macs")
        out["params_saved"] = _saved(ref, base, "params")
        out["weights_bytes_saved"] = _saved({"b": sum((m.get("files_bytes") or {}).values())},
                                            {"b": sum((base.get("files_bytes") or {}).values())}, "b")
        out["recommended"] = best["model"] if best["within_max_drop"] else None
        out["int8"] = _int8_vs_fp32(report, batch)
    out["sentence"] = sentence(out)
    return out


def _latency_target(models: list[dict[str, Any]]) -> dict[str, Any]:
    """The latency record (``backend``, ``batch``, ...) of the first pruned model pruned for a
    latency budget; empty where none was."""
    return next((lat for m in models for lat in [((m.get("prune") or {}).get("latency") or {})]
                 if lat.get("backend")), {})


def _brief(label: str, speedups: dict[str, Any], drops: dict[str, float | None]) -> dict[str, Any]:
    return {"model": label, "speedup": speedups[label]["speedup_median"], "drop_points": drops[label]}


def _int8_vs_fp32(report: dict[str, Any], batch: int | None) -> dict[str, dict[str, float]]:
    """Per backend that ran INT8 models, each one's speedup over its FP32 model at ``batch`` (p50 ratio)."""
    out: dict[str, dict[str, float]] = {}
    for backend, per_batch in (report.get("latency") or {}).items():
        stats = (per_batch.get(str(batch)) or {}).get("stats") or {}
        for label, st in stats.items():
            fp32 = stats.get(label.removesuffix(".int8")) if label.endswith(".int8") else None
            if fp32 and st.get("p50_ms"):
                out.setdefault(backend, {})[label] = fp32["p50_ms"] / st["p50_ms"]
    return out


def _pct(x: float | None) -> str | None:
    return None if x is None or not math.isfinite(x) else f"{x * 100:.0f} %"


def _points(drop: float, of: str = "") -> str:
    """'1.20 points lost', or '0.30 points gained' where the model scored higher than the base
    (``of``: 'top-1 ' reads '0.30 points top-1 gained')."""
    return f"{abs(drop):.2f} points {of}{'lost' if drop >= 0 else 'gained'}"


def sentence(s: dict[str, Any]) -> str:
    best = s.get("best")
    if not best:
        return "no verdict: no pruned model was timed against the base"
    speed = best["speedup"]
    lo, hi = best["speedup_range"]
    how = f"{speed:.2f}x faster" if speed >= 1 else f"{1 / speed:.2f}x SLOWER"
    parts = [f"{best['model']}: {how} than the base on {best['backend']} at batch {s['batch']} "
             f"(per-round range {lo:.2f}-{hi:.2f})"]
    if best.get("drop_points") is not None:
        d, ci = best["drop_points"], best.get("drop_ci95") or [float("nan")] * 2
        if d < 0:  # the interval of what was gained, as the words say: the drop's, negated
            ci = [-ci[1], -ci[0]]
        parts.append(f"{_points(d, 'top-1 ')} (95 % CI {ci[0]:+.2f} to {ci[1]:+.2f}, n={best['samples']})")
    else:
        parts.append("accuracy not measured (give --data)")
    saved = [f"{_pct(s.get(k))} fewer {w}" for k, w in (("macs_saved", "MACs"), ("params_saved", "parameters"))
             if _pct(s.get(k)) and s[k] >= 0.005]
    if saved:
        parts.append(", ".join(saved))
    allowed = f"the {s.get('max_drop') or 0:g} points --max-drop allows"
    if best.get("within_max_drop") is False:
        parts.append(f"every model lost more than {allowed}: deploy none, keep the base")
    elif best.get("rejected"):
        parts.append("faster but losing more than " + allowed + ": " + ", ".join(
            f"{r['model']} ({r['speedup']:.2f}x, {r['drop_points']:.2f} points)" for r in best["rejected"]))
    if best.get("pruned"):
        p = best["pruned"]
        lost = f", {_points(p['drop_points'])}" if p.get("drop_points") is not None else ""
        parts.append(f"the fastest pruned model, {p['model']}, is {p['speedup']:.2f}x{lost}: pruning does not pay "
                     f"on {best['backend']} beyond INT8")
    slower = [(v, b, k) for b, per in (s.get("int8") or {}).items() for k, v in per.items() if v < 1]
    if slower:
        v, backend, label = min(slower)
        parts.append(f"INT8 is SLOWER than FP32 on {backend} ({label} {v:.2f}x of "
                     f"{label.removesuffix('.int8')}): deploy {best['model']}")
    parts.append("timings stable" if s.get("trustworthy") else
                 f"timings UNSTABLE on {best['backend']} (a busy machine?): rerun with more --rounds before trusting "
                 "the speedup")
    return "; ".join(parts)


def parse_gate(text: str | None) -> dict[str, float]:
    """``max_drop=1.5,min_speedup=1.3`` -> {"max_drop": 1.5, "min_speedup": 1.3}."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in GATES:
            from ..registry import unknown

            raise ValueError(unknown("--fail-if condition", key, tuple(GATES)))
        try:
            out[key] = float(value)
        except ValueError:
            raise ValueError(f"--fail-if {key}: expected a number, got {value!r}") from None
        if not math.isfinite(out[key]):
            raise ValueError(f"--fail-if {key}: expected a finite number, got {value!r}")
    return out


def gate_failures(summary: dict[str, Any], gate: dict[str, float]) -> list[str]:
    """What the verdict misses of the gate (empty: it passes)."""
    best = summary.get("best")
    if gate and not best:
        return ["no pruned model was timed against the base"]
    misses = []
    if "min_speedup" in gate and best["speedup"] < gate["min_speedup"]:
        misses.append(f"speedup {best['speedup']:.2f} < {gate['min_speedup']:g}")
    if "max_drop" in gate:
        if best.get("drop_points") is None:
            misses.append("max_drop asked for, but accuracy was not measured (give --data)")
        elif best["drop_points"] > gate["max_drop"]:
            misses.append(f"{best['drop_points']:.2f} points lost > {gate['max_drop']:g}")
    return misses


def check_gate(summary: dict[str, Any], gate: str | None) -> None:
    """Raise the gate's exit (4) when the verdict misses ``gate``."""
    misses = gate_failures(summary, parse_gate(gate))
    if misses:
        raise TvsError(f"--fail-if {gate}: {'; '.join(misses)}", exit_code=4)
