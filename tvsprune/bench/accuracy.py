"""Accuracy of a model on an evaluation source: top-1, top-5, per class, agreement."""
from __future__ import annotations

import math

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


Z95 = 1.959964  # two-sided 95 % normal quantile


def wilson_interval(correct: np.ndarray) -> list[float]:
    """95 % Wilson score interval of a top-1 accuracy (fractions), from per-image correctness."""
    n = len(correct)
    if n == 0:
        return [float("nan"), float("nan")]
    p = float(np.mean(correct))
    denom = 1 + Z95 ** 2 / n
    centre = (p + Z95 ** 2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def paired_drop(base_correct: np.ndarray, model_correct: np.ndarray) -> dict[str, Any]:
    """Points of top-1 lost (base - model) and its paired 95 % interval: the same images go
    through both models, so the interval is that of the mean per-image difference."""
    d = base_correct.astype(np.float64) - model_correct.astype(np.float64)
    n = len(d)
    points = float(d.mean() * 100) if n else float("nan")
    se = float(d.std(ddof=1) / math.sqrt(n) * 100) if n > 1 else float("nan")
    return {"drop_points": points, "drop_ci95": [points - Z95 * se, points + Z95 * se], "samples": n}


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
    return {"top1": float(top1.mean()), "top1_ci95": wilson_interval(top1), "top5": float(topk.mean()),
            "samples": int(len(labels)),
            "classes": list(classes), "class_counts": counts, "per_class": per_class}


def evaluate(model: LoadedModel, data, device: str = "cpu", progress: Callable[[int], None] | None = None,
             indices: np.ndarray | None = None) -> dict[str, Any]:
    logits, labels, classes = predict(model, data, device, progress, indices)
    return accuracy_from_logits(logits, labels, classes)
