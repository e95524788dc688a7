"""The pruned-model artifact: spec + plan + pruned weights in one safetensors file.

Rebuilt by: build the base spec -> apply the plan (structure) -> load the weights.
No pickle anywhere.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..artifacts import atomic_path
from ..models.spec import LoadedModel, ModelSpec, build_module, load_state_dict_strict
from .plan import Plan

FORMAT = "tvsprune.pruned/1"
WEIGHTS_FILE = "pruned.safetensors"


def save_pruned(path: str | Path, model: nn.Module, plan: Plan, base: LoadedModel,
                input_shape: list[int], extra: dict[str, Any] | None = None) -> None:
    from safetensors.torch import save_file

    meta = {"format": FORMAT, "base": base.spec.to_dict(), "base_weights_sha256": base.weights_sha256,
            "input_shape": list(input_shape), "normalize": base.normalize, "plan": plan.to_dict(),
            **(extra or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"tvsprune": json.dumps(meta)})


def read_pruned_meta(path: str | Path) -> dict[str, Any]:
    from ..artifacts import read_safetensors

    return read_safetensors(path, "pruned model", FORMAT, tensors=False)[0]


def load_pruned(path: str | Path) -> LoadedModel:
    """Rebuild a pruned model from its artifact (directory or .safetensors file)."""
    from safetensors.torch import load_file

    from .surgery import apply_plan

    path = Path(path)
    file = path / WEIGHTS_FILE if path.is_dir() else path
    meta = read_pruned_meta(file)
    base = ModelSpec.from_dict(meta["base"])
    module = build_module(base.spec, base.kwargs).eval()
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
