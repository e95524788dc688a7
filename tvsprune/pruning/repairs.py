"""Repairs after surgery, without labels or gradients.

- BatchNorm re-estimation: running statistics recomputed on calibration images.
- Mean compensation: the mean input a consumer received from removed channels is folded
  into its bias (or the running mean of the BatchNorm after it), so it keeps receiving it.
"""
from __future__ import annotations

import logging
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn

log = logging.getLogger(__name__)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                          device: str = "cpu") -> int:
    """Re-estimate every BatchNorm's running mean/var (cumulative average); returns images seen."""
    norms = [m for m in model.modules() if isinstance(m, NORMS)]
    if not norms:
        return 0
    saved = {m: (m.momentum, m.training) for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the exact mean over all batches
    model.eval()
    for m in norms:
        m.train()
    seen = 0
    try:
        for x, _ in batches:
            model(x.to(device))
            seen += len(x)
    finally:
        for m, (momentum, training) in saved.items():
            m.momentum = momentum
            m.train(training)
        model.eval()
    return seen


@torch.no_grad()
def consumer_input_means(model: nn.Module, consumers: list[str],
                         batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: str = "cpu"
                         ) -> dict[str, np.ndarray]:
    """Mean input per input channel (Conv2d: over batch and space) or feature (Linear)."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def fn(m, inp):
            x = inp[0].detach().double()
            if x.dim() == 4 and not isinstance(m, nn.Linear):
                s, n = x.sum(dim=(0, 2, 3)), x.shape[0] * x.shape[2] * x.shape[3]
            else:
                x = x.reshape(-1, x.shape[-1])
                s, n = x.sum(0), x.shape[0]
            sums[name] = sums.get(name, 0) + s
            counts[name] = counts.get(name, 0) + n
        return fn

    handles = [modules[c].register_forward_pre_hook(hook(c)) for c in consumers]
    model.eval()
    try:
        for x, _ in batches:
            model(x.to(device))
    finally:
        for h in handles:
            h.remove()
    return {c: (sums[c] / counts[c]).cpu().numpy() for c in consumers if c in sums}
