"""Named, typed registries: what varies (criteria, allocations, model sources, backends, ...)
is registered by name in one place and looked up with an error that names the closest match.

    CRITERIA: Registry[Criterion] = Registry("criterion")

    @CRITERIA.entry("l1")
    class L1(WeightCriterion): ...

    CRITERIA.get("l11")   # TvsError: unknown criterion 'l11' (did you mean 'l1'? one of: ...)

A registry may be given a package whose modules register their entries when imported
(``package=``): a new entry is then one new module in that package, with no list to edit.
Modules are imported on the first lookup, so importing a registry stays cheap.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import pkgutil
from pathlib import Path
from typing import Callable, Generic, Iterator, TypeVar

from .errors import TvsError

T = TypeVar("T")


def closest(name: str, choices: list[str] | tuple[str, ...]) -> str | None:
    """The valid name nearest to a misspelt one, or None when nothing is close."""
    found = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.4)
    return found[0] if found else None


def unknown(kind: str, name: object, choices: list[str] | tuple[str, ...]) -> str:
    """'unknown criterion 'tsv' (did you mean 'tvs'? one of: ...)': the one wording for a bad name."""
    near = closest(str(name), choices)
    hint = f"did you mean {near!r}? " if near else ""
    return f"unknown {kind} {name!r} ({hint}valid: {', '.join(choices)})"


class Registry(Generic[T]):
    """Entries of one kind, by name, in registration order."""

    def __init__(self, kind: str, package: str | None = None, also: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._package = package
        self._also = also  # modules elsewhere that register entries here (imported on first lookup too)
        self._loaded = package is None and not also
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None) -> Callable[[T], T] | T:
        """``register("x", obj)``, or ``@register("x")`` on a class or function."""
        def add(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add(entry) if entry is not None else add

    def entry(self, name: str, instantiate: bool = True) -> Callable[[type], type]:
        """``@entry("x")`` on a class: names it (``cls.name``) and registers it (an instance, or
        the class itself with ``instantiate=False``)."""
        def add(cls: type) -> type:
            cls.name = name
            self.register(name, cls() if instantiate else cls)
            return cls

        return add

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        modules = list(self._also)
        if self._package:
            pkg = importlib.import_module(self._package)
            modules += [f"{self._package}.{i.name}" for i in sorted(pkgutil.iter_modules(pkg.__path__),
                                                                    key=lambda i: i.name) if not i.name.startswith("_")]
        for name in modules:
            importlib.import_module(name)

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise TvsError(unknown(self.kind, name, self.names())) from None

    def names(self) -> tuple[str, ...]:
        """Registration order; alphabetical for a package's entries (import order is not theirs to set)."""
        self._load()
        return tuple(sorted(self._entries)) if self._package or self._also else tuple(self._entries)

    def declared(self) -> tuple[str, ...]:
        """``names()``, read without importing the package's modules where they are not imported
        yet: every ``REGISTRY.entry("name")`` / ``REGISTRY.register("name", ...)`` with a literal
        name in their source, where REGISTRY is the name the package's ``__init__`` gives this
        registry. The CLI's parser lists the criteria so without importing torch; a test checks
        that it equals ``names()`` for every package registry. Falls back to ``names()`` (a
        registry with ``also=``, a name computed at run time, a package it cannot read)."""
        spec = None if self._loaded or self._also or not self._package else importlib.util.find_spec(self._package)
        if spec is None or not spec.origin or not spec.submodule_search_locations:
            return self.names()
        init = Path(spec.origin)
        var = next((t.id for node in ast.walk(ast.parse(init.read_text()))
                    for t in _assigned(node, "Registry", self.kind)), None)
        files = [init] + [Path(m.module_finder.path) / (f"{m.name}/__init__.py" if m.ispkg else f"{m.name}.py")
                          for m in pkgutil.iter_modules(spec.submodule_search_locations) if not m.name.startswith("_")]
        found = set(self._entries)
        for node in (n for f in files if var for n in ast.walk(ast.parse(f.read_text()))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("entry", "register") and getattr(node.func.value, "id", None) == var):
                name = node.args[0] if node.args else None
                if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                    return self.names()
                found.add(name.value)
        return tuple(sorted(found)) if var else self.names()

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._entries[n]) for n in self.names()]


def _assigned(node: ast.AST, factory: str, kind: str) -> list[ast.Name]:
    """The names ``node`` binds to ``factory("kind", ...)`` (``X = Registry("criterion")``)."""
    if not isinstance(node, (ast.Assign, ast.AnnAssign)) or not isinstance(node.value, ast.Call):
        return []
    call = node.value
    if getattr(call.func, "id", None) != factory or not call.args or getattr(call.args[0], "value", None) != kind:
        return []
    return [t for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)]
