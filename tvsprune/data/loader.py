"""Batching a source: a DataLoader that reports undecodable files instead of crashing."""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import TvsError
from .sources import BadSample, Source

log = logging.getLogger(__name__)


class _Indexed(Dataset):
    def __init__(self, source: Source, indices: np.ndarray) -> None:
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        i = int(self.indices[j])
        try:
            return self.source.load(i), int(self.source.labels[i]), None
        except BadSample as e:
            return None, int(self.source.labels[i]), str(e)


def _collate(items):
    good = [(x, y) for x, y, bad in items if bad is None]
    bad = [b for _, _, b in items if b is not None]
    if not good:
        return None, None, bad
    shapes = {tuple(x.shape) for x, _ in good}
    if len(shapes) > 1:
        raise TvsError(f"images of different sizes in one batch {sorted(shapes)}: add --resize/--crop")
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), bad


class BatchStream:
    """Iterate (images, labels) batches over ``indices`` of ``source``.

    An undecodable file stops the stream with an error naming it, unless ``skip_bad``,
    in which case it is counted in ``self.skipped``.
    """

    def __init__(self, source: Source, indices: np.ndarray, batch_size: int = 64,
                 workers: int = 0, skip_bad: bool = False) -> None:
        self.source, self.indices = source, np.asarray(indices)
        self.batch_size, self.workers, self.skip_bad = batch_size, workers, skip_bad
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(_Indexed(self.source, self.indices), batch_size=self.batch_size,
                            shuffle=False, num_workers=self.workers, collate_fn=_collate,
                            persistent_workers=False)
        for x, y, bad in loader:
            if bad:
                if not self.skip_bad:
                    raise TvsError(f"corrupt input {bad[0]} (use --skip-bad to skip and count such files)")
                self.skipped += bad
                for b in bad:
                    log.warning("skipped %s", b)
            if x is not None:
                yield x, y


def take_images(source: Source, n: int, seed: int = 0, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images spread evenly over the classes (seeded), decoded into one tensor."""
    from .sources import stratified_indices

    per_class = -(-n // max(1, len(source.classes)))
    idx = stratified_indices(source.labels, per_class, seed)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.permutation(idx)[:n])
    xs, ys = zip(*BatchStream(source, idx, batch_size))
    return torch.cat(xs), torch.cat(ys)
