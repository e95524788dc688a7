"""The bad-input matrix: every case is one ``error:`` line naming the problem, the documented
exit code, no traceback, no new file, and no pickle executed.

Cases run in-process through ``tvsprune.cli.main`` (fast); the faults that need a real
process (disk full, Ctrl-C, SIGKILL then resume, two runs at once) run ``python -m tvsprune``.
The README's reliability table lists the same cases.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from helpers import randomize_bn, run_cli, write_image_folder, write_run_config
from tiny_models import TinyCNN

from tvsprune.cli import main


@dataclass(frozen=True)
class Fx:
    spec: str
    weights: Path
    images: Path
    moments: Path
    pruned: Path
    onnx: Path


@pytest.fixture(scope="module")
def fx(tiny_calibrated, tmp_path_factory) -> Fx:
    spec, weights, images, moments = tiny_calibrated
    root = tmp_path_factory.mktemp("bad-inputs")
    pruned, onnx = root / "pruned", root / "m.onnx"
    r = run_cli("prune", spec, "--weights", weights, "--moments", moments, "--out", pruned)
    assert r.returncode == 0, r.stderr
    r = run_cli("export", "onnx", spec, "--weights", weights, "--out", onnx, "--data", images)
    assert r.returncode == 0, r.stderr
    return Fx(spec, weights, images, moments, pruned, onnx)


def run_main(argv: list) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------- bad inputs
def calibrate(f: Fx, t: Path, *extra, weights=None, data=None, spec=None) -> list:
    return ["calibrate", spec or f.spec, "--weights", weights or f.weights, "--data", data or f.images,
            "--out", t / "out.safetensors", *extra]


def prune(f: Fx, t: Path, *extra, moments=None, weights=None) -> list:
    return ["prune", f.spec, "--weights", weights or f.weights, "--moments", moments or f.moments,
            "--out", t / "out", *extra]


def replay(f: Fx, t: Path, plan: Path) -> list:
    return ["replay", f.spec, "--weights", f.weights, "--plan", plan, "--out", t / "out", "--structure-only"]


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def state(seed: int = 0, **kw) -> dict:
    torch.manual_seed(seed)
    return randomize_bn(TinyCNN(**kw), seed).state_dict()


class Exploit:
    """A pickle payload that would create MARKER if it were ever unpickled."""

    def __reduce__(self):
        return (os.system, (f"touch {os.environ['TVSPRUNE_TEST_MARKER']}",))


def pickle_exploit(t: Path) -> Path:
    torch.save({"state_dict": state(), "payload": Exploit()}, t / "evil.pt")
    return t / "evil.pt"


def npz(t: Path, **arrays) -> Path:
    np.savez(t / "d.npz", **arrays)
    return t / "d.npz"


def edited_plan(f: Fx, t: Path, edit: Callable[[dict], None]) -> Path:
    plan = json.loads((f.pruned / "plan.json").read_text())
    edit(plan)
    return write(t / "plan.json", json.dumps(plan))


def config(t: Path, text: str | None = None, **edits: str) -> Path:
    cfg = write_run_config(t)
    src = cfg.read_text() if text is None else text
    for old, new in edits.items():
        src = src.replace(old.replace("__", " "), new)
    cfg.write_text(src)
    return cfg


def onnx_with_images(f: Fx, t: Path) -> list:
    return ["export", "int8", write(t / "bad.onnx", b"not an onnx model"), "--out", t / "q.onnx",
            "--calib-data", f.images]


def one_class(f: Fx, t: Path) -> Path:
    return write_image_folder(t / "one", classes=1, per_class=4)


def corrupt_image(f: Fx, t: Path) -> Path:
    root = write_image_folder(t / "imgs", classes=3, per_class=3)
    write(root / "class0" / "broken.png", b"\x89PNG not really")
    return root


# (id, argv builder, text the error line must contain, exit code)
CASES: list[tuple[str, Callable[[Fx, Path], list], str, int]] = [
    # weights
    ("weights-missing", lambda f, t: calibrate(f, t, weights=t / "nope.pt"), "nope.pt", 1),
    ("weights-is-a-directory", lambda f, t: calibrate(f, t, weights=t), "is a directory", 1),
    ("weights-garbage", lambda f, t: calibrate(f, t, weights=write(t / "w.pt", b"garbage" * 100)), "w.pt", 1),
    ("weights-truncated", lambda f, t: calibrate(f, t, weights=write(t / "w.pt", f.weights.read_bytes()[:500])),
     "w.pt", 1),
    ("weights-pickle-exploit", lambda f, t: calibrate(f, t, weights=pickle_exploit(t)), "evil.pt", 1),
    ("weights-wrong-shapes", lambda f, t: calibrate(f, t, weights=(torch.save(state(width=4), t / "w.pt"),
                                                                  t / "w.pt")[1]), "shape", 1),
    ("weights-missing-keys", lambda f, t: calibrate(f, t, weights=(torch.save(
        {k: v for k, v in state().items() if not k.startswith("classifier.2")}, t / "w.pt"), t / "w.pt")[1]),
     "classifier.2", 1),
    ("weights-inf", lambda f, t: calibrate(f, t, weights=(torch.save(
        {**state(), "features.0.bias": torch.full((8,), float("inf"))}, t / "w.pt"), t / "w.pt")[1]),
     "features.0.bias", 1),
    ("weights-safetensors-garbage", lambda f, t: calibrate(f, t, weights=write(t / "w.safetensors", b"\x00" * 64)),
     "w.safetensors", 1),
    ("weights-not-a-state-dict", lambda f, t: calibrate(f, t, weights=(torch.save([1, 2, 3], t / "w.pt"),
                                                                      t / "w.pt")[1]), "w.pt", 1),
    # model specs
    ("spec-file-missing", lambda f, t: calibrate(f, t, spec=f"{t}/nofile.py:TinyCNN"), "nofile.py", 1),
    ("spec-class-missing", lambda f, t: calibrate(f, t, spec=f.spec.replace(":TinyCNN", ":Nope")), "Nope", 1),
    ("spec-unknown-zoo-name", lambda f, t: calibrate(f, t, spec="resnet21"), "resnet21", 1),
    ("spec-file-syntax-error", lambda f, t: calibrate(f, t, spec=f"{write(t / 'm.py', 'class N(:')}:N"), "m.py", 1),
    ("spec-bad-model-kwargs", lambda f, t: calibrate(f, t, "--model-kwargs", "widthx"), "widthx", 1),
    # data
    ("data-missing", lambda f, t: calibrate(f, t, data=t / "nodata"), "nodata", 1),
    ("data-empty-folder", lambda f, t: calibrate(f, t, data=(t / "empty").mkdir() or t / "empty"), "empty", 1),
    ("data-one-class", lambda f, t: calibrate(f, t, data=one_class(f, t)), "class", 1),
    ("data-corrupt-image", lambda f, t: calibrate(f, t, data=corrupt_image(f, t)), "broken.png", 1),
    ("npz-without-y", lambda f, t: calibrate(f, t, data=npz(t, x=np.zeros((4, 16, 16, 3), np.uint8))), "'y'", 1),
    ("npz-object-array", lambda f, t: calibrate(f, t, data=npz(t, x=np.array([{}, {}], dtype=object),
                                                                y=np.zeros(2))), "pickle", 1),
    ("npz-three-dimensional-x", lambda f, t: calibrate(f, t, data=npz(t, x=np.zeros((4, 16, 16), np.uint8),
                                                                       y=np.zeros(4))), "4 dimensions", 1),
    ("npz-negative-labels", lambda f, t: calibrate(f, t, data=npz(t, x=np.zeros((4, 16, 16, 3), np.uint8),
                                                                   y=-np.ones(4))), "negative", 1),
    ("npz-float-0-to-255", lambda f, t: calibrate(f, t, data=npz(t, x=np.full((4, 16, 16, 3), 200.0),
                                                                  y=np.arange(4) % 3)), "0..1", 1),
    ("npz-no-channel-axis", lambda f, t: calibrate(f, t, data=npz(t, x=np.zeros((4, 16, 16, 5), np.uint8),
                                                                   y=np.arange(4) % 3)), "channel axis", 1),
    ("crop-larger-than-images", lambda f, t: calibrate(f, t, "--crop", "64"), "crop", 1),
    ("std-zero", lambda f, t: calibrate(f, t, "--std", "0,0,0"), "positive", 1),
    ("mean-of-two-values", lambda f, t: calibrate(f, t, "--mean", "0.5,0.5"), "1 or 3", 1),
    ("samples-per-class-zero", lambda f, t: calibrate(f, t, "--samples-per-class", "0"), "samples-per-class", 64),
    ("batch-size-zero", lambda f, t: calibrate(f, t, "--batch-size", "0"), "batch-size", 64),
    # moments
    ("moments-missing", lambda f, t: prune(f, t, moments=t / "m.safetensors"), "m.safetensors", 1),
    ("moments-garbage", lambda f, t: prune(f, t, moments=write(t / "m.safetensors", b"\x07" * 100)),
     "m.safetensors", 1),
    ("moments-without-metadata", lambda f, t: prune(f, t, moments=(
        __import__("safetensors.torch").torch.save_file({"a": torch.zeros(2)}, str(t / "m.safetensors")),
        t / "m.safetensors")[1]), "metadata", 1),
    ("moments-from-other-weights", lambda f, t: prune(f, t, weights=(torch.save(state(seed=5), t / "w.pt"),
                                                                     t / "w.pt")[1]), "other weights", 1),
    # prune flags
    ("budget-above-one", lambda f, t: prune(f, t, "--target-params", "1.5"), "1.5", 64),
    ("two-budgets", lambda f, t: prune(f, t, "--target-params", "0.3", "--target-flops", "0.3"),
     "give one budget, not --target-params and --target-flops", 64),
    ("misspelt-method", lambda f, t: prune(f, t, "--method", "tsv"), "tsv", 64),
    # plans
    ("plan-not-json", lambda f, t: replay(f, t, write(t / "plan.json", "{not json")), "plan.json", 1),
    ("plan-missing", lambda f, t: replay(f, t, t / "plan.json"), "plan.json", 1),
    ("plan-float-index", lambda f, t: replay(f, t, edited_plan(f, t, lambda p: p["groups"][0]["kept"].__setitem__(
        0, 1.0))), "non-integer", 1),
    ("plan-index-out-of-range", lambda f, t: replay(f, t, edited_plan(
        f, t, lambda p: p["groups"][0]["kept"].__setitem__(-1, 999))), "999", 1),
    ("plan-duplicate-index", lambda f, t: replay(f, t, edited_plan(
        f, t, lambda p: p["groups"][0]["kept"].__setitem__(1, p["groups"][0]["kept"][0]))), "duplicate", 1),
    ("plan-for-another-model", lambda f, t: replay(f, t, edited_plan(
        f, t, lambda p: p["groups"][0].__setitem__("root", "features.99"))), "features.99", 1),
    # configs
    ("config-missing", lambda f, t: ["run", t / "nope.toml"], "nope.toml", 1),
    ("config-not-toml", lambda f, t: ["run", config(t, "[model\nspec=")], "TOML", 1),
    ("config-misspelt-method", lambda f, t: ["run", config(t, **{"target_params = 0.3": 'method = "tsv"'})],
     "'tvs'", 1),
    ("config-unknown-key", lambda f, t: ["run", config(t, **{"target_params = 0.3": "target_param = 0.3"})],
     "target_param", 1),
    ("config-bad-override", lambda f, t: ["run", config(t), "--set", "prune.target_params=lots"], "target_params", 1),
    # ONNX
    ("onnx-garbage", onnx_with_images, "bad.onnx", 1),
    ("onnx-missing", lambda f, t: ["export", "int8", t / "none.onnx", "--out", t / "q.onnx", "--calib-data",
                                   f.images], "none.onnx", 1),
    ("bench-garbage-onnx", lambda f, t: ["bench", f.spec, write(t / "p.onnx", b"junk"), "--weights", f.weights,
                                         "--out", t / "b", "--backend", "ort-cpu", "--input-shape", "3,16,16"],
     "p.onnx", 1),
    ("opset-too-old", lambda f, t: ["export", "onnx", f.spec, "--weights", f.weights, "--out", t / "m.onnx",
                                    "--opset", "3"], "--opset 3", 1),
    ("tensorrt-missing", lambda f, t: ["export", "trt", f.onnx, "--out", t / "m.engine"], "tensorrt", 2),
    # outputs
    ("out-dir-is-a-file", lambda f, t: prune(f, t)[:-1] + [write(t / "out", "x")], "not a directory", 1),
    ("out-file-is-a-dir", lambda f, t: calibrate(f, t)[:-1] + [(t / "d").mkdir() or t / "d"], "directory", 1),
    ("out-read-only", lambda f, t: calibrate(f, t)[:-1] + ["/proc/tvsprune-test/m.safetensors"], "cannot use /proc", 1),
    # usage
    ("unknown-flag", lambda f, t: calibrate(f, t, "--bogus"), "--bogus", 64),
    ("no-command", lambda f, t: [], "no command", 64),
]


@pytest.mark.parametrize("case_id,build,needle,code", CASES, ids=[c[0] for c in CASES])
def test_bad_input(fx, tmp_path, monkeypatch, case_id, build, needle, code):
    if case_id == "tensorrt-missing":
        import importlib.util

        if importlib.util.find_spec("tensorrt") is not None:
            pytest.skip("TensorRT is installed here")
    marker = tmp_path.parent / f"{tmp_path.name}-pwned"
    monkeypatch.setenv("TVSPRUNE_TEST_MARKER", str(marker))
    monkeypatch.chdir(tmp_path)
    argv = build(fx, tmp_path)
    before = files_under(tmp_path)
    rc, out, err = run_main(argv)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert rc == code, (rc, err)
    assert len(errors) == 1, err
    assert needle.lower() in errors[0].lower(), errors[0]
    assert "Traceback" not in err + out
    assert err.rstrip().splitlines()[-1].startswith("FAILED"), err
    assert files_under(tmp_path) == before, sorted(map(str, files_under(tmp_path) - before))
    assert not marker.exists(), "a pickle payload ran"


@pytest.mark.parametrize("layout", ["uint8 NHWC", "uint8 NCHW", "float NHWC", "float NCHW"])
def test_npz_layout_is_read_from_the_shape(layout):
    from tvsprune.data.sources import ArraySource, Preprocess

    u = (np.random.default_rng(0).random((4, 16, 16, 3)) * 255).astype(np.uint8)
    x = u if layout.startswith("uint8") else u / 255.0
    if layout.endswith("NCHW"):
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    got = ArraySource(layout, x, np.arange(4) % 2, None, Preprocess()).load(1)
    want = torch.from_numpy(u[1].astype(np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(got, want)


def test_matrix_has_forty_cases_all_listed_in_the_readme():
    assert len(CASES) + 4 >= 40  # the four process-level faults below
    from helpers import REPO

    section = (REPO / "README.md").read_text().split("## Reliability", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| \d+ \| ([\w-]+) \|", section, re.M)
    assert listed == [c[0] for c in CASES] + ["disk-full", "ctrl-c", "two-runs-one-output", "sigkill-then-resume"]


# ----------------------------------------------------------------------------- process faults
def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-big write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("command", ["calibrate", "prune"])
def test_disk_full_leaves_no_partial_file(fx, tmp_path, command):
    """A write that runs out of space (RLIMIT_FSIZE: the same EFBIG/ENOSPC path as a full tmpfs)."""
    argv = calibrate(fx, tmp_path) if command == "calibrate" else prune(fx, tmp_path)
    r = subprocess.run([sys.executable, "-m", "tvsprune", *map(str, argv)], capture_output=True, text=True,
                       preexec_fn=_limit_file_size(4096), timeout=300)
    assert r.returncode == 1, r.stderr
    errors = [l for l in r.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1 and "safetensors" in errors[0] and "Traceback" not in r.stderr, r.stderr
    assert not files_under(tmp_path), files_under(tmp_path)


def _slow_calibration(fx: Fx, out: Path) -> list[str]:
    """A calibration that takes ~10 s: SlowCNN sleeps 0.5 s per batch of one image."""
    return ["calibrate", fx.spec.replace(":TinyCNN", ":SlowCNN"), "--model-kwargs", "delay=0.5", "--weights",
            str(fx.weights), "--data", str(fx.images), "--out", str(out), "--batch-size", "1"]


def _start_holding_lock(argv: list[str], out: Path) -> subprocess.Popen:
    """Start ``python -m tvsprune ARGV`` and return once it holds the lock on ``out``."""
    from tvsprune.artifacts import output_lock
    from tvsprune.errors import TvsError

    # SIGINT back to its default in the child: a pytest started as a background job of a
    # non-interactive shell inherits SIGINT ignored, and Python then installs no handler
    proc = subprocess.Popen([sys.executable, "-m", "tvsprune", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    end = time.time() + 120
    while time.time() < end and proc.poll() is None:
        try:
            with output_lock(out):
                pass
        except TvsError:
            return proc
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the command never held its lock: {proc.communicate()}")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_exit_without_partial_output(fx, tmp_path, sig, code):
    out = tmp_path / "out" / "m.safetensors"
    proc = _start_holding_lock(_slow_calibration(fx, out), out)
    time.sleep(2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert len([l for l in err.splitlines() if "error:" in l]) == 1 and "Traceback" not in err, err
    assert err.rstrip().splitlines()[-1].startswith("FAILED"), err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_two_runs_on_one_output_are_refused_by_the_lock(fx, tmp_path):
    out = tmp_path / "m.safetensors"
    proc = _start_holding_lock(_slow_calibration(fx, out), out)
    try:
        rc, _, err = run_main(_slow_calibration(fx, out))
        assert rc == 1, err
        errors = [l for l in err.splitlines() if "error:" in l]
        assert len(errors) == 1 and "another tvsprune process" in errors[0], err
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists()


def test_sigkill_at_random_moments_then_resume(tmp_path):
    """`run` killed (SIGKILL, no cleanup) at three seeded moments, then resumed: the result is complete and valid."""
    cfg = write_run_config(tmp_path)
    out = tmp_path / "out"
    rng = np.random.default_rng(0)
    for delay in sorted(rng.uniform(3, 12, size=3)):
        proc = subprocess.Popen([sys.executable, "-m", "tvsprune", "run", str(cfg)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.kill()
        proc.wait()
    r = run_cli("run", str(cfg))
    assert r.returncode == 0, r.stderr
    assert not list(out.rglob("*.tvsprune-tmp"))  # temporary files of killed writes are swept on resume
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(s["status"] in ("passed", "skipped") for s in manifest["stages"].values()), manifest["stages"]
    from tvsprune.artifacts import sha256_file

    for stage in manifest["stages"].values():
        for path, digest in stage.get("outputs", {}).items():
            assert sha256_file(path) == digest, path
