"""Resolutions: how a filter's output map becomes its features (``global``: the spatial mean;
``pool:K``: K x K adaptive-average windows; ``full``: every position), and the fast pooling."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..models.probe import LayerInfo
from .options import POOL_MAX, RESOLUTIONS, parse_resolution  # noqa: F401 (pure: the parser reads them)

POOL_GEMM_MAX = 256  # maps of at most this many positions are pooled by one GEMM (faster on small maps)


def _repeat_index(h: int, w: int, resolution: str) -> torch.Tensor | None:
    """For ``pool:K`` and an h x w map smaller than K whose sides divide K: the position
    [K*K] each window repeats (every position fills (K/h) x (K/w) windows); else None."""
    kind, k = parse_resolution(resolution)
    if kind != "pool" or (h % k == 0 and w % k == 0) or k % h or k % w:
        return None
    rows, cols = torch.arange(k) // (k // h), torch.arange(k) // (k // w)
    return (rows[:, None] * w + cols[None, :]).flatten()


@functools.lru_cache(maxsize=64)
def _pool_matrix(h: int, w: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[h * w, k * k]: column (i, j) averages adaptive_avg_pool2d's window (i, j) of an h x w map."""
    p = torch.zeros(h, w, k, k, dtype=torch.float64)
    for i in range(k):
        rows = slice(i * h // k, -(-(i + 1) * h // k))
        for j in range(k):
            cols = slice(j * w // k, -(-(j + 1) * w // k))
            p[rows, cols, i, j] = 1.0 / ((rows.stop - rows.start) * (cols.stop - cols.start))
    return p.view(h * w, k * k).to(dtype=dtype, device=device)


def _reduce(y: torch.Tensor, resolution: str) -> torch.Tensor:
    """:func:`reduce_map` before any repeat: a map that :func:`_repeat_index` repeats stays per position."""
    if y.dim() == 2:
        return y.unsqueeze(-1)
    kind, k = parse_resolution(resolution)
    if kind == "global":
        return y.flatten(2).mean(-1, keepdim=True)
    if kind == "pool":
        h, w = y.shape[-2:]
        # the same windows as adaptive_avg_pool2d (sums to float32 rounding), faster on CPU:
        if h == k and w == k:  # one position per window
            return y.flatten(2)
        if k % h == 0 and k % w == 0 and (h < k or w < k):  # repeated to the windows by the caller
            return y.flatten(2)
        if y.is_contiguous():
            b, c = y.shape[:2]
            if h * w <= POOL_GEMM_MAX or (h * w <= 4 * POOL_GEMM_MAX and (h % k or w % k)):
                return (y.reshape(-1, h * w) @ _pool_matrix(h, w, k, y.dtype, y.device)).view(b, c, k * k)
            if h % k == 0 and w % k == 0:  # window rows summed, then window columns (2x avg_pool2d's speed)
                a, e = h // k, w // k
                return y.reshape(b * c * k, a, w).sum(1).view(-1, e).sum(1).div_(a * e).view(b, c, k * k)
        return F.adaptive_avg_pool2d(y, k).flatten(2)
    return y.flatten(2)


def reduce_map(y: torch.Tensor, resolution: str) -> torch.Tensor:
    """A layer output [B, C, ...] -> [B, C, D] at the given resolution."""
    z = _reduce(y, resolution)
    index = _repeat_index(*y.shape[-2:], resolution) if y.dim() == 4 else None
    return z if index is None else z[:, :, index.to(z.device)]


def feature_dim(info: LayerInfo, resolution: str) -> int:
    """D: features per filter that ``resolution`` keeps of the layer's statistic-point map."""
    shape = info.map_shape
    if info.kind == "linear" or len(shape) < 3:
        return 1
    kind, k = parse_resolution(resolution)
    if kind == "global":
        return 1
    if kind == "pool":
        return k * k
    return int(shape[1] * shape[2])
