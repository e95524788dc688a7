"""The pruned-model artifact: spec + plan + pruned weights in one safetensors file.

Rebuilt by: build the base spec -> apply the plan (structure) -> load the weights.
No pickle anywhere.

A base model from a user's .py file is recorded by absolute path and sha256, and the file
is copied beside the weights as ``model_source.py``. An artifact whose base is code loads
on its own only for the user who pruned it, on that machine (:mod:`tvsprune.models.trust`):
then it still loads after the folder moved or the original file changed (the copy, whose
hash matches the one remembered, is used, with a warning). Anyone else names the base
model (``--base-model``); the metadata never chooses code to run.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..artifacts import atomic_path, sha256_file
from ..errors import TvsError
from ..models.sources import SOURCES, ModelSource
from ..models.sources.code import user_file
from ..models import trust
from ..models.spec import (LoadedModel, ModelSpec, bake_reparametrizations, build_module,
                           load_state_dict_strict)
from .plan import Plan

FORMAT = "tvsprune.pruned/1"
WEIGHTS_FILE = "pruned.safetensors"
SOURCE_FILE = "model_source.py"
MAX_INPUT_VALUES = 3 * 4096 * 4096  # values per sample an artifact may ask for (--resize / --crop's bound)
log = logging.getLogger(__name__)


def keeps_source(base: LoadedModel) -> bool:
    """Whether the artifact of ``base`` keeps a copy of its model source (a user .py file)."""
    found = user_file(base.spec.spec)
    return bool(found and found[0].is_file())


def save_pruned(path: str | Path, model: nn.Module, plan: Plan, base: LoadedModel,
                input_shape: list[int], extra: dict[str, Any] | None = None, source_copy: Path | None = None) -> None:
    """Write the pruned-model file; a user model file is copied to ``source_copy`` (default: beside
    ``path`` as model_source.py)."""
    from safetensors.torch import save_file

    base_spec = base.spec.to_dict()
    meta: dict[str, Any] = {}
    if keeps_source(base):
        src, attr = user_file(base.spec.spec)
        src = src.resolve()
        base_spec["spec"] = f"{src}:{attr}"
        meta["base_source"] = {"path": str(src), "sha256": sha256_file(src), "copy": SOURCE_FILE}
        with atomic_path(source_copy or Path(path).parent / SOURCE_FILE) as tmp:
            tmp.write_bytes(src.read_bytes())
    meta = {"format": FORMAT, "base": base_spec, "base_weights_sha256": base.weights_sha256,
            "input_shape": list(input_shape), "normalize": base.normalize, "plan": plan.to_dict(),
            **meta, **(extra or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"tvsprune": json.dumps(meta)})
        digest = sha256_file(tmp)
    if _names_code(base_spec["spec"]):
        trust.remember(digest, base_spec["spec"], base_spec.get("kwargs") or {},
                       (meta.get("base_source") or {}).get("sha256"))


def refuse_repruning(loaded: LoadedModel) -> LoadedModel:
    """``loaded``, unless it is a pruned artifact: pruning one again would write an artifact
    whose base is that artifact, which no loader rebuilds (an artifact is its base model and
    one plan). Refused before anything runs, naming what to prune instead."""
    if loaded.plan is not None:
        base = (loaded.extra.get("base") or {}).get("spec") or "the base model"
        raise TvsError(f"{loaded.spec.spec} is a pruned artifact: pruning it again is not supported (an artifact is "
                       f"rebuilt from its base model and one plan); prune {base} with the tighter budget instead")
    return loaded


def read_pruned_meta(path: str | Path) -> dict[str, Any]:
    from ..artifacts import read_safetensors

    meta = read_safetensors(path, "pruned model", FORMAT, tensors=False)[0]
    shape = meta.get("input_shape")
    if not isinstance(shape, list) or not 1 <= len(shape) <= 4 or \
            not all(type(v) is int and v >= 1 for v in shape):  # noqa: E721
        raise TvsError(f"{path}: metadata field 'input_shape' must be a list of positive integers, got {shape!r}")
    if math.prod(shape) > MAX_INPUT_VALUES:
        raise TvsError(f"{path}: metadata field 'input_shape' {shape} asks for {math.prod(shape):,} values per "
                       f"sample, over the bound of {MAX_INPUT_VALUES:,}")
    if not isinstance(meta.get("plan"), dict):
        raise TvsError(f"{path}: metadata field 'plan' is missing or not an object")
    return meta


def _names_code(spec: str) -> bool | None:
    """Whether the spec names code to import (a file, a module); None for a spec no source knows
    (an in-memory model's label): that one cannot be rebuilt without the user naming it."""
    try:
        return SOURCES.find(spec).names_code
    except TvsError:
        return None


def _trusted_base(meta: dict[str, Any], weights_file: Path, base: ModelSpec | None) -> ModelSpec:
    """The base model to build: the one the user named, the recorded one when it names no code,
    or the recorded one when this user pruned this very file here; otherwise an error."""
    entry = meta.get("base")
    if not isinstance(entry, dict) or not isinstance(entry.get("spec"), str) or \
            not isinstance(entry.get("kwargs") or {}, dict):
        raise TvsError(f"{weights_file}: metadata field 'base' is not a model spec ({{\"spec\": ..., \"kwargs\": ...}})")
    recorded = ModelSpec.from_dict(entry)
    if base is not None:
        return ModelSpec(spec=base.spec, kwargs=dict(base.kwargs or recorded.kwargs))
    kind = _names_code(recorded.spec)
    if kind is False:
        return recorded
    if kind is None:
        raise TvsError(f"{weights_file}: its base model was {recorded.spec}, which cannot be rebuilt from a name: "
                       "give it with --base-model FILE.py:NAME (Python: pass the module itself)")
    mine = trust.recorded(sha256_file(weights_file))
    if mine is None or mine["spec"] != recorded.spec:
        raise TvsError(f"{weights_file}: its base model {recorded.spec!r} is code, and this artifact was not pruned "
                       "by you on this machine: tvsprune does not run code that a received file names. If you trust "
                       f"that code, name the base model yourself: --base-model FILE.py:NAME (Python: load_model(path, "
                       f"base=...); the artifact keeps a copy of its source as {weights_file.parent / SOURCE_FILE})")
    source = meta.get("base_source")
    if source is not None:
        source = {**source, "sha256": mine.get("source_sha256")}
    return ModelSpec(spec=_base_spec(recorded.spec, source, weights_file), kwargs=dict(mine.get("kwargs") or {}))


def _base_spec(spec: str, source: dict[str, Any] | None, weights_file: Path) -> str:
    """The base model's spec, pointed at the recorded file when it is unchanged, else at the
    copy kept in the artifact folder (hashes as remembered when this user pruned it)."""
    found = user_file(spec)
    if not found or not source or not source.get("sha256"):
        return spec
    (recorded, attr), copy = found, weights_file.parent / source.get("copy", SOURCE_FILE)
    if recorded.is_file() and sha256_file(recorded) == source["sha256"]:
        return spec
    if copy.is_file() and sha256_file(copy) == source["sha256"]:
        if recorded.is_file():
            log.warning("%s changed since this model was pruned: using the copy kept in %s", recorded, copy)
        return f"{copy}:{attr}"
    if recorded.is_file():
        log.warning("%s changed since this model was pruned (sha256 differs) and the artifact's copy is missing: "
                    "using the changed file", recorded)
        return spec
    raise TvsError(f"{weights_file}: its base model file {recorded} is gone and {copy} (the artifact's copy) is "
                   "missing or altered: restore one of them")


def load_pruned(path: str | Path, base: ModelSpec | None = None) -> LoadedModel:
    """Rebuild a pruned model from its artifact (directory or .safetensors file).

    ``base``: the base model the user names; needed for an artifact whose recorded base is
    code and that this user did not prune here (:func:`_trusted_base`).
    """
    from safetensors.torch import load_file

    from .surgery import apply_plan

    path = Path(path)
    file = path / WEIGHTS_FILE if path.is_dir() else path
    if path.is_dir() and (path / "prune.json").is_file():
        read_prune_report(path)  # the folder's files belong together (sha256), before anything is built
    meta = read_pruned_meta(file)
    spec = _trusted_base(meta, file, base)
    module = build_module(spec.spec, spec.kwargs).eval()
    bake_reparametrizations(module)  # the artifact holds the baked weights
    plan = Plan.from_dict(meta["plan"], str(file))
    example = torch.zeros(1, *meta["input_shape"])
    apply_plan(module, plan, example, meta["plan"].get("logits_layer"))
    state = load_file(str(file))
    if "replaced" in meta["plan"]:  # whole blocks replaced (--structure blocks)
        from .blocks import rebuild

        rebuild(module, meta["plan"]["replaced"], state, str(file))
    modules = dict(module.named_modules())
    for key in state:  # biases added by mean compensation
        owner, _, leaf = key.rpartition(".")
        m = modules.get(owner)
        if leaf == "bias" and isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is None:
            m.bias = nn.Parameter(torch.zeros_like(state[key]))
    load_state_dict_strict(module, state, str(file))
    module.eval()
    return LoadedModel(module=module, spec=ModelSpec(spec=str(path)), weights_sha256=None,
                       normalize=meta.get("normalize"), input_shape=tuple(meta["input_shape"]), plan=plan.to_dict(),
                       extra={"base": meta["base"], "base_weights_sha256": meta.get("base_weights_sha256"),
                              "repairs": meta.get("repairs")})


def read_prune_report(folder: str | Path) -> dict[str, Any]:
    """prune.json of an artifact folder, checked against the files beside it: a folder that
    mixes the weights or plan of one prune with the report of another is refused."""
    folder = Path(folder)
    path = folder / "prune.json"
    try:
        report = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:
        raise TvsError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(report, dict):
        raise TvsError(f"{path} holds {type(report).__name__}, not a prune report")
    artifacts = report.get("artifacts") if isinstance(report.get("artifacts"), dict) else {}
    for key, name in (("weights_sha256", WEIGHTS_FILE), ("plan_sha256", "plan.json")):
        want, f = artifacts.get(key), folder / name
        if want and f.is_file() and sha256_file(f) != want:
            raise TvsError(f"{folder}: {name} is not the file prune.json describes (sha256 differs): the folder "
                           "mixes the outputs of two prunes; prune again")
    return report


def is_pruned_artifact(spec: str) -> bool:
    """A ``tvsprune prune`` output folder, or a .safetensors file (a pruned artifact's weights)."""
    p = Path(spec)
    return (p.is_dir() and (p / WEIGHTS_FILE).is_file()) or (p.suffix == ".safetensors" and p.is_file())


@SOURCES.entry("pruned")
class PrunedArtifact(ModelSource):
    """A pruned artifact carries its base spec, plan and weights: it loads whole."""

    priority, form = 0, "a tvsprune prune output folder"

    def matches(self, spec: str) -> bool:
        return is_pruned_artifact(spec)

    def load(self, spec: str, base: ModelSpec | None = None) -> LoadedModel:
        return load_pruned(spec, base)


LATENCY_KEYS = ("backend", "batch", "precision", "structure", "target", "predicted", "measured", "speedup", "hit",
                "attempts", "replaced", "refitted")


def prune_record(prune_report: dict[str, Any]) -> dict[str, Any]:
    """What the report keeps of a model's prune.json: how it was pruned and, for a latency budget, the
    target, the predicted and measured ratios and (blocks) what was replaced and re-fitted; not the
    per-layer timing tables."""
    record = {k: prune_report.get(k) for k in ("method", "params", "macs", "layers", "accuracy", "per_class",
                                               "repairs", "allocation", "budget")}
    latency = prune_report.get("latency")
    if isinstance(latency, dict):
        record["latency"] = {k: latency[k] for k in LATENCY_KEYS if k in latency}
    return record
