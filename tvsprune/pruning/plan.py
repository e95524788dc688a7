"""Plans: which channels each coupled group keeps.

A plan is data (JSON): per group its root layer, member layers, original width and the
kept root-channel indices. It can be saved, diffed and re-applied to a fresh model built
from the same spec and weights. Deciding a plan is :mod:`.budget`'s.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..artifacts import write_json
from ..errors import TvsError

if TYPE_CHECKING:
    from .graph import ChannelGraph

FORMAT = "tvsprune.plan/1"


@dataclass
class Plan:
    groups: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def layers(self) -> dict[str, list[int]]:
        """Kept root-channel indices per member layer (coupled members share them)."""
        return {m: g["kept"] for g in self.groups for m in g["members"]}

    def removed(self) -> list[np.ndarray]:
        return [np.setdiff1d(np.arange(g["channels"]), np.asarray(g["kept"], dtype=np.int64)) for g in self.groups]

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **self.meta, "groups": self.groups}

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "plan") -> "Plan":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise TvsError(f"{source}: not a tvsprune plan (format {d.get('format') if isinstance(d, dict) else None!r},"
                           f" expected {FORMAT})")
        groups = d.get("groups")
        if not isinstance(groups, list):
            raise TvsError(f"{source}: 'groups' must be a list")
        for i, g in enumerate(groups):
            try:
                c, kept = g["channels"], list(g["kept"])
                str(g["root"]), list(g["members"])
            except (KeyError, TypeError, ValueError) as e:
                raise TvsError(f"{source}: group {i} is malformed ({e})") from None
            bad = [k for k in [c, *kept] if type(k) is not int]  # noqa: E721 (bool and float are refused)
            if bad:
                raise TvsError(f"{source}: group {g.get('root')!r} holds non-integer channel indices or width "
                               f"({bad[0]!r}): refusing to cast them")
            if not kept:
                raise TvsError(f"{source}: group {g['root']!r} keeps no channel")
            if len(set(kept)) != len(kept):
                dup = next(k for k in kept if kept.count(k) > 1)
                raise TvsError(f"{source}: group {g['root']!r} keeps channel {dup} twice (duplicate index)")
            outside = [k for k in kept if not 0 <= k < c]
            if outside:
                raise TvsError(f"{source}: group {g['root']!r} keeps channel {outside[0]}, outside its width {c}")
            g["kept"] = sorted(kept)
        meta = {k: v for k, v in d.items() if k not in ("format", "groups")}
        return cls(groups, meta)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise TvsError(f"plan not found: {path}") from None
        except IsADirectoryError:
            raise TvsError(f"{path} is a directory, not a plan.json") from None
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
            raise TvsError(f"{path}: corrupt plan (invalid JSON: {str(e)[:100]})") from None
        return cls.from_dict(d, str(path))


def plan_groups(graph: ChannelGraph, removed: list[np.ndarray]) -> list[dict[str, Any]]:
    """A plan's groups: per group of ``graph``, the root-channel indices it keeps once ``removed`` go."""
    return [{"root": g.root, "members": list(g.members), "channels": g.channels,
             "kept": [int(k) for k in np.setdiff1d(np.arange(g.channels), rm)]}
            for g, rm in zip(graph.groups, removed)]
