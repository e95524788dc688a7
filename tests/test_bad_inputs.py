"""The bad-input matrix: every case is one ``error:`` line naming the problem, the documented
exit code, no traceback, no new file, and no pickle executed.

Cases run in-process through ``tvsprune.cli.main`` (fast); the faults that need a real
process (disk full, Ctrl-C, SIGKILL then resume, two runs at once) run ``python -m tvsprune``.
The README's reliability section states their number and result.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
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
    return ["calibrate", f.spec if spec is None else spec, "--weights", weights or f.weights, "--data", data or f.images,
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


# ----------------------------------------------------------------------------- more builders
def model_file(t: Path, body: str, name: str = "Net") -> str:
    """A user model file ``t/user_model.py`` (TinyCNN importable beside it) -> its spec."""
    src = "import sys, torch, torch.nn as nn\nfrom tiny_models import TinyCNN\n" + body
    import shutil

    from helpers import REPO

    shutil.copy(REPO / "tests" / "tiny_models.py", t / "tiny_models.py")
    return f"{write(t / 'user_model.py', src)}:{name}"


def edited_moments(f: Fx, t: Path, tensors: Callable[[dict], None] | None = None,
                   meta: Callable[[dict], None] | None = None, raw: str | None = None) -> Path:
    """A copy of the session's moments file with its tensors or metadata edited."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(f.moments), "pt") as h:
        m = json.loads(h.metadata()["tvsprune"])
    ts = load_file(str(f.moments))
    if tensors:
        tensors(ts)
    if meta:
        meta(m)
    save_file(ts, str(t / "m.safetensors"), metadata={"tvsprune": raw if raw is not None else json.dumps(m)})
    return t / "m.safetensors"


def first(ts: dict, suffix: str) -> str:
    return next(k for k in sorted(ts) if k.endswith(suffix) and not k.startswith("@in/"))


def set_first(suffix: str, fn: Callable) -> Callable[[dict], None]:
    def edit(ts: dict) -> None:
        k = first(ts, suffix)
        ts[k] = fn(ts[k].clone())
    return edit


def artifact(f: Fx, t: Path, meta: Callable[[dict], None] | None = None, drop: str | None = None,
             swap_weights: bool = False) -> Path:
    """A copy of the session's pruned artifact folder, its weights' metadata edited or a file dropped."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    art = t / "art"
    shutil.copytree(f.pruned, art)
    if meta:
        w = art / "pruned.safetensors"
        with safe_open(str(w), "pt") as h:
            m = json.loads(h.metadata()["tvsprune"])
        meta(m)
        save_file(load_file(str(w)), str(w), metadata={"tvsprune": json.dumps(m)})
        import hashlib  # a consistent forgery: prune.json re-bound to the edited weights

        report = json.loads((art / "prune.json").read_text())
        report["artifacts"]["weights_sha256"] = hashlib.sha256(w.read_bytes()).hexdigest()
        write(art / "prune.json", json.dumps(report))
    if swap_weights:
        ts = load_file(str(art / "pruned.safetensors"))
        k = sorted(ts)[0]
        ts[k] = ts[k] + 1
        with safe_open(str(art / "pruned.safetensors"), "pt") as h:
            md = h.metadata()
        save_file(ts, str(art / "pruned.safetensors"), metadata=md)
    if drop:
        (art / drop).unlink()
    return art


def evaluate(f: Fx, t: Path, model, *extra) -> list:
    return ["eval", model, "--data", f.images, *extra]


def cifar_dir(t: Path, **entries) -> Path:
    import pickle

    d = t / "cifar"
    d.mkdir()
    with open(d / "test_batch", "wb") as fh:
        pickle.dump({k.encode(): v for k, v in entries.items()}, fh)
    with open(d / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [b"a", b"b", b"c"]}, fh)
    return d


def png_header(t: Path, w: int, h: int) -> Path:
    """An image folder whose one PNG declares w x h pixels (and holds almost nothing)."""
    import struct
    import zlib

    root = write_image_folder(t / "imgs", classes=3, per_class=2)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(  # noqa: E731
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    write(root / "class0" / "huge.png", b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
          + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return root


def onnx_external(f: Fx, t: Path, location: str) -> Path:
    """The session's ONNX model with its first initializer moved to external data at ``location``."""
    import onnx

    m = onnx.load(str(f.onnx))
    init = max(m.graph.initializer, key=lambda i: len(i.raw_data) or 0)
    init.data_location = onnx.TensorProto.EXTERNAL
    del init.external_data[:]
    entry = init.external_data.add()
    entry.key, entry.value = "location", location
    init.ClearField("raw_data")
    onnx.save(m, str(t / "ext.onnx"))
    return t / "ext.onnx"


def merge(f: Fx, t: Path, *inputs) -> list:
    return ["merge-moments", *inputs, "--out", t / "merged.safetensors"]


def bench(f: Fx, t: Path, *extra) -> list:
    return ["bench", f.spec, "--weights", f.weights, "--out", t / "b", "--backend", "ort-cpu", *extra]


def export_onnx(f: Fx, t: Path, *extra) -> list:
    return ["export", "onnx", f.spec, "--weights", f.weights, "--out", t / "m.onnx", *extra]


def int8(f: Fx, t: Path, *extra) -> list:
    return ["export", "int8", f.onnx, "--out", t / "q.onnx", "--calib-data", f.images, *extra]


def trt(f: Fx, t: Path, *extra) -> list:
    return ["export", "trt", f.onnx, "--out", t / "m.engine", *extra]


def other_shard(f: Fx, t: Path, edit: Callable[[dict], None]) -> Path:
    return edited_moments(f, t, meta=edit)


def config_with(t: Path, section_line: str, line: str) -> Path:
    """The test config with ``line`` added under the line ``section_line``."""
    return config(t, **{section_line.replace(" ", "__"): f"{section_line}\n{line}"})


NESTED = "[" * 100_000 + "]" * 100_000


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
    ("npz-two-dimensional-x", lambda f, t: calibrate(f, t, data=npz(t, x=np.zeros((4, 256), np.uint8),
                                                                     y=np.zeros(4))), "4 dimensions", 1),
    ("npz-negative-labels", lambda f, t: calibrate(f, t, data=npz(t, x=np.zeros((4, 16, 16, 3), np.uint8),
                                                                   y=-np.ones(4))), "negative", 1),
    ("npz-float-0-to-255", lambda f, t: calibrate(f, t, data=npz(t, x=np.full((4, 16, 16, 3), 200.0),
                                                                  y=np.arange(4) % 3)), "0..1", 1),
    ("npz-no-channel-axis", lambda f, t: calibrate(f, t, data=npz(t, x=np.zeros((4, 16, 16, 5), np.uint8),
                                                                   y=np.arange(4) % 3)), "channel axis", 1),
    ("crop-larger-than-images", lambda f, t: calibrate(f, t, "--crop", "64"), "crop", 1),
    ("std-zero", lambda f, t: calibrate(f, t, "--std", "0,0,0"), "positive", 64),
    ("mean-of-two-values", lambda f, t: calibrate(f, t, "--mean", "0.5,0.5"), "1 or 3", 64),
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


MORE_CASES: list[tuple[str, Callable[[Fx, Path], list], str, int]] = [
    # weights
    ("weights-empty-file", lambda f, t: calibrate(f, t, weights=write(t / "w.pt", b"")), "w.pt", 1),
    ("weights-json-file", lambda f, t: calibrate(f, t, weights=write(t / "w.json", "{}")), "w.json", 1),
    ("weights-nan", lambda f, t: calibrate(f, t, weights=(torch.save(
        {**state(), "features.0.weight": torch.full((8, 3, 3, 3), float("nan"))}, t / "w.pt"), t / "w.pt")[1]),
     "features.0.weight", 1),
    ("weights-unexpected-keys", lambda f, t: calibrate(f, t, weights=(torch.save(
        {**state(), "extra.weight": torch.zeros(3)}, t / "w.pt"), t / "w.pt")[1]), "extra.weight", 1),
    ("weights-two-state-dicts", lambda f, t: calibrate(f, t, weights=(torch.save(
        {"student": state(), "teacher": state()}, t / "w.pt"), t / "w.pt")[1]), "several state_dicts", 1),
    ("weights-numpy-array-beside", lambda f, t: calibrate(f, t, weights=(torch.save(
        {"net": state(), "history": __import__("numpy").zeros(3)}, t / "w.pt"), t / "w.pt")[1]), "numpy.ndarray", 1),
    ("weights-safetensors-truncated", lambda f, t: calibrate(f, t, weights=(
        __import__("safetensors.torch").torch.save_file(state(), str(t / "full.safetensors")),
        write(t / "w.safetensors", (t / "full.safetensors").read_bytes()[:300]))[1]), "w.safetensors", 1),
    ("weights-exploit-nested", lambda f, t: calibrate(f, t, weights=(torch.save(
        {"state_dict": state(), "meta": {"deep": [Exploit()]}}, t / "evil.pt"), t / "evil.pt")[1]), "evil.pt", 1),
    ("weights-normalize-not-numbers", lambda f, t: calibrate(f, t, weights=(torch.save(
        {"state_dict": state(), "normalize": {"mean": ["a"] * 3, "std": [0.2] * 3}}, t / "w.pt"), t / "w.pt")[1]),
     "checkpoint's normalize mean/std", 1),
    ("weights-normalize-std-zero", lambda f, t: calibrate(f, t, weights=(torch.save(
        {"state_dict": state(), "normalize": {"mean": [0.5] * 3, "std": [0.0] * 3}}, t / "w.pt"), t / "w.pt")[1]),
     "checkpoint's normalize std", 1),
    ("weights-equals-out", lambda f, t: calibrate(f, t, weights=write(t / "w.pt", f.weights.read_bytes()))[:-1]
     + [t / "w.pt"], "w.pt", 64),
    ("no-weights-without-flag", lambda f, t: ["calibrate", f.spec, "--data", f.images, "--out", t / "m.safetensors"],
     "--weights", 1),
    # model specs and the user's code
    ("spec-empty", lambda f, t: calibrate(f, t, spec=""), "model", 1),
    ("spec-module-not-found", lambda f, t: calibrate(f, t, spec="no_such_module_xyz:Net"), "no_such_module_xyz", 1),
    ("spec-not-a-python-file", lambda f, t: calibrate(f, t, spec=f"{write(t / 'm.txt', 'x')}:Net"), "m.txt", 1),
    ("spec-returns-not-a-module", lambda f, t: calibrate(f, t, spec=model_file(t, "def Net():\n    return 3\n")),
     "nn.Module", 1),
    ("spec-constructor-raises", lambda f, t: calibrate(f, t, spec=model_file(
        t, "class Net(TinyCNN):\n    def __init__(self):\n        raise ValueError('bad width')\n")),
     "bad width", 1),
    ("spec-exits-on-import", lambda f, t: calibrate(f, t, spec=model_file(t, "sys.exit(0)\nNet = TinyCNN\n")),
     "exit", 1),
    ("spec-forward-raises", lambda f, t: calibrate(f, t, spec=model_file(
        t, "class Net(TinyCNN):\n    def forward(self, x):\n        raise RuntimeError('my forward is broken')\n")),
     "my forward is broken", 1),
    ("spec-forward-nan", lambda f, t: calibrate(f, t, spec=model_file(
        t, "class Net(TinyCNN):\n    def forward(self, x):\n        return super().forward(x) * float('nan')\n")),
     "nan", 1),
    ("spec-forward-returns-tuple", lambda f, t: ["export", "onnx", model_file(
        t, "class Net(TinyCNN):\n    def forward(self, x):\n        return super().forward(x), x\n"),
        "--weights", f.weights, "--out", t / "m.onnx", "--input-shape", "3,16,16"], "returns tuple", 1),
    ("spec-forward-returns-dict", lambda f, t: ["bench", model_file(
        t, "class Net(TinyCNN):\n    def forward(self, x):\n        return {'out': super().forward(x)}\n"),
        "--weights", f.weights, "--out", t / "b", "--backend", "ort-cpu", "--input-shape", "3,16,16"], "returns dict", 1),
    ("spec-kwargs-json-list", lambda f, t: calibrate(f, t, "--model-kwargs", "[1, 2]"), "model-kwargs", 1),
    ("spec-kwargs-deep-json", lambda f, t: calibrate(f, t, "--model-kwargs", "{\"a\": " + NESTED + "}"),
     "model-kwargs", 1),
    ("spec-kwargs-unknown-argument", lambda f, t: calibrate(f, t, "--model-kwargs", "depth=3"), "depth", 1),
    # data
    ("data-one-level-too-high", lambda f, t: calibrate(f, t, data=(write_image_folder(t / "d" / "calib"), t / "d")[1]),
     "did you mean", 1),
    ("spec-zoo-name-with-dash", lambda f, t: calibrate(f, t, spec="resnet-20"), "did you mean 'resnet20'", 1),
    ("data-is-a-text-file", lambda f, t: calibrate(f, t, data=write(t / "d.txt", "hello")), "d.txt", 1),
    ("data-class-folders-empty", lambda f, t: calibrate(f, t, data=[(t / "e" / c).mkdir(parents=True)
                                                                    for c in "abc"] and t / "e"), "e", 1),
    ("data-zero-byte-image", lambda f, t: calibrate(f, t, data=(lambda r: (write(r / "class1" / "z.png", b""), r)[1])(
        write_image_folder(t / "imgs", classes=3, per_class=3))), "z.png", 1),
    ("data-png-declares-huge-size", lambda f, t: calibrate(f, t, data=png_header(t, 30000, 30000)), "huge.png", 1),
    ("data-cifar-without-data", lambda f, t: calibrate(f, t, data=cifar_dir(t, labels=[0, 1, 2])), "'data'", 1),
    ("data-cifar-bad-row-length", lambda f, t: calibrate(f, t, data=cifar_dir(
        t, data=np.zeros((3, 3000), np.uint8), labels=[0, 1, 2])), "3072", 1),
    ("data-cifar-label-count", lambda f, t: calibrate(f, t, data=cifar_dir(
        t, data=np.zeros((3, 3072), np.uint8), labels=[0, 1])), "labels", 1),
    ("data-cifar-exploit", lambda f, t: calibrate(f, t, data=cifar_dir(t, data=Exploit(), labels=[0])), "test_batch",
     1),
    ("npz-length-mismatch", lambda f, t: calibrate(f, t, data=npz(t, x=np.zeros((4, 16, 16, 3), np.uint8),
                                                                   y=np.arange(3) % 3)), "d.npz", 1),
    ("npz-nan-pixels", lambda f, t: calibrate(f, t, data=npz(t, x=np.full((6, 16, 16, 3), np.nan, np.float32),
                                                              y=np.arange(6) % 3)), "d.npz", 1),
    ("npz-fractional-labels", lambda f, t: calibrate(f, t, data=npz(t, x=np.zeros((4, 16, 16, 3), np.uint8),
                                                                     y=np.full(4, 0.5))), "d.npz", 1),
    ("npz-empty", lambda f, t: calibrate(f, t, data=npz(t, x=np.zeros((0, 16, 16, 3), np.uint8),
                                                         y=np.zeros(0, np.int64))), "d.npz", 1),
    ("npz-garbage", lambda f, t: calibrate(f, t, data=write(t / "d.npz", b"PK garbage")), "d.npz", 1),
    ("resize-too-large", lambda f, t: calibrate(f, t, "--resize", "100000"), "--resize", 64),
    ("crop-zero", lambda f, t: calibrate(f, t, "--crop", "0"), "--crop", 64),
    ("mean-nan", lambda f, t: calibrate(f, t, "--mean", "nan,0,0", "--std", "1,1,1"), "--mean", 64),
    ("mean-not-numbers", lambda f, t: calibrate(f, t, "--mean", "a,b,c"), "--mean", 64),
    ("std-negative", lambda f, t: calibrate(f, t, "--mean", "0,0,0", "--std", "-1,1,1"), "--std", 64),
    ("mean-without-std", lambda f, t: calibrate(f, t, "--mean", "0.5,0.5,0.5", weights=(torch.save(
        state(), t / "w.pt"), t / "w.pt")[1]), "--std", 1),
    ("workers-negative", lambda f, t: calibrate(f, t, "--workers", "-1"), "--workers", 64),
    ("seed-negative", lambda f, t: calibrate(f, t, "--seed", "-1"), "--seed", 64),
    ("split-unknown", lambda f, t: calibrate(f, t, "--split", "val"), "--split", 64),
    ("resolution-pool-too-fine", lambda f, t: calibrate(f, t, "--resolution", "pool:1000"), "at most 64", 64),
    ("resolution-unknown", lambda f, t: calibrate(f, t, "--resolution", "medium"), "medium", 64),
    ("resolution-pool-zero", lambda f, t: calibrate(f, t, "--resolution", "pool:0"), "pool:0", 64),
    ("device-unknown", lambda f, t: calibrate(f, t, "--device", "tpu"), "--device", 64),
    ("layers-match-nothing", lambda f, t: calibrate(f, t, "--layers", "nomatch*"), "nomatch", 1),
    ("out-inside-data", lambda f, t: calibrate(f, t)[:-1] + [f.images / "m.safetensors"], "inside", 64),
    # moments files
    ("moments-metadata-not-json", lambda f, t: prune(f, t, moments=edited_moments(f, t, raw="{not json")),
     "not valid JSON", 1),
    ("moments-metadata-deeply-nested", lambda f, t: prune(f, t, moments=edited_moments(f, t, raw=NESTED)),
     "m.safetensors", 1),
    ("moments-metadata-a-list", lambda f, t: prune(f, t, moments=edited_moments(f, t, raw="[1, 2]")),
     "not a JSON object", 1),
    ("moments-without-layers-entry", lambda f, t: prune(f, t, moments=edited_moments(
        f, t, meta=lambda m: m.pop("layers"))), "'layers'", 1),
    ("moments-wrong-format", lambda f, t: prune(f, t, moments=edited_moments(
        f, t, meta=lambda m: m.__setitem__("format", "tvsprune.moments/99"))), "format", 1),
    ("moments-nan-means", lambda f, t: prune(f, t, moments=edited_moments(
        f, t, tensors=set_first("/mean", lambda x: x.fill_(float("nan"))))), "m.safetensors", 1),
    ("moments-negative-variance", lambda f, t: prune(f, t, moments=edited_moments(
        f, t, tensors=set_first("/var", lambda x: x.fill_(-1.0)))), "m.safetensors", 1),
    ("moments-count-classes-mismatch", lambda f, t: prune(f, t, moments=edited_moments(
        f, t, tensors=set_first("/count", lambda x: x[:2].clone()))), "m.safetensors", 1),
    ("moments-tensor-missing", lambda f, t: prune(f, t, moments=edited_moments(
        f, t, tensors=lambda ts: ts.pop(first(ts, "/var")))), "missing", 1),
    ("moments-other-channel-count", lambda f, t: prune(f, t, moments=edited_moments(f, t, tensors=lambda ts: [
        ts.__setitem__(k, ts[k][:, :3].clone()) for k in [first(ts, s) for s in ("/mean", "/var")]])),
     "m.safetensors", 1),
    ("moments-is-a-directory", lambda f, t: prune(f, t, moments=(t / "m").mkdir() or t / "m"), "m", 1),
    ("merge-shard-with-itself", lambda f, t: merge(f, t, f.moments, f.moments), "shard", 1),
    ("merge-other-preprocessing", lambda f, t: merge(f, t, f.moments, other_shard(f, t, lambda m: (
        m["data"]["preprocess"].__setitem__("resize", 20), m.__setitem__("shards", ["other"])))),
     "preprocessing", 1),
    ("merge-other-classes", lambda f, t: merge(f, t, f.moments, other_shard(f, t, lambda m: (
        m.__setitem__("classes", ["x", "y", "z"]), m.__setitem__("shards", ["other"])))), "classes", 1),
    ("merge-one-file", lambda f, t: merge(f, t, f.moments), "two files", 1),
    ("merge-garbage", lambda f, t: merge(f, t, f.moments, write(t / "g.safetensors", b"junk")), "g.safetensors", 1),
    # prune options (checked before the model loads: usage errors)
    ("target-params-nan", lambda f, t: prune(f, t, "--target-params", "nan"), "--target-params", 64),
    ("target-flops-inf", lambda f, t: prune(f, t, "--target-flops", "inf"), "--target-flops", 64),
    ("target-params-negative", lambda f, t: prune(f, t, "--target-params", "-0.1"), "--target-params", 64),
    ("target-params-one", lambda f, t: prune(f, t, "--target-params", "1"), "--target-params", 64),
    ("target-flops-percent", lambda f, t: prune(f, t, "--target-flops", "50"), "fraction", 64),
    ("threshold-nan", lambda f, t: prune(f, t, "--threshold", "nan"), "--threshold", 64),
    ("threshold-negative", lambda f, t: prune(f, t, "--threshold", "-1"), "--threshold", 64),
    ("threshold-and-budget", lambda f, t: prune(f, t, "--threshold", "0.1", "--target-params", "0.3"),
     "give one budget", 64),
    ("min-keep-frac-nan", lambda f, t: prune(f, t, "--min-keep-frac", "nan"), "--min-keep-frac", 64),
    ("min-keep-frac-above-one", lambda f, t: prune(f, t, "--min-keep-frac", "1.5"), "--min-keep-frac", 64),
    ("min-keep-zero", lambda f, t: prune(f, t, "--min-keep", "0"), "--min-keep", 64),
    ("round-to-zero", lambda f, t: prune(f, t, "--round-to", "0"), "--round-to", 64),
    ("ridge-nan", lambda f, t: prune(f, t, "--ridge", "nan"), "--ridge", 64),
    ("ridge-negative", lambda f, t: prune(f, t, "--ridge", "-1"), "--ridge", 64),
    ("ridge-zero", lambda f, t: prune(f, t, "--ridge", "0"), "--ridge", 64),
    ("cost-power-negative", lambda f, t: prune(f, t, "--cost-power", "-2"), "--cost-power", 64),
    ("step-zero", lambda f, t: prune(f, t, "--step", "0"), "--step", 64),
    ("step-above-one", lambda f, t: prune(f, t, "--step", "2"), "--step", 64),
    ("step-decrease-zero", lambda f, t: prune(f, t, "--step-decrease", "0"), "--step-decrease", 64),
    # latency budgets
    ("target-latency-zero", lambda f, t: prune(f, t, "--target-latency", "0"), "--target-latency", 64),
    ("target-latency-one", lambda f, t: prune(f, t, "--target-latency", "1"), "--target-latency", 64),
    ("target-latency-nan", lambda f, t: prune(f, t, "--target-latency", "nan"), "--target-latency", 64),
    ("target-latency-and-macs", lambda f, t: prune(f, t, "--target-latency", "0.5", "--keep-macs", "0.5"),
     "give one budget", 64),
    ("latency-backend-unknown", lambda f, t: prune(f, t, "--target-latency", "0.5", "--latency-backend", "tpu"),
     "--latency-backend", 64),
    ("latency-backend-absent", lambda f, t: prune(f, t, "--target-latency", "0.5", "--latency-backend", "tensorrt"),
     "not available", 2),
    ("latency-batch-zero", lambda f, t: prune(f, t, "--target-latency", "0.5", "--latency-batch", "0"),
     "--latency-batch", 64),
    ("round-to-word", lambda f, t: prune(f, t, "--round-to", "fast"), "--round-to", 64),
    ("iter-tvs-latency", lambda f, t: prune(f, t, "--method", "iter-tvs", "--target-latency", "0.5"), "one-shot", 64),
    ("max-rounds-zero", lambda f, t: prune(f, t, "--max-rounds", "0"), "--max-rounds", 64),
    ("max-acc-drop-nan", lambda f, t: prune(f, t, "--max-acc-drop", "nan"), "--max-acc-drop", 64),
    ("allocation-misspelt", lambda f, t: prune(f, t, "--allocation", "globl"), "globl", 64),
    ("compensation-misspelt", lambda f, t: prune(f, t, "--compensation", "lss"), "lss", 64),
    ("tvs-saliency-misspelt", lambda f, t: prune(f, t, "--tvs-saliency", "l3"), "l3", 64),
    ("pair-reduce-misspelt", lambda f, t: prune(f, t, "--pair-reduce", "max"), "max", 64),
    ("repair-samples-zero", lambda f, t: prune(f, t, "--repair-samples-per-class", "0"), "--repair-samples", 64),
    ("prune-device-unknown", lambda f, t: prune(f, t, "--device", "tpu"), "--device", 64),
    ("tvs-without-moments", lambda f, t: ["prune", f.spec, "--weights", f.weights, "--out", t / "out"], "moments", 1),
    ("iter-tvs-without-val-data", lambda f, t: prune(f, t, "--method", "iter-tvs"), "val", 1),
    ("val-data-other-classes", lambda f, t: prune(f, t, "--val-data", write_image_folder(t / "v", classes=4,
                                                                                         per_class=2)), "class", 1),
    ("calib-data-missing", lambda f, t: prune(f, t, "--calib-data", t / "nocalib"), "nocalib", 1),
    ("val-data-is-every-calibration-image", lambda f, t: prune(f, t, "--calib-data", f.images, "--val-data",
                                                               f.images), "no validation images left", 1),
    # plans
    ("plan-deeply-nested", lambda f, t: replay(f, t, write(t / "plan.json", NESTED)), "plan.json", 1),
    ("plan-a-list", lambda f, t: replay(f, t, write(t / "plan.json", "[1, 2]")), "plan.json", 1),
    ("plan-groups-missing", lambda f, t: replay(f, t, edited_plan(f, t, lambda p: p.pop("groups"))), "groups", 1),
    ("plan-negative-index", lambda f, t: replay(f, t, edited_plan(
        f, t, lambda p: p["groups"][0]["kept"].__setitem__(0, -1))), "-1", 1),
    ("plan-keeps-nothing", lambda f, t: replay(f, t, edited_plan(
        f, t, lambda p: p["groups"][0].__setitem__("kept", []))), "keeps no channel", 1),
    ("plan-unknown-format", lambda f, t: replay(f, t, edited_plan(f, t, lambda p: p.__setitem__("format", "x/1"))),
     "format", 1),
    ("plan-is-a-directory", lambda f, t: replay(f, t, (t / "plan.json").mkdir() or t / "plan.json"), "plan.json", 1),
    ("plan-not-utf8", lambda f, t: replay(f, t, write(t / "plan.json", b"\xff\xfe\x00garbage")), "plan.json", 1),
    ("plan-repair-data-bad", lambda f, t: ["replay", f.spec, "--weights", f.weights, "--out", t / "out", "--plan",
                                           edited_plan(f, t, lambda p: p.__setitem__("repair_data", {
                                               "path": str(f.images), "batch_size": -4})), "--moments", f.moments],
     "batch_size", 1),
    # pruned artifacts (received files: data, never code)
    ("artifact-base-is-os-system", lambda f, t: evaluate(f, t, artifact(f, t, meta=lambda m: m.__setitem__(
        "base", {"spec": "os:system", "kwargs": {"command": f"touch {os.environ['TVSPRUNE_TEST_MARKER']}"}}))),
     "--base-model", 1),
    ("artifact-base-not-a-spec", lambda f, t: evaluate(f, t, artifact(f, t, meta=lambda m: m.__setitem__(
        "base", ["resnet20"]))), "base", 1),
    ("artifact-input-shape-bomb", lambda f, t: evaluate(f, t, artifact(f, t, meta=lambda m: m.__setitem__(
        "input_shape", [3, 100000, 100000]))), "input_shape", 1),
    ("artifact-input-shape-not-ints", lambda f, t: evaluate(f, t, artifact(f, t, meta=lambda m: m.__setitem__(
        "input_shape", ["3", 16, 16]))), "input_shape", 1),
    ("artifact-plan-missing", lambda f, t: evaluate(f, t, artifact(f, t, meta=lambda m: m.pop("plan"))), "plan", 1),
    ("artifact-weights-of-another-prune", lambda f, t: evaluate(f, t, artifact(f, t, swap_weights=True)),
     "mixes the outputs", 1),
    ("artifact-prune-json-not-json", lambda f, t: evaluate(f, t, (lambda a: (write(a / "prune.json", "{x"), a)[1])(
        artifact(f, t))), "prune.json", 1),
    ("artifact-weights-missing", lambda f, t: evaluate(f, t, artifact(f, t, drop="pruned.safetensors")), "art", 1),
    ("artifact-pruned-again", lambda f, t: ["prune", artifact(f, t), "--moments", f.moments, "--out", t / "out"],
     "pruning it again", 1),
    # configs
    ("config-round-to-zero", lambda f, t: ["run", config_with(t, "[prune]", "round_to = 0")], "round_to", 1),
    ("config-target-nan", lambda f, t: ["run", config(t, **{"target_params = 0.3": "target_params = nan"})],
     "target_params", 1),
    ("config-two-budgets", lambda f, t: ["run", config_with(t, "[prune]", "target_flops = 0.2")], "one budget", 1),
    ("config-output-dir-empty", lambda f, t: ["run", config(t, **{'output_dir = "out"': 'output_dir = " "'})],
     "output_dir", 1),
    ("config-model-section-missing", lambda f, t: ["run", config(t, **{"[model]": "[modell]"})], "model", 1),
    ("config-data-path-missing", lambda f, t: ["run", config(t, **{'calibration = "calib"':
                                                                   'calibration = "nocalib"'})], "nocalib", 1),
    ("config-unknown-section", lambda f, t: ["run", config_with(t, "[prune]", "[pruning]\nx = 1")], "pruning", 1),
    ("config-batch-sizes-empty", lambda f, t: ["run", config(t, **{"batch_sizes = [1, 4]": "batch_sizes = []"})],
     "batch_sizes", 1),
    ("config-backend-misspelt", lambda f, t: ["run", config(t, **{'backends = ["ort-cpu"]': 'backends = ["ort-cpy"]'})],
     "ort-cpu", 1),
    ("config-resolution-unknown", lambda f, t: ["run", config(t, **{'resolution = "global"':
                                                                    'resolution = "glob"'})], "glob", 1),
    ("config-trt-precision-unknown", lambda f, t: ["run", config_with(t, "[export]", 'tensorrt = ["fp8"]')],
     "fp8", 1),
    ("config-int8-method-unknown", lambda f, t: ["run", config_with(t, "[export]", 'int8_method = "mse"')],
     "mse", 1),
    ("config-trt-profile-inverted", lambda f, t: ["run", config_with(t, "[export]", "min_batch = 16")],
     "min_batch", 1),
    ("config-data-mean-bad", lambda f, t: ["run", config_with(t, "samples_per_class = 6", "mean = [0.5, 0.5]")],
     "data.mean", 1),
    ("config-data-seed-negative", lambda f, t: ["run", config_with(t, "samples_per_class = 6", "seed = -1")],
     "data.seed", 1),
    ("config-set-not-key-value", lambda f, t: ["run", config(t), "--set", "prune"], "key=value", 1),
    ("config-set-into-a-value", lambda f, t: ["run", config(t), "--set", "output_dir.x=1"], "not a section", 1),
    ("config-is-a-directory", lambda f, t: ["run", (t / "c.toml").mkdir() or t / "c.toml"], "c.toml", 1),
    ("config-deeply-nested", lambda f, t: ["run", write(t / "c.toml", "a = " + "[" * 5000 + "]" * 5000)], "c.toml",
     1),
    # ONNX and engines
    ("onnx-external-data-outside", lambda f, t: int8(f, t)[:2] + [onnx_external(f, t, "../../etc/passwd")]
     + int8(f, t)[3:], "outside", 1),
    ("onnx-external-data-missing", lambda f, t: int8(f, t)[:2] + [onnx_external(f, t, "weights.bin")]
     + int8(f, t)[3:], "missing", 1),
    ("export-batch-zero", lambda f, t: export_onnx(f, t, "--batch", "0"), "--batch", 64),
    ("export-batch-not-a-number", lambda f, t: export_onnx(f, t, "--batch", "abc"), "--batch", 64),
    ("export-input-shape-zero", lambda f, t: export_onnx(f, t, "--input-shape", "3,0,16"), "--input-shape", 64),
    ("export-tolerance-negative", lambda f, t: export_onnx(f, t, "--tolerance", "-1"), "--tolerance", 64),
    ("export-parity-samples-zero", lambda f, t: export_onnx(f, t, "--parity-samples", "0"), "--parity-samples", 64),
    ("export-exporter-unknown", lambda f, t: export_onnx(f, t, "--exporter", "jit"), "jit", 64),
    ("int8-calib-samples-zero", lambda f, t: int8(f, t, "--calib-samples", "0"), "--calib-samples", 64),
    ("int8-method-unknown", lambda f, t: int8(f, t, "--method", "mse"), "mse", 64),
    ("int8-calib-data-missing", lambda f, t: ["export", "int8", f.onnx, "--out", t / "q.onnx", "--calib-data",
                                              t / "nocal"], "nocal", 1),
    ("int8-out-equals-model", lambda f, t: ["export", "int8", write(t / "m.onnx", f.onnx.read_bytes()), "--out",
                                            t / "m.onnx", "--calib-data", f.images], "m.onnx", 64),
    ("trt-opt-level-nine", lambda f, t: trt(f, t, "--opt-level", "9"), "--opt-level", 64),
    ("trt-profile-inverted", lambda f, t: trt(f, t, "--min-batch", "16"), "min", 64),
    ("trt-precision-unknown", lambda f, t: trt(f, t, "--precision", "fp8"), "fp8", 64),
    # bench
    ("bench-backend-misspelt", lambda f, t: bench(f, t)[:-1] + ["ort-cpy"], "ort-cpu", 64),
    ("bench-batch-sizes-zero", lambda f, t: bench(f, t, "--batch-sizes", "0"), "--batch-sizes", 64),
    ("bench-eval-samples-zero", lambda f, t: bench(f, t, "--eval-samples", "0"), "--eval-samples", 64),
    ("bench-rounds-zero", lambda f, t: bench(f, t, "--rounds", "0"), "--rounds", 64),
    ("bench-threads-zero", lambda f, t: bench(f, t, "--threads", "0"), "--threads", 64),
    ("bench-noise-not-numbers", lambda f, t: bench(f, t, "--noise", "a"), "--noise", 64),
    ("bench-pruned-missing", lambda f, t: bench(f, t)[:2] + [t / "nopruned"] + bench(f, t)[2:], "nopruned", 1),
    ("bench-eval-data-other-classes", lambda f, t: bench(f, t, "--data", (lambda r: [
        (r / f"class{k}").rename(r / f"c{2 - k}") for k in range(3)] and r)(write_image_folder(t / "ev", per_class=2)))[:2]
     + [f.pruned] + bench(f, t)[2:] + ["--data", t / "ev"], "classes", 1),
    ("bench-trt-precision-unknown", lambda f, t: bench(f, t, "--trt-precision", "fp8"), "fp8", 64),
    # usage
    ("unknown-command", lambda f, t: ["prunee"], "prunee", 64),
    ("export-without-target", lambda f, t: ["export"], "TARGET", 64),
    ("misspelt-flag", lambda f, t: prune(f, t, "--traget-flops", "0.3"), "--traget-flops", 64),
]
CASES += MORE_CASES


@pytest.mark.parametrize("case_id,build,needle,code", CASES, ids=[c[0] for c in CASES])
def test_bad_input(fx, tmp_path, monkeypatch, case_id, build, needle, code):
    if case_id in ("tensorrt-missing", "latency-backend-absent"):
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


def test_npz_arrays_are_found_under_the_names_datasets_use(tmp_path):
    """x/y, images/labels, and MedMNIST's split arrays (labels shaped (N, 1)), by --split."""
    from tvsprune.data.sources import open_source

    rng = np.random.default_rng(0)
    train, test = (rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8) for n in (6, 4))
    np.savez(tmp_path / "a.npz", images=test, labels=np.arange(4) % 2)
    np.savez(tmp_path / "med.npz", train_images=train, train_labels=(np.arange(6) % 3)[:, None],
             test_images=test, test_labels=(np.arange(4) % 2)[:, None])
    assert list(open_source(tmp_path / "a.npz").labels) == [0, 1, 0, 1]
    got = open_source(tmp_path / "med.npz", split="train")
    assert len(got) == 6 and list(got.labels) == [0, 1, 2, 0, 1, 2]
    got = open_source(tmp_path / "med.npz")  # the default split: test
    assert len(got) == 4 and torch.equal(got.load(3), torch.from_numpy(test[3]).permute(2, 0, 1).float() / 255)


def test_matrix_size_is_the_readmes():
    from helpers import REPO

    total = len(CASES) + 4  # the four process-level faults below
    assert total >= 150 and len({c[0] for c in CASES}) == len(CASES)
    section = (REPO / "README.md").read_text().split("## Reliability", 1)[1].split("\n## ", 1)[0]
    assert f"{total} cases" in section.replace("\n", " ") or f"{len(CASES)} cases" in section.replace("\n", " ")


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
            assert sha256_file(out / path) == digest, path  # relative to the output folder
