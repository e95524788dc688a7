"""``torchvision:NAME`` and ``timm:NAME``, when those packages import (neither is required).

timm models also give their input size and normalisation from the pretrained config."""
from __future__ import annotations

import importlib
from typing import Any

import torch.nn as nn

from ...errors import TvsError
from . import SOURCES, ModelSource


def _hub(spec: str, lib: str):
    try:
        return importlib.import_module("torchvision.models" if lib == "torchvision" else "timm")
    except Exception as e:
        raise TvsError(f"model {spec!r} needs the {lib} package, which does not import here ({e})") from None


class _Hub(ModelSource):
    priority, lib = 20, ""

    @property
    def form(self) -> str:  # type: ignore[override]
        return f"{self.lib}:NAME"

    def matches(self, spec: str) -> bool:
        return spec.startswith(f"{self.lib}:")

    def build(self, spec: str, kwargs: dict[str, Any]) -> nn.Module:
        return self.create(_hub(spec, self.lib), spec.split(":", 1)[1], kwargs)

    def create(self, hub: Any, name: str, kwargs: dict[str, Any]) -> nn.Module:
        raise NotImplementedError


@SOURCES.entry("torchvision")
class Torchvision(_Hub):
    lib = "torchvision"

    def create(self, hub: Any, name: str, kwargs: dict[str, Any]) -> nn.Module:
        return hub.get_model(name, **kwargs)


@SOURCES.entry("timm")
class Timm(_Hub):
    lib = "timm"

    def create(self, hub: Any, name: str, kwargs: dict[str, Any]) -> nn.Module:
        return hub.create_model(name, **kwargs)

    def describe(self, module: nn.Module, loaded) -> None:
        """Input size and normalisation from the model's pretrained config, when it has one."""
        cfg = getattr(module, "pretrained_cfg", None) or {}
        size = cfg.get("input_size")
        loaded.input_shape = tuple(int(v) for v in size) if isinstance(size, (list, tuple)) and len(size) == 3 \
            else None
        mean, std = cfg.get("mean"), cfg.get("std")
        loaded.normalize = ({"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
                            if isinstance(mean, (list, tuple)) and isinstance(std, (list, tuple)) else None)
        from ...data.sources import model_channels

        if model_channels(module) == 1:  # in_chans=1: the config still describes RGB
            loaded.input_shape = (1, *loaded.input_shape[1:]) if loaded.input_shape else None
            if loaded.normalize:
                loaded.normalize = {k: [sum(v) / len(v)] for k, v in loaded.normalize.items()}
