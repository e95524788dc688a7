"""Whole residual blocks replaced, for a latency budget (``--structure blocks``): what a
replacement is, how it is fitted and what each form saves on the latency backend
(:func:`savings`; pruning/block_walk.py chooses them).

A residual block whose input and output have the same shape (one without downsampling, whose
traced graph adds its input to what it computes) gets cheaper forms: one 3x3 or 1x1
convolution fitted by least squares (no labels) to what the block computes, before its last
ReLU when it ends in one (read with torch.fx), the ReLU kept after it; or the block removed
(identity). The fit maps the block's input in the network as changed so far to the unpruned
block's output, block after block (to the output of the last removed block that runs right
after it, where there are some); every convolution after the first replaced block is then
re-fitted to what it wrote in the unpruned network (pruning/refit.py), and every BatchNorm
re-estimated on the repair images.

On ResNet-20 on a 2-core AVX-512 CPU this lost 1.74 points at 1.49x and 4.82 at 2.06x, where
removing channels lost 14.90 at 1.42x and 65.92 at 2.12x (benchmarks/block_replacement.py,
RESULTS.md names the commits).
"""
from __future__ import annotations

import copy
import operator
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import TvsError
from .refit import (FIT_CHUNK, FitReads, Targets, as_targets, fit_conv, module_io as _io, refit_conv,
                    run_hooked)

FORMS = ("3x3", "1x1", "identity")  # cheaper to the right


class ConvReLU(nn.Module):
    """The fitted replacement: a convolution (with bias), then a ReLU where the block ended in one."""

    def __init__(self, conv: nn.Conv2d, relu: bool) -> None:
        super().__init__()
        self.conv, self.relu = conv, relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return F.relu(y) if self.relu else y


def unfitted(channels: int, form: str) -> nn.Module:
    """A block in ``form`` with its weights unset (what its time is measured on): the
    convolution and ReLU of a 3x3 or 1x1, or nothing (identity)."""
    k = int(form[0]) if form != "identity" else 0
    return ConvReLU(nn.Conv2d(channels, channels, k, padding=k // 2), True) if k else nn.Identity()


class _ChildrenAsLeaves(torch.fx.Tracer):
    """Traces one module's own forward: its submodules stay calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _adds_its_input(block: nn.Module) -> bool:
    """Whether the block's own forward adds its input (directly, or through an identity or
    empty Sequential) to something: an identity shortcut. False where torch.fx cannot trace it."""
    try:
        graph = _ChildrenAsLeaves().trace(block)
    except Exception:  # noqa: BLE001 (any tracing failure: not a block tvsprune understands)
        return False
    alias: list[torch.fx.Node] = []  # the input, and what passes it on unchanged

    def passed(args: tuple) -> bool:
        return any(isinstance(a, torch.fx.Node) and any(a is b for b in alias) for a in args)

    for n in graph.nodes:
        if n.op == "placeholder" and not alias:
            alias.append(n)
        elif n.op == "call_module" and passed(n.args[:1]):
            m = block.get_submodule(n.target)
            if isinstance(m, nn.Identity) or (isinstance(m, nn.Sequential) and len(m) == 0):
                alias.append(n)
        elif passed(n.args) and (
                (n.op == "call_function" and n.target in (operator.add, operator.iadd, torch.add)) or
                (n.op == "call_method" and n.target in ("add", "add_"))):
            return True
    return False


def find_blocks(module: nn.Module, example: torch.Tensor) -> list[str]:
    """Residual blocks, in the order they run: submodules called once, whose 4-D input and
    output have the same shape, which hold two convolutions or more and add their input to
    what they compute (so that removing one leaves its shortcut). Squeeze-excitation modules,
    a stage's Sequential of blocks, or a block's branch alone are not blocks."""
    seen: dict[str, list[bool]] = {}
    hooks = []
    for name, m in module.named_modules():
        if name and sum(isinstance(c, nn.Conv2d) for c in m.modules()) >= 2:
            def hook(mod, args, out, name=name):
                x = args[0] if args else None
                seen.setdefault(name, []).append(isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)
                                                 and x.dim() == 4 and x.shape == out.shape)
            hooks.append(m.register_forward_hook(hook))
    run_hooked(module, hooks, example)
    return [n for n, calls in seen.items() if calls == [True] and _adds_its_input(module.get_submodule(n))]


def forms_for(block: nn.Module, channels: int) -> tuple[str, ...]:
    """The forms that hold fewer weights than the block's own convolutions (identity always): a
    dense 3x3 over a wide bottleneck (ResNet-50's 256-2048 channels) holds 8 times its block's
    and runs slower, so it is neither measured nor fitted."""
    own = sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Conv2d))
    return tuple(f for f in FORMS if f == "identity" or int(f[0]) ** 2 * channels ** 2 < own)


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _pre_relu(block: nn.Module) -> nn.Module | None:
    """The block computing its output before its last ReLU, or None (it ends otherwise, or fx
    cannot trace it)."""
    try:
        gm = torch.fx.symbolic_trace(block)
    except Exception:  # noqa: BLE001 (any tracing failure: fit the output as it is)
        return None
    out = next(n for n in gm.graph.nodes if n.op == "output")
    last = out.args[0]
    if not isinstance(last, torch.fx.Node):
        return None
    relu = ((last.op == "call_function" and last.target in (F.relu, torch.relu)) or
            (last.op == "call_method" and last.target in ("relu", "relu_")) or
            (last.op == "call_module" and isinstance(gm.get_submodule(last.target), nn.ReLU)))
    if not relu:
        return None
    out.args = (last.args[0],)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def successors(module: nn.Module, blocks: list[str]) -> dict[str, str]:
    """For each block, the block that reads its output and nothing else does: its next sibling
    in an nn.Sequential (whose forward hands each child's output to the next child only)."""
    after = {}
    for a in blocks:
        parent, _, leaf = a.rpartition(".")
        seq = module.get_submodule(parent) if parent else module
        names = [n for n, _ in seq.named_children()]
        nxt = names[names.index(leaf) + 1:][:1]
        if type(seq).forward is nn.Sequential.forward and nxt and f"{parent}.{nxt[0]}".lstrip(".") in blocks:
            after[a] = f"{parent}.{nxt[0]}".lstrip(".")
    return after


def run_end(name: str, forms: dict[str, str], after: dict[str, str]) -> str:
    """The last of the removed blocks that run right after ``name`` (``name`` itself if none):
    a replacement followed by removed blocks is fitted to the output of the last of them."""
    while after.get(name) in forms and forms[after[name]] == "identity":
        name = after[name]
    return name


def replace_one(model: nn.Module, base: nn.Module | Targets, name: str, form: str, xfit: torch.Tensor,
                ridge: float, fit_to: str | None = None, reads: FitReads | None = None) -> dict[str, Any]:
    """Block ``name`` of ``model`` (in place) in ``form``, fitted to ``base``'s block ``fit_to``
    (``name`` by default: a later one where the blocks between are removed); its record.
    ``reads``: where both are read (along the chain: :class:`FitReads`)."""
    if form == "identity":
        _set(model, name, nn.Identity())
        return {"form": "identity", "relu": False}
    fit_to, targets = fit_to or name, as_targets(base)
    pre = _pre_relu(targets.base.get_submodule(fit_to))
    pairs = reads.pairs(name, fit_to, pre) if reads is not None else \
        ((_io(model, name, x)[0], targets.output(fit_to, x, pre)) for x in xfit.split(FIT_CHUNK))
    _set(model, name, ConvReLU(fit_conv(pairs, int(form[0]), ridge), pre is not None))
    return {"form": form, "relu": pre is not None, "fitted_to": fit_to}


def running_units(base: nn.Module, blocks: list[str], convs: list[str], example: torch.Tensor) -> list[str]:
    """The blocks and the convolutions ``convs`` outside them, in the order they start."""
    order: list[str] = []
    names = blocks + [c for c in convs if not any(_overlaps(c, b) for b in blocks)]
    run_hooked(base, [base.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: order.append(n))
                      for n in names], example)
    return list(dict.fromkeys(order))


def fit_from(model: nn.Module, base: nn.Module | Targets, forms: dict[str, str], units: list[str], start: str,
             xfit: torch.Tensor, ridge: float, after: dict[str, str], inner: dict[str, list[str]]
             ) -> tuple[dict[str, Any], list[str]]:
    """``model`` fitted in place, in running order from unit ``start`` on: each block of ``forms``
    replaced (fitted to the end of the removed blocks right after it, by ``after``); every other
    convolution that runs after the first replaced block (``inner``: a block's own) re-fitted.
    The records of the replaced blocks and the re-fitted convolutions. ``base``: the unpruned
    network, or its :class:`Targets` (which keep its outputs for the next candidate)."""
    first, record, refitted = min((units.index(b) for b in forms), default=len(units)), {}, []
    base = as_targets(base)
    reads = FitReads(model, base, list(xfit.split(FIT_CHUNK)))
    for i in range(units.index(start), len(units)):
        u = units[i]
        if u in forms:
            record[u] = replace_one(model, base, u, forms[u], xfit, ridge, run_end(u, forms, after), reads)
        elif i > first:
            for c in inner.get(u, [u] if isinstance(base.base.get_submodule(u), nn.Conv2d) else []):
                refit_conv(model, base, c, xfit, ridge, reads)
                refitted.append(c)
    return record, refitted


def apply_forms(base: nn.Module | Targets, forms: dict[str, str], units: list[str], xfit: torch.Tensor, ridge: float,
                repair, after: dict[str, str] | None = None, inner: dict[str, list[str]] | None = None
                ) -> tuple[nn.Module, dict[str, dict[str, Any]], list[str]]:
    """A copy of ``base`` fitted by :func:`fit_from` (``units``: :func:`running_units`; only the
    convolutions among them and in ``inner`` are re-fitted), its BatchNorms re-estimated by
    ``repair(model)``; the record the artifact keeps, and the re-fitted convolutions."""
    model = copy.deepcopy(as_targets(base).base).eval()
    record, refitted = fit_from(model, base, forms, units, units[0], xfit, ridge, after or {}, inner or {})
    repair(model)
    return model.eval(), record, refitted


def rebuild(module: nn.Module, replaced: Any, state: dict[str, torch.Tensor], source: str) -> None:
    """Put an artifact's replaced blocks back into a freshly built base ``module`` (in place),
    shapes from the weights ``state``; a record that does not fit is refused."""
    if not isinstance(replaced, dict):
        raise TvsError(f"{source}: plan field 'replaced' must be an object")
    names = dict(module.named_modules())
    nested = next(((a, b) for a in replaced for b in replaced if a != b and _overlaps(a, b)), None)
    if nested:
        raise TvsError(f"{source}: replaced blocks {nested[0]!r} and {nested[1]!r} overlap (one holds the other)")
    for name, rec in replaced.items():
        if not isinstance(rec, dict) or rec.get("form") not in FORMS or type(rec.get("relu")) is not bool:  # noqa: E721
            raise TvsError(f"{source}: replaced block {name!r} is malformed ({rec!r})")
        if not name or name not in names:
            raise TvsError(f"{source}: replaced block {name!r} is not a module of the base model")
        if rec["form"] == "identity":
            _set(module, name, nn.Identity())
            continue
        w, k = state.get(f"{name}.conv.weight"), int(rec["form"][0])
        if w is None or w.dim() != 4 or tuple(w.shape[2:]) != (k, k):
            raise TvsError(f"{source}: the weights of replaced block {name!r} are missing or not {rec['form']}")
        _set(module, name, ConvReLU(nn.Conv2d(w.shape[1], w.shape[0], k, padding=k // 2), rec["relu"]))


# each form's saving: 15 rounds of at least 0.2 s per network. On ResNet-20 (ort-cpu, batch 32, 2 cores) three calls
# predicted one network at 0.657-0.702 with the latency table's 5 rounds of 0.05 s, 0.663-0.677 with these (67 s)
SAVINGS_ROUNDS, SAVINGS_ROUND_S = 15, 0.2
TIMED_ALIKE = 3  # blocks alike timed for all of them (ResNet-20 has at most three alike: all are timed)


def savings(base: nn.Module, blocks: list[str], backend: str, precision: str, input_shape: list[int],
             batch: int, allowed: dict[str, tuple[str, ...]] | None = None) -> dict[tuple[str, str], float]:
    """Each (block, form) alone (the forms ``allowed`` for it, every one by default): the fraction
    of the base's time it saves, measured (weights do not matter). Blocks alike (class, input
    shape, parameter shapes) do the same work: their rounds are pooled, which steadies a
    measurement of a few per cent on a noisy machine, and at most ``TIMED_ALIKE`` of them (the
    first, the last and one between) are timed for all (ResNet-56's 25 blocks: 27 networks, not 75)."""
    from ..compare.on_backend import time_networks

    nets: dict[str, nn.Module] = {"base": base}
    alike: dict[str, tuple] = {}
    for name in blocks:
        block, x = base.get_submodule(name), _io(base, name, torch.zeros(1, *input_shape))[0]
        alike[name] = (type(block).__name__, tuple(x.shape),
                       tuple((k, tuple(v.shape)) for k, v in block.state_dict().items()))
    for name in blocks:
        same = [o for o in blocks if alike[o] == alike[name]]
        if name not in {same[round(i * (len(same) - 1) / (TIMED_ALIKE - 1))] for i in range(TIMED_ALIKE)}:
            continue
        x = _io(base, name, torch.zeros(1, *input_shape))[0]
        for f in (allowed or {}).get(name, FORMS):
            m = copy.deepcopy(base)
            _set(m, name, unfitted(x.shape[1], f))
            nets[f"{name}|{f}"] = m.eval()
    ms = time_networks(backend, precision, nets, input_shape, batch, SAVINGS_ROUNDS, SAVINGS_ROUND_S)
    base_ms = np.asarray(ms.pop("base"))
    saved = {tuple(k.split("|")): 1 - np.asarray(v) / base_ms for k, v in ms.items()}
    return {(n, f): float(np.median(np.concatenate([saved[(o, f)] for o in blocks if alike[o] == alike[n]
                                                     and (o, f) in saved])))
            for n in blocks for f in (allowed or {}).get(n, FORMS)}
