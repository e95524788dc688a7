"""Progress that works in a pipe: a long command prints a line at least every heartbeat
(10 s by default; 0.3 s here) with its step and counts, on stderr, with candidates as k/N."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from helpers import REPO


def test_prune_in_a_pipe_prints_progress_every_heartbeat(tiny_calibrated, tmp_path, monkeypatch):
    """A slowed prune (each candidate network takes 0.3 s more to build) in a pipe: a heartbeat line
    every 0.2 s, none missing, naming the candidate k/N."""
    import contextlib
    import io
    import time

    from tvsprune import console
    from tvsprune.cli import main
    from tvsprune.pruning import selection

    spec, weights, images, moments = tiny_calibrated
    build = selection.build_pruned

    def slow_build(*a, **kw):
        time.sleep(0.3)
        return build(*a, **kw)

    monkeypatch.setattr(selection, "build_pruned", slow_build)
    monkeypatch.setattr(console, "HEARTBEAT_S", 0.2)
    out, err = io.StringIO(), io.StringIO()  # not terminals: the pipe's behaviour
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["prune", spec, "--weights", str(weights), "--moments", str(moments), "--out", str(tmp_path / "p")])
    assert code == 0, err.getvalue()
    beats = [line for line in err.getvalue().splitlines() if line.startswith("... tvsprune prune: ")]
    assert len(beats) >= 5, err.getvalue()
    times = [float(re.search(r"\((\d+) s\)$", b).group(1)) for b in beats]
    assert all(b - a <= 1 for a, b in zip(times, times[1:])), times  # none missing (seconds are rounded)
    assert any(re.search(r"candidate \d/\d", b) for b in beats), beats
    assert "... tvsprune" not in out.getvalue()  # results on stdout, progress on stderr


def test_calibrate_heartbeat_carries_counts_and_rate(tmp_path):
    from helpers import make_tiny_checkpoint, write_image_folder

    spec, weights, images = make_tiny_checkpoint(tmp_path, write_image_folder(tmp_path / "imgs", per_class=60))
    env = {**os.environ, "TVSPRUNE_HEARTBEAT_S": "0.05", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "tvsprune", "calibrate", spec, "--weights", str(weights), "--data",
                        str(images), "--out", str(tmp_path / "m.safetensors"), "--batch-size", "4"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert re.search(r"\d+/180 img at \d+ img/s", r.stderr), r.stderr


def test_timing_networks_names_the_timing_not_the_last_export(caplog):
    """The blocks walk's savings and every A/B check export their networks first (each export
    names its own steps: the heartbeat said 'parity on ONNX Runtime' through minutes of timing)."""
    import logging

    import torch.nn as nn

    from tvsprune.compare.on_backend import measure_speedup, time_networks

    nets = {"a": nn.Conv2d(3, 4, 3).eval(), "b": nn.Conv2d(3, 2, 3).eval()}
    with caplog.at_level(logging.INFO, logger="tvsprune.progress"):
        time_networks("ort-cpu", "fp32", nets, [3, 8, 8], 2, rounds=1, min_time_s=0.001)
        steps = [r.getMessage() for r in caplog.records if r.name == "tvsprune.progress"]
        assert any("parity" in s for s in steps) and steps[-1] == "timing 2 networks on ort-cpu at batch 2", steps
        measure_speedup("ort-cpu", nets["a"], nets["b"], [3, 8, 8], 2, rounds=1, iters=1)
    steps = [r.getMessage() for r in caplog.records if r.name == "tvsprune.progress"]
    assert steps[-1] == "timing the pruned network against the base on ort-cpu at batch 2", steps
