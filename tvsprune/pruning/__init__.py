"""The prune stage: scores -> plan -> surgery, the iterative driver, repairs and report.

Names are imported on first use, so ``pruning.options`` (read by the CLI's parser) does not
import the stage and torch with it."""
from __future__ import annotations

from ..lazy import lazy

_WHERE = {"load_pruned": ".artifact", "save_pruned": ".artifact", "make_plan": ".budget", "Guards": ".options",
          "PruneOptions": ".options", "methods": ".options", "Plan": ".plan", "CRITERIA": ".scores",
          "hellinger_pairs": ".scores", "layer_scores": ".scores", "ldiff": ".scores", "mean_distance": ".scores",
          "spearman": ".scores", "prune": ".stage", "replay": ".stage", "apply_plan": ".surgery"}

__getattr__ = lazy(__name__, _WHERE)


__all__ = sorted(_WHERE)
