"""torch.distributed reduction of moments: every rank's shard gathered and merged in rank order
(exact and deterministic, as the Chan merge is associative)."""
from __future__ import annotations

import torch

from .moments import InputMoments, LayerMoments


def all_gather_merge(moments: dict[str, LayerMoments]) -> dict[str, LayerMoments]:
    """Gather every rank's moments and merge them in rank order (exact, deterministic)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    merged = {}
    for name, lm in moments.items():
        parts = []
        for t in (lm.count, lm.mean, lm.m2):
            bufs = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(bufs, t.contiguous())
            parts.append(bufs)
        acc = LayerMoments(parts[0][0], parts[1][0], parts[2][0])
        for r in range(1, world):
            acc = acc.merge(LayerMoments(parts[0][r], parts[1][r], parts[2][r]))
        merged[name] = acc
    return merged


def all_gather_merge_inputs(inputs: dict[str, InputMoments]) -> dict[str, InputMoments]:
    """The same for the consumers' input statistics."""
    import torch.distributed as dist

    world = dist.get_world_size()
    merged = {}
    for name, im in inputs.items():
        parts = []
        for t in (im.count, im.mean) + ((im.m2,) if im.m2 is not None else ()):
            bufs = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(bufs, t.contiguous())
            parts.append(bufs)
        m2s = parts[2] if len(parts) == 3 else [None] * world
        acc = InputMoments(parts[0][0], parts[1][0], m2s[0])
        for r in range(1, world):
            acc = acc.merge(InputMoments(parts[0][r], parts[1][r], m2s[r]))
        merged[name] = acc
    return merged
