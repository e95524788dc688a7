"""``resnet20``, ``vgg11_bn``, ...: the built-in CIFAR zoo (32x32 inputs)."""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from ...errors import TvsError
from ..zoo import ZOO, ZOO_INPUT_SHAPE
from . import SOURCES, ModelSource


@SOURCES.entry("zoo")
class Zoo(ModelSource):
    priority = 10

    @property
    def form(self) -> str:  # type: ignore[override]
        return f"a zoo name ({', '.join(sorted(ZOO))})"

    def matches(self, spec: str) -> bool:
        return spec in ZOO

    def build(self, spec: str, kwargs: dict[str, Any]) -> nn.Module:
        try:
            return ZOO[spec](**kwargs)
        except TypeError as e:
            raise TvsError(f"zoo model {spec!r}: bad keyword arguments {kwargs}: {e}") from None

    def describe(self, module: nn.Module, loaded) -> None:
        loaded.input_shape = ZOO_INPUT_SHAPE
