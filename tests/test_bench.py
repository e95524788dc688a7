"""Bench: statistics against a synthetic runner with known delays, skipped backends, report in Chromium."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from html import escape
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import randomize_bn
from tiny_models import TinyCNN

from tvsprune.compare.latency import LatencyConfig, measure_interleaved, summarize
from tvsprune.backends import Runner, make_runner, register
from tvsprune.errors import TvsError
from tvsprune.models import LoadedModel, ModelSpec


class Synthetic(Runner):
    """Reports fixed, known delays instead of measuring (no sleeping, no clocks)."""

    name = "synthetic"

    def __init__(self, artifact, **kw):
        super().__init__(artifact, **kw)
        self.delays = list(artifact)  # seconds, cycled
        self.i = 0
        self.input_shape = (3, 4, 4)

    def _activate(self):
        pass

    def _infer(self, x):
        return np.zeros((len(x), 2), np.float32)

    def _timed(self, x):
        d = self.delays[self.i % len(self.delays)]
        self.i += 1
        return {"h2d": 0.001, "compute": d, "d2h": 0.002}


register("synthetic", "synthetic", lambda a, **k: Synthetic(a, **k))


def test_summary_statistics_exact():
    delays = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    st = summarize(delays, batch=8)
    assert st["n"] == 100 and st["min_ms"] == pytest.approx(1) and st["max_ms"] == pytest.approx(100)
    assert st["mean_ms"] == pytest.approx(50.5)
    assert st["p50_ms"] == pytest.approx(50.5) and st["p90_ms"] == pytest.approx(90.1)
    assert st["p99_ms"] == pytest.approx(99.01)
    assert st["std_ms"] == pytest.approx(np.std(np.arange(1, 101), ddof=1))
    assert st["cv"] == pytest.approx(st["std_ms"] / 50.5)
    assert st["throughput_ips"] == pytest.approx(8 / 0.0505)


def test_interleaved_ratio_and_transfer_times_from_synthetic_runners():
    a = make_runner("synthetic", [0.004])  # base: 4 ms
    b = make_runner("synthetic", [0.001, 0.003])  # pruned: 1 or 3 ms (median 2)
    cfg = LatencyConfig(warmup_iters=0, warmup_s=0.0, rounds=4, iters=10, cv_warn=10)
    with a, b:
        res = measure_interleaved({"base": a, "pruned": b}, np.zeros((2, 3, 4, 4), np.float32), cfg)
    assert res["stats"]["base"]["p50_ms"] == pytest.approx(4.0)
    assert res["stats"]["pruned"]["mean_ms"] == pytest.approx(2.0)
    assert res["stats"]["pruned"]["h2d_ms"] == pytest.approx(1.0) and res["stats"]["pruned"]["d2h_ms"] == pytest.approx(2.0)
    sp = res["speedup_vs_base"]["pruned"]
    assert sp["speedup_median"] == pytest.approx(2.0) and sp["rounds"] == 4


def test_unstable_timings_are_repeated_and_flagged():
    noisy = make_runner("synthetic", [0.001, 0.010])
    steady = make_runner("synthetic", [0.002])
    cfg = LatencyConfig(warmup_iters=0, warmup_s=0.0, rounds=2, iters=4, cv_warn=0.1, max_repeats=1)
    with noisy, steady:
        res = measure_interleaved({"a": steady, "b": noisy}, np.zeros((1, 3, 4, 4), np.float32), cfg)
    assert res["warnings"] and "b" in res["warnings"][0]


def test_runner_validates_inputs_once_in_base_class():
    r = make_runner("synthetic", [0.001])
    with pytest.raises(TvsError, match="before activate"):
        r.infer(np.zeros((1, 3, 4, 4), np.float32))
    with r:
        with pytest.raises(TvsError, match="float32"):
            r.infer(np.zeros((1, 3, 4, 4), np.float64))
        with pytest.raises(TvsError, match="does not match"):
            r.infer(np.zeros((1, 3, 5, 5), np.float32))
        assert r.infer(np.zeros((2, 3, 4, 4), np.float32)).shape == (2, 2)


def test_torch_and_ort_cpu_runners_agree(tmp_path):
    from tvsprune.exporters import export_onnx

    loaded = LoadedModel(module=randomize_bn(TinyCNN()), spec=ModelSpec("tiny"), input_shape=(3, 16, 16))
    export_onnx(loaded, tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    with make_runner("torch-cpu", loaded) as t, make_runner("ort-cpu", tmp_path / "m.onnx") as o:
        assert np.abs(t.infer(x) - o.infer(x)).max() < 1e-4
        assert o.info["providers_loaded"] == ["CPUExecutionProvider"]


@pytest.fixture(scope="session")
def chromium() -> str:
    """A headless chromium when this machine has one (the suite never installs system packages)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path is None:
        pytest.skip("no chromium here (install it to render-check report.html)")
    return path


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """A bench run of a tiny base model and two pruned variants on torch-cpu and ort-cpu."""
    import shutil as sh

    from helpers import run_cli, write_image_folder

    root = tmp_path_factory.mktemp("bench")
    src = root / "tiny_models.py"
    sh.copy(Path(__file__).parent / "tiny_models.py", src)
    torch.manual_seed(0)
    weights = root / "w.pt"
    torch.save(randomize_bn(TinyCNN()).state_dict(), weights)
    data = write_image_folder(root / "images", per_class=8)
    spec = f"{src}:TinyCNN"
    assert run_cli("calibrate", spec, "--weights", weights, "--data", data, "--out", root / "m.safetensors",
                   "--samples-per-class", "4").returncode == 0
    outs = []
    for frac in ("0.2", "0.5"):
        d = root / f"pruned{frac}"
        r = run_cli("prune", spec, "--weights", weights, "--moments", root / "m.safetensors", "--target-params",
                    frac, "--out", d, "--val-data", data)
        assert r.returncode == 0, r.stderr
        outs.append(d)
    out = root / "report"
    r = run_cli("bench", spec, *outs, "--weights", weights, "--data", data, "--out", out, "--batch-sizes", "1,8",
                "--rounds", "2", "--iters", "3", "--backend", "torch-cpu,ort-cpu")  # a named missing backend is an error (test_hardening)
    assert r.returncode == 0, r.stderr
    (root / "bench-stdout.txt").write_text(r.stdout)
    return out


def test_report_json_lists_skipped_backends_and_measurements(tiny_report):
    rep = json.loads((tiny_report / "report.json").read_text())
    assert set(rep["latency"]) == {"torch-cpu", "ort-cpu"}
    assert "tensorrt" in rep["skipped_backends"] and rep["skipped_backends"]["tensorrt"]
    assert "torch-cuda" in rep["skipped_backends"]
    assert rep["latency"]["ort-cpu"]["8"]["stats"]["base"]["n"] >= 6
    assert {m["label"] for m in rep["models"]} == {"base", "pruned0.2", "pruned0.5"}
    assert rep["accuracy"]["models"]["base"]["agreement_with_base"] == 1.0
    assert rep["memory"]["ort-cpu"]["base"]["peak_rss_bytes"] > 0
    for backend in ("ort-cpu", "torch-cpu"):  # each model's own, from a fresh process
        fresh = rep["memory"][backend]["pruned0.5"]["fresh"]
        assert fresh["weights_bytes"] > 0 and fresh["peak_bytes"]["8"] >= fresh["weights_bytes"], fresh
    assert rep["machine"]["cpu_count"] and rep["versions"]["torch"]
    md = (tiny_report / "report.md").read_text()
    assert "## Summary" in md and "plots/latency_vs_batch.png" in md and "Backends skipped" in md
    assert "## What was measured" in md and "compensation" in md  # how the pruned model was made
    html = (tiny_report / "report.html").read_text()
    assert "What was measured" in html and '<pre id="render-check" hidden>' in html
    for w in rep["warnings"]:  # warnings reach the pages, not only report.json
        assert w in md and escape(w) in html


def test_accuracy_is_measured_per_backend_through_its_runner(tiny_report):
    """Every backend that ran has top-1 and agreement with the base for every model; torch and
    ONNX Runtime run the same networks, so their top-1 agree to within one image."""
    rep = json.loads((tiny_report / "report.json").read_text())
    by_backend = rep["accuracy_by_backend"]
    assert set(by_backend) == set(rep["latency"]) == {"torch-cpu", "ort-cpu"}
    n = rep["accuracy"]["samples"]
    for backend, models in by_backend.items():
        assert set(models) == {"base", "pruned0.2", "pruned0.5"}
        assert models["base"]["agreement_with_base"] == 1.0 and models["base"]["samples"] == n
        for label, a in models.items():
            assert abs(a["top1"] - by_backend["torch-cpu"][label]["top1"]) <= 1 / n + 1e-9, (backend, label)
            assert abs(a["top1"] - rep["accuracy"]["models"][label]["top1"]) <= 1 / n + 1e-9
    md = (tiny_report / "report.md").read_text()
    assert "## Accuracy per backend" in md and "| ort-cpu | pruned0.5 |" in md


def test_report_html_plots_render_in_headless_chromium(tiny_report, chromium, tmp_path):
    html = tiny_report / "report.html"
    r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                        html.as_uri()], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    block = re.search(r'<pre id="render-check"[^>]*>(.*?)</pre>', r.stdout, re.S)
    sizes = json.loads(block.group(1).replace("&quot;", '"'))
    names = {s["plot"] for s in sizes}
    assert {"latency_vs_batch", "accuracy_vs_params", "per_class_change"} <= names
    assert any(n.startswith("channels_") for n in names)
    assert all(s["width"] > 0 and s["height"] > 0 for s in sizes)


def test_warnings_name_a_model_slower_than_the_base_or_its_fp32_version():
    from tvsprune.bench.stage import report_warnings

    lat = {"stats": {"base": {"p50_ms": 1.0}, "pruned": {"p50_ms": 1.2}, "pruned.int8": {"p50_ms": 2.0},
                     "fast": {"p50_ms": 0.5}},
           "speedup_vs_base": {"pruned": {"speedup_median": 1.11, "speedup_min": 0.46, "speedup_max": 3.06},
                               "pruned.int8": {"speedup_median": 0.5, "speedup_min": 0.4, "speedup_max": 0.6},
                               "fast": {"speedup_median": 2.0, "speedup_min": 1.9, "speedup_max": 2.1}},
           "warnings": ["unstable timings (cv > 0.15) for base after a repeat"]}
    models = [{"label": "base", "macs": 100}, {"label": "pruned", "macs": 80}, {"label": "fast", "macs": 20},
              {"label": "pruned.int8"}]
    acc = {"models": {"fast": {"drop_points": 4.2, "drop_ci95": [2.0, 6.4]}, "pruned": {"drop_points": 1.0}}}
    w = report_warnings({"models": models, "latency": {"ort-cpu": {"8": lat, "1": lat}}, "accuracy": acc})
    assert sum("unstable" in x for x in w) == 1 and "at 2 of 2 points" in w[0]  # one line, not one per point
    assert any(x.startswith("pruned is slower than base") and "p50" in x for x in w)  # median > 1, p50 slower
    assert any(x.startswith("pruned.int8 is slower than its FP32 model") for x in w)
    assert any(x.startswith("fast has 5.00x fewer MACs but runs only") and "--round-to" in x for x in w)
    assert any(x.startswith("fast loses 4.2 points") and "--keep-macs" in x for x in w)
    assert not any(x.startswith("pruned loses") for x in w)
    assert not any("inference memory" in x for x in w)
    from tvsprune.backends.blocks import isa_block

    fresh = lambda b32: {"fresh": {"peak_bytes": {"1": 2**20, "32": b32}}}  # noqa: E731
    memory = {"ort-cpu": {"base": fresh(12 * 2**20), "pruned": fresh(15 * 2**20), "fast": fresh(12.5 * 2**20)}}
    w = report_warnings({"models": models, "latency": {}, "memory": memory})
    assert [x for x in w if "inference memory" in x] == [
        "pruned peaks at 15.0 MiB of inference memory on ort-cpu at batch 32, above the base's 12.0 MiB: widths "
        "off the backend's channel block run on kernels with larger buffers; prune with --round-to "
        f"{isa_block()} (with --target-latency too: its auto rounding is 8)"]  # fast: within noise of the base


def test_the_verdict_is_the_same_sentence_everywhere_and_gates_ci(tiny_report):
    """report.json's summary, report.md's first line, report.html and bench's last line agree."""
    from tvsprune.bench.verdict import check_gate, gate_failures, parse_gate

    rep = json.loads((tiny_report / "report.json").read_text())
    s = rep["summary"]
    assert {"sentence", "batch", "backends", "best", "trustworthy", "all_stable", "macs_saved", "params_saved",
            "weights_bytes_saved"} <= set(s)
    assert s["batch"] == 8 and set(s["backends"]) == {"torch-cpu", "ort-cpu"}
    best = s["best"]
    stable = [b for b in s["backends"].values() if b["stable"]] or list(s["backends"].values())
    assert best["speedup"] == max(b["speedup"] for b in stable)
    lo, hi = best["drop_ci95"]
    assert lo <= best["drop_points"] <= hi and best["samples"] == rep["accuracy"]["samples"]
    assert 0 < s["macs_saved"] < 1 and 0 < s["params_saved"] < 1
    assert (tiny_report / "report.md").read_text().splitlines()[0] == f"**Verdict: {s['sentence']}**"
    assert escape(s["sentence"]) in (tiny_report / "report.html").read_text()
    stdout = (tiny_report.parent / "bench-stdout.txt").read_text()
    assert stdout.rstrip().splitlines()[-1] == f"verdict: {s['sentence']}"
    assert gate_failures(s, parse_gate(f"min_speedup={best['speedup'] + 1}"))
    assert not gate_failures(s, parse_gate(f"min_speedup={best['speedup'] - 0.01},max_drop={best['drop_points'] + 0.01}"))
    with pytest.raises(TvsError) as e:
        check_gate(s, f"max_drop={best['drop_points'] - 1}")
    assert e.value.exit_code == 4
    with pytest.raises(ValueError, match="did you mean 'max_drop'"):
        parse_gate("max_dorp=1")


def test_the_end_table_fits_100_columns_without_cutting_a_value(tiny_report):
    import io

    from tvsprune.bench.report import end_table
    from tvsprune.console import print_table

    rows = end_table(json.loads((tiny_report / "report.json").read_text()))
    assert {"pts lost", "ort-cpu x b8", "torch-cpu x b8"} <= set(rows[0])
    buf = io.StringIO()
    print_table(rows, title="tvsprune bench", width=100, file=buf)
    text = buf.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 100
    for row in rows:  # every value is there whole, on one line
        for value in row.values():
            assert value in text, value


def test_the_end_table_gives_an_int8_row_its_fp32_models_size():
    from tvsprune.bench.report import end_table

    report = {"models": [{"label": "base", "params": 272474, "macs": 41_000_000},
                         {"label": "pruned", "params": 228570, "macs": 30_000_000}, {"label": "pruned.int8"}]}
    rows = {r["model"]: r for r in end_table(report)}
    assert (rows["pruned.int8"]["params"], rows["pruned.int8"]["MACs"]) == (rows["pruned"]["params"],
                                                                           rows["pruned"]["MACs"]) == ("229k", "30M")


def test_plots_show_the_speedup_with_sentences_for_captions(tiny_report):
    from tvsprune.bench.report import CAPTIONS, CHANNELS_CAPTION

    assert (tiny_report / "plots" / "speedup_vs_batch.png").is_file()
    md = (tiny_report / "report.md").read_text()
    html_text = (tiny_report / "report.html").read_text()
    assert f"*{CAPTIONS['speedup_vs_batch']}*" in md and escape(CAPTIONS["speedup_vs_batch"]) in html_text
    assert "LDIFF, 1 minus the mean" in CHANNELS_CAPTION and escape(CHANNELS_CAPTION) in html_text
    summary = md.split("## Summary", 1)[1]
    assert "| :---|" in summary.replace("|:---|", "| :---|") and "---:|" in summary  # text left, numbers right
    assert 'class="text"' in html_text and 'class="num"' in html_text


def test_the_report_says_a_blocks_prune_was_fitted_not_uncompensated():
    """A blocks prune records compensation 'none' (nothing is folded), yet its replacements and
    the convolutions after them are fitted by least squares: the report says that, from the
    prune.json it is given (the bench keeps its latency record; it once dropped it and said '0
    later convolutions'), lists the blocks replaced and draws no channels-per-layer plot."""
    from tvsprune.bench.report import _details, make_plots, provenance_rows
    from tvsprune.pruning.artifact import prune_record

    def model(label, allocation, latency):
        layers = [{"layer": "conv1", "channels_before": 16, "channels_after": 16 if latency.get("replaced") else 8,
                   "ldiff": None}]
        prune_json = {"method": "tvs", "allocation": allocation, "budget": {"in_words": "keep 65 % of the latency"},
                      "repairs": {"compensation": "none" if allocation == "blocks" else "ls", "bn_recalibrate": True},
                      "layers": layers, "elapsed_s": 3.0, "latency": latency}
        return {"label": label, "spec": label, "prune": prune_record(prune_json)}

    blocks = {"measured": 0.68, "saved_alone": {"l.0:1x1": 0.1}, "path": [{"replaced": {}}],
              "replaced": {"l.0": "1x1", "l.2": "identity"}, "refitted": ["l.1.conv1", "l.1.conv2"]}
    report = {"models": [{"label": "base", "spec": "resnet20"}, model("blocks", "blocks", blocks),
                         model("one", "blocks", {**blocks, "refitted": ["l.1.conv1"]}),
                         model("channels", "sensitivity", {"measured": 0.66})]}
    assert set(report["models"][1]["prune"]["latency"]) == {"measured", "replaced", "refitted"}  # no timing tables
    repairs = {r["model"]: r.get("repairs") for r in provenance_rows(report)}
    assert repairs["blocks"] == ("blocks fitted by least squares, 2 later convolutions re-fitted, "
                                 "BatchNorm re-estimated"), repairs
    assert repairs["one"].startswith("blocks fitted by least squares, 1 later convolution re-fitted,"), repairs
    assert repairs["channels"] == "compensation ls, BatchNorm re-estimated" and repairs["base"] is None, repairs
    table = dict(_details(report))
    rows = next(rows for title, rows in table.items() if title.startswith("Blocks replaced"))
    assert [(r["model"], r["block"], r["replaced by"]) for r in rows][:2] == [("blocks", "l.0", "1x1"),
                                                                             ("blocks", "l.2", "identity")]
    assert [n for n in make_plots(report) if n.startswith("channels_")] == ["channels_channels"]
