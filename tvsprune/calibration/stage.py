"""The calibrate stage: model + data -> moments file."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable


from ..version import __version__
from ..data import BatchStream, stratified_indices
from ..data.options import DataOptions
from ..errors import MissingDependencyError, TvsError
from ..models import LoadedModel, load_model
from ..models.probe import probe_model
from .collector import collect_moments
from .moments import Moments
from .options import DEFAULT_RESOLUTION

log = logging.getLogger(__name__)


def _dist_context() -> tuple[int, int, bool]:
    """(rank, world, initialised_here): joins a torchrun group when the env asks for one."""
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch

        dist.init_process_group(backend="nccl" if torch.cuda.is_available() and
                                os.environ.get("TVSPRUNE_DIST_BACKEND") != "gloo" else "gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def calibrate(model: str | LoadedModel, data: DataOptions, out: str | Path | None,
              resolution: str = DEFAULT_RESOLUTION, layers: str | None = None, device: str = "cpu",
              progress: Callable[[int], None] | None = None,
              on_total: Callable[[int], None] | None = None) -> Moments:
    """Collect class-conditional moments of every prunable layer and write them to ``out``.

    Under ``torchrun`` each rank reads its shard (every world-size-th sample) and rank 0
    writes the merged result.
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise MissingDependencyError("--device cuda asked for, but torch sees no CUDA GPU (tvsprune doctor "
                                         "tells more)")
    source = data.open(loaded)
    if data.mean is None and loaded.normalize is None:
        log.warning("no normalisation given (--mean/--std) and none in the checkpoint: using raw [0, 1] pixels")
    indices = stratified_indices(source.labels, data.samples_per_class, data.seed)
    rank, world, own_group = _dist_context()
    shard = indices[rank::world]
    try:
        first = source.load(int(indices[0]))
    except Exception as e:  # a bad first file is reported by the stream below with its name
        first = None
        log.debug("first sample failed: %s", e)
    import torch

    example = first[None] if first is not None else torch.zeros(1, *(loaded.input_shape or (3, 32, 32)))
    probe = probe_model(loaded.module, example, what=f"model {loaded.spec.spec}")
    chosen = probe.select(layers)
    if on_total:
        on_total(len(shard))
    stream = BatchStream(source, shard, data.batch_size, data.workers, data.skip_bad)
    meta = {
        "tvsprune_version": __version__,
        "model": loaded.spec.to_dict(),
        "weights_sha256": loaded.weights_sha256,
        "input_shape": list(example.shape[1:]),
        "data": source.describe() | {"samples_per_class": data.samples_per_class, "seed": data.seed},
        # which samples these moments hold: merge-moments refuses to count a shard twice
        "shards": [_shard_id(source.describe().get("source"), indices)],
    }
    try:
        moments = collect_moments(loaded.module, probe, stream, source.classes, resolution, chosen,
                                  device, progress, meta)
        moments.meta["skipped"] = len(stream.skipped)
        if stream.skipped:
            moments.meta["skipped_files"] = stream.skipped[:100]
        if out is not None and rank == 0:
            moments.save(out)
    finally:
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()
    return moments


def _shard_id(source: Any, indices: Any) -> str:
    """The identity of a set of samples: the resolved data source and the sample indices."""
    import hashlib

    import numpy as np

    h = hashlib.sha256(str(source).encode())
    h.update(np.asarray(indices, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def merge_moment_files(paths: list[str | Path], out: str | Path) -> Moments:
    """Merge shards written by separate calibrate runs into one file."""
    if len(paths) < 2:
        raise TvsError("merge-moments needs at least two files")
    result = Moments.load(paths[0])
    for p in paths[1:]:
        result = result.merge(Moments.load(p))
    result.save(out)
    return result


def moments_table(moments: Moments) -> list[dict[str, Any]]:
    """One row per layer, for the CLI's summary table."""
    rows = []
    for name, lm in moments.layers.items():
        info = moments.meta.get("layers", {}).get(name, {})
        var = lm.var
        rows.append({"layer": name, "stat": info.get("stat_module", name), "channels": lm.mean.shape[1],
                     "dim": lm.mean.shape[2], "mean|mu|": float(lm.mean.abs().mean()),
                     "mean var": float(var.mean()),
                     "dead filters": int((var.amax(dim=(0, 2)) <= 1e-12).sum())})
    return rows


__all__ = ["DataOptions", "calibrate", "merge_moment_files", "moments_table"]
