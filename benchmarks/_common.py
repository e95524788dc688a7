"""Helpers shared by the benchmark scripts: locating ../shared, unpacking CIFAR-10 once."""
from __future__ import annotations

import os
import platform
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TVSPRUNE_SHARED", REPO.parent / "shared"))
CACHE = Path(os.environ.get("TVSPRUNE_CACHE", Path.home() / ".cache" / "tvsprune"))
CHECKPOINTS = {"vgg11_bn": SHARED / "models" / "vgg11_bn_cifar10.pt",
               "resnet20": SHARED / "models" / "resnet20_cifar10.pt"}


def cifar10() -> Path:
    """The shared CIFAR-10 JPEG folders (train/, test/), unpacked once into the cache."""
    out = CACHE / "cifar10-jpg"
    if not (out / "test").is_dir():
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(SHARED / "datasets" / "cifar10-jpg.tar.gz") as tar:
            tar.extractall(out, filter="data")
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"
