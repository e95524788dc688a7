"""Shared fixtures: tiny models built in code, tiny data written on the fly, shared/ paths."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TVSPRUNE_SHARED", REPO.parent / "shared"))
MODELS = SHARED / "models"
CIFAR_TGZ = SHARED / "datasets" / "cifar10-jpg.tar.gz"


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run ``python -m tvsprune ARGS`` and return the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "tvsprune", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=timeout)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics so equivalence tests mean something."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def write_image_folder(root: Path, classes: int = 3, per_class: int = 6, size: int = 16, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k in range(classes):
        d = root / f"class{k}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = (rng.random((size, size, 3)) * 80 + k * 60).clip(0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i:03d}.png")
    return root


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
