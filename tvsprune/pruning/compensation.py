"""Compensation: what a consumer received from removed channels is rebuilt from the kept ones.

At the input of every consumer (a Conv2d that mixes channels, or a Linear) that loses
input channels R and keeps K, a removed channel is reconstructed as ``a_R ~ M a_K + c``
and the reconstruction is folded into the consumer's weights:
``W[:, K] += W[:, R] M`` per kernel tap and ``bias += sum over taps of W[:, R] c``. Channel
mixing commutes with the spatial kernel, so the fold is exact wherever the kernel does not
read zero padding.

- ``mean``: M = 0, c = E[a_R] (the zeroth-order case).
- ``ls``: M, c by ridge regression on the input's mean and covariance, which calibrate
  collects (pooled over classes and positions): distributional, no images needed.
- ``ls-seq``: after surgery, each consumer in forward order is re-fitted on calibration
  images so that its output on the *pruned* network's input matches its output on the
  unpruned network's input; this also corrects what upstream pruning changed.

Ridge strength is relative to the mean variance of the regressors (``ridge`` x trace / k),
solved by Cholesky; a failed factorisation raises the ridge tenfold rather than inverting
a singular matrix.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn

from ..calibration.collector import input_rows, mixes_channels
from ..calibration.moments import InputMoments
from ..errors import TvsError
from .graph import ChannelGraph
from .options import COMPENSATIONS, DEFAULT_RIDGE  # noqa: F401 (re-exported)
from .plan import Plan
from .refit import StopPass, module_io, run_hooked

log = logging.getLogger(__name__)
ROWS_BYTES = 256 * 2**20  # ls-seq holds at most this much of the unpruned network's input rows at once
REFIT_POSITIONS = 64  # ls-seq's positions per image (calibrate streams 16: it must stay near inference cost)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class FoldReport:
    """What a compensation did, for prune.json."""

    method: str
    consumers: int = 0
    ridge_raised: list[str] = field(default_factory=list)
    fallback_mean: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"method": self.method, "consumers": self.consumers, "ridge_raised": self.ridge_raised,
                "fallback_mean": self.fallback_mean, "warnings": self.warnings}


def _removed(graph: ChannelGraph, plan: Plan, dim: str, wanted) -> dict[str, np.ndarray]:
    """Removed indices in the ``dim`` ("in"/"out") dimension of every module ``wanted`` accepts."""
    return graph.removed_indices(dict(zip((g["root"] for g in plan.groups), plan.removed())), dim, wanted)


def removed_inputs(graph: ChannelGraph, plan: Plan) -> dict[str, np.ndarray]:
    """Removed input indices of every channel-mixing consumer (union over the groups it reads)."""
    return _removed(graph, plan, "in", mixes_channels)


def removed_outputs(graph: ChannelGraph, plan: Plan) -> dict[str, np.ndarray]:
    """Removed output indices of every Conv/Linear layer."""
    return _removed(graph, plan, "out", lambda m: isinstance(m, (nn.Conv2d, nn.Linear)))


def ridge_cholesky(gram: torch.Tensor, ridge: float, name: str) -> tuple[torch.Tensor, bool]:
    """Cholesky factor of gram + lam I, lam = ridge x mean diagonal, raised tenfold until it factorises.

    Returns (factor, whether the ridge had to be raised); never a bare inverse.
    """
    k = gram.shape[0]
    scale = float(torch.diagonal(gram).mean()) if k else 0.0
    if not np.isfinite(scale):
        raise TvsError(f"{name}: the input statistics are not finite")
    lam = ridge * max(scale, 1e-12)
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    for attempt in range(8):
        chol, info = torch.linalg.cholesky_ex(gram + lam * eye)
        if int(info) == 0 and torch.isfinite(chol).all():
            return chol, attempt > 0
        lam *= 10.0
    raise TvsError(f"{name}: the input covariance is degenerate even with a large ridge")


def ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float, name: str,
                report: FoldReport | None = None) -> torch.Tensor:
    """X = (gram + lam I)^-1 rhs (see :func:`ridge_cholesky`)."""
    chol, raised = ridge_cholesky(gram, ridge, f"compensation for {name}")
    if raised and report is not None:
        report.ridge_raised.append(name)
    return torch.cholesky_solve(rhs, chol)


def _tap_sum(w: torch.Tensor) -> torch.Tensor:
    """Weight [O, C, ...] -> [O, C]: the sum over kernel taps (what a constant input meets)."""
    return w.flatten(2).sum(-1) if w.dim() > 2 else w


def _mix(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Weight [O, C, ...] with input channels mixed by a [C, K] -> [O, K, ...]."""
    return torch.einsum("oc...,ck->ok...", w, a)


def _add_shift(layer: nn.Module, shift: torch.Tensor, norm: nn.Module | None) -> None:
    """Add ``shift`` [O] to the layer's output: its bias, else the following BatchNorm's mean, else a new bias."""
    if layer.bias is not None:
        layer.bias.data.add_(shift.to(layer.bias.dtype))
    elif isinstance(norm, NORMS) and norm is not layer:
        norm.running_mean.sub_(shift.to(norm.running_mean.dtype))
    else:
        layer.bias = nn.Parameter(shift.to(layer.weight.dtype).clone())


@torch.no_grad()
def fold_from_moments(graph: ChannelGraph, plan: Plan, inputs: dict[str, InputMoments], method: str,
                      norm_after: dict[str, str], ridge: float = DEFAULT_RIDGE,
                      fallback_means: dict[str, np.ndarray] | None = None) -> FoldReport:
    """``mean`` or ``ls`` folds into every consumer of the original model, before surgery (original indices)."""
    if method not in ("mean", "ls"):
        raise TvsError(f"fold_from_moments: unknown method {method!r}")
    report = FoldReport(method)
    for name, rm in removed_inputs(graph, plan).items():
        m = graph.modules[name]
        w = m.weight.detach().double()
        width = w.shape[1]
        im = inputs.get(name)
        if im is None and fallback_means is not None and name in fallback_means:
            mean, cov = torch.as_tensor(fallback_means[name], dtype=torch.float64), None
        elif im is None:
            raise TvsError(f"compensation: no input statistics for {name} (calibrate with this tvsprune version)")
        else:
            mean, cov = im.mean.double(), im.cov
        if mean.numel() != width:
            raise TvsError(f"compensation: input statistics of {name} have width {mean.numel()}, the layer {width}")
        keep = torch.as_tensor(np.setdiff1d(np.arange(width), rm), dtype=torch.long)
        rmt = torch.as_tensor(rm, dtype=torch.long)
        offset = torch.zeros(width, dtype=torch.float64)
        if method == "ls" and cov is not None and len(keep):
            cov = cov.double()
            ckk = cov[keep][:, keep]
            _check_conditioning(name, ckk, im.n, report)
            mt = ridge_solve(ckk, cov[keep][:, rmt], ridge, name, report)  # [K, R] = M^T
            offset[rmt] = mean[rmt] - mt.T @ mean[keep]
            w[:, keep] += _mix(w[:, rmt], mt.T)
        else:
            if method == "ls":
                report.fallback_mean.append(name)
            offset[rmt] = mean[rmt]
        m.weight.data.copy_(w.to(m.weight.dtype))
        _add_shift(m, _tap_sum(w) @ offset, graph.modules.get(norm_after.get(name, "")))
        report.consumers += 1
    return report


def _check_conditioning(name: str, cov: torch.Tensor, rows: int, report: FoldReport) -> None:
    """Warn (never fail) when the regression is underdetermined or its regressors are collinear."""
    k = cov.shape[0]
    msg = None
    if rows <= k:
        msg = f"{name}: {rows} calibration rows for {k} regressors: the fit leans on its ridge (more images help)"
    else:
        ev = torch.linalg.eigvalsh(cov)
        if float(ev[0]) <= 1e-10 * max(float(ev[-1]), 1e-300):
            msg = f"{name}: kept input channels are collinear (singular covariance): the ridge decides the fit"
    if msg:
        log.warning("compensation: %s", msg)
        report.warnings.append(msg)


def _original_rows(original: nn.Module, names: list[str], batches: list, budget: int | None = None
                   ) -> Iterator[dict[str, list[torch.Tensor]]]:
    """The unpruned network's sampled input rows of each consumer in ``names``, per batch, for
    consecutive slices of ``names`` that fit ``budget`` bytes: one forward pass over the images
    per slice (it stops after the slice's last consumer) instead of one per consumer."""
    budget = ROWS_BYTES if budget is None else budget
    mods = dict(original.named_modules())
    size = {n: 0 for n in names}
    run_hooked(original, [mods[n].register_forward_pre_hook(  # bytes per image, per consumer
        lambda m, a, n=n: size.__setitem__(n, 4 * input_rows(a[0], isinstance(m, nn.Linear), REFIT_POSITIONS).numel())
    ) for n in names], batches[0][0][:1])
    images = sum(len(x) for x, _ in batches)
    i = 0
    while i < len(names):
        j, used = i + 1, size[names[i]] * images
        while j < len(names) and used + size[names[j]] * images <= budget:
            used += size[names[j]] * images
            j += 1
        part, rows = names[i:j], {n: [] for n in names[i:j]}

        def grab(m, a, n):
            if len(rows[n]) == k:  # its first call in this pass
                rows[n].append(input_rows(a[0], isinstance(m, nn.Linear), REFIT_POSITIONS).clone())
            if all(len(r) == k + 1 for r in rows.values()):  # the part's last layer to run (not its last name:
                raise StopPass                                 # a head may run before a layer listed ahead of it)

        hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: grab(m, a, n)) for n in part]
        try:
            for k, (x, _) in enumerate(batches):
                try:
                    original(x)
                except StopPass:
                    pass
        finally:
            for h in hooks:
                h.remove()
        if any(len(r) != len(batches) for r in rows.values()):
            raise TvsError("ls-seq: a consumer layer was not reached by the forward pass")
        yield rows
        i = j


@torch.no_grad()
def refit_sequential(original: nn.Module, pruned: nn.Module, graph: ChannelGraph, plan: Plan, order: list[str],
                     batches: Iterable[tuple[torch.Tensor, torch.Tensor]], norm_after: dict[str, str],
                     ridge: float = DEFAULT_RIDGE) -> FoldReport:
    """``ls-seq``: re-fit each consumer of ``pruned`` (after surgery) in forward order.

    Consumer L gets W' = W A, bias' = bias + W (E[x] - A E[x~]) with A = cov(x, x~)
    (cov(x~) + lam I)^-1, x its input in the unpruned network and x~ in the pruned one (kept
    channels only): its output on the pruned network matches the original's in the
    least-squares sense, whatever upstream changed. One pass over ``batches`` per consumer
    on the pruned network; the unpruned network's rows are read once for many consumers
    (:func:`_original_rows`).
    """
    report = FoldReport("ls-seq")
    batches = list(batches)
    if not batches:
        raise TvsError("ls-seq needs calibration images")
    rin, rout = removed_inputs(graph, plan), removed_outputs(graph, plan)
    orig_mods, new_mods = dict(original.named_modules()), dict(pruned.named_modules())
    original.eval()
    pruned.eval()
    todo: list[str] = []
    for name in order:  # nothing upstream removed yet: the input is the original one
        if mixes_channels(orig_mods.get(name)) and mixes_channels(new_mods.get(name)) and (todo or name in rin):
            todo.append(name)
    for known in _original_rows(original, todo, batches) if todo else ():
        for name in known:
            _refit_one(name, orig_mods[name], new_mods[name], known[name], pruned, batches, rout,
                       new_mods.get(norm_after.get(name, "")), ridge, report)
    return report


def _refit_one(name: str, src: nn.Module, dst: nn.Module, rows_a: list[torch.Tensor], pruned: nn.Module,
               batches: list, rout: dict[str, np.ndarray], norm: nn.Module | None, ridge: float,
               report: FoldReport) -> None:
    """One consumer of :func:`refit_sequential`, from the unpruned network's rows ``rows_a``."""
    linear = isinstance(src, nn.Linear)
    width = src.weight.shape[1]  # joint statistics of [x, x~]: C + K columns
    acc = InputMoments.zeros(width + dst.weight.shape[1], cov=True)
    for (x, _), xa in zip(batches, rows_a):
        xb = module_io(pruned, name, x, output=False)[0]
        acc = acc.add_rows(torch.cat([xa, input_rows(xb, linear, REFIT_POSITIONS)], dim=1).double())
    mx, my = acc.mean[:width], acc.mean[width:]
    cxy, cyy = acc.cov[:width, width:], acc.cov[width:, width:]
    a = ridge_solve(cyy, cxy.T.contiguous(), ridge, name, report).T  # [C, K]
    w = src.weight.detach().double()
    b = src.bias.detach().double() if src.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    keep_out = np.setdiff1d(np.arange(w.shape[0]), rout.get(name, np.empty(0, dtype=np.int64)))
    ko = torch.as_tensor(keep_out, dtype=torch.long)
    w, b = w[ko], b[ko]
    new_w = _mix(w, a)
    if tuple(new_w.shape) != tuple(dst.weight.shape):
        raise TvsError(f"ls-seq: {name} refit has shape {tuple(new_w.shape)}, the pruned layer "
                       f"{tuple(dst.weight.shape)}")
    shift = _tap_sum(w) @ (mx - a @ my)
    dst.weight.data.copy_(new_w.to(dst.weight.dtype))
    if src.bias is not None:
        dst.bias.data.copy_((b + shift).to(dst.bias.dtype))
    else:
        _add_shift(dst, shift, norm)
    report.consumers += 1


__all__ = ["COMPENSATIONS", "FoldReport", "fold_from_moments", "refit_sequential", "removed_inputs",
           "removed_outputs", "ridge_solve"]
