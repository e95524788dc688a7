"""One streaming pass over calibration data that fills :class:`Moments` for every layer."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from ..errors import TvsError
from ..models.probe import LayerInfo, ModelProbe, run_forward
from .options import DEFAULT_RESOLUTION
from .moments import BatchClasses, CoMoments, InputMoments, LayerMoments, Moments
from .resolution import (POOL_MAX, RESOLUTIONS, _repeat_index, _reduce, feature_dim,  # noqa: F401 (re-exported)
                         parse_resolution, reduce_map)

log = logging.getLogger(__name__)

# input positions per image kept for calibrate's second moments (strided subsample): 16 fit
# the LS folds as well as 64 did (README, Measured results) at a quarter of the rows
POSITIONS_MAX = 16
STATE_MAX_BYTES = 8 << 30  # calibrate's class moments in all (mean and M2, float64): refused beyond, before allocating
FUSE_MAX = 1 << 22  # elements of a fused layer group's class state: classes (>= 128) x features, 32 MiB in float64


def mixes_channels(m: nn.Module) -> bool:
    """A Linear, or a Conv2d with groups == 1: a layer whose input channels compensation folds into.

    A depthwise or grouped convolution loses a removed channel's own filter instead.
    """
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def consumer_layers(model: nn.Module) -> list[str]:
    """Layers whose input statistics calibrate collects (see :func:`mixes_channels`)."""
    return [n for n, m in model.named_modules() if mixes_channels(m)]


def input_view(x: torch.Tensor, channels_last: bool = False, positions: int = POSITIONS_MAX) -> torch.Tensor:
    """A consumer's input as a strided view [..., C], positions strided to <= ``positions`` per image.

    A Conv2d reads [B, C, H, W]; a Linear reads [..., C] (``channels_last``), which is
    [B, H, W, C] when it serves as a pointwise convolution (ConvNeXt).
    """
    if not channels_last and x.dim() == 4:
        x = x.permute(0, 2, 3, 1)
    if x.dim() == 4:
        hw = x.shape[1] * x.shape[2]
        step = max(1, math.ceil(math.sqrt(hw / positions)))
        if step > 1:
            x = x[:, ::step, ::step, :]
    return x


def input_rows(x: torch.Tensor, channels_last: bool = False, positions: int = POSITIONS_MAX) -> torch.Tensor:
    """:func:`input_view` as rows [N, C] (one per image and sampled position)."""
    x = input_view(x, channels_last, positions)
    return x.reshape(-1, x.shape[-1])


def layer_output(y: torch.Tensor, kind: str) -> torch.Tensor:
    """A Linear's output [B, ..., C] -> [B, C] (mean over positions); a conv's is left as it is."""
    if kind == "linear" and y.dim() > 2:
        return y.reshape(y.shape[0], -1, y.shape[-1]).mean(1)
    return y


class _Group:
    """Consecutive layers whose class moments are one fused state [K, F, 1] (their per-sample
    features side by side): each batch costs one float64 update for the group instead of one
    per layer, with the same arithmetic element by element (bit-identical moments)."""

    def __init__(self, names: list[str], shapes: list[tuple[int, int]], classes: int,
                 device: torch.device | str) -> None:
        self.names, self.shapes = names, shapes
        starts = [0]
        for c, d in shapes:
            starts.append(starts[-1] + c * d)
        self.cuts = {n: slice(a, b) for n, a, b in zip(names, starts[:-1], starts[1:])}
        self.moments = LayerMoments.zeros(classes, starts[-1], 1, device)
        self.batch: torch.Tensor | None = None       # this batch's reduced maps, float64 [B, F]
        self.pending: dict[str, torch.Tensor] = {}  # the layers arrived so far: their columns of ``batch``
        self.flushed = False                         # the group was updated in this batch

    def put(self, name: str, y: torch.Tensor) -> bool:
        """Copy a layer's reduced map [B, C, D] into the batch (a copy: an in-place activation
        after the statistic point may overwrite ``y``); True once every layer has arrived."""
        if self.batch is None or self.batch.shape[0] != y.shape[0]:
            self.batch = torch.empty(y.shape[0], self.moments.mean.shape[1], dtype=torch.float64,
                                     device=y.device)
        part = self.batch[:, self.cuts[name]]
        part.copy_(y.reshape(y.shape[0], -1))
        self.pending[name] = part
        return len(self.pending) == len(self.names)

    def flush(self, labels: torch.Tensor, classes: BatchClasses) -> None:
        self.moments = self.moments.add_batch(self.batch, labels, classes)
        self.pending, self.flushed = {}, True

    def split(self) -> dict[str, LayerMoments]:
        """The fused state cut back into one :class:`LayerMoments` [K, C, D] per layer."""
        return {name: LayerMoments(self.moments.count, self.moments.mean[:, self.cuts[name]].reshape(-1, c, d),
                                   self.moments.m2[:, self.cuts[name]].reshape(-1, c, d))
                for name, (c, d) in zip(self.names, self.shapes)}


class MomentCollector:
    """Hooks on each layer's statistic point; ``update`` folds one labelled batch in.

    Layers are updated in fused groups (see :class:`_Group`) whose class state holds at
    most ``FUSE_MAX`` elements. A group whose layers do not each run exactly once per forward
    pass (a module called twice, or skipped) is split back into single layers at once,
    which is what they would have accumulated on their own.
    """

    def __init__(self, model: nn.Module, layers: list[LayerInfo], num_classes: int,
                 resolution: str = "global", device: torch.device | str = "cpu",
                 consumers: list[str] | None = None) -> None:
        parse_resolution(resolution)
        self.model, self.layers, self.resolution = model, layers, resolution
        self.num_classes = num_classes
        # maps smaller than pool:K accumulate per position and are repeated to the windows once, in results()
        self.repeat = {l.name: index for l in layers if l.kind == "conv" and len(l.map_shape) == 3
                       and (index := _repeat_index(l.map_shape[1], l.map_shape[2], resolution)) is not None}
        shapes = {l.name: (l.channels, l.map_shape[1] * l.map_shape[2] if l.name in self.repeat
                           else feature_dim(l, resolution)) for l in layers}
        state = sum(2 * 8 * num_classes * c * d for c, d in shapes.values())
        if state > STATE_MAX_BYTES:
            raise TvsError(f"the moments at resolution {resolution} would take {state / 2**30:.1f} GiB ({num_classes} "
                           f"classes x channels x features, mean and variance in float64), over the bound of "
                           f"{STATE_MAX_BYTES / 2**30:.0f} GiB: use a coarser --resolution (global, or pool:K with a "
                           "smaller K)")
        runs: list[list[str]] = []
        width, width_max = 0, FUSE_MAX // max(num_classes, 128)  # a batch's buffer [B, F] is bounded alike for B <= 128
        for l in layers:
            size = shapes[l.name][0] * shapes[l.name][1]
            if runs and width + size <= width_max:
                runs[-1].append(l.name)
                width += size
            else:
                runs.append([l.name])
                width = size
        self.groups = [_Group(names, [shapes[n] for n in names], num_classes, device) for names in runs]
        self.group_of = {n: g for g in self.groups for n in g.names}
        self.single: dict[str, LayerMoments] = {}  # layers of split groups
        modules = dict(model.named_modules())
        self.consumers = list(consumers or [])
        self.inputs = {n: CoMoments(
            modules[n].in_features if isinstance(modules[n], nn.Linear) else modules[n].in_channels, device)
            for n in self.consumers}
        self._labels: torch.Tensor | None = None
        self._classes: BatchClasses | None = None  # the labels grouped by class, once per batch
        self._handles: list[Any] = []

    def __enter__(self) -> "MomentCollector":
        modules = dict(self.model.named_modules())
        for info in self.layers:
            self._handles.append(modules[info.stat_module].register_forward_hook(self._hook(info)))
        for name in self.consumers:
            self._handles.append(modules[name].register_forward_pre_hook(
                self._input_hook(name, isinstance(modules[name], nn.Linear))))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _add_single(self, name: str, y: torch.Tensor) -> None:
        self.single[name] = self.single[name].add_batch(y, self._labels, self._classes)

    def _split(self, group: _Group) -> None:
        """Stop fusing ``group``: its layers continue on their own, pending maps included."""
        self.groups.remove(group)
        self.single.update(group.split())
        for name in group.names:
            self.group_of.pop(name)
        for name, y in group.pending.items():
            self._add_single(name, y)

    def _hook(self, info: LayerInfo) -> Callable:
        name = info.name

        def hook(module, inp, out):
            if self._labels is None:
                return
            y = _reduce(layer_output(out.detach(), info.kind), self.resolution)
            group = self.group_of.get(name)
            if group is not None and (group.flushed or name in group.pending):  # ran twice in one pass
                self._split(group)
                group = None
            if group is None:
                self._add_single(name, y)
                return
            if group.put(name, y):
                group.flush(self._labels, self._classes)
        return hook

    def _input_hook(self, name: str, channels_last: bool) -> Callable:
        def hook(module, inp):
            if self._labels is not None:
                self.inputs[name].add(input_view(inp[0].detach(), channels_last))
        return hook

    def update(self, x: torch.Tensor, labels: torch.Tensor,
               forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Forward one batch (through ``forward``, default the model's call); every hooked layer
        accumulates its moments. Returns logits."""
        self._labels, self._classes = labels, BatchClasses.of(labels, self.num_classes)
        try:
            out = (forward or nn.Module.__call__)(self.model, x)
            for group in [g for g in self.groups if g.pending]:  # some of its layers did not run
                self._split(group)
            return out
        finally:
            self._labels = self._classes = None
            for group in self.groups:
                group.pending, group.flushed = {}, False

    def results(self) -> tuple[dict[str, LayerMoments], dict[str, InputMoments]]:
        """The moments so far, as new tensors (windows repeated where a map was kept per position)."""
        found = dict(self.single)
        for group in self.groups:
            found.update(group.split())
        layers = {}
        for info in self.layers:
            m, index = found[info.name], self.repeat.get(info.name)
            layers[info.name] = (LayerMoments(m.count.clone(), m.mean.clone(), m.m2.clone()) if index is None else
                                 LayerMoments(m.count.clone(), m.mean[:, :, index.to(m.mean.device)],
                                              m.m2[:, :, index.to(m.m2.device)]))
        return layers, {n: acc.result() for n, acc in self.inputs.items()}


def collect_moments(model: nn.Module, probe: ModelProbe, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    classes: list[str], resolution: str = DEFAULT_RESOLUTION, layers: list[LayerInfo] | None = None,
                    device: str = "cpu", progress: Callable[[int], None] | None = None,
                    meta: dict[str, Any] | None = None, second_moments: bool = True) -> Moments:
    """Stream ``batches`` through ``model`` once and return the class-conditional moments.

    With ``second_moments`` the same pass also collects every consumer's input mean and
    covariance (what least-squares compensation reads).

    Under an initialised ``torch.distributed`` process group, each rank passes its own
    shard of batches and every rank returns the merged moments of all shards.
    """
    layers = layers or probe.layers
    if probe.num_outputs and len(classes) != probe.num_outputs:
        raise TvsError(f"the data has {len(classes)} classes but the model outputs {probe.num_outputs} logits")
    dev = torch.device(device)
    model = model.to(dev).eval()
    collector = MomentCollector(model, layers, len(classes), resolution, dev,
                                consumer_layers(model) if second_moments else None)
    seen = 0
    t0 = time.perf_counter()
    # inference mode, as plain inference runs (no autograd bookkeeping at all); what it
    # produces is cloned into ordinary tensors below, so callers may update them in place
    with torch.inference_mode(), contextlib.ExitStack() as hooked:
        for x, y in batches:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if seen == 0:  # the model alone first, before any hook: an error there is the model's or the input's
                out = run_forward(model, x)
                if isinstance(out, torch.Tensor) and out.is_floating_point() and not bool(torch.isfinite(out).all()):
                    raise TvsError("the model's outputs on the first calibration batch are not finite (NaN or Inf): "
                                   "check the weights and the input normalisation")
                hooked.enter_context(collector)
            collector.update(x, y)
            seen += len(y)
            if progress:
                progress(len(y))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elapsed = time.perf_counter() - t0
    result, inputs = collector.results()
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        from .distributed import all_gather_merge, all_gather_merge_inputs

        if dist.get_backend() == "gloo":
            result = {n: m.to("cpu") for n, m in result.items()}
            inputs = {n: m.to("cpu") for n, m in inputs.items()}
        result = all_gather_merge(result)
        inputs = all_gather_merge_inputs(inputs)
    result = {n: m.to("cpu") for n, m in result.items()}
    inputs = {n: m.to("cpu") for n, m in inputs.items() if m.n > 0}
    counts = next(iter(result.values())).count
    if int(counts.sum()) == 0:
        raise TvsError("no calibration samples were processed")
    bad = next((n for n, m in result.items() if not (torch.isfinite(m.mean).all() and torch.isfinite(m.m2).all())),
               None)
    if bad is not None:
        raise TvsError(f"layer {bad}'s outputs are NaN or Inf on the calibration images (the model's weights or "
                       "its inputs' preprocessing): refusing to write moments that would prune at random")
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
        "input_positions_max": POSITIONS_MAX,
    })
    from ..console import short_list

    empty = [c for c, n in zip(classes, out_meta["class_counts"]) if n == 0]
    if empty:
        log.warning("%d of %d classes have no calibration samples: %s (they are left out of the class pairs)",
                    len(empty), len(classes), short_list(empty))
    single = [c for c, n in zip(classes, out_meta["class_counts"]) if n == 1]
    if single:
        log.warning("%d of %d classes have one calibration image: %s (TV scores leave them out of the class pairs: "
                    "a variance needs two)", len(single), len(classes), short_list(single))
    out_meta["empty_classes"] = empty
    return Moments(result, out_meta, inputs)
