"""The pruned-model artifact: spec + plan + pruned weights in one safetensors file.

Rebuilt by: build the base spec -> apply the plan (structure) -> load the weights.
No pickle anywhere.

A base model from a user's .py file is recorded by absolute path and sha256, and the file
is copied beside the weights as ``model_source.py``: the artifact folder still loads after
it is moved to another directory or machine, or after the original file changed (the copy,
whose hash matches, is used, with a warning). Loading such an artifact runs that copy, as
giving the ``file.py:Name`` spec itself would.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..artifacts import atomic_path, sha256_file
from ..errors import TvsError
from ..models.sources import SOURCES, ModelSource
from ..models.sources.code import user_file
from ..models.spec import LoadedModel, ModelSpec, build_module, load_state_dict_strict
from .plan import Plan

FORMAT = "tvsprune.pruned/1"
WEIGHTS_FILE = "pruned.safetensors"
SOURCE_FILE = "model_source.py"
log = logging.getLogger(__name__)


def save_pruned(path: str | Path, model: nn.Module, plan: Plan, base: LoadedModel,
                input_shape: list[int], extra: dict[str, Any] | None = None) -> None:
    from safetensors.torch import save_file

    base_spec = base.spec.to_dict()
    meta: dict[str, Any] = {}
    found = user_file(base.spec.spec)
    if found and found[0].is_file():
        src, attr = found[0].resolve(), found[1]
        base_spec["spec"] = f"{src}:{attr}"
        meta["base_source"] = {"path": str(src), "sha256": sha256_file(src), "copy": SOURCE_FILE}
        with atomic_path(Path(path).parent / SOURCE_FILE) as tmp:
            tmp.write_bytes(src.read_bytes())
    meta = {"format": FORMAT, "base": base_spec, "base_weights_sha256": base.weights_sha256,
            "input_shape": list(input_shape), "normalize": base.normalize, "plan": plan.to_dict(),
            **meta, **(extra or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"tvsprune": json.dumps(meta)})


def read_pruned_meta(path: str | Path) -> dict[str, Any]:
    from ..artifacts import read_safetensors

    return read_safetensors(path, "pruned model", FORMAT, tensors=False)[0]


def _base_spec(spec: str, source: dict[str, Any] | None, weights_file: Path) -> str:
    """The base model's spec, pointed at the recorded file when it is unchanged, else at the
    copy kept in the artifact folder."""
    found = user_file(spec)
    if not found or not source:
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


def load_pruned(path: str | Path) -> LoadedModel:
    """Rebuild a pruned model from its artifact (directory or .safetensors file)."""
    from safetensors.torch import load_file

    from .surgery import apply_plan

    path = Path(path)
    file = path / WEIGHTS_FILE if path.is_dir() else path
    meta = read_pruned_meta(file)
    base = ModelSpec.from_dict(meta["base"])
    module = build_module(_base_spec(base.spec, meta.get("base_source"), file), base.kwargs).eval()
    plan = Plan.from_dict(meta["plan"], str(file))
    example = torch.zeros(1, *meta["input_shape"])
    apply_plan(module, plan, example, meta["plan"].get("logits_layer"))
    state = load_file(str(file))
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

    def load(self, spec: str) -> LoadedModel:
        return load_pruned(spec)
