"""Prune options: every choice of the prune stage and its default, written once.

``PruneOptions`` is what the CLI, the TOML config and the Python API build; ``Guards`` are
the per-layer limits a plan keeps. Nothing here imports another module of ``pruning``
except the registries, so every other module may read a default from here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import NonNegativeInt, PositiveInt, field_validator, model_validator

from ..options import Options, one_of
from .allocations import ALLOCATIONS
from .criteria import CRITERIA

DEFAULT_RIDGE = 1e-3
LARGE_LOSS_POINTS = 3.0  # top-1 points lost beyond which prune and bench say what to try


@dataclass(frozen=True)
class Limit:
    """The finite range a numeric option must lie in (one definition for its flag and its config key)."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    hint: str = ""

    def check(self, name: str, value: float) -> float:
        """``value`` when finite and in range, else a ValueError saying the range (and the hint)."""
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        below = value <= self.low if self.low_open else value < self.low
        above = value >= self.high if self.high_open else value > self.high
        if below or above:
            lo, hi = "(" if self.low_open else "[", ")" if self.high_open or self.high == math.inf else "]"
            top = "inf" if self.high == math.inf else f"{self.high:g}"
            hint = f" ({self.hint})" if self.hint else ""
            raise ValueError(f"{name} must be in {lo}{self.low:g}, {top}{hi}, got {value:g}{hint}")
        return value


FRACTION = "a fraction: 50 % removed is 0.5"
KEPT = "a fraction kept: half the network is 0.5"
LIMITS = {
    "keep_params": Limit(0.0, 1.0, low_open=True, high_open=True, hint=KEPT),
    "keep_macs": Limit(0.0, 1.0, low_open=True, high_open=True, hint=KEPT),
    "target_params": Limit(0.0, 1.0, high_open=True, hint=FRACTION),
    "target_flops": Limit(0.0, 1.0, high_open=True, hint=FRACTION),
    "target_latency": Limit(0.0, 1.0, low_open=True, high_open=True,
                            hint="a fraction of the unpruned latency kept: twice as fast is 0.5"),
    "threshold": Limit(0.0),
    "cost_power": Limit(0.0),
    "min_keep_frac": Limit(0.0, 1.0),
    "ridge": Limit(0.0, low_open=True),
    "max_acc_drop": Limit(-100.0, 100.0),  # negative: the pruned network must gain accuracy
    "step": Limit(0.0, 1.0, low_open=True),
    "step_decrease": Limit(0.0, 1.0, low_open=True),
}


@dataclass
class Guards:
    """Limits that keep a pruned network usable."""

    min_keep_frac: float = 0.1
    min_keep: int = 1
    round_to: int = 1

    def max_removable(self, channels: int) -> int:
        keep = max(self.min_keep, math.ceil(self.min_keep_frac * channels))
        return max(0, channels - min(channels, keep))

    def clamp(self, channels: int, n_remove: int) -> int:
        n = min(max(0, n_remove), self.max_removable(channels))
        if self.round_to > 1 and n > 0:
            kept = channels - n
            kept = min(channels, int(math.ceil(kept / self.round_to) * self.round_to))
            n = channels - kept
        return n


def methods(declared: bool = False) -> tuple[str, ...]:
    """tvs, iter-tvs, then every other registered criterion (read when asked: a criterion
    registered later is a method too). ``declared``: read from the criteria's source without
    importing them (the CLI's parser: no torch for --help)."""
    names = CRITERIA.declared() if declared else CRITERIA.names()
    return ("tvs", "iter-tvs") + tuple(c for c in names if c != "tvs")


def allocation_choices(declared: bool = False) -> tuple[str, ...]:
    return ("auto",) + (ALLOCATIONS.declared() if declared else ALLOCATIONS.names())


# how the TV score is combined before allocation: "none" (the TV score alone), "ls" (times the
# least-squares saliency: least discriminative *and* most reconstructable), "l2" (times the
# filter's L2 norm), "auto" (the most faithful of them, see select_plan)
DEFAULT_TARGET_PARAMS = 0.3  # the budget when none is given (CLI, Python API and run alike)
BUDGETS = ("keep_params", "keep_macs", "target_latency", "target_params", "target_flops", "threshold")
NEEDS_IMAGES = ("the repairs need calibration images (BatchNorm re-estimation, ls-seq, or mean compensation from an "
                "old moments file): give --calib-data (the moments file's data folder was not found) or --no-repair")


class PruneOptions(Options):
    method: str = "tvs"  # tvs, iter-tvs or a registered criterion (methods())
    # the budget, one of: the fraction of parameters or MACs KEPT (keep_params=0.5: half the
    # parameters, 2x fewer); the same as a fraction REMOVED (target_params, target_flops: the
    # older spelling, kept as aliases); a score threshold. DEFAULT_TARGET_PARAMS when none is given
    keep_params: float | None = None
    keep_macs: float | None = None
    target_params: float | None = None
    target_flops: float | None = None
    threshold: float | None = None
    # a latency budget: the fraction of the unpruned network's latency kept on latency_backend at
    # latency_batch (0.5: twice as fast), from a table measured there (pruning/latency.py); the
    # pruned network is then measured against the base and the plan re-made if it misses
    target_latency: float | None = None
    latency_backend: str = "ort-cpu"
    latency_batch: PositiveInt = 32
    latency_precision: Literal["fp32", "int8"] = "fp32"  # int8: the table and the check time INT8 (QDQ) graphs
    # how the table is measured: "layer" (each layer alone) or "network" (the whole network with one
    # group narrowed at a time); benchmarks/latency_budget.py prints both predictions' errors against
    # the networks it measures: mean |error| 0.154 / 0.112 on ResNet-20, 0.076 / 0.222 on VGG-11
    latency_model: Literal["layer", "network"] = "layer"
    # "auto": the candidates of AUTO_CANDIDATES / AUTO_ALLOCATIONS, chosen by fidelity (select_plan);
    # without calibration images cost for parameter budgets, global for MAC budgets (cost
    # keeps VGG-11 within 1 point at 60 % of parameters where global loses 4; it drains
    # ResNet-20's fragile early layers under a MAC budget, where global does not)
    allocation: str = "auto"
    cost_power: float = 2.0
    # guards: the per-layer limits a plan keeps (Guards)
    min_keep_frac: float = 0.1
    min_keep: PositiveInt = 1
    # kept widths in multiples of this; "auto": the latency backend's channel block for a latency
    # budget (pruning.latency.backend_block), none (1) for a parameter or MAC budget, which names no target
    round_to: PositiveInt | Literal["auto"] = "auto"
    pair_reduce: Literal["min", "mean"] = "min"
    seed: NonNegativeInt = 0
    # repairs: the defaults are the best configuration the accuracy benchmark found
    # "auto": ls, and ls-seq too when the repair images are few enough (AUTO_SEQ_IMAGES) and
    # others are held out to compare on; the more faithful network is kept (ls-seq won on
    # ResNet-20 and tied on VGG-11)
    compensation: Literal["none", "mean", "ls", "ls-seq", "auto"] = "auto"
    bn_recalibrate: bool = True
    ridge: float = DEFAULT_RIDGE
    mean_compensation: bool = False  # deprecated spelling of compensation="mean"
    repair_samples_per_class: PositiveInt | None = 100
    # iterative
    max_acc_drop: float = 2.0     # points
    step: float = 0.05            # fraction of the original metric removed per round
    step_decrease: float = 0.025  # the reference code's step shrink on rejection
    max_rounds: PositiveInt = 50
    compare_criteria: bool = True
    # tvs: how the TV score is combined (TVS_SALIENCY); "auto" tries the combinations with the
    # allocations that suit the budget (AUTO_CANDIDATES) and keeps the most faithful pruned
    # network: no single one won on both ResNet-20 and VGG-11 in the accuracy benchmark; "l1" is
    # the L1 norm alone, auto's guard where the TV score ranks channels less faithfully
    tvs_saliency: Literal["auto", "ls", "l2", "none", "l1"] = "auto"
    # what a latency budget removes: channels (the criterion's), or whole same-shape residual
    # blocks replaced by one least-squares convolution or removed (pruning/blocks.py)
    structure: Literal["channels", "blocks"] = "channels"
    device: str = "cpu"

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        return one_of(v, methods(), "method")

    @field_validator("allocation")
    @classmethod
    def _allocation(cls, v: str) -> str:
        return one_of(v, allocation_choices(), "allocation")

    @field_validator("latency_backend")
    @classmethod
    def _latency_backend(cls, v: str) -> str:
        from ..backends import BACKENDS

        return one_of(v, BACKENDS.names(), "latency_backend")

    @model_validator(mode="after")
    def _check(self) -> "PruneOptions":
        for name, limit in LIMITS.items():  # the same finite ranges and words as the flags
            if getattr(self, name) is not None:
                limit.check(name, getattr(self, name))
        given = [k for k in BUDGETS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one budget, not {' and '.join(given)}")
        if not given:  # one default budget for the CLI, the API and run
            self.target_params = DEFAULT_TARGET_PARAMS
        if self.mean_compensation:
            self.compensation, self.mean_compensation = "mean", False
        if self.structure == "blocks" and self.target_latency is None:
            raise ValueError("structure 'blocks' takes a latency budget (target_latency): blocks are chosen by the "
                             "time they save, measured")
        if self.target_latency is not None and self.method == "iter-tvs":
            raise ValueError("iter-tvs takes a parameter or MAC budget; a latency budget is one-shot (method tvs or "
                             "a baseline)")
        return self

    @property
    def block(self) -> int:
        """round_to as a number: "auto" is the latency backend's channel block for a latency budget, 1 otherwise."""
        if self.round_to != "auto":
            return int(self.round_to)
        if self.target_latency is None:
            return 1
        from ..backends.blocks import backend_block

        return backend_block(self.latency_backend, self.latency_precision)

    @property
    def guards(self) -> Guards:
        return Guards(self.min_keep_frac, self.min_keep, self.block)

    @property
    def repairs(self) -> dict[str, Any]:
        return {"compensation": self.compensation, "bn_recalibrate": self.bn_recalibrate, "ridge": self.ridge}

    @property
    def needs_images(self) -> bool:
        return self.bn_recalibrate or self.compensation == "ls-seq"

    @classmethod
    def no_repair(cls, **kw: Any) -> "PruneOptions":
        return cls.build(compensation="none", bn_recalibrate=False, **kw)

    def allocation_for(self, metric: str) -> str:
        """The allocation used for a budget in ``metric`` (params or macs) where no selection runs."""
        if self.allocation != "auto":
            return self.allocation
        return "cost" if metric == "params" else "global"  # macs and latency alike

    def candidates(self, metric: str, criterion: str) -> list[tuple[str | None, str]]:
        """(tvs combination or None, allocation) pairs that ``auto`` chooses among
        (select_plan leaves ``sensitivity`` out on networks with too many groups)."""
        combos = [None] if criterion != "tvs" else None if self.tvs_saliency == "auto" else [self.tvs_saliency]
        metric = "macs" if metric == "latency" else metric  # a latency budget prices cuts like MACs, measured
        if self.allocation == "auto" and combos is None:
            return list(AUTO_CANDIDATES[metric])
        allocs = AUTO_ALLOCATIONS[metric] if self.allocation == "auto" else (self.allocation,)
        return [(c, a) for c in (combos or ("none", "l2", "ls")) for a in allocs]

    def budget(self) -> tuple[float | None, str]:
        """(fraction removed, metric): the one internal form of every budget spelling."""
        if self.keep_macs is not None:
            return 1.0 - self.keep_macs, "macs"
        if self.target_latency is not None:
            return 1.0 - self.target_latency, "latency"
        if self.keep_params is not None:
            return 1.0 - self.keep_params, "params"
        if self.target_flops is not None:
            return self.target_flops, "macs"
        return self.target_params, "params"


def budget_words(metric: str, removed: float | None) -> str:
    """A budget as a person reads it: 'keep 50 % of MACs (2.0x fewer)'."""
    if removed is None:
        return "a score threshold (no budget)"
    what = {"macs": "MACs", "params": "parameters"}.get(metric, metric)
    kept = 1.0 - removed
    if metric == "latency":
        return f"keep {kept * 100:.0f} % of the latency ({1 / kept:.2f}x faster)" if kept > 0 else "no latency"
    return f"keep {kept * 100:.0f} % of {what} ({1 / kept:.2f}x fewer)" if kept > 0 else f"remove every {what}"


def budget_record(budget: dict[str, Any] | None) -> dict[str, Any] | None:
    """A plan's budget with its words ('keep 70 % of parameters (1.43x fewer)')."""
    if not budget:
        return budget
    return {**budget, "in_words": budget_words(budget.get("metric", "params"), budget.get("target"))}


# what ``auto`` tries, by budget metric (benchmarks/accuracy_vs_sparsity.py): the TV score
# with the cost rule wins VGG-11's parameter budgets, TV x L2 with one global threshold
# ResNet-20's, and TV x LS saliency counted by filter magnitude ResNet-20's MAC budgets; the
# cost rule is ruinous under MAC budgets on both (it drains the MAC-heavy early layers);
# TV x LS saliency with measured per-group sensitivity wins VGG-11's MAC budget
AUTO_CANDIDATES = {"params": (("none", "cost"), ("l2", "global"), ("ls", "magnitude"), ("ls", "sensitivity"),
                              ("l1", "sensitivity")),
                   "macs": (("none", "global"), ("l2", "global"), ("ls", "magnitude"), ("ls", "sensitivity"),
                            ("l1", "sensitivity"))}
AUTO_ALLOCATIONS = {"params": ("cost", "global", "magnitude", "sensitivity"),
                    "macs": ("global", "magnitude", "sensitivity")}

TVS_SALIENCY: tuple[str, ...] = get_args(PruneOptions.model_fields["tvs_saliency"].annotation)
COMPENSATIONS: tuple[str, ...] = get_args(PruneOptions.model_fields["compensation"].annotation)  # auto: ls or ls-seq
