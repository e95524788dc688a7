"""Channel coupling through Torch-Pruning's dependency graph, and an exact cost model.

A *group* is a set of channels that must be removed together: a layer's output
channels, its BatchNorm, the input channels of its consumers, and, through residual
additions, concatenations, depthwise convolutions or a flatten into a Linear layer,
the channels of every other layer tied to them. Torch-Pruning traces the autograd
graph to find these ties; this module turns its groups into plain data (names and
index maps) that plans, surgery and the cost model share.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..errors import TvsError
from ..models.costs import is_grouped_conv  # noqa: F401 (re-exported)
from ..models.probe import raw_outputs

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
    blocks: int = 1          # a grouped convolution in the group: remove the same channels of every block

    @property
    def block_size(self) -> int:
        return self.channels // self.blocks

    def expand(self, local: np.ndarray) -> np.ndarray:
        """Block-local channel indices -> root channels (the same indices in every block)."""
        local = np.asarray(local, dtype=np.int64)
        return np.sort((np.arange(self.blocks)[:, None] * self.block_size + local[None, :]).ravel())

    def is_uniform(self, removed: np.ndarray) -> bool:
        """Whether ``removed`` root channels are the same block-local indices in every block."""
        if self.blocks == 1:
            return True
        removed = np.sort(np.asarray(removed, dtype=np.int64))
        return np.array_equal(removed, self.expand(removed[removed < self.block_size]))


def out_width(m: nn.Module) -> int:
    """Output channels of a Conv2d, output features of a Linear."""
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


@contextlib.contextmanager
def reshapes_guarded():
    """While Torch-Pruning builds its graph, note each reshape whose channel mapping it cannot infer.

    Torch-Pruning maps channels through 2-D/4-D flattens only. A reshape that splits the
    channel dimension (ShuffleNet's channel shuffle: a 5-D view, a transpose, a view back)
    is either left unmapped or fails inside its index inference. Such reshapes are
    recorded (``graph.tvsprune_unmapped``), not mapped, and every group whose channels pass through one is left unpruned
    (see ``ChannelGraph``): coupling channels through an unknown permutation would give
    a network that runs and computes the wrong thing. The library function is replaced
    only while tvsprune calls the graph (which re-runs the mapping on every query), and
    only to add this bookkeeping.
    """
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_reshape_index_mapping

    def guarded(graph, node):
        unmapped = graph.__dict__.setdefault("tvsprune_unmapped", set())
        size = getattr(node.grad_fn, "_saved_self_sizes", None) or getattr(node.grad_fn, "_saved_self_sym_sizes", None)
        if node in unmapped or (size is not None and len(size) > 4):
            unmapped.add(node)
            return None
        try:
            return original(graph, node)
        except ArithmeticError:
            unmapped.add(node)
            return None

    original_slice = index_mapping.update_slice_index_mapping

    def guarded_slice(graph, node):
        # A slice along channels (GhostNet's cat(...)[:, :out]) couples what Torch-Pruning 1.6
        # maps wrongly: measured on timm ghostnet_100, it pruned conv_stem to zero channels.
        # Unless it keeps every channel, it is recorded like an unmapped reshape.
        unmapped = graph.__dict__.setdefault("tvsprune_unmapped", set())
        fn = node.grad_fn
        size = getattr(fn, "_saved_self_sym_sizes", None) or getattr(fn, "_saved_self_sizes", None)
        dim = getattr(fn, "_saved_dim", None)
        if size is not None and dim is not None:
            rank = len(size)
            channel_dim = {4: 1, 3: 2, 2: 1}.get(rank)
            if dim % max(rank, 1) == channel_dim:
                start, end, step = getattr(fn, "_saved_start", 0) or 0, getattr(fn, "_saved_end", None), \
                    getattr(fn, "_saved_step", 1) or 1
                whole = int(size[channel_dim])
                if not (start == 0 and step == 1 and (end is None or end >= whole)):
                    unmapped.add(node)
                    return None
        return original_slice(graph, node)

    index_mapping.update_reshape_index_mapping = guarded
    index_mapping.update_slice_index_mapping = guarded_slice
    try:
        yield
    finally:
        index_mapping.update_reshape_index_mapping = original
        index_mapping.update_slice_index_mapping = original_slice


def _dep_graph(model: nn.Module, example: torch.Tensor):
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), reshapes_guarded(), raw_outputs(model):
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    except Exception as e:  # unsupported op in tracing
        raise TvsError(f"cannot trace the model's channel dependencies: {type(e).__name__}: {e}") from None
    finally:
        model.train(was_training)
    dg.__dict__.setdefault("tvsprune_unmapped", set())
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
        reshaped: list[str] = []
        failed: dict[str, str] = {}
        for g in self._all_groups(ignored, failed):
            root = g[0].dep.target.module
            items, members = [], []
            through = next((it.dep.target for it in g.items if it.dep.target in self.dg.tvsprune_unmapped), None)
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
            if through is not None:
                reshaped.append(self.names[root])
        self.rigid: dict[str, str] = dict(failed)
        self.rigid.update({r: "its channels pass through a reshape that reorders them (e.g. a channel "
                                         "shuffle) or a slice of the channels (e.g. GhostNet's cat-then-slice), "
                                         "which the dependency graph cannot map" for r in reshaped})
        for g in self.groups:
            self._set_blocks(g)

    def copy(self) -> "ChannelGraph":
        """This graph on a deep copy of its model, without tracing again: the dependency graph
        is copied with the model (one memo, so its nodes point at the copied modules); what
        does not depend on the model (pruners, the traced autograd nodes, Torch-Pruning's
        registries) is shared. The groups are plain data and shared too. Pruning the copy
        leaves this graph and its model untouched."""
        dg = self.dg
        shared: list[Any] = [getattr(dg, k) for k in ("REGISTERED_PRUNERS", "CUSTOMIZED_PRUNERS", "ops",
                                                      "_in_channel_pruning_fn", "_out_channel_pruning_fn",
                                                      "IGNORED_LAYERS_IN_TRACING") if hasattr(dg, k)]
        shared += [p for box in (dg.REGISTERED_PRUNERS, dg.CUSTOMIZED_PRUNERS) for p in box.values()]
        shared += [n.grad_fn for n in dg.module2node.values() if getattr(n, "grad_fn", None) is not None]
        memo: dict[int, Any] = {id(o): o for o in shared}
        new = object.__new__(ChannelGraph)
        new.__dict__.update(self.__dict__)
        new.model = copy.deepcopy(self.model, memo)
        # the nodes link each other along the whole network: a plain deepcopy recurses as
        # deep as the network is long. Shallow copies first, then their fields through the memo.
        nodes = list(dg.module2node.values())
        for n in nodes:
            memo[id(n)] = copy.copy(n)
        for n in nodes:
            memo[id(n)].__dict__.update({k: copy.deepcopy(v, memo) for k, v in vars(n).items()})
        new.dg = copy.deepcopy(dg, memo)
        new.names = {m: n for n, m in new.model.named_modules()}
        new.modules = dict(new.model.named_modules())
        new.rigid = dict(self.rigid)
        return new

    def _all_groups(self, ignored: list[nn.Module], failed: dict[str, str]) -> list[Any]:
        """Torch-Pruning's group of every Conv2d/Linear (each channel in one group), one root at a time.

        A root whose group Torch-Pruning cannot build (an index mapping it cannot infer)
        is left unpruned with the reason, instead of failing the whole model.
        """
        groups, visited = [], set()
        for m in list(self.dg.module2node):
            if not isinstance(m, (nn.Conv2d, nn.Linear)) or m in ignored or m in visited:
                continue
            pruner = self.dg.get_pruner_of_module(m)
            if pruner is None or pruner.get_out_channels(m) is None:
                continue
            try:
                with reshapes_guarded():
                    g = self.dg.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
            except Exception as e:  # an index mapping Torch-Pruning could not work out
                failed[self.names[m]] = f"the dependency graph cannot map its channels ({type(e).__name__}: {e})"
                continue
            outs = [dep.target.module for dep, _ in g if self.dg.is_out_channel_pruning_fn(dep.handler)]
            visited.update(outs)
            if not any(o in ignored for o in outs):
                groups.append(g)
        return groups

    def _set_blocks(self, g: Group) -> None:
        """Grouped convolutions and GroupNorms keep their group count: channels go in equal numbers per block.

        As Torch-Pruning's pruners do, the same block-local channels are removed from every
        block. A grouped convolution reached through a reordering of channels (e.g. a
        concatenation) is left unpruned, with the reason.
        """
        blocks = 1
        for it in g.items:
            m = self.modules[it.module]
            if isinstance(m, nn.GroupNorm) and m.num_groups > 1:  # normalises contiguous chunks: keep them aligned
                what, count, width = "GroupNorm", m.num_groups, m.num_channels
            elif is_grouped_conv(m):
                what, count = "grouped convolution", m.groups
                width = m.out_channels if it.dim == "out" else m.in_channels
            else:
                continue
            if width != g.channels or not np.array_equal(it.idxs, it.root_idxs) or \
                    not np.array_equal(np.sort(it.idxs), np.arange(width)):
                self.rigid[g.root] = f"coupled to {what} {it.module} (groups={count}) through a channel reordering"
                return
            blocks = int(np.lcm(blocks, count))
        if g.channels % blocks:
            self.rigid[g.root] = f"{g.channels} channels do not split into {blocks} equal blocks"
            return
        g.blocks = blocks

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
            removed = {r: self.group(r).expand(np.array([0])) for r in roots}
            for r in roots:
                m = modules[r]
                with reshapes_guarded():
                    dg.get_pruning_group(m, dg.get_pruner_of_module(m).prune_out_channels,
                                         [int(i) for i in removed[r]]).prune(record_history=False)
            # The index maps must say what the surgery did: a channel that the graph ties to
            # two root channels (GhostNet's cat([a, depthwise(a)])) is pruned inconsistently.
            wrong = next((n for n, w in self.implied_widths(removed).items() if out_width(modules[n]) != w), None)
            if wrong is not None:
                return ("the dependency graph ties some of its channels to two channels of one layer "
                        "(e.g. GhostNet's cat([a, depthwise(a)])) and cannot remove them consistently")
            try:
                with torch.no_grad():
                    model(example)
            except RuntimeError as e:
                return f"the forward pass fails when this width changes ({str(e).strip().splitlines()[0]})"
            return None

        roots = [g.root for g in self.groups if g.block_size > 1 and g.root not in self.rigid]
        if roots and trial(roots) is not None:
            for r in roots:
                reason = trial([r])
                if reason is not None:
                    self.rigid[r] = reason
        return self.rigid

    def removed_indices(self, removed: dict[str, np.ndarray], dim: str, wanted) -> dict[str, np.ndarray]:
        """Indices in the ``dim`` ("in"/"out") dimension of every module ``wanted`` accepts that go
        when ``removed[root]`` root channels of each group go (union over the groups)."""
        gone: dict[str, set[int]] = {}
        for g in self.groups:
            rm = removed.get(g.root)
            if rm is None or len(rm) == 0:
                continue
            mask = np.zeros(g.channels, dtype=bool)
            mask[np.asarray(rm, dtype=np.int64)] = True
            for it in g.items:
                if it.dim == dim and wanted(self.modules[it.module]):
                    gone.setdefault(it.module, set()).update(int(i) for i in it.idxs[mask[it.root_idxs]])
        return {k: np.asarray(sorted(v), dtype=np.int64) for k, v in gone.items() if v}

    def implied_widths(self, removed: dict[str, np.ndarray]) -> dict[str, int]:
        """Output width of every Conv2d/Linear once ``removed[root]`` root channels go, from the index maps."""
        gone = self.removed_indices(removed, "out", lambda m: isinstance(m, (nn.Conv2d, nn.Linear)))
        return {n: out_width(m) - len(gone.get(n, ())) for n, m in self.modules.items()
                if isinstance(m, (nn.Conv2d, nn.Linear))}

    def group(self, root: str) -> Group | None:
        return next((g for g in self.groups if g.root == root), None)

    def prune_group(self, root: str, remove: np.ndarray, members: list[str] | None = None) -> Any:
        """Remove root channels ``remove`` of the group rooted at ``root`` (and all coupled ones)."""
        module = self.modules.get(root)
        if module is None:
            raise TvsError(f"plan names layer {root!r}, which the model does not have")
        g = self.group(root)
        if g is not None and not g.is_uniform(remove):
            raise TvsError(f"plan removes different channels from the {g.blocks} blocks of group {root!r} "
                           "(a grouped convolution needs the same channels removed in every block)")
        pruner = self.dg.get_pruner_of_module(module)
        with reshapes_guarded():
            group = self.dg.get_pruning_group(module, pruner.prune_out_channels, [int(i) for i in remove])
        if members is not None:
            found = sorted({self.names[it.dep.target.module] for it in group.items
                            if isinstance(it.dep.target.module, (nn.Conv2d, nn.Linear))
                            and self.dg.is_out_channel_pruning_fn(it.dep.handler)})
            if found != sorted(members):
                raise TvsError(f"plan group {root!r} couples {sorted(members)} but this model couples {found}: "
                               "the plan was made for another model")
        return group
