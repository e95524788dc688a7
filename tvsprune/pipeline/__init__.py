"""The whole pipeline from one config: config schema, stage runner with manifest, demo (names
import on first use)."""
from __future__ import annotations

from ..lazy import lazy

_WHERE = {"RunConfig": ".config", "load_config": ".config", "resolve_paths": ".config", "STAGES": ".run",
          "Pipeline": ".run"}
__getattr__ = lazy(__name__, _WHERE)

__all__ = sorted(_WHERE)
