"""Real architectures: grouped convolutions, channel shuffle, SE, LayerNorm/Linear-as-pointwise, attention.

The torchvision/timm cases need those packages (``pip install --no-deps torchvision
timm``; the Makefile's test target installs them) and the test-environment workaround in
hub_models.py. The whole matrix (18 torchvision + 6 timm models) is
benchmarks/architectures.py; here a few cheap ones that cover each mechanism.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from helpers import write_image_folder
from hub_models import import_hub, run_case
from tvsprune.errors import TvsError
from tvsprune.models.probe import probe_model
from tvsprune.pruning.costs import CostModel
from tvsprune.pruning.graph import ChannelGraph
from tvsprune.pruning.budget import make_plan


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("hub") / "images", classes=10, per_class=3, size=64)


@pytest.mark.parametrize("case,allocation", [
    ("torchvision:regnet_y_400mf", "auto"),        # grouped convolutions + squeeze-excitation
    ("torchvision:shufflenet_v2_x0_5", "global"),  # channel shuffle: its groups are left unpruned, the branches pruned
    ("torchvision:mobilenet_v3_small", "global"),  # SE, hardswish, depthwise
    ("timm:convnext_atto", "global"),              # LayerNorm, Linear as a pointwise convolution after a permute
])
def test_hub_model_goes_through_calibrate_prune_export(case, allocation, images, tmp_path):
    """Each mechanism through the whole path. One model runs the default allocation (its
    sensitivity curves cut every group); the others the global one, which makes the same
    cuts without the curves' 50-90 single-group networks (about 15 s each here): the defaults
    on every model are benchmarks/architectures.py's matrix."""
    hub, name = case.split(":")
    if import_hub(hub) is None:
        pytest.skip(f"{hub} is not installed")
    row = run_case(hub, name, images, tmp_path, methods=("tvs",), allocation=allocation)
    assert row["status"] == "ok", row.get("traceback") or row.get("reason")
    assert row["tvs"]["params_removed"] >= 0.25
    assert row["tvs"]["parity_ok"], row["tvs"]
    assert row["tvs"]["exporter"] == row["base_exporter"] == "dynamo", row  # no fallback to TorchScript


def test_attention_models_are_refused_with_one_line(images, tmp_path):
    if import_hub("torchvision") is None:
        pytest.skip("torchvision is not installed")
    row = run_case("torchvision", "swin_t", images, tmp_path, methods=("tvs",), export_base=False)
    assert row["status"] == "refused"
    assert "attention block" in row["reason"] and "\n" not in row["reason"]


class GroupedNet(nn.Module):
    """conv -> grouped conv (4 groups) -> conv, with BatchNorms."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(self.c3(x).mean((2, 3)))


def test_grouped_convolution_loses_the_same_channels_in_every_block_and_costs_are_exact():
    from tvsprune.pruning.surgery import apply_plan

    torch.manual_seed(0)
    model = GroupedNet().eval()
    example = torch.randn(2, 3, 8, 8)
    probe = probe_model(model, example)
    graph = ChannelGraph(model, example, probe.logits_layer)
    g1 = next(g for g in graph.groups if g.root == "c1")
    assert g1.blocks == 4 and g1.block_size == 4
    cost = CostModel(model, graph, {l.name: l.out_shape for l in probe.layers})
    scores = {l.name: np.random.default_rng(0).random(l.channels) for l in probe.layers}
    plan = make_plan(graph, cost, scores, target=0.4, allocation="uniform")
    for g, rm in zip(graph.groups, plan.removed()):
        if g.blocks > 1:
            assert len(rm) % g.blocks == 0 and g.is_uniform(rm)
    apply_plan(model, plan, example, probe.logits_layer, graph=graph)
    assert model.c2.groups == 4 and model(example).shape == (2, 5)
    params = sum(p.numel() for p in model.parameters())
    assert params == plan.meta["params"]["after"]


def test_a_plan_that_breaks_a_grouped_convolutions_blocks_is_refused():
    from tvsprune.pruning.plan import Plan
    from tvsprune.pruning.surgery import apply_plan

    model = GroupedNet().eval()
    example = torch.randn(1, 3, 8, 8)
    probe = probe_model(model, example)
    graph = ChannelGraph(model, example, probe.logits_layer)
    groups = [{"root": g.root, "members": g.members, "channels": g.channels,
               "kept": list(range(1, g.channels)) if g.root == "c1" else list(range(g.channels))}
              for g in graph.groups]
    with pytest.raises(TvsError, match="same channels removed in every block"):
        apply_plan(model, Plan(groups), example, probe.logits_layer, graph=graph)


class ShuffleNet(nn.Module):
    """A channel shuffle between two convolutions: coupling through it cannot be mapped."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        x = torch.relu(self.c2(x))
        return self.fc(torch.relu(self.c3(x)).mean((2, 3)))


def test_groups_through_a_channel_shuffle_are_left_unpruned_with_the_reason():
    model = ShuffleNet().eval()
    example = torch.randn(1, 3, 8, 8)
    graph = ChannelGraph(model, example, "fc")
    assert "c1" in graph.rigid and "reorders" in graph.rigid["c1"]
    assert "c2" not in graph.rigid and "c3" not in graph.rigid


class GhostNet(nn.Module):
    """GhostNet's module as timm writes it: a primary conv and a cheap depthwise conv of it,
    concatenated and sliced to the output width, added to the block input; then a depthwise
    conv created first, so that Torch-Pruning roots the group there (as in timm's ghostnet_100)."""

    def __init__(self, out: int = 6):
        super().__init__()
        init = -(-out // 2)
        self.dw = nn.Conv2d(out, out, 3, padding=1, groups=out)
        self.stem = nn.Conv2d(3, out, 3, padding=1)
        self.primary = nn.Conv2d(out, init, 1)
        self.cheap = nn.Conv2d(init, init, 3, padding=1, groups=init)
        self.head, self.fc, self.out = nn.Conv2d(out, 8, 1), nn.Linear(8, 3), out

    def forward(self, x):
        x = torch.relu(self.stem(x))
        a = torch.relu(self.primary(x))
        ghost = torch.cat([a, torch.relu(self.cheap(a))], dim=1)[:, :self.out]
        x = self.dw(x + ghost)
        return self.fc(torch.relu(self.head(x)).mean((2, 3)))


# 5: a slice that drops a channel (recorded while the graph is built); 6: a slice that keeps
# them all (torch records none) and each primary channel is tied to two stem channels
@pytest.mark.parametrize("out,reason", [(5, "slice"), (6, "two channels of one layer")])
def test_ghost_module_is_left_unpruned_not_mis_coupled(out, reason):
    from tvsprune.pruning.surgery import apply_plan

    model = GhostNet(out).eval()
    example = torch.randn(2, 3, 8, 8)
    probe = probe_model(model, example)
    graph = ChannelGraph(model, example, probe.logits_layer)
    rigid = graph.find_rigid_groups(example)
    (stem_group,) = [g for g in graph.groups if "stem" in g.members]
    assert reason in rigid.get(stem_group.root, "")
    cost = CostModel(model, graph, {l.name: l.out_shape for l in probe.layers})
    scores = {l.name: np.random.default_rng(0).random(l.channels) for l in probe.layers}
    plan = make_plan(graph, cost, scores, target=0.3, allocation="uniform")
    pruned = apply_plan(copy.deepcopy(model), plan, example, probe.logits_layer)
    with torch.no_grad():
        assert pruned(example).shape == (2, 3)  # runs, with the widths the plan implies (checked in apply_plan)
    assert pruned.stem.out_channels == out
