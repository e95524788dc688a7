"""Least-squares saliency: what removing one channel costs once compensation has rebuilt it.

For a consumer with input covariance S (from the moments file) and weights W, removing
input channel i and reconstructing it from all the others by ridge regression leaves a
residual of variance r_i = 1 / (S + lam I)^-1_ii. Its error at the consumer's output has
energy about r_i ||W[:, i]||^2 (summed over taps), which is divided by the consumer's
output energy sum_t tr(W_t S W_t^T) so that layers are comparable. A channel's saliency is
the sum over every consumer that reads it (coupled channels: all of them).

This ranks by *reconstructability* and scales across layers, so a global threshold on it
is an allocation: how many channels each layer loses follows from the data.
"""
from __future__ import annotations

import numpy as np
import torch

from ..calibration.moments import InputMoments
from ..errors import TvsError
from ..calibration.collector import mixes_channels
from .compensation import DEFAULT_RIDGE, ridge_cholesky
from .graph import ChannelGraph


def _consumer_saliency(w: torch.Tensor, cov: torch.Tensor, ridge: float,
                       keep: np.ndarray | None = None) -> torch.Tensor:
    """Relative output error of removing each input channel alone, with LS compensation -> [C].

    With ``keep``, the residuals are those of a channel given the other *kept* ones (the
    removed ones score 0).
    """
    taps = w.flatten(2) if w.dim() > 2 else w.unsqueeze(-1)           # [O, C, T]
    gram = torch.einsum("oit,okt->ik", taps, taps)                       # sum_t W_t^T W_t
    energy = max(float((gram * cov).sum()), 1e-30)
    full = torch.zeros(cov.shape[0], dtype=torch.float64)
    if keep is not None:
        k = torch.as_tensor(keep, dtype=torch.long)
        cov, taps = cov[k][:, k], taps[:, k]
    chol, _ = ridge_cholesky(cov, ridge, "saliency")
    prec_diag = torch.diagonal(torch.cholesky_inverse(chol))
    resid = 1.0 / prec_diag
    wnorm = (taps ** 2).sum(dim=(0, 2))                                  # [C]
    sal = resid * wnorm / energy
    if keep is None:
        return sal
    full[torch.as_tensor(keep, dtype=torch.long)] = sal
    return full


@torch.no_grad()
def ls_saliency(graph: ChannelGraph, inputs: dict[str, InputMoments], layers: list[str],
                ridge: float = DEFAULT_RIDGE, removed: dict[str, np.ndarray] | None = None
                ) -> dict[str, np.ndarray]:
    """Per prunable layer (producer), the LS saliency of each output channel (higher = keep).

    ``removed`` (root channels already removed, per group root) conditions every residual
    on the channels still kept; removed channels score -1 (they go first again).
    """
    removed = removed or {}
    rin = _removed_inputs(graph, removed)
    if not inputs:
        raise TvsError("the ls criterion needs the moments file's input second moments "
                       "(calibrate with this tvsprune version)")
    cache: dict[str, torch.Tensor] = {}
    out: dict[str, np.ndarray] = {}
    wanted = set(layers)
    for g in graph.groups:
        sal = np.zeros(g.channels)
        for it in g.items:
            m = graph.modules[it.module]
            if it.dim != "in" or not mixes_channels(m):
                continue
            im = inputs.get(it.module)
            if im is None or im.m2 is None:
                continue
            if it.module not in cache:
                keep = None
                if it.module in rin:
                    keep = np.setdiff1d(np.arange(im.mean.numel()), rin[it.module])
                cache[it.module] = _consumer_saliency(m.weight.detach().double(), im.cov.double(), ridge, keep)
            np.add.at(sal, it.root_idxs, cache[it.module].numpy()[it.idxs])
        gone = removed.get(g.root)
        if gone is not None and len(gone):
            sal[gone] = -1.0
        for it in g.items:
            if it.dim == "out" and it.module in wanted:
                s = out.setdefault(it.module, np.zeros(graph.modules[it.module].weight.shape[0]))
                s[it.idxs] = sal[it.root_idxs]
    return out


def _removed_inputs(graph: ChannelGraph, removed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from .compensation import removed_inputs
    from .plan import Plan, plan_groups

    if not removed:
        return {}
    none = np.empty(0, dtype=np.int64)
    return removed_inputs(graph, Plan(plan_groups(graph, [np.asarray(removed.get(g.root, none), dtype=np.int64)
                                                          for g in graph.groups])))


__all__ = ["ls_saliency"]
