"""Inference runners: one interface for every backend, registered by name.

``activate`` loads (session, engine, CUDA graph), ``infer`` runs one batch, ``deactivate``
frees; a runner is a context manager. The base class validates inputs once per shape and
times every backend the same way: ``infer_timed`` returns host-to-device, compute and
device-to-host seconds (CPU backends report compute only, measured with perf_counter;
CUDA backends use CUDA events on a non-default stream).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import MissingDependencyError, TvsError

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


class TorchRunner(Runner):
    """PyTorch eager on CPU or CUDA; ``cuda_graphs=True`` replays a captured CUDA graph."""

    def __init__(self, artifact: Any, device: str = "cpu", cuda_graphs: bool = False, **options: Any) -> None:
        super().__init__(artifact, **options)
        self.device, self.cuda_graphs = device, cuda_graphs
        self.name = "torch-cuda-graphs" if cuda_graphs else f"torch-{device.split(':')[0]}"
        self._graphs: dict[tuple[int, ...], Any] = {}

    def _activate(self) -> None:
        import torch

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise MissingDependencyError("torch sees no CUDA GPU")
        self.torch = torch
        self.model = self.artifact.module.to(self.device).eval()
        if self.artifact.input_shape:
            self.input_shape = tuple(self.artifact.input_shape)
        self.info["threads"] = torch.get_num_threads()
        if self.device.startswith("cuda"):
            self.stream = torch.cuda.Stream()
            torch.cuda.reset_peak_memory_stats()

    def _deactivate(self) -> None:
        self._graphs.clear()
        self.model.to("cpu")
        if self.device.startswith("cuda"):
            self.info["gpu_peak_allocated_bytes"] = int(self.torch.cuda.max_memory_allocated())
            self.torch.cuda.empty_cache()

    def _graph_for(self, shape: tuple[int, ...]):
        torch = self.torch
        if shape not in self._graphs:
            static_in = torch.zeros(shape, device=self.device)
            with torch.cuda.stream(self.stream), torch.inference_mode():
                for _ in range(3):  # warm up on the side stream before capture
                    self.model(static_in)
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph, stream=self.stream):
                static_out = self.model(static_in)
            self._graphs[shape] = (graph, static_in, static_out)
        return self._graphs[shape]

    def _forward_device(self, xd):
        if self.cuda_graphs:
            graph, static_in, static_out = self._graph_for(tuple(xd.shape))
            static_in.copy_(xd)
            graph.replay()
            return static_out
        with self.torch.inference_mode():
            return self.model(xd)

    def _infer(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        if self.device == "cpu":
            with torch.inference_mode():
                return self.model(torch.from_numpy(x)).numpy()
        with torch.cuda.stream(self.stream):
            out = self._forward_device(torch.from_numpy(x).to(self.device, non_blocking=True))
            res = out.cpu().numpy()
        return res

    def _timed(self, x: np.ndarray) -> dict[str, float]:
        if self.device == "cpu":
            return super()._timed(x)
        return cuda_event_timed(self.torch, self.stream, x, self.device, self._forward_device)


class OrtRunner(Runner):
    """ONNX Runtime with a chosen execution provider; records which providers really loaded."""

    PROVIDERS = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
                 "ort-trt": "TensorrtExecutionProvider"}

    def __init__(self, artifact: str | Path, backend: str = "ort-cpu", fp16: bool = False,
                 engine_cache: str | None = None, threads: int | None = None, **options: Any) -> None:
        super().__init__(artifact, **options)
        self.name, self.fp16, self.engine_cache, self.threads = backend, fp16, engine_cache, threads
        self.device = "cpu" if backend == "ort-cpu" else "cuda"

    def _activate(self) -> None:
        from ..exporters.onnx_export import ort_session

        want = self.PROVIDERS[self.name]
        opts: dict[str, Any] = {}
        if self.name == "ort-trt":
            opts = {"trt_fp16_enable": self.fp16, "trt_engine_cache_enable": bool(self.engine_cache)}
            if self.engine_cache:
                opts["trt_engine_cache_path"] = self.engine_cache
        providers = [want] if want == "CPUExecutionProvider" else [want, "CPUExecutionProvider"]
        options = [opts] + ([{}] if len(providers) > 1 else [])
        before = _gpu_free_bytes() if self.device == "cuda" else None
        self.sess = ort_session(self.artifact, providers, options, self.threads)
        loaded = self.sess.get_providers()
        self.info["providers_loaded"] = loaded
        if want not in loaded:
            raise MissingDependencyError(f"{want} did not load (ONNX Runtime fell back to {loaded}); "
                                         "install onnxruntime-gpu with matching CUDA/TensorRT libraries")
        if before is not None:
            after = _gpu_free_bytes()
            if after is not None:
                self.info["gpu_memory_delta_bytes"] = before - after
        inp = self.sess.get_inputs()[0]
        self.input_name = inp.name
        if all(isinstance(d, int) for d in inp.shape[1:]):
            self.input_shape = tuple(inp.shape[1:])
        self.info["threads"] = self.threads or "ort default"

    def _deactivate(self) -> None:
        del self.sess

    def _infer(self, x: np.ndarray) -> np.ndarray:
        return self.sess.run(None, {self.input_name: x})[0]


class TensorRTRunner(Runner):
    """A serialized TensorRT engine, executed with device buffers from PyTorch."""

    name = "tensorrt"
    device = "cuda"

    def _activate(self) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            from ..exporters.probe import INSTALL_TRT

            raise MissingDependencyError(INSTALL_TRT) from None
        import torch

        if not torch.cuda.is_available():
            raise MissingDependencyError("the tensorrt backend needs a CUDA GPU visible to torch")
        self.torch, self.trt = torch, trt
        before = _gpu_free_bytes()
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(Path(self.artifact).read_bytes())
        if self.engine is None:
            raise TvsError(f"{self.artifact}: TensorRT could not deserialize the engine (other GPU or version?)")
        self.context = self.engine.create_execution_context()
        after = _gpu_free_bytes()
        self.info["gpu_memory_delta_bytes"] = (before - after) if before is not None and after is not None else None
        self.info["device_memory_size_v2"] = getattr(self.engine, "device_memory_size_v2", None)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        shape = tuple(self.engine.get_tensor_shape(self.inputs[0]))
        self.input_shape = shape[1:] if all(d > 0 for d in shape[1:]) else None
        self.stream = torch.cuda.Stream()

    def _run(self, xd):
        torch, trt = self.torch, self.trt
        self.context.set_input_shape(self.inputs[0], tuple(xd.shape))
        self.context.set_tensor_address(self.inputs[0], xd.data_ptr())
        shape = tuple(self.context.get_tensor_shape(self.outputs[0]))
        dtype = {trt.float32: torch.float32, trt.float16: torch.float16}.get(
            self.engine.get_tensor_dtype(self.outputs[0]), torch.float32)
        out = torch.empty(shape, dtype=dtype, device="cuda")
        self.context.set_tensor_address(self.outputs[0], out.data_ptr())
        self.context.execute_async_v3(self.stream.cuda_stream)
        return out

    def _infer(self, x: np.ndarray) -> np.ndarray:
        with self.torch.cuda.stream(self.stream):
            out = self._run(self.torch.from_numpy(x).cuda(non_blocking=True))
            return out.float().cpu().numpy()

    def _timed(self, x: np.ndarray) -> dict[str, float]:
        return cuda_event_timed(self.torch, self.stream, x, "cuda", self._run)

    def _deactivate(self) -> None:
        del self.context, self.engine


def _gpu_free_bytes() -> int | None:
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info()[0])
    except Exception:
        pass
    return None


# name -> (artifact kind, factory)
REGISTRY: dict[str, tuple[str, Callable[..., Runner]]] = {
    "torch-cpu": ("torch", lambda a, **k: TorchRunner(a, "cpu", **k)),
    "torch-cuda": ("torch", lambda a, **k: TorchRunner(a, "cuda", **k)),
    "torch-cuda-graphs": ("torch", lambda a, **k: TorchRunner(a, "cuda", cuda_graphs=True, **k)),
    "ort-cpu": ("onnx", lambda a, **k: OrtRunner(a, "ort-cpu", **k)),
    "ort-cuda": ("onnx", lambda a, **k: OrtRunner(a, "ort-cuda", **k)),
    "ort-trt": ("onnx", lambda a, **k: OrtRunner(a, "ort-trt", **k)),
    "tensorrt": ("engine", lambda a, **k: TensorRTRunner(a, **k)),
}


def register(name: str, kind: str, factory: Callable[..., Runner]) -> None:
    """Add a backend (e.g. a test double) under ``name``."""
    REGISTRY[name] = (kind, factory)


def make_runner(name: str, artifact: Any, **options: Any) -> Runner:
    if name not in REGISTRY:
        raise TvsError(f"unknown backend {name!r} (one of {', '.join(REGISTRY)})")
    return REGISTRY[name][1](artifact, **options)


def backend_availability() -> dict[str, str | None]:
    """Each backend -> None when usable here, else the reason it is skipped."""
    out: dict[str, str | None] = {"torch-cpu": None, "ort-cpu": None}
    try:
        import torch

        cuda = torch.cuda.is_available()
    except Exception:
        cuda = False
    for b in ("torch-cuda", "torch-cuda-graphs"):
        out[b] = None if cuda else "no CUDA GPU visible to torch"
    try:
        import onnxruntime as ort

        prov = ort.get_available_providers()
    except Exception:
        prov = []
    out["ort-cuda"] = None if "CUDAExecutionProvider" in prov and cuda else \
        "onnxruntime-gpu (CUDAExecutionProvider) not installed" if "CUDAExecutionProvider" not in prov else "no GPU"
    out["ort-trt"] = None if "TensorrtExecutionProvider" in prov and cuda else \
        "onnxruntime-gpu with the TensorRT provider not installed" if "TensorrtExecutionProvider" not in prov else "no GPU"
    try:
        import importlib.util

        has_trt = importlib.util.find_spec("tensorrt") is not None
    except Exception:
        has_trt = False
    out["tensorrt"] = None if has_trt and cuda else ("TensorRT not installed (use the container)" if not has_trt
                                                     else "no CUDA GPU visible")
    return out
