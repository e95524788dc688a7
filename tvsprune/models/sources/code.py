"""``path/to/file.py:Name`` (a user's file) and ``package.module:Name`` (an importable module):
a class or factory that returns an ``nn.Module``."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch.nn as nn

from ...errors import TvsError
from . import SOURCES, ModelSource


def user_file(spec: str) -> tuple[Path, str] | None:
    """(file, attribute) when ``spec`` names a model in a user's .py file, else None."""
    if ":" not in spec or spec.startswith(("torchvision:", "timm:")):
        return None
    target, attr = spec.rsplit(":", 1)
    if target.endswith(".py") or "/" in target or "\\" in target:
        return Path(target), attr
    return None


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise TvsError(f"model file not found: {path}")
    name = "tvsprune_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TvsError(f"cannot import model file: {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # the user's code failed to import, or exited while importing
        del sys.modules[name]
        what = f"called sys.exit({e.code!r})" if isinstance(e, SystemExit) else f"failed: {type(e).__name__}: {e}"
        raise TvsError(f"importing {path} {what}") from None
    return module


def _call(spec: str, module: Any, attr: str, kwargs: dict[str, Any]) -> nn.Module:
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise TvsError(f"{spec.rsplit(':', 1)[0]} has no class or function named {attr!r}")
    try:
        model = factory(**kwargs)
    except Exception as e:
        raise TvsError(f"building {spec} with {kwargs} failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise TvsError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


@SOURCES.entry("file")
class UserFile(ModelSource):
    priority, form, names_code = 30, "file.py:Name", True

    def matches(self, spec: str) -> bool:
        return user_file(spec) is not None

    def build(self, spec: str, kwargs: dict[str, Any]) -> nn.Module:
        path, attr = user_file(spec)
        return _call(spec, _import_file(path), attr, kwargs)


@SOURCES.entry("module")
class ImportableModule(ModelSource):
    priority, form, names_code = 40, "module:Name", True

    def matches(self, spec: str) -> bool:
        return ":" in spec

    def build(self, spec: str, kwargs: dict[str, Any]) -> nn.Module:
        target, attr = spec.rsplit(":", 1)
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise TvsError(f"cannot import module {target!r} for model spec {spec!r}: {e}") from None
        return _call(spec, module, attr, kwargs)
