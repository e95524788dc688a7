"""Backends: one module per inference backend (a loader + runner), registered by name.

Each module registers its backends in ``BACKENDS`` with the kind of artifact they run
(``torch`` module, ``onnx`` file, TensorRT ``engine``), a factory and a check that says why
the backend cannot run here (or None). Heavy packages (onnxruntime-gpu, tensorrt) are
imported inside the runner that needs them, so a missing one disables one backend, not the
tool. After Polygraphy's backend/<name>/runner.py.


``activate`` loads (session, engine, CUDA graph), ``infer`` runs one batch, ``deactivate``
frees; a runner is a context manager. The base class validates inputs once per shape and
times every backend the same way: ``infer_timed`` returns host-to-device, compute and
device-to-host seconds (CPU backends report compute only, measured with perf_counter;
CUDA backends use CUDA events on a non-default stream).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import TvsError
from ..registry import Registry

log = logging.getLogger(__name__)


class Runner:
    """Base class. Subclasses implement ``_activate``, ``_infer`` and optionally ``_timed``."""

    name = "base"
    device = "cpu"

    def __init__(self, artifact: Any, **options: Any) -> None:
        self.artifact, self.options = artifact, options
        self.active = False
        self.input_shape: tuple[int, ...] | None = None  # without batch, when the backend knows it
        self._validated: set[tuple[int, ...]] = set()
        self.info: dict[str, Any] = {}

    # lifecycle ---------------------------------------------------------------
    def activate(self) -> "Runner":
        if not self.active:
            self._activate()
            self.active = True
        return self

    def deactivate(self) -> None:
        if self.active:
            self._deactivate()
            self.active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc: Any) -> None:
        self.deactivate()

    # inference ---------------------------------------------------------------
    def _validate(self, x: np.ndarray) -> np.ndarray:
        if not self.active:
            raise TvsError(f"runner {self.name} used before activate()")
        shape = tuple(x.shape)
        if shape in self._validated:
            return x
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            raise TvsError(f"{self.name}: inputs must be float32 numpy arrays, got {getattr(x, 'dtype', type(x))}")
        if x.ndim < 2:
            raise TvsError(f"{self.name}: inputs need a batch dimension, got shape {list(shape)}")
        if self.input_shape is not None and tuple(shape[1:]) != tuple(self.input_shape):
            raise TvsError(f"{self.name}: input shape {list(shape[1:])} does not match the model's "
                           f"{list(self.input_shape)}")
        self._validated.add(shape)
        return x

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self._infer(self._validate(x))

    def infer_timed(self, x: np.ndarray) -> dict[str, float]:
        """One batch; seconds for h2d, compute and d2h (CPU: compute only)."""
        x = self._validate(x)
        return self._timed(x)

    def _timed(self, x: np.ndarray) -> dict[str, float]:
        t = time.perf_counter()
        self._infer(x)
        return {"h2d": 0.0, "compute": time.perf_counter() - t, "d2h": 0.0}

    def _activate(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _deactivate(self) -> None:
        pass

    def _infer(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


def cuda_event_timed(torch: Any, stream: Any, x: np.ndarray, device: str,
                     compute: Callable[[Any], Any]) -> dict[str, float]:
    """Time one batch on ``stream`` with CUDA events: pinned host->device copy, ``compute``
    on the device tensor, device->pinned host copy; seconds for each part."""
    host = torch.from_numpy(x).pin_memory()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    with torch.cuda.stream(stream):
        ev[0].record(stream)
        xd = host.to(device, non_blocking=True)
        ev[1].record(stream)
        out = compute(xd)
        ev[2].record(stream)
        out_host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        out_host.copy_(out, non_blocking=True)
        ev[3].record(stream)
    ev[3].synchronize()
    return {"h2d": ev[0].elapsed_time(ev[1]) / 1e3, "compute": ev[1].elapsed_time(ev[2]) / 1e3,
            "d2h": ev[2].elapsed_time(ev[3]) / 1e3}


def gpu_free_bytes() -> int | None:
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info()[0])
    except Exception:
        pass
    return None



def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


@dataclass(frozen=True)
class Backend:
    """A registered backend: what it runs, how to make its runner, and whether it can run here."""

    kind: str                                   # "torch", "onnx", "engine" (or a test double's own)
    factory: Callable[..., Runner]
    unavailable: Callable[[], str | None] = lambda: None  # None when usable here, else the reason
    order: int | None = None  # place among the backends measured when none is named; None: only when named


BACKENDS: Registry[Backend] = Registry("backend", package=__name__)


def register(name: str, kind: str, factory: Callable[..., Runner],
             unavailable: Callable[[], str | None] = lambda: None, order: int | None = None) -> None:
    """Add a backend under ``name`` (a backend module does this; so may a test double).
    ``order``: its place among the backends measured when the user names none."""
    BACKENDS.register(name, Backend(kind, factory, unavailable, order))


def default_backends() -> list[str]:
    """The backends measured when none is named, in their registered order."""
    ranked = [(b.order, name) for name, b in BACKENDS.items() if b.order is not None]
    return [name for _, name in sorted(ranked)]


def make_runner(name: str, artifact: Any, **options: Any) -> Runner:
    return BACKENDS.get(name).factory(artifact, **options)


def backend_kind(name: str) -> str:
    return BACKENDS.get(name).kind


def backend_availability() -> dict[str, str | None]:
    """Each backend -> None when usable here, else the reason it is skipped."""
    return {name: b.unavailable() for name, b in BACKENDS.items()}


__all__ = ["BACKENDS", "Backend", "Runner", "backend_availability", "backend_kind", "cuda_event_timed",
           "default_backends", "make_runner", "register"]
