"""The calibrate stage: hooks, streaming moments (Chan merge), file format, distributed reduction.

Names are imported on first use, so the CLI's parser can read ``calibration.options`` without
importing torch (``tvsprune --help`` stays fast)."""
from __future__ import annotations

from ..lazy import lazy

_WHERE = {"MomentCollector": ".collector", "collect_moments": ".collector", "parse_resolution": ".resolution",
          "reduce_map": ".resolution", "InputMoments": ".moments", "LayerMoments": ".moments", "Moments": ".moments",
          "DataOptions": "..data.options", "CalibrateOptions": ".options", "calibrate": ".stage",
          "merge_moment_files": ".stage"}

__getattr__ = lazy(__name__, _WHERE)


__all__ = sorted(_WHERE)
