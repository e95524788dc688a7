"""One streaming pass over calibration data that fills :class:`Moments` for every layer."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import TvsError
from ..models.probe import LayerInfo, ModelProbe, run_forward
from .moments import LayerMoments, Moments

log = logging.getLogger(__name__)

RESOLUTIONS = ("global", "pool:K", "full")


def parse_resolution(resolution: str) -> tuple[str, int]:
    """``global`` -> ("global", 1); ``pool:K`` -> ("pool", K); ``full`` -> ("full", 0)."""
    if resolution in ("global", "full"):
        return resolution, 1 if resolution == "global" else 0
    if resolution.startswith("pool:"):
        try:
            k = int(resolution[5:])
        except ValueError:
            k = 0
        if k >= 1:
            return "pool", k
    raise TvsError(f"unknown resolution {resolution!r} (use global, pool:K or full)")


def reduce_map(y: torch.Tensor, resolution: str) -> torch.Tensor:
    """A layer output [B, C, ...] -> [B, C, D] at the given resolution."""
    if y.dim() == 2:
        return y.unsqueeze(-1)
    kind, k = parse_resolution(resolution)
    if kind == "global":
        return y.flatten(2).mean(-1, keepdim=True)
    if kind == "pool":
        return F.adaptive_avg_pool2d(y, k).flatten(2)
    return y.flatten(2)


def feature_dim(info: LayerInfo, resolution: str) -> int:
    if info.kind == "linear" or len(info.out_shape) < 3:
        return 1
    kind, k = parse_resolution(resolution)
    if kind == "global":
        return 1
    if kind == "pool":
        return k * k
    return int(info.out_shape[1] * info.out_shape[2])


class MomentCollector:
    """Hooks on each layer's statistic point; ``update`` folds one labelled batch in."""

    def __init__(self, model: nn.Module, layers: list[LayerInfo], num_classes: int,
                 resolution: str = "global", device: torch.device | str = "cpu") -> None:
        parse_resolution(resolution)
        self.model, self.layers, self.resolution = model, layers, resolution
        self.num_classes = num_classes
        self.moments = {l.name: LayerMoments.zeros(num_classes, l.channels, feature_dim(l, resolution), device)
                        for l in layers}
        self._labels: torch.Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> "MomentCollector":
        modules = dict(self.model.named_modules())
        for info in self.layers:
            self._handles.append(modules[info.stat_module].register_forward_hook(self._hook(info.name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable:
        def hook(module, inp, out):
            if self._labels is not None:
                self.moments[name] = self.moments[name].add_batch(reduce_map(out.detach(), self.resolution),
                                                                  self._labels)
        return hook

    def update(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward one batch; every hooked layer accumulates its moments. Returns logits."""
        self._labels = labels
        try:
            return self.model(x)
        finally:
            self._labels = None


def _all_gather_merge(moments: dict[str, LayerMoments]) -> dict[str, LayerMoments]:
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


@torch.no_grad()
def collect_moments(model: nn.Module, probe: ModelProbe, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    classes: list[str], resolution: str = "global", layers: list[LayerInfo] | None = None,
                    device: str = "cpu", progress: Callable[[int], None] | None = None,
                    meta: dict[str, Any] | None = None) -> Moments:
    """Stream ``batches`` through ``model`` once and return the class-conditional moments.

    Under an initialised ``torch.distributed`` process group, each rank passes its own
    shard of batches and every rank returns the merged moments of all shards.
    """
    layers = layers or probe.layers
    if probe.num_outputs and len(classes) != probe.num_outputs:
        raise TvsError(f"the data has {len(classes)} classes but the model outputs {probe.num_outputs} logits")
    dev = torch.device(device)
    model = model.to(dev).eval()
    collector = MomentCollector(model, layers, len(classes), resolution, dev)
    seen = 0
    t0 = time.perf_counter()
    with collector:
        for x, y in batches:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if seen == 0:
                collector._labels = y
                try:
                    run_forward(model, x)
                finally:
                    collector._labels = None
            else:
                collector.update(x, y)
            seen += len(y)
            if progress:
                progress(len(y))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elapsed = time.perf_counter() - t0
    result = collector.moments
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        if dist.get_backend() == "gloo":
            result = {n: m.to("cpu") for n, m in result.items()}
        result = _all_gather_merge(result)
    result = {n: m.to("cpu") for n, m in result.items()}
    counts = next(iter(result.values())).count
    if int(counts.sum()) == 0:
        raise TvsError("no calibration samples were processed")
    out_meta = dict(meta or {})
    out_meta.update({
        "resolution": resolution,
        "classes": list(classes),
        "class_counts": [int(c) for c in counts.tolist()],
        "samples": int(counts.sum()),
        "logits_layer": probe.logits_layer,
        "layers": {l.name: l.to_dict() | {"dim": feature_dim(l, resolution)} for l in layers},
        "elapsed_s": round(elapsed, 3),
        "world_size": dist.get_world_size() if distributed else 1,
    })
    empty = [c for c, n in zip(classes, out_meta["class_counts"]) if n == 0]
    if empty:
        log.warning("classes with no calibration samples: %s", ", ".join(empty))
    out_meta["empty_classes"] = empty
    return Moments(result, out_meta)
