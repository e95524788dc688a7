"""Where a model comes from: one module per kind of spec string, each registered in ``SOURCES``.

A source says whether it ``matches`` a spec, ``build``s the untrained module, and may
``describe`` what it knows about the input (shape, normalisation). ``load_model`` asks the
sources in ``priority`` order (lowest first) and uses the first that matches. To add one,
write a module here:

    from . import SOURCES, ModelSource

    @SOURCES.entry("onnx2torch")
    class FromOnnx(ModelSource):
        priority = 15
        def matches(self, spec): return spec.endswith(".onnx")
        def build(self, spec, kwargs): ...

The pruned-artifact source lives with the artifact format (``tvsprune.pruning.artifact``)
and is loaded on first lookup, so ``models`` never imports ``pruning`` (no import cycle).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch.nn as nn

from ...errors import TvsError
from ...registry import Registry

if TYPE_CHECKING:
    from ..spec import LoadedModel, ModelSpec


class ModelSource:
    """One kind of spec string."""

    priority: ClassVar[int] = 50
    name: ClassVar[str] = ""
    form: ClassVar[str] = ""  # how the spec looks, for the error that lists them
    # the spec names code to import and call (a .py file, a module): a recorded spec of this
    # kind is never taken from a received file (see :mod:`tvsprune.models.trust`)
    names_code: ClassVar[bool] = False

    def matches(self, spec: str) -> bool:
        raise NotImplementedError

    def build(self, spec: str, kwargs: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def load(self, spec: str, base: "ModelSpec | None" = None) -> "LoadedModel | None":
        """A source whose spec carries its own weights and structure (a pruned artifact)
        returns the whole loaded model here (``base``: the base model the user named for it);
        the others return None and are built."""
        return None

    def describe(self, module: nn.Module, loaded: "LoadedModel") -> None:
        """Fill in what this source knows of the input (``input_shape``, ``normalize``)."""


class _Sources(Registry[ModelSource]):
    def ordered(self) -> list[ModelSource]:
        return sorted((s for _, s in self.items()), key=lambda s: (s.priority, s.name))

    def find(self, spec: str) -> ModelSource:
        for source in self.ordered():
            if source.matches(spec):
                return source
        forms = ", ".join(s.form for s in self.ordered() if s.form)
        from ..zoo import ZOO
        from ...registry import closest

        near = closest(spec.replace("-", "").lower(), list(ZOO)) or closest(spec, list(ZOO))
        hint = f" (did you mean {near!r}?)" if near else ""
        raise TvsError(f"unknown model {spec!r}{hint}: use {forms}")


SOURCES = _Sources("model source", package=__name__, also=("tvsprune.pruning.artifact",))

__all__ = ["ModelSource", "SOURCES"]
