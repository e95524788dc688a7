"""Render report.json into report.md and a self-contained report.html (plots embedded)."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from ..artifacts import write_text


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _mb(v: float | None) -> str:
    """Megabytes with the digits a small figure needs (never a misleading 0.0); '-' for none."""
    if not v:
        return "-"
    mb = v / 1e6
    return f"{mb:.1f}" if mb >= 10 else f"{mb:.2f}" if mb >= 0.1 else f"{mb:.4f}"


def summary_rows(report: dict[str, Any]) -> list[dict[str, str]]:
    """One row per model: size, accuracy, latency at the largest batch, speedups vs MACs ratio."""
    models = report["models"]
    base = models[0]
    acc = (report.get("accuracy") or {}).get("models", {})
    rows = []
    for m in models:
        row = {"model": m["label"], "params": _fmt(m.get("params")), "MACs": _fmt(m.get("macs"))}
        if m.get("macs") and base.get("macs"):
            row["MACs ratio"] = _fmt(base["macs"] / m["macs"])
        a = acc.get(m["label"])
        if a:
            row["top-1 %"] = _fmt(a["top1"] * 100)
            ci = a.get("top1_ci95")
            row["top-1 95 % CI"] = f"{ci[0] * 100:.1f}-{ci[1] * 100:.1f} (n={a['samples']})" if ci else "-"
            d, dci = a.get("drop_points"), a.get("drop_ci95")
            row["points lost [95 % CI]"] = "-" if m is base or d is None else \
                f"{d:.2f} [{dci[0]:+.2f}, {dci[1]:+.2f}]"
            row["agree w/ base %"] = _fmt(a["agreement_with_base"] * 100)
        for backend, per_batch in report.get("latency", {}).items():
            bs = max(per_batch, key=int)
            lat = per_batch[bs]
            st = lat["stats"].get(m["label"])
            if st:
                row[f"{backend} p50 ms (b{bs})"] = _fmt(st["p50_ms"], 3)
            sp = lat.get(f"speedup_vs_{base['label']}", {}).get(m["label"])
            if sp:
                row[f"{backend} speedup (b{bs})"] = f"{sp['speedup_median']:.2f} [{sp['speedup_min']:.2f}-{sp['speedup_max']:.2f}]"
        rows.append(row)
    return rows


def _short(n: int | None) -> str:
    """A count in a few characters: 272k, 40.8M, 1.2G."""
    if not n:
        return "-"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            v = n / div
            return f"{v:.1f}{unit}" if v < 10 else f"{v:.0f}{unit}"
    return str(int(n))


def end_table(report: dict[str, Any]) -> list[dict[str, str]]:
    """The terminal's end table: one row per model (the INT8 files too, sized as their FP32
    model), its size, top-1 (%), points lost, agreement with the base (%), and its median
    speedup per backend at the verdict's batch; fits 100 columns."""
    base = report["models"][0]["label"]
    batch = str((report.get("summary") or {}).get("batch"))
    acc = ((report.get("accuracy") or {}).get("models")) or {}
    by_backend = report.get("accuracy_by_backend") or {}
    rows = []
    models = {m["label"]: m for m in report["models"]}
    for m in report["models"]:
        label = m["label"]
        a = acc.get(label) or next((v[label] for v in by_backend.values() if label in v), None)
        shape = models.get(label.removesuffix(".int8"), m)  # an INT8 file: its FP32 model's structure
        row = {"model": label, "params": _short(m.get("params") or shape.get("params")),
               "MACs": _short(m.get("macs") or shape.get("macs")),
               "top-1": _fmt(a["top1"] * 100) if a else "-",
               "pts lost": _fmt(a.get("drop_points")) if a and label != base else "-",
               "agree": _fmt(a["agreement_with_base"] * 100) if a and label != base and
               a.get("agreement_with_base") is not None else "-"}
        for backend, per_batch in report.get("latency", {}).items():
            sp = (per_batch.get(batch) or {}).get(f"speedup_vs_{base}", {}).get(label)
            row[f"{backend} x b{batch}"] = "1.00 (base)" if label == base else (
                f"{sp['speedup_median']:.2f} ({sp['speedup_min']:.2f}-{sp['speedup_max']:.2f})" if sp else "-")
        rows.append(row)
    return rows


def provenance_rows(report: dict[str, Any]) -> list[dict[str, str]]:
    """One row per model: where it came from (spec) and, for a pruned one, how it was pruned."""
    rows = []
    for m in report["models"]:
        row = {"model": m["label"], "source": m["spec"]}
        p = m.get("prune")
        if p:
            b = p.get("budget") or {}
            r = p.get("repairs") or {}
            row["method"] = str(p.get("method"))
            row["budget"] = b.get("in_words") or (f"{b['target']:g} of {b['metric']} removed" if b.get("target") is not None
                             else f"threshold {b.get('threshold')}") if b else "-"
            row["allocation"] = str(p.get("allocation") or "-")
            n = len((p.get("latency") or {}).get("refitted") or [])  # blocks: always fitted, not folded
            fits = (f"blocks fitted by least squares, {n} later convolution{'' if n == 1 else 's'} re-fitted"
                    if p.get("allocation") == "blocks" else f"compensation {r.get('compensation', 'none')}")
            row["repairs"] = ", ".join([fits, "BatchNorm re-estimated"] if r.get("bn_recalibrate") else [fits])
            row["removed"] = (f"{p['params']['removed_frac'] * 100:.1f} % params, "
                              f"{p['macs']['removed_frac'] * 100:.1f} % MACs") if p.get("params") else "-"
        rows.append(row)
    return rows


def _numeric(rows: list[dict[str, str]], key: str) -> bool:
    """Whether a column holds numbers (right-aligned) rather than text (left-aligned)."""
    values = [str(r.get(key, "")).replace(",", "").split(" ")[0] for r in rows if r.get(key) not in (None, "", "-")]
    try:
        [float(v) for v in values]
    except ValueError:
        return False
    return bool(values)


def _md_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(keys) + " |", "|" + "".join("---:|" if _numeric(rows, k) else ":---|" for k in keys)]
    out += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(out)


def _html_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    align = {k: "num" if _numeric(rows, k) else "text" for k in keys}
    head = "".join(f'<th class="{align[k]}">{html.escape(k)}</th>' for k in keys)
    body = "".join("<tr>" + "".join(f'<td class="{align[k]}">{html.escape(str(r.get(k, "")))}</td>' for k in keys)
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CAPTIONS = {
    "speedup_vs_batch": "Speedup over the base model at each measured batch size, per backend: the median of the "
                        "A/B-interleaved rounds' ratios, the bar from the slowest to the fastest round. Above the "
                        "line at 1 the model is faster; the dotted line is its MACs ratio, the speedup fewer MACs "
                        "would give if time followed them.",
    "latency_vs_batch": "Latency of one batch (p50, shaded to p90) against batch size, per backend.",
    "accuracy_vs_params": "Top-1 accuracy against the share of parameters removed, one point per model.",
    "per_class_change": "Change in top-1 accuracy per class against the base model (points); each class has "
                        "only the images named in the title, so a few points either way can be noise.",
}
CHANNELS_CAPTION = ("Channels per layer before (grey) and kept (green); the red line (right axis) is the layer's "
                    "LDIFF, 1 minus the mean of its filters' TV scores normalised by the largest: near 0 every "
                    "filter separates the classes alike, near 1 a few do and the rest can go.")


def caption(name: str) -> str:
    """The sentence under a plot."""
    return CHANNELS_CAPTION if name.startswith("channels_") else CAPTIONS.get(name, name)


def _speedup_plot(plt: Any, lat: dict[str, Any], models: list[dict[str, Any]], save: Any) -> None:
    base = models[0]
    fig, axes = plt.subplots(1, len(lat), figsize=(5 * len(lat), 3.6), squeeze=False)
    for ax, (backend, per_batch) in zip(axes[0], lat.items()):
        batches = sorted(per_batch, key=int)
        pos = range(len(batches))
        for m in models[1:]:
            sp = [per_batch[b].get(f"speedup_vs_{base['label']}", {}).get(m["label"]) for b in batches]
            if not any(sp):
                continue
            mid = [s["speedup_median"] if s else float("nan") for s in sp]
            err = [[s["speedup_median"] - s["speedup_min"] if s else 0 for s in sp],
                   [s["speedup_max"] - s["speedup_median"] if s else 0 for s in sp]]
            line = ax.errorbar(list(pos), mid, yerr=err, marker="o", capsize=3, label=m["label"])
            if m.get("macs") and base.get("macs"):
                ax.axhline(base["macs"] / m["macs"], ls=":", color=line[0].get_color(), lw=1)
        ax.axhline(1.0, color="k", lw=0.7)
        ax.set_xticks(list(pos), batches)
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"speedup over {base['label']} (x)")
        ax.set_title(backend)
        ax.legend(fontsize=8)
    save(fig, "speedup_vs_batch")


def make_plots(report: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes per plot name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, bytes] = {}

    def save(fig, name):
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        plots[name] = buf.getvalue()

    lat = report.get("latency", {})
    if lat:
        fig, axes = plt.subplots(1, len(lat), figsize=(5 * len(lat), 3.6), squeeze=False)
        for ax, (backend, per_batch) in zip(axes[0], lat.items()):
            batches = sorted(per_batch, key=int)
            labels = list(per_batch[batches[0]]["stats"])
            for label in labels:
                ys = [per_batch[b]["stats"][label]["p50_ms"] for b in batches]
                lo = [per_batch[b]["stats"][label]["p90_ms"] for b in batches]
                ax.plot([int(b) for b in batches], ys, marker="o", label=f"{label} (p50)")
                ax.fill_between([int(b) for b in batches], ys, lo, alpha=0.15)
            ax.set_xscale("log", base=2)
            ax.set_xticks([int(b) for b in batches], batches)  # ticks at the measured batches only
            ax.minorticks_off()
            ax.set_xlabel("batch size")
            ax.set_ylabel("latency ms (p50, band to p90)")
            ax.set_title(backend)
            ax.legend(fontsize=8)
        save(fig, "latency_vs_batch")
        _speedup_plot(plt, lat, report["models"], save)
    acc = (report.get("accuracy") or {}).get("models", {})
    models = report["models"]
    pruned = [m for m in models[1:] if m.get("params") and m["label"] in acc]
    if len(pruned) >= 2 and models[0].get("params"):
        fig, ax = plt.subplots(figsize=(5, 3.6))
        xs = [0.0] + [1 - m["params"] / models[0]["params"] for m in pruned]
        ys = [acc[models[0]["label"]]["top1"] * 100] + [acc[m["label"]]["top1"] * 100 for m in pruned]
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        ax.plot([xs[i] * 100 for i in order], [ys[i] for i in order], marker="o")
        for m, x, y in zip(pruned, xs[1:], ys[1:]):
            ax.annotate(m["label"], (x * 100, y), fontsize=7)
        ax.set_xlabel("parameters removed %")
        ax.set_ylabel("top-1 %")
        ax.set_title("accuracy vs parameters removed")
        save(fig, "accuracy_vs_params")
    for m in models[1:]:
        layers = ((m.get("prune") or {}).get("layers")) or []
        if not layers or m["prune"].get("allocation") == "blocks":  # no channel removed: the blocks table says it
            continue
        fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(layers)), 3.8))
        idx = range(len(layers))
        ax.bar(idx, [l["channels_before"] for l in layers], color="#ccc", label="before")
        ax.bar(idx, [l["channels_after"] for l in layers], color="#3a7", label="kept")
        ax.set_xticks(list(idx), [l["layer"] for l in layers], rotation=75, fontsize=7)
        ax.set_ylabel("channels")
        ax2 = ax.twinx()
        ax2.plot(list(idx), [l.get("ldiff") or 0 for l in layers], color="#c33", marker=".", label="LDIFF")
        ax2.set_ylabel("LDIFF")
        ax2.set_ylim(0, 1)
        ax.set_title(f"{m['label']}: channels kept and LDIFF per layer")
        ax.legend(loc="upper left", fontsize=8)
        save(fig, f"channels_{m['label']}")
    if acc and len(models) > 1:
        classes = report["accuracy"]["classes"]
        base = acc[models[0]["label"]]["per_class"]
        fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(classes)), 3.6))
        width = 0.8 / max(1, len(models) - 1)
        for j, m in enumerate(models[1:]):
            if m["label"] not in acc:
                continue
            d = [(a - b) * 100 for a, b in zip(acc[m["label"]]["per_class"], base)]
            ax.bar([i + j * width for i in range(len(classes))], d, width=width, label=m["label"])
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(classes))], classes, rotation=45, fontsize=8)
        ax.set_ylabel("accuracy change (points)")
        counts = report["accuracy"].get("models", {}).get(models[0]["label"], {}).get("class_counts") or []
        n = f" (n = {min(counts)}-{max(counts)} images per class)" if counts else ""
        ax.set_title(f"per-class accuracy change vs base{n}")
        ax.legend(fontsize=8)
        save(fig, "per_class_change")
    return plots


def _details(report: dict[str, Any]) -> list[tuple[str, list[dict[str, str]]]]:
    sections = []
    for backend, per_batch in report.get("latency", {}).items():
        rows = []
        for bs in sorted(per_batch, key=int):
            for label, st in per_batch[bs]["stats"].items():
                rows.append({"batch": bs, "model": label, **{k: _fmt(st[k], 3) for k in
                             ("mean_ms", "std_ms", "min_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms")},
                             "cv": _fmt(st["cv"], 3), "images/s": _fmt(st["throughput_ips"], 1),
                             # transfers exist only where the model runs on a device: "-" on the CPU
                             "h2d ms": _fmt(st["h2d_ms"], 3) if st.get("h2d_ms") else "-",
                             "d2h ms": _fmt(st["d2h_ms"], 3) if st.get("d2h_ms") else "-"})
        sections.append((f"Latency: {backend}", rows))
    blocks = [{"model": m["label"], "block": name, "replaced by": form} for m in report["models"]
              for name, form in (((m.get("prune") or {}).get("latency") or {}).get("replaced") or {}).items()]
    if blocks:
        sections.append(("Blocks replaced (identity: removed; each fitted by least squares, no channel removed)",
                         blocks))
    mem_rows = []
    for backend, per in report.get("memory", {}).items():
        for label, m in per.items():
            fresh = m.get("fresh") or {}
            peaks = fresh.get("peak_bytes") or {}
            mem_rows.append({"backend": backend, "model": label,
                             "weights MB": _mb(fresh.get("weights_bytes")),
                             **{f"peak MB b{bs}": _mb(v) for bs, v in peaks.items()},
                             "process peak RSS MB (all models)": _fmt((m.get("peak_rss_bytes") or 0) / 1e6, 1),
                             "GPU peak alloc MB": _fmt((m.get("gpu_peak_allocated_bytes") or 0) / 1e6, 1)
                             if m.get("gpu_peak_allocated_bytes") else "-",
                             "GPU mem delta MB": _fmt(m["gpu_memory_delta_bytes"] / 1e6, 1)
                             if m.get("gpu_memory_delta_bytes") else "-",
                             "engine device mem MB": _fmt(m["device_memory_size_v2"] / 1e6, 1)
                             if m.get("device_memory_size_v2") else "-",
                             # what the session really runs on (ONNX Runtime falls back to CPU silently)
                             "providers loaded": ", ".join(m.get("providers_loaded") or []) or "-"})
    files = [{"model": m["label"], **{f"{k} MB": _fmt(v / 1e6, 3) for k, v in m.get("files_bytes", {}).items()}}
             for m in report["models"]]
    sections.append(("Memory", mem_rows))
    sections.append(("Files", files))
    by_backend = [{"backend": b, "model": label, "top-1 %": _fmt(a["top1"] * 100),
                   "agreement with base %": _fmt(a["agreement_with_base"] * 100)
                   if a.get("agreement_with_base") is not None else "-", "images": a["samples"]}
                  for b, models in (report.get("accuracy_by_backend") or {}).items() for label, a in models.items()]
    if by_backend:
        sections.append(("Accuracy per backend (each model run by that backend; agreement: top-1 prediction "
                         "equal to the base model's on the same backend)", by_backend))
    acc = (report.get("accuracy") or {}).get("models", {})
    sim = []
    for label, a in acc.items():
        for s in a.get("noise_similarity", []):
            sim.append({"model": label, "noise std": _fmt(s["noise_std"]), "agreement with base %":
                        _fmt(s["agreement"] * 100), "top-1 %": _fmt(s["accuracy"] * 100),
                        "prob. TV distance": _fmt(s["prob_l1_distance"], 4)})
    if sim:
        sections.append(("Functional similarity under input noise (vs the base model under the same noise)", sim))
    skipped = [{"backend": b, "reason": r} for b, r in report.get("skipped_backends", {}).items()]
    sections.append(("Backends skipped", skipped))
    return sections


def render(report: dict[str, Any], out: str | Path) -> None:
    """Write report.md (+ plots/*.png) and report.html (plots inline as data URIs)."""
    out = Path(out)
    plots = make_plots(report)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    for name, png in plots.items():
        (out / "plots" / f"{name}.png").write_bytes(png)
    mach = report["machine"]
    gpu = ", ".join(g.get("name", "?") for g in mach.get("gpus", [])) or "none"
    head = (f"tvsprune {report['tvsprune_version']} on {mach.get('cpu', '?')} ({mach.get('cpu_count')} cores, "
            f"{report['flags']['threads']} threads), GPU: {gpu}; created {report['created']}")
    summary = summary_rows(report)
    provenance = provenance_rows(report)
    warnings = report.get("warnings") or []
    note = ("Speedups are medians of per-round ratios (base / model) from A/B-interleaved rounds, "
            "with their min-max in brackets; compare them with the MACs ratio.")
    verdict = (report.get("summary") or {}).get("sentence") or "no verdict"
    md = [f"**Verdict: {verdict}**", "", "# tvsprune benchmark report", "", head, "", "## What was measured", "", _md_table(provenance), "",
          f"Accuracy data: {report.get('data') or 'none given'}", ""]
    if warnings:
        md += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    md += ["## Summary", "", _md_table(summary), "", note, ""]
    for name in plots:
        md += [f"![{caption(name)}](plots/{name}.png)", "", f"*{caption(name)}*", ""]
    for title, rows in _details(report):
        md += [f"## {title}", "", _md_table(rows) or "(none)", ""]
    write_text(out / "report.md", "\n".join(md))
    imgs = "".join(f'<figure><img alt="{n}" data-plot="{n}" src="data:image/png;base64,'
                   f'{base64.b64encode(p).decode()}"><figcaption>{html.escape(caption(n))}</figcaption></figure>' for n, p in plots.items())
    details = "".join(f"<h2>{html.escape(t)}</h2>{_html_table(r) or '<p>(none)</p>'}" for t, r in _details(report))
    warn_html = ("<h2>Warnings</h2><ul class=\"warnings\">" + "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
                 + "</ul>") if warnings else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>tvsprune report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}}.text{{text-align:left}}th{{background:#f3f3f3}}
figure{{display:inline-block;margin:0.5em}}img{{max-width:100%}}</style></head><body>
<p id="verdict"><strong>Verdict: {html.escape(verdict)}</strong></p>
<h1>tvsprune benchmark report</h1><p>{html.escape(head)}</p>
<h2>What was measured</h2>{_html_table(provenance)}<p>Accuracy data: {html.escape(str(report.get('data') or 'none given'))}</p>
{warn_html}<h2>Summary</h2>{_html_table(summary)}<p>{html.escape(note)}</p>
{imgs}{details}
<pre id="render-check" hidden></pre>
<script>window.addEventListener('load',function(){{var r=[];document.querySelectorAll('img[data-plot]').forEach(function(i){{
r.push({{plot:i.dataset.plot,width:i.naturalWidth,height:i.naturalHeight}});}});
document.getElementById('render-check').textContent=JSON.stringify(r);}});</script>
</body></html>"""
    write_text(out / "report.html", page)
