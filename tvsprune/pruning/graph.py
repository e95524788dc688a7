"""Channel coupling through Torch-Pruning's dependency graph, and an exact cost model.

A *group* is a set of channels that must be removed together: a layer's output
channels, its BatchNorm, the input channels of its consumers, and, through residual
additions, concatenations, depthwise convolutions or a flatten into a Linear layer,
the channels of every other layer tied to them. Torch-Pruning traces the autograd
graph to find these ties; this module turns its groups into plain data (names and
index maps) that plans, surgery and the cost model share.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..errors import TvsError

COSTED = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class GroupItem:
    module: str
    dim: str                 # "out" or "in"
    idxs: np.ndarray         # indices in this module's dimension
    root_idxs: np.ndarray    # the root channel each index belongs to


@dataclass
class Group:
    root: str                # the Conv/Linear whose output channels define the group
    channels: int
    members: list[str]       # Conv/Linear layers whose output channels are in the group
    items: list[GroupItem] = field(default_factory=list)


def _dep_graph(model: nn.Module, example: torch.Tensor):
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    except Exception as e:  # unsupported op in tracing
        raise TvsError(f"cannot trace the model's channel dependencies: {type(e).__name__}: {e}") from None
    finally:
        model.train(was_training)
    return dg


def _plain(idxs: Any) -> np.ndarray:
    return np.asarray([int(getattr(i, "idx", i)) for i in idxs], dtype=np.int64)


class ChannelGraph:
    """The model's coupled-channel groups (pruning roots exclude the logits layer)."""

    def __init__(self, model: nn.Module, example: torch.Tensor, logits_layer: str | None) -> None:
        self.model = model
        self.dg = _dep_graph(model, example)
        self.names = {m: n for n, m in model.named_modules()}
        self.modules = dict(model.named_modules())
        ignored = [self.modules[logits_layer]] if logits_layer else []
        self.groups: list[Group] = []
        for g in self.dg.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)):
            root = g[0].dep.target.module
            items, members = [], []
            for item in g.items:
                m = item.dep.target.module
                if not isinstance(m, nn.Module) or m not in self.names:
                    continue
                dim = "out" if self.dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
                roots = np.asarray(item.root_idxs if item.root_idxs is not None else _plain(item.idxs))
                items.append(GroupItem(self.names[m], dim, _plain(item.idxs), roots.astype(np.int64)))
                if dim == "out" and isinstance(m, (nn.Conv2d, nn.Linear)) and self.names[m] not in members:
                    members.append(self.names[m])
            channels = root.out_channels if isinstance(root, nn.Conv2d) else root.out_features
            self.groups.append(Group(self.names[root], channels, members, items))
        self.rigid: dict[str, str] = {}

    def find_rigid_groups(self, example: torch.Tensor) -> dict[str, str]:
        """Groups whose width the forward pass cannot change (e.g. ``x.view(-1, 128)``).

        Removes one channel of every group on a copy and runs the model; only when that
        fails are groups tried one at a time. Such groups are left unpruned.
        """
        import copy

        def trial(roots: list[str]) -> str | None:
            model = copy.deepcopy(self.model).eval()
            dg = _dep_graph(model, example)
            modules = dict(model.named_modules())
            for r in roots:
                m = modules[r]
                dg.get_pruning_group(m, dg.get_pruner_of_module(m).prune_out_channels, [0]).prune(record_history=False)
            try:
                with torch.no_grad():
                    model(example)
            except RuntimeError as e:
                return str(e).strip().splitlines()[0]
            return None

        roots = [g.root for g in self.groups if g.channels > 1]
        if roots and trial(roots) is not None:
            for r in roots:
                reason = trial([r])
                if reason is not None:
                    self.rigid[r] = f"the forward pass fails when this width changes ({reason})"
        return self.rigid

    def prune_group(self, root: str, remove: np.ndarray, members: list[str] | None = None) -> Any:
        """Remove root channels ``remove`` of the group rooted at ``root`` (and all coupled ones)."""
        module = self.modules.get(root)
        if module is None:
            raise TvsError(f"plan names layer {root!r}, which the model does not have")
        pruner = self.dg.get_pruner_of_module(module)
        group = self.dg.get_pruning_group(module, pruner.prune_out_channels, [int(i) for i in remove])
        if members is not None:
            found = sorted({self.names[it.dep.target.module] for it in group.items
                            if isinstance(it.dep.target.module, (nn.Conv2d, nn.Linear))
                            and self.dg.is_out_channel_pruning_fn(it.dep.handler)})
            if found != sorted(members):
                raise TvsError(f"plan group {root!r} couples {sorted(members)} but this model couples {found}: "
                               "the plan was made for another model")
        return group


@dataclass
class _Costed:
    name: str
    kind: str
    out: int
    inp: int
    k: int           # kernel area
    spatial: int     # output positions
    bias: bool
    depthwise: bool


class CostModel:
    """Parameters and MACs of the model for any choice of removed root channels, exactly.

    Counts Conv2d / Linear weights and biases and BatchNorm affine parameters that
    pruning changes; everything else is a constant taken from the model.
    """

    def __init__(self, model: nn.Module, graph: ChannelGraph, shapes: dict[str, list[int]]) -> None:
        self.layers: dict[str, _Costed] = {}
        tracked = 0
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                if m.groups not in (1, m.in_channels):
                    raise TvsError(f"layer {name}: grouped convolution (groups={m.groups}) is not supported")
                hw = shapes.get(name, [m.out_channels, 1, 1])
                spatial = int(np.prod(hw[1:])) if len(hw) >= 3 else 1
                c = _Costed(name, "conv", m.out_channels, m.in_channels, m.kernel_size[0] * m.kernel_size[1],
                            spatial, m.bias is not None, m.groups == m.in_channels and m.groups > 1)
            elif isinstance(m, nn.Linear):
                c = _Costed(name, "linear", m.out_features, m.in_features, 1, 1, m.bias is not None, False)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = _Costed(name, "bn", m.num_features, m.num_features, 1, 1, False, False)
            else:
                continue
            self.layers[name] = c
            tracked += sum(p.numel() for p in m.parameters(recurse=False))
        self.other_params = sum(p.numel() for p in model.parameters()) - tracked
        self.graph = graph

    def cost(self, removed: list[np.ndarray] | None = None) -> tuple[int, int]:
        """(params, MACs) when ``removed[g]`` root channels of group g are removed."""
        out = {n: c.out for n, c in self.layers.items()}
        inp = {n: c.inp for n, c in self.layers.items()}
        if removed is not None:
            for group, rm in zip(self.graph.groups, removed):
                if rm is None or len(rm) == 0:
                    continue
                rm_set = np.zeros(group.channels, dtype=bool)
                rm_set[rm] = True
                for it in group.items:
                    if it.module not in self.layers:
                        continue
                    n = int(rm_set[it.root_idxs].sum()) if len(it.root_idxs) else 0
                    if it.dim == "out":
                        out[it.module] -= n
                    else:
                        inp[it.module] -= n
        params, macs = self.other_params, 0
        for n, c in self.layers.items():
            if c.kind == "bn":
                params += 2 * out[n]
                continue
            w = out[n] * c.k if c.depthwise else out[n] * inp[n] * c.k
            params += w + (out[n] if c.bias else 0)
            macs += w * c.spatial
        return int(params), int(macs)
