"""Allocations: how many channels each coupled group loses for one scalar ``lam`` in [0, 1].

``make_plan`` bisects ``lam`` until the budget is met, so a rule must be monotone in it.
Each rule is one module here, registered in ``ALLOCATIONS``; within a group, channels always
go in ascending score order. To add one:

    from . import ALLOCATIONS, Allocation

    @ALLOCATIONS.entry("sqrt-uniform", instantiate=False)
    class SqrtUniform(Allocation):
        def n_remove(self, a, i, lam):
            return int(lam ** 0.5 * a.channels[i])

and a test; ``--allocation sqrt-uniform`` works in the CLI, the config and the API.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from ...registry import Registry


class Allocation:
    """One allocation rule. ``setup`` sees the whole allocator once; ``n_remove`` is per group."""

    name: ClassVar[str] = ""

    def transform(self, gscores: list[np.ndarray | None], orders: list[np.ndarray | None]) -> list[np.ndarray | None]:
        """The scores the rule compares (default: as they are)."""
        return gscores

    def setup(self, a: "Allocator", ldiffs: list[float] | None, unit_costs: list[float] | None,
              cost_power: float) -> None:
        a.weights = np.ones(len(a.gscores))

    def n_remove(self, a: "Allocator", i: int, lam: float) -> int:
        raise NotImplementedError


ALLOCATIONS: Registry[type] = Registry("allocation", package=__name__)


def removal_order(t: np.ndarray) -> np.ndarray:
    """Channels in the order they go: ascending score, ties by index."""
    return np.argsort(t, kind="stable")


class Allocator:
    """Maps one scalar ``lam`` in [0, 1] to a number of channels to remove per group (monotone)."""

    def __init__(self, allocation: str, gscores: list[np.ndarray | None], channels: list[int],
                 guards, ldiffs: list[float] | None = None, unit_costs: list[float] | None = None,
                 cost_power: float = 1.0, count_scores: list[np.ndarray | None] | None = None,
                 curves: list[list[tuple[int, float]] | None] | None = None,
                 savings: list[list[float] | None] | None = None) -> None:
        self.rule: Allocation = ALLOCATIONS.get(allocation)()
        self.allocation = allocation
        self.orders = [None if t is None else removal_order(t) for t in gscores]
        self.gscores = self.rule.transform(gscores, self.orders)
        self.channels, self.guards = channels, guards
        self.count_scores = count_scores  # a second per-group score some rules count by (magnitude)
        self.curves = curves  # per group, measured (count, KL) points (sensitivity)
        self.savings = savings  # per group, what each of its curve's cuts saves alone in the budget's metric
        self.means = [float(t.mean()) if t is not None else 0.0 for t in self.gscores]
        self.rule.setup(self, ldiffs, unit_costs, cost_power)

    def counts(self, lam: float) -> list[int]:
        return [0 if t is None else self.guards.clamp(c, self.rule.n_remove(self, i, lam))
                for i, (t, c) in enumerate(zip(self.gscores, self.channels))]

    def removed(self, counts: list[int]) -> list[np.ndarray]:
        return [np.sort(o[:n]) if o is not None else np.empty(0, dtype=np.int64)
                for o, n in zip(self.orders, counts)]


__all__ = ["ALLOCATIONS", "Allocation", "Allocator"]
