"""Accuracy of a model on an evaluation source: top-1, top-5, per class, agreement."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from ..data import BatchStream
from ..models import LoadedModel


@torch.no_grad()
def predict(model: LoadedModel, data, device: str = "cpu", progress: Callable[[int], None] | None = None,
            indices: np.ndarray | None = None, max_samples: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Logits [N, K] and labels [N] for an evaluation source (``DataOptions``)."""
    from ..data import stratified_indices
    from ..models.probe import run_forward

    source = data.open(model)
    if indices is None:
        indices = stratified_indices(source.labels, data.samples_per_class, data.seed)
    if max_samples is not None:
        indices = indices[:max_samples]
    from ..compare.logits import collect_logits

    net = model.module.to(device).eval()
    try:
        logits, labels = collect_logits(
            lambda x: run_forward(net, x.to(device), what=f"model {model.spec.spec}").float().cpu().numpy(),
            BatchStream(source, indices, data.batch_size, data.workers, data.skip_bad), progress)
    finally:
        net.to("cpu")
    return logits, labels, source.classes


def accuracy_from_logits(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Top-1, top-5 and per-class accuracy (fractions)."""
    from ..errors import TvsError

    if logits.shape[1] < len(classes):
        raise TvsError(f"the data has {len(classes)} classes but the model outputs {logits.shape[1]} logits")
    top1 = logits.argmax(1) == labels
    k = min(5, logits.shape[1])
    topk = (np.argsort(-logits, axis=1)[:, :k] == labels[:, None]).any(1)
    per_class, counts = [], []
    for c in range(len(classes)):
        m = labels == c
        counts.append(int(m.sum()))
        per_class.append(float(top1[m].mean()) if m.any() else float("nan"))
    return {"top1": float(top1.mean()), "top5": float(topk.mean()), "samples": int(len(labels)),
            "classes": list(classes), "class_counts": counts, "per_class": per_class}


def evaluate(model: LoadedModel, data, device: str = "cpu", progress: Callable[[int], None] | None = None,
             indices: np.ndarray | None = None) -> dict[str, Any]:
    logits, labels, classes = predict(model, data, device, progress, indices)
    return accuracy_from_logits(logits, labels, classes)
