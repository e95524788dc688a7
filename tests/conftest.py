"""Shared fixtures (helpers live in helpers.py, which test modules import directly)."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import CIFAR_TGZ, MODELS, REPO, make_tiny_checkpoint, run_cli, write_image_folder


def pytest_configure(config) -> None:
    """tvsprune's per-user state (the record of artifacts pruned here) in a folder of this test
    session's own, inherited by the CLI subprocesses: tests never read or write the real one."""
    import os
    import tempfile

    os.environ["TVSPRUNE_HOME"] = tempfile.mkdtemp(prefix="tvsprune-home-")
    _keep_freed_memory()


# glibc's malloc hands every large freed buffer (a batch's activations) back to the kernel and
# takes it again zero-filled on the next forward pass: measured on ResNet-20, 256 images at a
# time, 0.26 s per pass against 0.15 s with the thresholds below, and `tvsprune prune` (auto)
# 47 s against 33 s, a third of it system time. The tests only: timings in benchmarks/ and
# bench run with the allocator's defaults, as a user's process does.
_MALLOC = {"MALLOC_MMAP_THRESHOLD_": 256 << 20, "MALLOC_TRIM_THRESHOLD_": 256 << 20}


def _keep_freed_memory() -> None:
    """The thresholds for the CLI subprocesses (environment) and this process (mallopt, glibc only)."""
    import ctypes
    import ctypes.util
    import os

    for k, v in _MALLOC.items():
        os.environ.setdefault(k, str(v))
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to set
        return
    mallopt(-3, _MALLOC["MALLOC_MMAP_THRESHOLD_"])  # M_MMAP_THRESHOLD
    mallopt(-1, _MALLOC["MALLOC_TRIM_THRESHOLD_"])  # M_TRIM_THRESHOLD


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images")


@pytest.fixture
def tiny_model_file(tmp_path: Path) -> Path:
    """A user model file exposing TinyCNN, plus its weights (seeded)."""
    src = tmp_path / "tiny_models.py"
    src.write_text((REPO / "tests" / "tiny_models.py").read_text())
    return src


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """The shared CIFAR-10 JPEG folders, unpacked once per session (skips when absent)."""
    if not CIFAR_TGZ.exists():
        pytest.skip(f"shared dataset not found: {CIFAR_TGZ}")
    import tarfile

    out = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(CIFAR_TGZ) as tar:
        tar.extractall(out, filter="data")
    return out


@pytest.fixture(scope="session")
def shared_models() -> Path:
    if not (MODELS / "resnet20_cifar10.pt").exists():
        pytest.skip(f"shared models not found in {MODELS}")
    return MODELS


@pytest.fixture
def tiny_setup(tmp_path, image_folder) -> tuple[str, Path, Path]:
    """A user model file with saved weights (and normalisation), and an image folder of 3 classes."""
    return make_tiny_checkpoint(tmp_path / "tiny", image_folder)


@pytest.fixture(scope="session")
def tiny_calibrated(tmp_path_factory) -> tuple[str, Path, Path, Path]:
    """The same, calibrated once per session (read-only: tests write into their own tmp_path)."""
    root = tmp_path_factory.mktemp("tiny-calibrated")
    spec, weights, images = make_tiny_checkpoint(root, write_image_folder(root / "images"))
    moments = root / "m.safetensors"
    r = run_cli("calibrate", spec, "--weights", weights, "--data", images, "--out", moments, "--samples-per-class", "3")
    assert r.returncode == 0, r.stderr
    return spec, weights, images, moments
