"""The prune stage: scores -> plan -> surgery, the iterative driver, repairs and report."""
from .artifact import load_pruned, save_pruned
from .plan import Guards, Plan, make_plan
from .scores import CRITERIA, hellinger_pairs, layer_scores, ldiff, mean_distance, spearman
from .stage import PruneOptions, methods, prune, replay
from .surgery import apply_plan

__all__ = ["CRITERIA", "Guards", "Plan", "PruneOptions", "apply_plan", "hellinger_pairs",
           "layer_scores", "ldiff", "load_pruned", "make_plan", "mean_distance", "methods", "prune", "replay",
           "save_pruned", "spearman"]
