"""Inputs that used to give a silently wrong result: each is now one error line and no file."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import randomize_bn, run_cli
from tiny_models import TinyCNN



def _one_error(r, *needles: str, code: int = 1) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    errors = [l for l in r.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in errors[0], errors[0]


def test_nan_weights_are_refused(tiny_setup, tmp_path):
    spec, weights, data = tiny_setup
    sd = randomize_bn(TinyCNN()).state_dict()
    sd["features.4.weight"][0, 0, 0, 0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save({"state_dict": sd}, bad)
    out = tmp_path / "m.safetensors"
    _one_error(run_cli("calibrate", spec, "--weights", bad, "--data", data, "--out", out), "features.4.weight", "NaN")
    assert not out.exists()


@pytest.mark.parametrize("flags,needle", [
    (["--std", "0,0,0"], "positive"),
    (["--mean", "0.5,0.5"], "1 or 3"),
    (["--mean", "0.5,0.5", "--std", "0.2,0.2"], "1 or 3"),
    (["--mean", "0.5", "--std", "0"], "positive"),
])
def test_bad_normalisation_is_refused(tiny_setup, tmp_path, flags, needle):
    spec, weights, data = tiny_setup
    out = tmp_path / "m.safetensors"
    _one_error(run_cli("calibrate", spec, "--weights", weights, "--data", data, "--out", out, *flags), needle)
    assert not out.exists()


def test_mean_alone_is_used_with_the_checkpoints_std(tiny_setup, tmp_path):
    spec, weights, data = tiny_setup
    out = tmp_path / "m.safetensors"
    r = run_cli("calibrate", spec, "--weights", weights, "--data", data, "--out", out, "--mean", "0.4,0.4,0.4")
    assert r.returncode == 0, r.stderr
    from tvsprune.calibration import Moments

    pre = Moments.load(out).meta["data"]["preprocess"]
    assert pre["mean"] == [0.4, 0.4, 0.4] and pre["std"] == [0.25, 0.25, 0.25]


def test_calibrate_without_weights_is_refused_unless_asked(tiny_setup, tmp_path):
    spec, _, data = tiny_setup
    out = tmp_path / "m.safetensors"
    _one_error(run_cli("calibrate", spec, "--data", data, "--out", out), "--weights")
    assert not out.exists()
    r = run_cli("calibrate", spec, "--data", data, "--out", out, "--allow-random-weights")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("value", [1.0, True, "2"])
def test_plan_with_non_integer_indices_is_refused(tiny_setup, tmp_path, value):
    spec, weights, data = tiny_setup
    moments, out = tmp_path / "m.safetensors", tmp_path / "p"
    assert run_cli("calibrate", spec, "--weights", weights, "--data", data, "--out", moments).returncode == 0
    r = run_cli("prune", spec, "--weights", weights, "--moments", moments, "--target-params", "0.3", "--out", out)
    assert r.returncode == 0, r.stderr
    plan = json.loads((out / "plan.json").read_text())
    plan["groups"][0]["kept"][0] = value
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(plan))
    _one_error(run_cli("replay", spec, "--weights", weights, "--plan", bad, "--out", tmp_path / "r"), "non-integer")
    assert not (tmp_path / "r").exists()


def test_unsupported_opset_is_refused(tmp_path):
    out = tmp_path / "m.onnx"
    _one_error(run_cli("export", "onnx", "resnet20", "--out", out, "--opset", "3"), "--opset 3")
    assert not out.exists()


def test_zero_batch_size_is_a_usage_error(tmp_path):
    r = run_cli("bench", "resnet20", "--data", tmp_path, "--out", tmp_path / "b", "--batch-sizes", "0")
    assert r.returncode == 64 and "positive" in r.stderr and "Traceback" not in r.stderr


def test_requested_missing_backend_fails_with_exit_2(tiny_setup, tmp_path):
    pytest.importorskip("onnxruntime")
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    spec, weights, data = tiny_setup
    out = tmp_path / "bench"
    r = run_cli("bench", spec, "--weights", weights, "--data", data, "--out", out, "--backend", "tensorrt")
    _one_error(r, "tensorrt", code=2)
    assert "PASSED" not in r.stderr + r.stdout


def test_table_columns_are_the_union_of_row_keys(capsys):
    from tvsprune.console import print_table

    print_table([{"model": "a", "p50": 1.5}, {"model": "b", "int8": 2.5, "p50": 3.5}])
    out = capsys.readouterr().out
    header = next(l for l in out.splitlines() if "model" in l)
    row_b = next(l for l in out.splitlines() if " b " in l or "│ b" in l)
    assert header.index("int8") > header.index("p50")
    assert row_b.index("3.5") < row_b.index("2.5")  # p50 value under p50, int8 value under int8


def test_pruned_artifact_survives_a_move_and_a_changed_model_file(tiny_setup, tmp_path):
    """The artifact records its user model file by absolute path and hash, and keeps a copy."""
    import shutil

    from tvsprune.models import load_model

    spec, weights, data = tiny_setup
    moments, out = tmp_path / "m.safetensors", tmp_path / "p"
    assert run_cli("calibrate", spec, "--weights", weights, "--data", data, "--out", moments).returncode == 0
    assert run_cli("prune", spec, "--weights", weights, "--moments", moments, "--out", out).returncode == 0
    assert (out / "model_source.py").is_file()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        want = load_model(str(out)).module(x)
    moved = tmp_path / "elsewhere" / "p"
    shutil.move(str(out), moved)
    src = spec.rsplit(":", 1)[0]
    with open(src, "a") as f:  # the original file changes after pruning ...
        f.write("\nraise RuntimeError('edited after pruning')\n")
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(moved)).module(x), want)  # ... the copy is used
    (moved / "model_source.py").write_text("# altered\n")
    import os

    os.remove(src)
    _one_error(run_cli("eval", moved, "--data", data), "model_source.py", "restore")
