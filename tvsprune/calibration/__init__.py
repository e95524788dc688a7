"""The calibrate stage: hooks, streaming moments (Chan merge), file format, distributed reduction."""
from .collector import MomentCollector, collect_moments
from .resolution import parse_resolution, reduce_map
from .moments import InputMoments, LayerMoments, Moments
from ..data.options import DataOptions
from .options import CalibrateOptions
from .stage import calibrate, merge_moment_files

__all__ = ["CalibrateOptions", "DataOptions", "InputMoments", "LayerMoments", "MomentCollector", "Moments", "calibrate", "collect_moments",
           "merge_moment_files", "parse_resolution", "reduce_map"]
