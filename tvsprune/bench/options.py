"""``BenchOptions``: what bench measures and how long it takes (the ``[bench]`` section, the
bench flags and :func:`tvsprune.bench`)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveInt, field_validator

from ..backends import BACKENDS
from ..compare.latency import LatencyConfig
from ..options import Options, one_of


class BenchOptions(Options):
    backends: list[str] | None = None  # None: every backend present, in the registry's order
    batch_sizes: list[PositiveInt] = Field(default_factory=lambda: [1, 8, 32], min_length=1)
    rounds: PositiveInt = LatencyConfig.rounds  # A B A B ... rounds
    iters: PositiveInt = LatencyConfig.iters    # timed iterations per model per round
    eval_samples: PositiveInt | None = 2000      # images for accuracy (stratified); None: all
    noise: list[float] = Field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2])
    trt_precision: Literal["fp32", "fp16", "bf16", "int8"] = "fp16"
    threads: PositiveInt | None = None
    seed: NonNegativeInt = 0
    input_shape: list[PositiveInt] | None = None  # C,H,W when neither the models nor the data tell it
    max_drop: float | None = Field(2.0, ge=0, le=100)  # points of top-1 a recommended model may lose (None: any)
    fail_if: str | None = None  # a gate on the verdict, e.g. "max_drop=1.5,min_speedup=1.3" (exit 4 when missed)

    @field_validator("fail_if")
    @classmethod
    def _gate(cls, v: str | None) -> str | None:
        from .verdict import parse_gate

        parse_gate(v)
        return v

    @field_validator("backends")
    @classmethod
    def _backends(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else [one_of(b, BACKENDS.names(), "backend") for b in v]

    @property
    def latency(self) -> LatencyConfig:
        return LatencyConfig(rounds=self.rounds, iters=self.iters)
