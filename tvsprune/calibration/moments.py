"""Per-layer, per-class, per-filter streaming moments and their file format.

For each layer: ``count`` [K] (samples per class), ``mean`` [K, C, D] and ``m2`` [K, C, D]
(sum of squared deviations), all float64 except the counts. Within a batch (at most a few
hundred samples of float32 activations) the sums of squares are taken in float64; batches
and shards combine with the parallel-variance update of Chan et al., which is exact and
associative up to float64 rounding, unlike a running sum of squares over the whole set.

File layout (safetensors): ``L/count`` int64 [K], ``L/mean`` float64 [K, C, D],
``L/var`` float64 [K, C, D] (unbiased; 0 where count < 2) for every layer name ``L``;
JSON metadata under the metadata key ``tvsprune``.

Format 2 adds, for every consumer layer ``N`` (a Conv2d or Linear that reads channels),
the statistics of its *input* pooled over classes and positions, which least-squares
compensation needs: ``@in/N/count`` int64 [1], ``@in/N/mean`` float64 [C] and
``@in/N/cov`` float64 [C, C] (unbiased covariance; absent for inputs wider than
``COV_MAX`` features, where only the mean is kept). Format 1 files still load (without
input statistics).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..artifacts import atomic_path
from ..errors import TvsError

FORMAT = "tvsprune.moments/2"
FORMATS = ("tvsprune.moments/1", FORMAT)
COV_MAX = 2048  # widest consumer input whose C x C covariance is kept (2048^2 float64 = 32 MiB)


@dataclass
class BatchClasses:
    """A batch's labels grouped by class: the classes it holds and each sample's row among them."""

    rows: torch.Tensor            # [B] each sample's row in ``counts``
    counts: torch.Tensor          # [R] samples per held class
    present: torch.Tensor | None  # [R] the held classes; None when the batch holds all of them

    @classmethod
    def of(cls, labels: torch.Tensor, k: int) -> "BatchClasses":
        counts = torch.bincount(labels, minlength=k)
        present = torch.nonzero(counts).flatten()
        if present.numel() == k:
            return cls(labels, counts, None)
        slot = torch.zeros(k, dtype=torch.long, device=labels.device)
        slot[present] = torch.arange(present.numel(), device=labels.device)
        return cls(slot[labels], counts[present], present)


@dataclass
class LayerMoments:
    """Moments of one layer's filters, split by class."""

    count: torch.Tensor  # [K] int64
    mean: torch.Tensor   # [K, C, D] float64
    m2: torch.Tensor     # [K, C, D] float64

    @classmethod
    def zeros(cls, classes: int, channels: int, dim: int, device: torch.device | str = "cpu") -> "LayerMoments":
        z = torch.zeros(classes, channels, dim, dtype=torch.float64, device=device)
        return cls(torch.zeros(classes, dtype=torch.int64, device=device), z, z.clone())

    @property
    def var(self) -> torch.Tensor:
        """Unbiased variance; 0 for classes with fewer than two samples."""
        denom = (self.count - 1).clamp(min=1).to(torch.float64).view(-1, 1, 1)
        return torch.where(self.count.view(-1, 1, 1) > 1, self.m2 / denom, torch.zeros_like(self.m2))

    def merge(self, other: "LayerMoments") -> "LayerMoments":
        """Combine two disjoint sets of samples (Chan et al. parallel update)."""
        if self.mean.shape != other.mean.shape:
            raise TvsError(f"cannot merge moments of shapes {tuple(self.mean.shape)} and {tuple(other.mean.shape)}")
        na = self.count.to(torch.float64).view(-1, 1, 1)
        nb = other.count.to(torch.float64).view(-1, 1, 1)
        n = na + nb
        safe_n = torch.where(n > 0, n, torch.ones_like(n))
        delta = other.mean - self.mean
        mean = self.mean + delta * (nb / safe_n)
        m2 = self.m2 + other.m2 + delta * delta * (na * nb / safe_n)
        return LayerMoments(self.count + other.count, mean, m2)

    def add_batch(self, y: torch.Tensor, labels: torch.Tensor,
                  classes: "BatchClasses | None" = None) -> "LayerMoments":
        """Fold a batch ``y`` [B, C, D] (any float dtype) with ``labels`` [B] in.

        Within the batch, per class: the sum and the sum of squares in float64 (a float32
        value's square is exact in float64), m2 = sum of squares - sum^2 / n, clamped at 0;
        two passes over the batch instead of four (gathering each sample's class mean costs
        as much as the rest). Batches then combine by Chan's update, as shards do.

        When the batch holds only some classes (a batch of 32 among 1,000 classes), only
        their rows are computed and merged; the other rows are copied unchanged, which is
        what merging an empty class gives, bit for bit. ``classes`` is that grouping of
        ``labels``, when the caller already has it (one per batch, shared by every layer).
        """
        k = self.count.numel()
        c = classes or BatchClasses.of(labels, k)
        flat = y.reshape(y.shape[0], -1).to(torch.float64)
        zeros = torch.zeros(c.counts.numel(), flat.shape[1], dtype=torch.float64, device=y.device)
        sums = zeros.index_add(0, c.rows, flat)
        squares = zeros.index_add_(0, c.rows, flat * flat)
        n = c.counts.clamp(min=1).to(torch.float64).unsqueeze(1)
        mean_b = sums / n
        m2_b = (squares - sums * mean_b).clamp_(min=0)
        shape = (c.counts.numel(), *self.mean.shape[1:])
        batch = LayerMoments(c.counts, mean_b.view(shape), m2_b.view(shape))
        if c.present is None:
            return self.merge(batch)
        part = LayerMoments(self.count[c.present], self.mean[c.present], self.m2[c.present]).merge(batch)
        return LayerMoments(*(t.index_copy(0, c.present, u) for t, u in
                              ((self.count, part.count), (self.mean, part.mean), (self.m2, part.m2))))

    def to(self, device: torch.device | str) -> "LayerMoments":
        return LayerMoments(self.count.to(device), self.mean.to(device), self.m2.to(device))

    def pooled(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """All classes merged: (mean [C, D], unbiased var [C, D], count)."""
        total = LayerMoments(self.count[:1] * 0, self.mean[:1] * 0, self.m2[:1] * 0)
        for c in range(self.count.numel()):
            total = total.merge(LayerMoments(self.count[c:c + 1], self.mean[c:c + 1], self.m2[c:c + 1]))
        return total.mean[0], total.var[0], int(total.count[0])


@dataclass
class InputMoments:
    """Mean and co-moment matrix of one consumer's input channels, pooled over classes and positions.

    ``m2`` is the sum of outer products of deviations from the mean ([C, C]); ``None`` when
    the input is too wide to keep it (only the mean then).
    """

    count: torch.Tensor          # [1] int64 (rows: images x sampled positions)
    mean: torch.Tensor           # [C] float64
    m2: torch.Tensor | None      # [C, C] float64

    @classmethod
    def zeros(cls, channels: int, device: torch.device | str = "cpu", cov: bool | None = None) -> "InputMoments":
        """Empty statistics; ``cov`` keeps the co-moment matrix (default: when ``channels <= COV_MAX``)."""
        keep = channels <= COV_MAX if cov is None else cov
        m2 = torch.zeros(channels, channels, dtype=torch.float64, device=device) if keep else None
        return cls(torch.zeros(1, dtype=torch.int64, device=device),
                   torch.zeros(channels, dtype=torch.float64, device=device), m2)

    @property
    def n(self) -> int:
        return int(self.count[0])

    @property
    def cov(self) -> torch.Tensor | None:
        """Unbiased covariance [C, C] (zeros below two rows)."""
        if self.m2 is None:
            return None
        return self.m2 / max(1, self.n - 1) if self.n > 1 else torch.zeros_like(self.m2)

    def merge(self, other: "InputMoments") -> "InputMoments":
        """Chan et al.'s parallel update for a mean vector and a co-moment matrix."""
        if self.mean.shape != other.mean.shape:
            raise TvsError(f"cannot merge input moments of widths {self.mean.numel()} and {other.mean.numel()}")
        na, nb = float(self.n), float(other.n)
        n = na + nb
        if n == 0:
            return self
        delta = other.mean - self.mean
        mean = self.mean + delta * (nb / n)
        m2 = None
        if self.m2 is not None and other.m2 is not None:
            m2 = self.m2 + other.m2 + torch.outer(delta, delta) * (na * nb / n)
        return InputMoments(self.count + other.count, mean, m2)

    def add_rows(self, rows: torch.Tensor) -> "InputMoments":
        """Fold rows [..., C] (one per image and sampled position) in (see :class:`CoMoments`)."""
        acc = CoMoments(self.mean.numel(), rows.device, self.m2 is not None)
        acc.add(rows)
        return self.merge(acc.result())

    def to(self, device: torch.device | str) -> "InputMoments":
        return InputMoments(self.count.to(device), self.mean.to(device),
                            None if self.m2 is None else self.m2.to(device))


class CoMoments:
    """Streaming mean and co-moment matrix of rows [..., C] (what :class:`InputMoments` keeps).

    Rows are taken relative to a fixed reference, the first batch's mean in the rows' dtype:
    each batch costs one pass that writes ``d = rows - ref`` (read through any strides, so a
    strided view of an activation is gathered and centred at once), the float64 column sums
    of ``d`` and the product ``d.T @ d`` in the rows' dtype (float32 activations: the product
    is the cost that matters), added to a float64 sum. Only the block rows of the upper
    triangle are multiplied (about 60 % of the product's flops at four blocks); the lower
    triangle is mirrored at the end, where the reference's offset from the mean is taken out
    in float64 (m2 = S - s s^T / n). Calibration batches mix the data, so every batch's mean
    lies near the reference and the float32 product loses nothing to the offset. Shards and
    ranks combine through :meth:`InputMoments.merge`.
    """

    def __init__(self, channels: int, device: torch.device | str = "cpu", cov: bool | None = None) -> None:
        empty = InputMoments.zeros(channels, device, cov)
        self.s1 = empty.mean  # float64 [C]: sum of (row - ref)
        self.s2 = empty.m2    # float64 [C, C] (upper block rows) or None (inputs wider than COV_MAX)
        self.n = 0
        self.ref: torch.Tensor | None = None  # [C] in the rows' dtype: the first batch's mean
        blocks = max(1, min(4, channels // 64))
        self.edges = [channels * i // blocks for i in range(blocks + 1)]

    def add(self, rows: torch.Tensor) -> None:
        if rows.numel() == 0:
            return
        c = rows.shape[-1]
        if self.ref is None:
            self.ref = rows.reshape(-1, c).mean(0)
        d = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
        d = torch.sub(rows, self.ref, out=d).view(-1, c)
        self.n += d.shape[0]
        self.s1 += d.sum(0, dtype=torch.float64)
        if self.s2 is not None:
            e = self.edges
            for a, b in zip(e[:-1], e[1:]):
                self.s2[a:b, a:] += d[:, a:b].T @ d[:, a:]

    def result(self) -> InputMoments:
        """The rows so far as :class:`InputMoments` (unbiased covariance through ``cov``)."""
        if self.n == 0:
            return InputMoments.zeros(self.s1.numel(), self.s1.device, self.s2 is not None)
        count = torch.tensor([self.n], dtype=torch.int64, device=self.s1.device)
        offset = self.s1 / self.n
        m2 = None
        if self.s2 is not None:
            m2 = torch.triu(self.s2) + torch.triu(self.s2, 1).T - self.n * torch.outer(offset, offset)
        return InputMoments(count, self.ref.to(torch.float64) + offset, m2)


def _check_values(path: str | Path, tensors: dict[str, torch.Tensor], classes: int) -> None:
    """Refuse what would prune silently wrong: NaN or Inf anywhere, negative counts or variances,
    and class counts of another length than the class list."""
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise TvsError(f"{path}: tensor {key} holds NaN or Inf values (a model whose outputs are not finite, "
                           "or a damaged file): calibrate again")
        leaf = key.rsplit("/", 1)[-1]
        if leaf in ("count", "var") and (t < 0).any():
            raise TvsError(f"{path}: tensor {key} holds negative values ({leaf} cannot be negative)")
        if leaf == "count" and not key.startswith("@in/") and t.shape[0] != classes:
            raise TvsError(f"{path}: tensor {key} counts {t.shape[0]} classes, the metadata lists {classes}")


@dataclass
class Moments:
    """Moments of every calibrated layer, plus metadata describing where they came from.

    ``inputs`` holds the pooled input statistics of every consumer layer (format 2);
    empty for files written by format 1.
    """

    layers: dict[str, LayerMoments]
    meta: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, InputMoments] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return list(self.meta.get("classes", []))

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    def merge(self, other: "Moments") -> "Moments":
        """Exact, associative combination of two shards (same model, layers, resolution)."""
        for key in ("resolution", "classes"):
            if self.meta.get(key) != other.meta.get(key):
                raise TvsError(f"cannot merge moments with different {key}: "
                               f"{self.meta.get(key)!r} vs {other.meta.get(key)!r}")
        if self.meta.get("weights_sha256") != other.meta.get("weights_sha256"):
            raise TvsError("cannot merge moments collected from different weights (weights_sha256 differs)")
        if list(self.layers) != list(other.layers):
            raise TvsError("cannot merge moments of different layer sets")
        pre = [(m.meta.get("data") or {}).get("preprocess") for m in (self, other)]
        if pre[0] != pre[1]:
            raise TvsError(f"cannot merge moments collected with different preprocessing: {pre[0]} vs {pre[1]}")
        twice = set(self.meta.get("shards") or ()) & set(other.meta.get("shards") or ())
        if twice:
            raise TvsError(f"cannot merge: both files hold the samples of shard {sorted(twice)[0]} (the same "
                           "images from the same folder); each shard may be merged once")
        layers = {n: self.layers[n].merge(other.layers[n]) for n in self.layers}
        inputs = {n: self.inputs[n].merge(other.inputs[n]) for n in self.inputs if n in other.inputs}
        meta = dict(self.meta)
        first = next(iter(layers.values()), None)
        if first is not None:
            meta["class_counts"] = [int(c) for c in first.count.tolist()]
            meta["samples"] = int(first.count.sum())
        meta["skipped"] = int(self.meta.get("skipped", 0)) + int(other.meta.get("skipped", 0))
        meta["shards"] = sorted(set(self.meta.get("shards") or ()) | set(other.meta.get("shards") or ()))
        return Moments(layers, meta, inputs)

    def save(self, path: str | Path) -> None:
        """Write the safetensors file atomically."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for name, lm in self.layers.items():
            tensors[f"{name}/count"] = lm.count.cpu().contiguous()
            tensors[f"{name}/mean"] = lm.mean.cpu().contiguous()
            tensors[f"{name}/var"] = lm.var.cpu().contiguous()
        for name, im in self.inputs.items():
            tensors[f"@in/{name}/count"] = im.count.cpu().contiguous()
            tensors[f"@in/{name}/mean"] = im.mean.cpu().contiguous()
            if im.m2 is not None:
                tensors[f"@in/{name}/cov"] = im.cov.cpu().contiguous()
        meta = dict(self.meta, format=FORMAT, layers=self.meta.get("layers") or {n: {} for n in self.layers},
                    inputs=sorted(self.inputs))
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"tvsprune": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> "Moments":
        """Read a moments file (no pickle)."""
        from ..artifacts import read_safetensors

        meta, tensors = read_safetensors(path, "moments file", FORMATS)
        if not isinstance(meta.get("layers"), dict) or not isinstance(meta.get("classes"), list):
            raise TvsError(f"{path}: metadata lacks its 'layers' or 'classes' entry (not a moments file tvsprune wrote)")
        _check_values(path, tensors, len(meta["classes"]))
        layers = {}
        for name in meta["layers"]:
            try:
                count, mean, var = (tensors[f"{name}/{t}"] for t in ("count", "mean", "var"))
            except KeyError as e:
                raise TvsError(f"{path}: tensor {e.args[0]} missing") from None
            if count.shape[0] != mean.shape[0] or mean.shape != var.shape or mean.dim() != 3:
                raise TvsError(f"{path}: layer {name}: count {tuple(count.shape)}, mean {tuple(mean.shape)} and var "
                               f"{tuple(var.shape)} do not agree ([classes], [classes, channels, features] twice)")
            m2 = var * (count - 1).clamp(min=0).to(torch.float64).view(-1, 1, 1)
            layers[name] = LayerMoments(count, mean, m2)
        inputs = {}
        for name in meta.get("inputs") or []:
            try:
                count, mean = tensors[f"@in/{name}/count"], tensors[f"@in/{name}/mean"]
            except KeyError as e:
                raise TvsError(f"{path}: tensor {e.args[0]} missing") from None
            cov = tensors.get(f"@in/{name}/cov")
            if cov is not None and tuple(cov.shape) != (mean.numel(), mean.numel()):
                raise TvsError(f"{path}: tensor @in/{name}/cov has shape {tuple(cov.shape)}, expected "
                               f"{(mean.numel(), mean.numel())}")
            inputs[name] = InputMoments(count, mean, None if cov is None else cov * max(0, int(count[0]) - 1))
        return cls(layers, meta, inputs)
