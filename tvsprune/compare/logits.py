"""Logits of a model over batches: a PyTorch module or any backend's runner, the same loop for both."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

Forward = Callable[[torch.Tensor], np.ndarray]


def forward_fn(model: Any) -> Forward:
    """A batch -> logits function for an ``nn.Module`` (no grad, eval mode) or an active runner
    (anything with ``infer(float32 array) -> array``: every backend's runner, see tvsprune.backends)."""
    if isinstance(model, torch.nn.Module):
        net = model.eval()

        def run_torch(x: torch.Tensor) -> np.ndarray:
            with torch.no_grad():
                return net(x).float().cpu().numpy()

        return run_torch
    if not callable(getattr(model, "infer", None)):
        raise TypeError(f"forward_fn takes an nn.Module or a runner, not {type(model).__name__}")
    return lambda x: np.asarray(model.infer(np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)))


def chunks(x: torch.Tensor, size: int = 64) -> Iterator[tuple[torch.Tensor, None]]:
    """A tensor of inputs as batches of at most ``size`` (no labels)."""
    for i in range(0, len(x), size):
        yield x[i:i + size], None


def collect_logits(forward: Forward, batches: Iterable[tuple[torch.Tensor, Any]],
                   progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits [N, K] over ``batches`` of (inputs, labels or None), and the labels [N] when given."""
    logits, labels = [], []
    for x, y in batches:
        logits.append(np.asarray(forward(x)))
        if y is not None:
            labels.append(y.numpy() if torch.is_tensor(y) else np.asarray(y))
        if progress:
            progress(len(x))
    out = np.concatenate(logits) if logits else np.zeros((0, 0), dtype=np.float32)
    return out, (np.concatenate(labels) if labels else None)


__all__ = ["Forward", "chunks", "collect_logits", "forward_fn"]
