"""``torch-cpu``, ``torch-cuda``, ``torch-cuda-graphs``: PyTorch eager (or a captured CUDA graph)."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import MissingDependencyError
from . import Runner, cuda_available, cuda_event_timed, register


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


def _no_cuda() -> str | None:
    return None if cuda_available() else "no CUDA GPU visible to torch"


register("torch-cpu", "torch", lambda a, **k: TorchRunner(a, "cpu", **k), order=0)
register("torch-cuda", "torch", lambda a, **k: TorchRunner(a, "cuda", **k), _no_cuda, order=2)
register("torch-cuda-graphs", "torch", lambda a, **k: TorchRunner(a, "cuda", cuda_graphs=True, **k), _no_cuda,
         order=3)
