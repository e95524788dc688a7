"""The prune stage: scores -> plan -> surgery, the iterative driver, repairs and report."""
from .artifact import load_pruned, save_pruned
from .budget import make_plan
from .options import Guards, PruneOptions, methods
from .plan import Plan
from .scores import CRITERIA, hellinger_pairs, layer_scores, ldiff, mean_distance, spearman
from .stage import prune, replay
from .surgery import apply_plan

__all__ = ["CRITERIA", "Guards", "Plan", "PruneOptions", "apply_plan", "hellinger_pairs",
           "layer_scores", "ldiff", "load_pruned", "make_plan", "mean_distance", "methods", "prune", "replay",
           "save_pruned", "spearman"]
