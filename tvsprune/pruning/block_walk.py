"""Which residual blocks ``--structure blocks`` replaces for a latency budget: the greedy walk.

Each form of each block (pruning/blocks.py) is priced by the fraction of the base's time it
saves alone on the latency backend, measured (pooled over blocks alike); a network's predicted
latency is one minus the sum of its changes' savings. Each step takes the change that raises
the held-out KL least per unit of time saved (scored lazily: best at their last trial first,
until none left can beat the best; all of them where that step reaches the target); the last
one, the change that reaches the target for the least KL (where two or three replaced blocks each made cheaper reach it, those too); but where networks
predicted at most 3 % over the target cost less KL than that step (one change, or two or three replaced blocks made
cheaper together), two of them are built and measured first, least KL first, and the first that measures at most
2 % over is kept (a near miss: the savings are each measured alone, on a noisy machine). The chosen network is
then measured against the base: while it is more than 10 % over the target the walk goes on. Where it lands more
than 5 % under the target (a step is a whole block: up to a seventh of ResNet-20's time), the walk steps back: of
the networks one block lighter (one replaced block in a dearer form, or back as it was) whose prediction, scaled by
what the measurement showed, still meets the target, the one with the least KL is built and measured, and kept where
it is at most 5 % over the target (the tolerance of the channel path's re-plan: a network that met the target is
traded only for one within it).
"""
from __future__ import annotations

import copy
import itertools
import logging
from typing import Any

import torch
import torch.nn as nn

from ..console import step
from ..errors import TvsError
from .blocks import (FORMS, _overlaps, apply_forms, find_blocks, fit_from, forms_for, running_units, savings,
                     successors)
from .latency import TOLERANCE as BACK_TOLERANCE
from .refit import FIT_IMAGES, TRIAL_IMAGES, Targets, module_io, refittable

log = logging.getLogger(__name__)
MAX_EXTRA_STEPS = 3  # steps taken past the predicted target while the measurement misses it, and steps back
MAX_SETS = 8  # the last step also tries at most this many sets of replaced blocks made cheaper together
TOLERANCE = 0.1  # a measured network at most 10 % over the target is where the walk stops going on
# the last step's near misses: networks predicted at most NEAR over the target, for less KL than the step that
# reaches it, are built and measured first (NEAR_TRIES at most), the first at most NEAR_MET over kept (on this
# 2-core AMD EPYC one ResNet-20 pair measured 0.644-0.670 in 30 calls, A/A pairs 0.973-1.009: speedup_drift.py)
NEAR, NEAR_MET, NEAR_TRIES = 0.03, 0.02, 2
# BACK_TOLERANCE, the channel path's re-plan tolerance (5 %): more than it under the target, a step back, kept if
# it measures at most that over


def _blocks(n: int) -> str:
    return f"{n} block" if n == 1 else f"{n} blocks"


def _pick(cands: list[tuple[float, float, dict[str, str]]], gap: float | None) -> dict[str, str] | None:
    """The greedy's step among (KL added, time saved, forms) candidates: the least KL per unit
    of time saved; but where that step saves the ``gap`` left to the target, the step that
    saves it for the least KL (the last step as long as it must be, not the longest one that
    is cheap per unit)."""
    if not cands:
        return None
    rate = min(cands, key=lambda c: c[0] / c[1])
    if gap is None or rate[1] < gap:
        return rate[2]
    return min((c for c in cands if c[1] >= gap), key=lambda c: c[0])[2]


def near_misses(cands: list[tuple[float, float, dict[str, str]]], chosen: dict[str, str], forms: dict[str, str],
                target: float, predicted, limit: int = NEAR_TRIES) -> list[dict[str, str]]:
    """Of ``forms`` (the network so far, no KL added) and the last step's candidates, those
    predicted over ``target`` by at most ``NEAR`` for less KL than ``chosen`` (the step that
    reaches it): at most ``limit``, least KL first. A prediction is a sum of savings each
    measured alone, and a whole block can be a seventh of a network's time: where the step that
    reaches the target costs more than one that nearly does, the near one is worth measuring."""
    added = next(c[0] for c in cands if c[2] is chosen)
    near = [(k, f) for k, _, f in [(0.0, 0.0, forms), *cands]
            if k < added and target < predicted(f) <= target * (1 + NEAR)]
    return [f for _, f in sorted(near, key=lambda c: c[0])[:limit]]


def near_sets(forms: dict[str, str], allowed: dict[str, tuple[str, ...]] | None, predicted, target: float,
              limit: int = NEAR_TRIES + 2) -> list[dict[str, str]]:
    """The :func:`cheaper_sets` of ``forms`` predicted over ``target`` by at most ``NEAR``, the
    nearest ``limit`` (fewest blocks changed among equals), to be scored as near misses that no
    single step makes: e.g. two 1x1 blocks removed together, for less KL than a fourth block
    replaced."""
    sets = cheaper_sets(forms, allowed, predicted, predicted(forms) - target * (1 + NEAR), limit=10_000)
    near = [t for t in sets if predicted(t) > target]
    return sorted(near, key=lambda t: (predicted(t), sum(t[n] != forms[n] for n in forms)))[:limit]


def lighter(forms: dict[str, str], allowed: dict[str, tuple[str, ...]] | None = None) -> list[dict[str, str]]:
    """The networks one block lighter than ``forms``: one replaced block in any dearer form
    (3x3 is the dearest) ``allowed`` for it, or back as it was."""
    out = []
    for name, form in forms.items():
        for dearer in FORMS[:FORMS.index(form)]:
            if allowed is None or dearer in allowed.get(name, FORMS):
                out.append({**forms, name: dearer})
        out.append({n: f for n, f in forms.items() if n != name})
    return out


def cheaper_sets(forms: dict[str, str], allowed: dict[str, tuple[str, ...]] | None, predicted, gap: float,
                 limit: int = MAX_SETS) -> list[dict[str, str]]:
    """The networks with two or three of ``forms``' replaced blocks each in a cheaper form (the
    last step's other moves: three 1x1s that all go can close a gap that no single block
    closes, for less KL than a fourth block replaced). Of those that save at least ``gap``, the
    ``limit`` that change fewest blocks and, among those, save least. Three at most: the sets
    grow as the cube of the replaced blocks, not exponentially."""
    cheaper = {n: [f for f in FORMS[FORMS.index(forms[n]) + 1:] if allowed is None or f in allowed.get(n, FORMS)]
               for n in forms}
    now, out = predicted(forms), []
    for k in (2, 3):
        for names in itertools.combinations([n for n in forms if cheaper[n]], k):
            for choice in itertools.product(*(cheaper[n] for n in names)):
                trial = {**forms, **dict(zip(names, choice))}
                saved = now - predicted(trial)
                if saved >= gap:
                    out.append((k, saved, trial))
    return [f for _, _, f in sorted(out, key=lambda c: c[:2])[:limit]]


def step_back(forms: dict[str, str], measured: float, target: float, predicted, kl,
              allowed: dict[str, tuple[str, ...]] | None = None) -> dict[str, str] | None:
    """Of the networks :func:`lighter` than ``forms`` whose prediction, scaled by ``measured``
    over ``forms``' own, meets ``target``, the one with the least ``kl(forms)``; None if none.
    A lighter network predicted no slower than ``forms`` is no step back (where a dearer form
    was measured saving more, as on MobileNetV2 at batch 4: it would land further under)."""
    scale, now = measured / predicted(forms), predicted(forms)
    return min((t for t in lighter(forms, allowed) if now < predicted(t) and predicted(t) * scale <= target), key=kl,
               default=None)


class _Walk:
    """The greedy walk for one prune: the base, its blocks and their measured savings, the
    images the forms are fitted and scored on, and the network chosen so far."""

    def __init__(self, loaded, opts, calib, input_shape: list[int]) -> None:
        from ..compare.logits import chunks, collect_logits, forward_fn
        from .context import repair_batches
        from .selection import fidelity_images

        if calib is None:
            raise TvsError("--structure blocks fits each replacement on calibration images: give --calib-data "
                           "(the moments file's data folder was not found)")
        self.loaded, self.opts, self.input_shape = loaded, opts, input_shape
        self.base, self.target = loaded.module.eval(), opts.target_latency
        example = torch.zeros(1, *input_shape)
        self.blocks = find_blocks(self.base, example)
        if not self.blocks:
            raise TvsError(f"{loaded.spec.spec}: no block whose input and output have the same shape (a residual "
                           "block without downsampling, with two convolutions or more): --structure blocks has "
                           "nothing to replace; prune channels (--structure channels)")
        self.allowed = {b: forms_for(self.base.get_submodule(b), module_io(self.base, b, example)[0].shape[1])
                        for b in self.blocks}
        step(f"measuring {sum(map(len, self.allowed.values()))} block replacements on {opts.latency_backend} at "
             f"batch {opts.latency_batch}")
        self.saved = savings(self.base, self.blocks, opts.latency_backend, opts.latency_precision, input_shape,
                              opts.latency_batch, self.allowed)
        self.after = successors(self.base, self.blocks)
        self.before = {b: a for a, b in self.after.items()}
        refit = opts.compensation not in ("none", "mean")  # the later convolutions re-fitted: ls-seq's repair
        convs = refittable(self.base, example) if refit else []
        self.units = running_units(self.base, self.blocks, convs, example)
        self.inner = {b: [c for c in convs if _overlaps(c, b)] for b in self.blocks}
        self.targets = Targets(self.base)  # the base's outputs, kept for every candidate's fits
        self.repair = list(repair_batches(calib, loaded, opts.repair_samples_per_class)[1])
        self.xfit = torch.cat([x for x, _ in self.repair])[:FIT_IMAGES]
        xs, _ = fidelity_images(calib, loaded, opts)
        self._logits = lambda model: collect_logits(forward_fn(model), chunks(xs))[0]
        self.base_logits = self._logits(self.base)
        self.forms: dict[str, str] = {}
        self.current: tuple[nn.Module, dict[str, Any], float] = (self.base, {}, 0.0)
        self.refitted: list[str] = []
        self.path: list[dict[str, Any]] = []
        self.last_kl: dict[tuple[str, str], float] = {}  # each step's KL added at its last trial (scored)
        self.met: dict[str, float] | None = None  # the near miss's measurement, where it was kept

    def faithful(self, model: nn.Module) -> float:
        from .selection import fidelity

        return fidelity(self.base_logits, self._logits(model))["kl"]

    def fix(self, model: nn.Module) -> None:
        from .repairs import recalibrate_batchnorm

        if self.opts.bn_recalibrate:
            recalibrate_batchnorm(model, self.repair)

    def predicted(self, forms: dict[str, str]) -> float:
        return 1 - sum(self.saved[(n, f)] for n, f in forms.items())

    def take(self, forms: dict[str, str], **note: Any) -> None:
        """``forms`` built (fitted on all the fit images, in running order) as the current network."""
        step(f"fitting the network with {_blocks(len(forms))} replaced on {len(self.xfit)} images")
        model, record, self.refitted = apply_forms(self.targets, forms, self.units, self.xfit, self.opts.ridge,
                                                   self.fix, self.after, self.inner)
        self.forms, self.current = forms, (model, record, self.faithful(model))
        self.path.append({"replaced": dict(forms), "predicted": round(self.predicted(forms), 4),
                          "kl": round(self.current[2], 5), **note})
        log.info("blocks: %s, predicted %.3f of the latency, held-out KL %.4f", forms, self.predicted(forms),
                 self.current[2])

    def trial_kl(self, name: str, form: str) -> float:
        """A step scored on the current network with ``name`` changed and everything from there on
        re-fitted (from the replacement before it when ``name`` goes: it is fitted through it)."""
        model, trial = copy.deepcopy(self.current[0]), {**self.forms, name: form}
        head = self.before.get(name)
        while head in trial and trial[head] == "identity":
            head = self.before.get(head)
        start = head if form == "identity" and head in trial else name
        fit_from(model, self.targets, trial, self.units, start, self.xfit[:TRIAL_IMAGES], self.opts.ridge, self.after,
                 self.inner)
        self.fix(model)
        return self.faithful(model.eval())

    def trial_whole(self, forms: dict[str, str]) -> float:
        """``forms`` scored as a greedy trial, fitted from the base (a block put back as it was
        changes what the convolutions before the next replaced one read)."""
        return self.faithful(apply_forms(self.targets, forms, self.units, self.xfit[:TRIAL_IMAGES], self.opts.ridge,
                                         self.fix, self.after, self.inner)[0])

    def advance(self, finish: bool = False) -> bool:
        """One greedy step (:func:`_pick`); ``finish``: the step may reach the target. The
        candidates are scored lazily (:meth:`scored`); where the step so found reaches the
        target, all are scored (the one that reaches it for the least KL, and the near misses)."""
        forms, now = self.forms, self.predicted(self.forms)
        step(f"scoring one more replaced block for the network with {_blocks(len(forms))} replaced")
        steps = [(name, f) for name in self.blocks if not any(_overlaps(name, o) for o in forms if o != name)
                 for f in FORMS[FORMS.index(forms[name]) + 1 if name in forms else 0:]
                 if f in self.allowed[name] and self.predicted({**forms, name: f}) < now]
        gap = now - self.target if finish else None
        last = gap is not None and gap > 0
        # the last step: several replaced blocks made cheaper at once, fitted whole
        sets = self.whole(cheaper_sets(forms, self.allowed, self.predicted, gap)) if last else []
        done: dict[tuple[str, str], tuple[float, float, dict[str, str]]] = {}
        cands = self.scored(steps, done, lazy=True) + sets
        chosen = _pick(cands, gap)
        if last and now - self.predicted(chosen) >= gap and len(done) < len(steps):
            cands = self.scored(steps, done, lazy=False) + sets  # it reaches the target: of all, the least KL
            chosen = _pick(cands, gap)
        if chosen is None:
            return False
        if last and self.predicted(chosen) <= self.target and self.near(
                cands + self.whole(near_sets(forms, self.allowed, self.predicted, self.target)), chosen):
            return False
        self.take(chosen)
        return True

    def scored(self, steps: list[tuple[str, str]], done: dict, lazy: bool) -> list[tuple[float, float, dict[str, str]]]:
        """(KL added, time saved, forms) of each (block, form) step, each a trial. ``lazy``: in
        the order of the KL per time saved each scored at its last trial (never scored first),
        only until the best scored here is no worse than the next one's last score (the lazy
        greedy of Minoux: a step's KL does not fall as other blocks are replaced). A deep
        network's trials each re-fit what runs after the block, so scoring every step at every
        step grows as the cube of its depth."""
        now, best = self.predicted(self.forms), float("inf")
        saved = {s: now - self.predicted({**self.forms, s[0]: s[1]}) for s in steps}
        rate = lambda s: self.last_kl[s] / saved[s] if s in self.last_kl else -float("inf")  # noqa: E731
        for s in sorted(steps, key=rate) if lazy and self.last_kl else steps:
            if lazy and s not in done and s in self.last_kl and best <= rate(s):
                break
            if s not in done:
                self.last_kl[s] = self.trial_kl(*s) - self.current[2]
                done[s] = (self.last_kl[s], saved[s], {**self.forms, s[0]: s[1]})
            best = min(best, rate(s))
        if lazy and len(done) < len(steps):
            log.info("blocks: %d of %d steps scored (the others scored worse per time saved at their last trial)",
                     len(done), len(steps))
        return list(done.values())

    def whole(self, sets: list[dict[str, str]]) -> list[tuple[float, float, dict[str, str]]]:
        """Networks that change several blocks at once as the last step's candidates: (KL added,
        time saved, forms), each scored whole (:meth:`trial_whole`)."""
        now = self.predicted(self.forms)
        return [(self.trial_whole(t) - self.current[2], now - self.predicted(t), t) for t in sets]

    def near(self, cands: list[tuple[float, float, dict[str, str]]], chosen: dict[str, str]) -> bool:
        """The last step's :func:`near_misses` in turn, each built (unless it is the network so
        far) and measured: the first at most ``NEAR_MET`` over the target is kept, with its
        measurement in ``self.met``; the others are undone. False where none is kept."""
        for forms in near_misses(cands, chosen, self.forms, self.target, self.predicted):
            self.met = self.tried(forms, "near", NEAR_MET)
            if self.met:
                return True
        return False

    def tried(self, forms: dict[str, str], step: str, over: float) -> dict[str, float] | None:
        """``forms`` built (unless it is the network so far) and measured: kept where it is at
        most ``over`` above the target, and its measurement returned; else undone (the path
        marks it ``kept: false``) and None."""
        kept, built = (self.forms, self.current, self.refitted), forms is not self.forms
        if built:
            self.take(forms, step=step)
        m = self.measure()
        if m["ratio"] <= self.target * (1 + over):
            return m
        if built:
            self.path[-1]["kept"] = False
            self.forms, self.current, self.refitted = kept
        return None

    def measure(self) -> dict[str, float]:
        """The current network against the base on the latency backend; ``ratio``: its fraction
        of the base's time. Recorded on the path's last entry."""
        from ..compare.on_backend import measure_speedup

        step(f"measuring the network with {_blocks(len(self.forms))} replaced against the base")
        m = measure_speedup(self.opts.latency_backend, self.base, self.current[0], self.input_shape,
                            self.opts.latency_batch, self.opts.latency_precision)
        m["ratio"] = 1 / m["speedup"]
        self.path[-1]["measured"] = round(m["ratio"], 4)
        return m

    def back(self, m: dict[str, float]) -> dict[str, float]:
        """While the measured network is more than 5 % under the target, a step back
        (:func:`step_back`), measured: kept where it is at most 5 % over the target, else undone."""
        for _ in range(MAX_EXTRA_STEPS):
            if m["ratio"] >= self.target * (1 - BACK_TOLERANCE):
                break
            chosen = step_back(self.forms, m["ratio"], self.target, self.predicted, self.trial_whole, self.allowed)
            if chosen is None:
                break
            lighter_m = self.tried(chosen, "back", BACK_TOLERANCE)
            if lighter_m is None:
                break
            m = lighter_m
        return m

    def run(self) -> tuple[dict[str, Any], dict[str, Any]]:
        while self.predicted(self.forms) > self.target and self.advance(finish=True):
            pass
        if not self.path:
            raise TvsError(f"{self.loaded.spec.spec}: no block replacement saves measurable time on "
                           f"{self.opts.latency_backend}")
        m = self.met
        for _ in range(0 if m else MAX_EXTRA_STEPS + 1):
            m = self.measure()
            if m["ratio"] <= self.target * (1 + TOLERANCE) or not self.advance():
                break
        m = m if self.met else self.back(m)
        (model, replaced, kl), opts = self.current, self.opts
        record = {"backend": opts.latency_backend, "batch": opts.latency_batch, "precision": opts.latency_precision,
                  "structure": "blocks", "target": self.target, "predicted": round(self.predicted(self.forms), 4),
                  "measured": round(m["ratio"], 4), "speedup": round(m["speedup"], 4),
                  "measured_range": [round(1 / m["speedup_max"], 4), round(1 / m["speedup_min"], 4)],
                  "hit": m["ratio"] <= self.target * (1 + TOLERANCE),
                  "attempts": sum("measured" in p for p in self.path),
                  "saved_alone": {f"{n}:{f}": round(v, 4) for (n, f), v in self.saved.items()}, "path": self.path,
                  "refitted": self.refitted}
        return {"model": model, "replaced": replaced, "kl": kl}, record


def replace_blocks(loaded, opts, calib, input_shape: list[int]) -> tuple[dict[str, nn.Module | Any], dict[str, Any]]:
    """The network ``--structure blocks`` makes for ``opts.target_latency``, and its latency record."""
    return _Walk(loaded, opts, calib, input_shape).run()


def blocks_chosen(loaded, opts, calib, input_shape: list[int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`replace_blocks` in the shape prune's one-shot path takes (a plan with no channel
    groups: the replaced blocks are in its ``replaced`` field), and the latency record."""
    from ..models.costs import count_params_macs
    from .plan import Plan

    result, record = replace_blocks(loaded, opts, calib, input_shape)
    record["replaced"] = {n: r["form"] for n, r in result["replaced"].items()}
    (p0, m0), (p1, m1) = count_params_macs(loaded.module, input_shape), count_params_macs(result["model"], input_shape)
    plan = Plan([], {"allocation": "blocks", "replaced": result["replaced"],
                     "budget": {"metric": "latency", "target": 1 - opts.target_latency, "threshold": None},
                     "params": {"before": p0, "after": p1, "removed_frac": 1 - p1 / p0},
                     "macs": {"before": m0, "after": m1, "removed_frac": 1 - m1 / m0 if m0 else 0.0}})
    return {"plan": plan, "model": result["model"], "report": {"blocks": result["replaced"]}, "scores": {},
            "combine": None, "compensation": "none"}, record
