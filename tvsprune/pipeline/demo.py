"""``tvsprune demo``: the full pipeline on the ResNet-20 and CIFAR-10 images shipped in the package."""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "demo_assets"
CONFIG = ASSETS / "demo.toml"
