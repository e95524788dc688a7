"""Packages whose names import on first use: ``__getattr__ = lazy(__name__, {name: module})``.

The CLI's parser reads the option modules of several packages; with their ``__init__``
importing the stages, ``tvsprune --help`` imported torch (1.7 s). A name a package exports is
now imported when first read (``from tvsprune.pruning import prune`` works as before)."""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """The package's module ``__getattr__``: ``name`` from the module ``where[name]`` (relative to
    ``package``)."""
    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(where[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
