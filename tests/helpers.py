"""Test helpers, importable by every test module: paths, the CLI runner, tiny data and checkpoints."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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


def make_tiny_checkpoint(root: Path, image_folder: Path) -> tuple[str, Path, Path]:
    """A user model file (TinyCNN), its seeded weights with normalisation, and the image folder."""
    import shutil

    from tiny_models import TinyCNN

    root.mkdir(parents=True, exist_ok=True)
    src = root / "tiny_models.py"
    shutil.copy(REPO / "tests" / "tiny_models.py", src)
    torch.manual_seed(0)
    weights = root / "tiny.pt"
    torch.save({"state_dict": randomize_bn(TinyCNN()).state_dict(),
                "normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}, weights)
    return f"{src}:TinyCNN", weights, image_folder


def write_run_config(tmp_path: Path, extra: str = "", prune_extra: str = "") -> Path:
    """A run.toml for TinyCNN on tiny image folders (global resolution, ort-cpu bench), with its files."""
    import shutil

    from tiny_models import TinyCNN

    src = tmp_path / "tiny_models.py"
    shutil.copy(REPO / "tests" / "tiny_models.py", src)
    torch.manual_seed(0)
    torch.save({"state_dict": randomize_bn(TinyCNN()).state_dict(),
                "normalize": {"mean": [0.5] * 3, "std": [0.25] * 3}}, tmp_path / "w.pt")
    write_image_folder(tmp_path / "calib", per_class=8)
    write_image_folder(tmp_path / "eval", per_class=4, seed=1)
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"""output_dir = "out"
{extra}
[model]
spec = "tiny_models.py:TinyCNN"
weights = "w.pt"

[data]
calibration = "calib"
evaluation = "eval"
samples_per_class = 6

[calibrate]
resolution = "global"

[prune]
target_params = 0.3
{prune_extra}

[export]
onnx = true
int8 = false

[bench]
backends = ["ort-cpu"]
batch_sizes = [1, 4]
rounds = 2
iters = 2
eval_samples = 12
""")
    return cfg
