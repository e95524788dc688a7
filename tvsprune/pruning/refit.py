"""Least-squares fits of convolutions to an unpruned network's activations (no labels): the
replacements of ``--structure blocks``, and every convolution that runs after a changed block,
re-fitted so that it maps what it now reads to what it wrote in the unpruned network (the
sequential reconstruction that ``ls-seq`` does for removed channels).

The fits read the activations of ``FIT_IMAGES`` images in chunks (memory flat in their
number), on ``FIT_POSITIONS`` random output positions per image; each forward pass stops at
the module it reads.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import TvsError

FIT_IMAGES, FIT_POSITIONS, FIT_CHUNK = 1000, 256, 100
TRIAL_IMAGES = 250  # a greedy trial, scored and thrown away, is fitted on fewer
TARGET_BYTES = 256 << 20  # the unpruned network's outputs a blocks walk keeps for its fits (Targets)


def run_hooked(model: nn.Module, handles: list, x: torch.Tensor) -> None:
    """One forward pass of ``model`` (eval, no grad) on ``x`` with hooks ``handles`` registered,
    which are removed after it, whatever happens."""
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()


class StopPass(Exception):
    """Raised by the hook that has read what it wanted: the rest of the forward pass is skipped."""


def module_io(model: nn.Module, name: str, x: torch.Tensor, pre: nn.Module | None = None,
              output: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Module ``name``'s input and output on ``x`` (``pre``'s output on that input when given:
    a block's pre-ReLU output); the pass stops there (``output=False``: before the module runs,
    and the output is None)."""
    got: dict[str, torch.Tensor | None] = {}

    def after(m: nn.Module, a: tuple, o: torch.Tensor) -> None:
        got.update(x=a[0].clone(), y=o.clone())  # clones: in-place ops after it
        raise StopPass

    def before(m: nn.Module, a: tuple) -> None:
        got.update(x=a[0], y=None)  # nothing runs after it
        raise StopPass

    mod = model.get_submodule(name)
    h = mod.register_forward_hook(after) if output else mod.register_forward_pre_hook(before)
    try:
        with torch.no_grad():
            try:
                model(x)
            except StopPass:
                pass
            if pre is not None and "x" in got:
                got["y"] = pre(got["x"])
    finally:
        h.remove()
    if "x" not in got:
        raise TvsError(f"{name} was not reached by the forward pass")
    return got["x"], got["y"]


def fit_conv(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], like: nn.Conv2d | int, ridge: float = 1e-4,
             positions: int = FIT_POSITIONS, seed: int = 0) -> nn.Conv2d:
    """The convolution shaped like ``like`` (kernel, stride, padding, dilation, bias or not; an
    int k: k x k, stride 1, same padding, with bias) closest in least squares to each pair's
    ``z`` from its ``x`` (chunks of images: their normal equations are summed), on ``positions``
    random output positions per image; ridge relative to the mean diagonal."""
    if isinstance(like, int):
        geo = {"kernel_size": like, "stride": 1, "padding": like // 2, "dilation": 1}
        bias = True
    else:
        geo = {"kernel_size": like.kernel_size, "stride": like.stride, "padding": like.padding,
               "dilation": like.dilation}
        bias = like.bias is not None
    gen, g, r, held, rows = torch.Generator().manual_seed(seed), 0.0, 0.0, [], 0
    for x, z in pairs:
        n, c = x.shape[:2]
        cols = F.unfold(x, **geo)
        sel = torch.randint(0, cols.shape[2], (n, 1, min(positions, cols.shape[2])), generator=gen)
        a = torch.gather(cols, 2, sel.expand(-1, cols.shape[1], -1)).permute(0, 2, 1).reshape(-1, cols.shape[1])
        b = torch.gather(z.reshape(n, z.shape[1], -1), 2, sel.expand(-1, z.shape[1], -1))
        a = torch.cat([a, torch.ones(len(a), 1)], 1).double() if bias else a.double()
        held.append((a, b.permute(0, 2, 1).reshape(-1, z.shape[1]).double()))
        rows += len(a)
        if rows >= a.shape[1]:  # as many rows as unknowns: the normal equations, from here on
            for a, b in held:
                g, r = g + a.T @ a, r + a.T @ b
            held = []
    # rows only grow: once as many as the unknowns, every later chunk is added at once, so rows are
    # held at the end only when they are fewer than the unknowns, every one of them held
    if held and ridge > 0:  # solved for the rows: the same ridge solution
        sol = _dual_ridge(torch.cat([h[0] for h in held]), torch.cat([h[1] for h in held]), ridge, bias).float()
    else:
        for a, b in held:  # no ridge: the normal equations as they are
            g, r = g + a.T @ a, r + a.T @ b
        g += ridge * g.diagonal()[:len(g) - bias].mean() * torch.eye(len(g), dtype=g.dtype)
        sol = torch.linalg.solve(g, r).float()
    cout = sol.shape[1]
    conv = nn.Conv2d(c, cout, bias=bias, **geo)
    conv.weight.data = sol[:conv.weight[0].numel()].T.reshape(conv.weight.shape).contiguous()
    if bias:
        conv.bias.data = sol[-1].contiguous()
    return conv


def _dual_ridge(a: torch.Tensor, b: torch.Tensor, ridge: float, bias: bool) -> torch.Tensor:
    """argmin |a w - b|^2 + lam |w|^2 with lam = ``ridge`` times the mean diagonal of a^T a (the
    bias column left out of the mean, as the normal equations do), as a^T (a a^T + lam I)^-1 b:
    equal to (a^T a + lam I)^-1 a^T b, and far cheaper where the rows are fewer than the unknowns
    (a 3x3 fit of 512 channels has 4,609 unknowns; 160 images of a 2x2 map give 640 rows)."""
    lam = ridge * a[:, :a.shape[1] - bias].square().sum(0).mean()
    k = a @ a.T
    k.diagonal().add_(lam)
    return a.T @ torch.linalg.solve(k, b)


def refittable(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The convolutions a least-squares fit can stand in for (ungrouped, zero padding, called
    once on ``example``), in the order they run."""
    calls: list[str] = []
    run_hooked(model, [m.register_forward_hook(lambda m, a, o, name=name: calls.append(name))
                       for name, m in model.named_modules() if type(m) is nn.Conv2d], example)
    return [n for n in dict.fromkeys(calls) if calls.count(n) == 1 and model.get_submodule(n).groups == 1
            and model.get_submodule(n).padding_mode == "zeros" and isinstance(model.get_submodule(n).padding, tuple)]


class Targets:
    """What the unpruned network ``base`` wrote at the modules the fits read, on chunks of images:
    :func:`module_io`'s output, kept (up to ``budget`` bytes, then computed each time). A blocks
    walk fits every candidate network to the same base on the same images; each fit once ran the
    base up to its module again (a quarter of a ResNet-18 walk's time). A chunk is known by where
    its data lies and its shape (the kept entry holds it, so that memory is not reused)."""

    def __init__(self, base: nn.Module, budget: int = TARGET_BYTES) -> None:
        self.base, self.budget, self.used = base, budget, 0
        self.kept: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def output(self, name: str, x: torch.Tensor, pre: nn.Module | None = None) -> torch.Tensor:
        key = (name, pre is not None, x.data_ptr(), tuple(x.shape), x.stride())
        if key in self.kept:
            return self.kept[key][1]
        y = module_io(self.base, name, x, pre)[1]
        if self.used + y.nbytes <= self.budget:
            self.kept[key], self.used = (x, y), self.used + y.nbytes
        return y


def as_targets(base: nn.Module | Targets) -> Targets:
    """``base`` as :class:`Targets` (a module: one that keeps nothing)."""
    return base if isinstance(base, Targets) else Targets(base, budget=0)


def refit_conv(model: nn.Module, base: nn.Module | Targets, name: str, xfit: torch.Tensor, ridge: float) -> None:
    """Convolution ``name`` of ``model`` (in place, same shape) re-fitted to map what it reads in
    ``model`` to what it wrote in ``base``."""
    targets = as_targets(base)
    pairs = ((module_io(model, name, x)[0], targets.output(name, x)) for x in xfit.split(FIT_CHUNK))
    new = fit_conv(pairs, model.get_submodule(name), ridge)
    conv = model.get_submodule(name)
    conv.weight.data = new.weight.data
    if conv.bias is not None:
        conv.bias.data = new.bias.data
