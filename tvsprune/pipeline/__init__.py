"""The whole pipeline from one config: config schema, stage runner with manifest, demo."""
from .config import RunConfig, load_config, resolve_paths
from .run import STAGES, Pipeline

__all__ = ["Pipeline", "RunConfig", "STAGES", "load_config", "resolve_paths"]
