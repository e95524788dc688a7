"""A received pruned artifact never chooses code to run (tvsprune.models.trust)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import run_cli


def _with_base(src: Path, dst: Path, base: dict) -> Path:
    """A copy of artifact ``src`` whose metadata records ``base`` as its base model."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    f = dst / "pruned.safetensors"
    with safe_open(str(f), "pt") as h:
        meta, state = h.metadata(), {k: h.get_tensor(k) for k in h.keys()}
    inner = json.loads(meta["tvsprune"])
    inner["base"] = base
    save_file(state, str(f), metadata={"tvsprune": json.dumps(inner)})
    report = json.loads((dst / "prune.json").read_text())  # a consistent forgery: prune.json re-bound
    report["artifacts"]["weights_sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
    (dst / "prune.json").write_text(json.dumps(report))
    return dst


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny pruned artifact made here (its base is a user .py file), and its inputs."""
    from helpers import make_tiny_checkpoint, write_image_folder

    root = tmp_path_factory.mktemp("trust")
    spec, weights, images = make_tiny_checkpoint(root, write_image_folder(root / "images"))
    r = run_cli("calibrate", spec, "--weights", weights, "--data", images, "--out", root / "m.safetensors",
                "--resolution", "global")
    assert r.returncode == 0, r.stderr
    r = run_cli("prune", spec, "--weights", weights, "--moments", root / "m.safetensors", "--out", root / "p",
                "--method", "l1", "--target-params", "0.3", "--calib-data", images)
    assert r.returncode == 0, r.stderr
    return spec, images, root / "p"


def _one_error(r, *needles: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr)
    errors = [l for l in r.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("command", [["eval", "{dir}", "--data", "{images}"],
                                     ["export", "onnx", "{dir}", "--out", "{tmp}/x.onnx"]])
@pytest.mark.parametrize("spec", ["os:system", "subprocess:getoutput"])
def test_artifact_naming_a_system_call_runs_nothing(pruned, tmp_path, command, spec):
    _, images, src = pruned
    marker = tmp_path / "ran"
    evil = _with_base(src, tmp_path / "evil", {"spec": spec, "kwargs": {"command": f"touch {marker}",
                                                                        "cmd": f"touch {marker}"}})
    args = [a.format(dir=evil, images=images, tmp=tmp_path) for a in command]
    _one_error(run_cli(*args), "is code", "--base-model")
    assert not marker.exists()
    assert not (tmp_path / "x.onnx").exists()


def test_received_artifact_of_user_code_needs_the_base_named(pruned, tmp_path, monkeypatch):
    """The same artifact, from another user (no record of it here): refused until the base is named."""
    spec, images, src = pruned
    received = tmp_path / "received"
    shutil.copytree(src, received)
    env = {"TVSPRUNE_HOME": str(tmp_path / "other-home")}
    _one_error(run_cli("eval", received, "--data", images, env=env), "was not pruned by you", "--base-model")
    r = run_cli("eval", received, "--data", images, "--base-model", spec, env=env)
    assert r.returncode == 0, r.stderr


def test_artifact_pruned_here_loads_without_naming_its_base(pruned):
    _, images, src = pruned
    r = run_cli("eval", src, "--data", images)
    assert r.returncode == 0, r.stderr


def test_a_record_owned_by_another_user_is_not_trusted(pruned, tmp_path, monkeypatch):
    from tvsprune.models import trust
    from tvsprune.artifacts import sha256_file

    _, _, src = pruned
    digest = sha256_file(src / "pruned.safetensors")
    assert trust.recorded(digest) is not None
    real = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real + 1)
    assert trust.recorded(digest) is None


def test_only_zoo_and_hub_names_are_taken_as_recorded(tmp_path):
    """Specs that name no code (registry names) need no record; files and modules do."""
    from tvsprune.models.sources import SOURCES

    assert not SOURCES.find("resnet20").names_code
    assert not SOURCES.find("torchvision:resnet18").names_code
    assert SOURCES.find("os:system").names_code and SOURCES.find(f"{tmp_path}/m.py:Net").names_code


@pytest.mark.parametrize("base", [["not", "a", "dict"], {"kwargs": {}}, {"spec": 3}, {"spec": "resnet20", "kwargs": 1}])
def test_malformed_base_metadata_is_one_line(pruned, tmp_path, base):
    _, images, src = pruned
    bad = _with_base(src, tmp_path / "bad", base)
    _one_error(run_cli("eval", bad, "--data", images), "metadata field 'base'")


def test_folder_mixing_two_prunes_is_refused(pruned, tmp_path):
    """pruned.safetensors of one prune beside prune.json of another: bench refuses, naming the file."""
    spec, images, src = pruned
    mixed = tmp_path / "mixed"
    shutil.copytree(src, mixed)
    other = json.loads((mixed / "prune.json").read_text())
    other["artifacts"]["weights_sha256"] = "0" * 64
    (mixed / "prune.json").write_text(json.dumps(other))
    _one_error(run_cli("bench", spec, mixed, "--weights", str(Path(spec.rsplit(":", 1)[0]).parent / "tiny.pt"),
                       "--out", tmp_path / "r", "--backend", "torch-cpu", "--batch-sizes", "1", "--rounds", "1",
                       "--iters", "1"),
               "pruned.safetensors", "two prunes")
    assert not (tmp_path / "r" / "report.json").exists()
