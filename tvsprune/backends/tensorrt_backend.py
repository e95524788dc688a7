"""``tensorrt``: a serialized TensorRT engine, run with device buffers from PyTorch (in the container)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import MissingDependencyError, TvsError
from . import Runner, cuda_available, cuda_event_timed, gpu_free_bytes, register


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
        before = gpu_free_bytes()
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(Path(self.artifact).read_bytes())
        if self.engine is None:
            raise TvsError(f"{self.artifact}: TensorRT could not deserialize the engine (other GPU or version?)")
        self.context = self.engine.create_execution_context()
        after = gpu_free_bytes()
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


def _trt_missing() -> str | None:
    import importlib.util

    try:
        has_trt = importlib.util.find_spec("tensorrt") is not None
    except Exception:
        has_trt = False
    if not has_trt:
        return "TensorRT not installed (use the container)"
    return None if cuda_available() else "no CUDA GPU visible"


register("tensorrt", "engine", lambda a, **k: TensorRTRunner(a, **k), _trt_missing, order=6)
