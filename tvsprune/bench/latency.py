"""Moved to :mod:`tvsprune.compare.latency` (the one timing loop); kept so old imports work."""
from ..compare.latency import LatencyConfig, measure_interleaved, summarize  # noqa: F401
