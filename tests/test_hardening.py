"""Inputs that used to give a silently wrong result: each is now one error line and no file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import randomize_bn, run_cli, write_image_folder
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
    _one_error(run_cli("calibrate", spec, "--weights", weights, "--data", data, "--out", out, *flags), needle,
               code=64)  # flag values: usage errors, checked before the model loads
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


def test_sixteen_bit_images_keep_their_values(tmp_path):
    """A 16-bit greyscale PNG is scaled by 65535, not clipped to white by an 8-bit conversion."""
    from PIL import Image

    from tvsprune.data.sources import _pixels

    a = (np.arange(16 * 16).reshape(16, 16) * 200).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I;16")
        x = _pixels(im)
    assert x.shape == (3, 16, 16)
    np.testing.assert_allclose(x[0].numpy(), a / 65535.0, rtol=1e-6)
    assert float(x.mean()) < 0.5  # the 8-bit conversion made 98 % of these pixels 1.0


@pytest.mark.parametrize("case", ["weights", "inside-data"])
def test_output_over_an_input_is_refused_and_the_input_kept(tiny_setup, tmp_path, case):
    spec, weights, images = tiny_setup
    before = weights.read_bytes()
    out = weights if case == "weights" else images / "m.safetensors"
    _one_error(run_cli("calibrate", spec, "--weights", weights, "--data", images, "--out", out),
               "--out", "is" if case == "weights" else "is inside", code=64)
    assert weights.read_bytes() == before and not (images / "m.safetensors").exists()


@pytest.mark.parametrize("flag,value,needle", [("--threshold", "nan", "finite"), ("--target-flops", "50", "0.5"),
                                                ("--min-keep-frac", "nan", "finite"), ("--ridge", "-1", "(0, inf)"),
                                                ("--step", "0", "(0, 1]"), ("--seed", "-1", ">= 0")])
def test_numeric_flags_are_finite_and_in_range_before_any_model_loads(tmp_path, flag, value, needle):
    r = run_cli("prune", "resnet20", "--out", tmp_path / "p", flag, value)
    _one_error(r, flag, needle, code=64)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("key,value,needle", [("threshold", "nan", "finite"), ("target_flops", "50", "0.5"),
                                               ("round_to", "0", "greater than 0"), ("ridge", "-1", "(0, inf)")])
def test_config_values_get_the_flags_checks(tmp_path, key, value, needle):
    from helpers import write_run_config

    from tvsprune.errors import TvsError
    from tvsprune.pipeline import load_config

    cfg = write_run_config(tmp_path)
    with pytest.raises(TvsError, match=None) as e:
        load_config(cfg, [f"prune.{key}={value}"])
    assert needle in str(e.value) and "\n" not in str(e.value)


def _moments_with(tiny_calibrated, tmp_path, edit):
    """A copy of the session's tiny moments file with one tensor edited."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    spec, weights, images, moments = tiny_calibrated
    with safe_open(str(moments), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    return spec, weights, images, bad


@pytest.mark.parametrize("what,needle", [("nan", "NaN or Inf"), ("negative-var", "negative"),
                                         ("class-count", "classes")])
def test_damaged_moments_are_refused_at_prune(tiny_calibrated, tmp_path, what, needle):
    def edit(t):
        key = next(k for k in t if k.endswith("/var") and not k.startswith("@in/"))
        if what == "nan":
            t[key][0, 0, 0] = float("nan")
        elif what == "negative-var":
            t[key][0, 0, 0] = -1.0
        else:
            count = key.rsplit("/", 1)[0] + "/count"
            t[count] = torch.cat([t[count], t[count][:1]])
    spec, weights, images, bad = _moments_with(tiny_calibrated, tmp_path, edit)
    _one_error(run_cli("prune", spec, "--weights", weights, "--moments", bad, "--out", tmp_path / "p",
                       "--calib-data", images), needle)
    assert not (tmp_path / "p").exists()


def test_a_model_with_nan_outputs_is_refused_at_calibrate(tmp_path):
    from tvsprune.calibration import collect_moments
    from tvsprune.errors import TvsError
    from tvsprune.models.probe import probe_model

    model = randomize_bn(TinyCNN())
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0] = float("nan")
    x = torch.rand(12, 3, 16, 16)
    with pytest.raises(TvsError, match="NaN or Inf"):
        collect_moments(model, probe_model(model, x[:1]), [(x, torch.arange(12) % 3)], ["a", "b", "c"])


def test_validation_classes_must_be_the_calibration_classes(tiny_calibrated, tmp_path):
    from helpers import write_image_folder

    spec, weights, images, moments = tiny_calibrated
    val = write_image_folder(tmp_path / "val", per_class=2)
    (val / "class2").rename(val / "zebra")
    _one_error(run_cli("prune", spec, "--weights", weights, "--moments", moments, "--out", tmp_path / "p",
                       "--calib-data", images, "--val-data", val), "--val-data", "zebra")


@pytest.mark.parametrize("args,needle", [
    (["calibrate", "resnet20", "--data", ".", "--out", "m.safetensors", "--device", "tpu"], "torch device"),
    (["calibrate", "resnet20", "--data", ".", "--out", "m.safetensors", "--resolution", "pool:1000"], "at most 64"),
    (["calibrate", "resnet20", "--data", ".", "--out", "m.safetensors", "--resize", "100000"], "at most 4096"),
    (["export", "onnx", "resnet20", "--out", "x.onnx", "--batch", "abc"], "positive integer"),
    (["export", "onnx", "resnet20", "--out", "x.onnx", "--batch", "0"], "positive integer"),
])
def test_bad_flag_values_are_usage_errors_before_anything_loads(tmp_path, args, needle):
    _one_error(run_cli(*args, cwd=tmp_path), needle, code=64)
    assert not list(tmp_path.iterdir())


def test_moments_state_over_its_bound_is_refused_before_allocation(monkeypatch):
    from tvsprune.calibration import collector
    from tvsprune.errors import TvsError
    from tvsprune.models.probe import probe_model

    model = randomize_bn(TinyCNN())
    probe = probe_model(model, torch.zeros(1, 3, 16, 16))
    monkeypatch.setattr(collector, "STATE_MAX_BYTES", 1000)
    with pytest.raises(TvsError, match="over the bound of"):
        collector.MomentCollector(model, probe.layers, 3, "full")


def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import Image

    from tvsprune.data import sources

    (tmp_path / "a").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "a" / "big.png")
    monkeypatch.setattr(sources, "MAX_PIXELS", 1000)
    src = sources.ImageFolderSource(tmp_path, sources.Preprocess())
    with pytest.raises(sources.BadSample, match="64 x 64 pixels, over the bound"):
        src.load(0)


def test_a_prune_that_fails_while_writing_keeps_the_earlier_artifact(tiny_calibrated, tmp_path, monkeypatch):
    """The new files are written beside the old ones and swapped in only once all are written."""
    from tvsprune.models import load_model
    from tvsprune.pruning import stage
    from tvsprune.pruning.options import PruneOptions

    spec, weights, images, moments = tiny_calibrated
    out = tmp_path / "p"
    r = run_cli("prune", spec, "--weights", weights, "--moments", moments, "--out", out, "--target-params", "0.3",
                "--method", "l1", "--calib-data", images)
    assert r.returncode == 0, r.stderr
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stage, "write_json", disk_full)  # prune.json, the last file written
    from tvsprune.data.options import DataOptions

    with pytest.raises(OSError):
        stage.prune(load_model(spec, str(weights)), moments, out, PruneOptions(method="l2", target_params=0.5),
                    DataOptions(path=str(images)))
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_the_output_lock_is_taken_on_the_real_path(tmp_path):
    """A second writer reaching the same folder through a symlink is refused like one naming it."""
    from tvsprune.artifacts import output_lock
    from tvsprune.errors import TvsError

    real = tmp_path / "out"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with output_lock(real, "dir"):
        with pytest.raises(TvsError, match="being written by another"):
            with output_lock(tmp_path / "link", "dir"):
                pass


def test_a_model_file_that_exits_on_import_is_one_error(tmp_path, image_folder):
    (tmp_path / "m.py").write_text("import sys\nsys.exit(0)\n")
    _one_error(run_cli("calibrate", f"{tmp_path / 'm.py'}:Net", "--data", image_folder, "--out", tmp_path / "o.st",
                       "--allow-random-weights"), "sys.exit(0)")


def test_a_data_file_replaced_with_its_size_and_mtime_kept_changes_the_digest(tmp_path):
    """run reuses a stage only when its data is the same by content, not by name, size and mtime."""
    import os

    from tvsprune.artifacts import content_digest

    root = write_image_folder(tmp_path / "imgs", classes=2, per_class=2)
    f = sorted(root.rglob("*.png"))[0]
    before, st = content_digest(root), f.stat()
    data = bytearray(f.read_bytes())
    data[-20] ^= 0xFF  # same size, other bytes
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert content_digest(root) != before


def test_one_image_per_class_gives_no_tv_scores_but_still_prunes_by_l1(tiny_setup, tmp_path):
    """One calibration image per class has no class variance: the TV bound would have ranked filters on
    the variance floor alone (every filter 'dead'). calibrate warns, a TV prune is one error line and no
    output, and a criterion that needs no variance still prunes."""
    spec, weights, _ = tiny_setup
    data = write_image_folder(tmp_path / "one", classes=3, per_class=1)
    moments = tmp_path / "m.safetensors"
    r = run_cli("calibrate", spec, "--weights", weights, "--data", data, "--out", moments)
    assert r.returncode == 0 and "3 of 3 classes have one calibration image" in r.stderr, r.stderr
    base = ("prune", spec, "--weights", weights, "--moments", moments, "--target-params", "0.3", "--calib-data", data)
    _one_error(run_cli(*base, "--out", tmp_path / "tv"), "2 calibration images each")
    assert not (tmp_path / "tv").exists()
    r = run_cli(*base, "--method", "l1", "--out", tmp_path / "l1")
    assert r.returncode == 0 and (tmp_path / "l1" / "plan.json").is_file(), r.stderr
