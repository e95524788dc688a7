"""Model specs, the CIFAR zoo and safe checkpoint loading (names import on first use)."""
from __future__ import annotations

from ..lazy import lazy

_WHERE = {"LoadedModel": ".spec", "ModelSpec": ".spec", "build_module": ".spec", "load_model": ".spec",
          "parse_kwargs": ".spec", "read_checkpoint": ".spec", "ZOO": ".zoo"}
__getattr__ = lazy(__name__, _WHERE)

__all__ = sorted(_WHERE)
