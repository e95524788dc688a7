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
from torch.nn.modules.utils import _pair

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
        places = z.shape[2] * z.shape[3]  # the output positions
        sel = torch.randint(0, places, (n, 1, min(positions, places)), generator=gen)
        a = patches(x, sel[:, 0], **geo)
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


def patches(x: torch.Tensor, sel: torch.Tensor, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """The columns ``F.unfold(x, ...)`` holds at output positions ``sel`` (n, P) of each image, as
    rows (n * P, C * kh * kw): the same values, without unfolding every position (on a ResNet-56
    walk, unfolding all 1,024 to keep 256 took a sixth of each trial)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(_pair, (kernel_size, stride, padding, dilation))
    n, c, _, w = x.shape
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows = (sel // ow * sh)[..., None] + torch.arange(kh) * dh  # (n, P, kh)
    cols = (sel % ow * sw)[..., None] + torch.arange(kw) * dw  # (n, P, kw)
    got = F.pad(x, (pw, pw, ph, ph))[torch.arange(n)[:, None, None, None], :, rows[..., None], cols[:, :, None, :]]
    return got.permute(0, 1, 4, 2, 3).reshape(n * sel.shape[1], c * kh * kw)  # (n, P, kh, kw, C) -> C, kh, kw


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

    @staticmethod
    def _key(name: str, x: torch.Tensor, pre: nn.Module | None) -> tuple:
        return name, pre is not None, x.data_ptr(), tuple(x.shape), x.stride()

    def _keep(self, key: tuple, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if key not in self.kept and self.used + y.nbytes <= self.budget:
            self.kept[key], self.used = (x, y), self.used + y.nbytes
        return y

    def output(self, name: str, x: torch.Tensor, pre: nn.Module | None = None) -> torch.Tensor:
        key = self._key(name, x, pre)
        if key in self.kept:
            return self.kept[key][1]
        return self._keep(key, x, module_io(self.base, name, x, pre)[1])

    def outputs(self, name: str, chunks: list[torch.Tensor], pre: nn.Module | None,
                chain: "ChainInputs") -> Iterable[torch.Tensor]:
        """:meth:`output` on each chunk; those not kept read along ``chain`` (on the base)."""
        keys = [self._key(name, x, pre) for x in chunks]
        if all(k in self.kept for k in keys):
            return [self.kept[k][1] for k in keys]
        return (self._keep(k, x, y) for k, x, (_, y) in zip(keys, chunks, chain.read(name, pre)))


def as_targets(base: nn.Module | Targets) -> Targets:
    """``base`` as :class:`Targets` (a module: one that keeps nothing)."""
    return base if isinstance(base, Targets) else Targets(base, budget=0)


CHAIN_BYTES = 256 << 20  # the inputs ChainInputs keeps; beyond it, each read runs the network from the images


def _chains(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The nn.Sequential modules of ``model`` that run as one (nn.Sequential's own forward, called
    once on ``example``: each child reads the one before it, and nothing else calls them), outer first."""
    calls: dict[str, int] = {}
    seqs = {n: m for n, m in model.named_modules() if type(m).forward is nn.Sequential.forward and len(m)}
    run_hooked(model, [m.register_forward_pre_hook(lambda m, a, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
                       for n, m in seqs.items()], example)
    return [n for n in seqs if calls.get(n) == 1 and all(calls.get(c, 0) <= 1 for c in seqs if c.startswith(n + "."))]


class ChainInputs:
    """What modules of ``model`` read and write, per chunk of images, asked in running order (a
    fit's inputs, or its targets in the unpruned network). Where a module lies in an nn.Sequential
    that runs as one (:func:`_chains`), the input of the child holding it is kept and carried from
    child to child, and a read runs that child alone: a walk's trial re-fits every convolution
    after its block, and reading each from the images made a trial grow as the square of the
    depth. The same operations on the same chunks, so the same values. Elsewhere (or past
    ``CHAIN_BYTES`` kept), the network runs from the images, one chunk at a time."""

    def __init__(self, model: nn.Module, chunks: list[torch.Tensor]) -> None:
        self.model, self.chunks, self.held, self.at = model, chunks, None, (None, -1)
        self.chains = _chains(model, chunks[0][:1]) if chunks else []
        self.names = {seq: [n for n, _ in model.get_submodule(seq).named_children()] for seq in self.chains}

    def _where(self, name: str) -> tuple[str, int, str] | None:
        for seq in self.chains:  # outer first: a shortcut Sequential inside a block is read through its block
            names = self.names[seq]
            prefix = f"{seq}." if seq else ""
            if name.startswith(prefix) and name != seq:
                child, _, rel = name[len(prefix):].partition(".")
                if child in names:
                    return seq, names.index(child), rel
        return None

    def read(self, name: str, pre: nn.Module | None = None,
             output: bool = True) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
        """:func:`module_io` of module ``name`` (``pre``: its output is ``pre`` of its input;
        ``output=False``: the input only) on each chunk."""
        where = self._where(name)
        if where is not None:
            seq_name, idx, rel = where
            seq = self.model.get_submodule(seq_name)
            if self.held is None or self.at[0] != seq_name or idx < self.at[1]:
                first = f"{seq_name}.{self.names[seq_name][idx]}".lstrip(".")
                self.held = [module_io(self.model, first, x, output=False)[0] for x in self.chunks]
                self.at = (seq_name, idx)
            with torch.no_grad():
                while self.at[1] < idx:
                    self.held, self.at = [seq[self.at[1]](h) for h in self.held], (seq_name, self.at[1] + 1)
            if sum(h.nbytes for h in self.held) <= CHAIN_BYTES:
                if rel:
                    return [module_io(seq[idx], rel, h.clone(), pre, output) for h in self.held]
                with torch.no_grad():
                    return [(h.clone(), (pre or seq[idx])(h.clone()) if output else None) for h in self.held]
            self.held, self.chains = None, []  # from here on, from the images
        return (module_io(self.model, name, x, pre, output) for x in self.chunks)

    def __call__(self, name: str) -> Iterable[torch.Tensor]:
        """What module ``name`` reads, on each chunk."""
        return (x for x, _ in self.read(name, output=False))


class FitReads:
    """A fit's pairs for one set of image chunks, asked in running order: what ``model`` reads at a
    module, and what the unpruned network (``targets``) wrote there, each read along the chain."""

    def __init__(self, model: nn.Module, targets: Targets, chunks: list[torch.Tensor]) -> None:
        self.chunks, self.targets = chunks, targets
        self.inputs, self.base = ChainInputs(model, chunks), ChainInputs(targets.base, chunks)

    def pairs(self, name: str, fit_to: str | None = None, pre: nn.Module | None = None):
        return zip(self.inputs(name), self.targets.outputs(fit_to or name, self.chunks, pre, self.base))


def refit_conv(model: nn.Module, base: nn.Module | Targets, name: str, xfit: torch.Tensor, ridge: float,
               reads: FitReads | None = None) -> None:
    """Convolution ``name`` of ``model`` (in place, same shape) re-fitted to map what it reads in
    ``model`` to what it wrote in ``base`` (``reads``: both, along the chain, for ``xfit``'s chunks)."""
    targets = as_targets(base)
    pairs = reads.pairs(name) if reads is not None else \
        ((module_io(model, name, x)[0], targets.output(name, x)) for x in xfit.split(FIT_CHUNK))
    new = fit_conv(pairs, model.get_submodule(name), ridge)
    conv = model.get_submodule(name)
    conv.weight.data = new.weight.data
    if conv.bias is not None:
        conv.bias.data = new.bias.data
