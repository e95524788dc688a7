"""Pruning: physical removal == masking, mean compensation, planted filters, plans, scores."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from helpers import randomize_bn, run_cli
from tiny_models import ConcatNet, DepthwiseNet, DynamicViewNet, TinyCNN, ViewNet

from tvsprune.calibration import LayerMoments, collect_moments
from tvsprune.errors import TvsError
from tvsprune.models import build_module, load_model
from tvsprune.models.probe import probe_model
from tvsprune.pruning import Guards, Plan, apply_plan, hellinger_pairs, layer_scores, make_plan, spearman
from tvsprune.pruning.costs import CostModel
from tvsprune.pruning.graph import ChannelGraph
from tvsprune.pruning.repairs import consumer_input_means
from tvsprune.pruning.compensation import fold_from_moments
from tvsprune.pruning.compensation import removed_inputs as consumer_removals

TINY = Path(__file__).parent / "tiny_models.py"


def _setup(model: nn.Module, shape=(3, 16, 16)):
    example = torch.zeros(1, *shape)
    probe = probe_model(model, example)
    graph = ChannelGraph(model, example, probe.logits_layer)
    graph.find_rigid_groups(example)
    cost = CostModel(model, graph, {l.name: l.out_shape for l in probe.layers})
    return example, probe, graph, cost


def _random_plan(model, frac=0.4, seed=0, shape=(3, 16, 16), only=None):
    example, probe, graph, cost = _setup(model, shape)
    scores = layer_scores("random", model, None, [l.name for l in probe.layers], seed=seed)
    if only is not None:
        scores = {k: v for k, v in scores.items() if k in only}
    plan = make_plan(graph, cost, scores, target=frac, allocation="uniform")
    return plan, example, probe, cost


def _masked_reference(model, plan, probe):
    """The unpruned model with the plan's channels zeroed after their BatchNorm."""
    ref = copy.deepcopy(model)
    stat = {l.name: l.stat_module for l in probe.layers}
    modules = dict(ref.named_modules())
    for g, rm in zip(plan.groups, plan.removed()):
        if len(rm) == 0:
            continue
        mask = torch.ones(g["channels"])
        mask[rm] = 0
        for member in g["members"]:
            modules[stat[member]].register_forward_hook(
                lambda m, i, o, mask=mask: o * mask.view(1, -1, *([1] * (o.dim() - 2))))
    return ref


CASES = {
    "vgg": (lambda: randomize_bn(build_module("vgg11_bn")), (3, 32, 32)),
    "resnet": (lambda: randomize_bn(build_module("resnet20")), (3, 32, 32)),
    "concat": (lambda: randomize_bn(ConcatNet()), (3, 16, 16)),
    "view": (lambda: randomize_bn(ViewNet()), (3, 16, 16)),
    "dynview": (lambda: randomize_bn(DynamicViewNet()), (3, 16, 16)),
    "depthwise": (lambda: randomize_bn(DepthwiseNet()), (3, 16, 16)),
    "tiny": (lambda: randomize_bn(TinyCNN()), (3, 16, 16)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_physical_removal_equals_masking(case):
    torch.manual_seed(0)
    make, shape = CASES[case]
    model = make()
    plan, example, probe, cost = _random_plan(model, 0.4, shape=shape)
    assert any(len(r) for r in plan.removed())
    ref = _masked_reference(model, plan, probe)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = apply_plan(copy.deepcopy(model), plan, example, probe.logits_layer)
    x = torch.randn(5, *shape)
    with torch.no_grad():
        diff = (ref(x) - pruned(x)).abs().max().item()
    assert diff <= 1e-5
    # the same surgery on a copy of the traced graph (what prune does per candidate) is bit
    # for bit the surgery on a fresh trace, and leaves the original model untouched
    graph = ChannelGraph(model, example, probe.logits_layer)
    twin = graph.copy()
    apply_plan(twin.model, plan, example, probe.logits_layer, graph=twin)
    a, b = pruned.state_dict(), twin.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the cost model predicts the real parameter count exactly
    assert cost.cost(plan.removed())[0] == sum(p.numel() for p in pruned.parameters())
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_hardcoded_view_group_is_left_intact_and_flatten_couples_otherwise():
    plan, *_ = _random_plan(randomize_bn(ViewNet()), 0.3)
    assert "forward pass fails" in plan.meta["rigid_groups"]["conv2"]
    assert len(plan.layers()["conv2"]) == 8 and len(plan.layers()["fc1"]) < 12
    plan, example, probe, _ = _random_plan(randomize_bn(DynamicViewNet()), 0.4)
    assert not plan.meta.get("rigid_groups") and len(plan.layers()["conv2"]) < 8
    graph = ChannelGraph(DynamicViewNet(), example, probe.logits_layer)
    fc1_in = next(it for g in graph.groups if g.root == "conv2" for it in g.items if it.module == "fc1")
    assert len(fc1_in.idxs) == 8 * 16  # each channel feeds 4x4 flattened features


def test_residual_coupling_keeps_shared_channels_together():
    model = randomize_bn(build_module("resnet20"))
    plan, *_ = _random_plan(model, 0.3, shape=(3, 32, 32))
    stage3 = next(g for g in plan.groups if "layers.8.conv2" in g["members"])
    assert {"layers.6.conv2", "layers.7.conv2", "layers.8.conv2", "layers.6.shortcut.0"} <= set(stage3["members"])


def test_user_model_file_roundtrip(tmp_path):
    src = tmp_path / "tiny_models.py"
    shutil.copy(TINY, src)
    loaded = load_model(f"{src}:build", kwargs={"name": "view"})
    randomize_bn(loaded.module)
    plan, example, probe, _ = _random_plan(loaded.module, 0.3)
    ref = _masked_reference(loaded.module, plan, probe)
    pruned = apply_plan(copy.deepcopy(loaded.module), plan, example, probe.logits_layer)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert (ref(x) - pruned(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case,only", [("tiny", {"features.4", "classifier.0"}), ("dynview", {"conv2", "fc1"}),
                                       ("concat", {"a", "b", "mix"})])
def test_mean_compensation_equals_replacing_by_mean(case, only):
    """Consumers here are Linear or 1x1 convolutions, where the bias fold is exact.

    (Behind a zero-padded KxK convolution the fold is exact in the interior only.)
    """
    torch.manual_seed(1)
    model = CASES[case][0]()
    plan, example, probe, _ = _random_plan(model, 0.3, only=only)
    graph = ChannelGraph(model, example, probe.logits_layer)
    calib = [(torch.randn(8, 3, 16, 16) + 0.5, torch.zeros(8, dtype=torch.long)) for _ in range(3)]
    consumers = list(consumer_removals(graph, plan))
    means = consumer_input_means(model, consumers, calib)
    # reference: the unpruned model whose consumers see removed inputs replaced by their mean
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    removed_inputs: dict[str, np.ndarray] = {}
    rm_by_root = dict(zip([p["root"] for p in plan.groups], plan.removed()))
    for g in graph.groups:
        rm = rm_by_root.get(g.root, [])
        for it in g.items:
            if it.dim == "in" and it.module in consumers:
                sel = it.idxs[np.isin(it.root_idxs, rm)]
                removed_inputs[it.module] = np.concatenate([removed_inputs.get(it.module, []), sel]).astype(int)

    def replace(name):
        def fn(m, inp):
            x = inp[0].clone()
            idx = torch.as_tensor(removed_inputs[name])
            mu = torch.as_tensor(means[name][removed_inputs[name]], dtype=x.dtype)
            x[:, idx] = mu.view(1, -1, *([1] * (x.dim() - 2)))
            return (x,)
        return fn

    for name in removed_inputs:
        modules[name].register_forward_pre_hook(replace(name))
    pruned = copy.deepcopy(model)
    pgraph = ChannelGraph(pruned, example, probe.logits_layer)
    fold_from_moments(pgraph, plan, {}, "mean", {l.name: l.stat_module for l in probe.layers}, fallback_means=means)
    apply_plan(pruned, plan, example, probe.logits_layer, graph=pgraph)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert (ref(x) - pruned(x)).abs().max().item() <= 1e-5
        assert (ref(x) - apply_plan(copy.deepcopy(model), plan, example, probe.logits_layer)(x)).abs().max() > 1e-4


class Planted(nn.Module):
    """Filters 0-3 read the class-carrying input channel with small weights; filters 4-7
    read pure noise channels with large weights (so magnitude criteria keep them)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 1)
        self.fc = nn.Linear(8, 3)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            for j in range(4):
                self.conv.weight[j, 0] = 0.2 + 0.1 * j
            for j in range(4, 8):
                self.conv.weight[j, 1:] = 5.0 * (1 if j % 2 else -1)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_planted_nondiscriminative_filters():
    torch.manual_seed(0)
    model = Planted().eval()
    n = 300
    y = torch.arange(n) % 3
    x = torch.randn(n, 4, 6, 6)
    x[:, 0] += y.view(-1, 1, 1).float() * 3.0  # class signal in channel 0 only
    example, probe, graph, cost = _setup(model, (4, 6, 6))
    moments = collect_moments(model, probe, [(x[i:i + 50], y[i:i + 50]) for i in range(0, n, 50)],
                              ["a", "b", "c"], "global")
    base = cost.cost()[0]
    target = (base - cost.cost([np.arange(4)])[0]) / base  # exactly four filters' worth
    for criterion, expect_removed in (("tvs", [4, 5, 6, 7]), ("l1", [0, 1, 2, 3])):
        scores = layer_scores(criterion, model, moments, ["conv"])
        plan = make_plan(graph, cost, scores, target=target - 1e-9, allocation="uniform")
        assert sorted(plan.removed()[0].tolist()) == expect_removed, criterion


def test_plan_replay_is_exact_and_bad_plans_fail(tmp_path):
    model = randomize_bn(build_module("resnet20"))
    plan, example, probe, _ = _random_plan(model, 0.3, shape=(3, 32, 32))
    path = tmp_path / "plan.json"
    plan.meta["logits_layer"] = probe.logits_layer
    plan.save(path)
    a = apply_plan(copy.deepcopy(model), plan, example, probe.logits_layer)
    b = apply_plan(copy.deepcopy(model), Plan.load(path), example, probe.logits_layer)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # corrupt JSON, wrong format, out-of-range index, plan for another model
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TvsError, match="corrupt plan"):
        Plan.load(tmp_path / "bad.json")
    d = json.loads(path.read_text())
    d["groups"][0]["kept"] = [0, 999]
    with pytest.raises(TvsError, match="outside its width"):
        Plan.from_dict(d)
    with pytest.raises(TvsError, match="another model|not a prunable group"):
        apply_plan(randomize_bn(build_module("vgg11_bn")), Plan.load(path), torch.zeros(1, 3, 32, 32), "classifier.6")


def test_guards_and_round_to():
    model = randomize_bn(build_module("vgg11_bn"))
    example, probe, graph, cost = _setup(model, (3, 32, 32))
    scores = layer_scores("l1", model, None, [l.name for l in probe.layers])
    plan = make_plan(graph, cost, scores, target=0.6, allocation="global", guards=Guards(0.25, 8, 8))
    for g in plan.groups:
        kept = len(g["kept"])
        assert kept >= max(8, int(np.ceil(0.25 * g["channels"])))
        assert kept % 8 == 0 or kept == g["channels"]
    assert "classifier.6" not in plan.layers()  # the logits layer is never pruned


def test_cost_rank_allocation_counts_depend_on_cost_not_on_score_spread():
    """Two groups of equal cost: under cost-rank they lose the same number of channels however
    skewed their scores are (under cost, the skewed group loses more); order stays the criterion's."""
    from tvsprune.pruning.allocations import Allocator

    skewed, flat = np.array([0.01, 0.02, 0.03, 1.0]), np.array([0.7, 0.8, 0.9, 1.0])
    guards = Guards(0.0, 1, 1)
    rank = Allocator("cost-rank", [skewed, flat], [4, 4], guards, unit_costs=[1.0, 1.0], cost_power=2)
    cost = Allocator("cost", [skewed, flat], [4, 4], guards, unit_costs=[1.0, 1.0], cost_power=2)
    for lam in (0.3, 0.6):
        a, b = rank.counts(lam)
        assert a == b
    assert cost.counts(0.3)[0] > cost.counts(0.3)[1]
    assert rank.removed([2, 2])[0].tolist() == [0, 1] and rank.removed([2, 2])[1].tolist() == [0, 1]


def test_hellinger_matches_closed_form_and_handles_dead_filters():
    mu = torch.tensor([[[0.0], [0.0], [1.0]], [[1.0], [0.0], [1.0]]], dtype=torch.float64)  # [K=2, C=3, D=1]
    var = torch.tensor([[[1.0], [0.0], [2.0]], [[1.0], [0.0], [0.5]]], dtype=torch.float64)
    lm = LayerMoments(torch.tensor([10, 10]), mu, var * 9)
    h2 = hellinger_pairs(lm).numpy()
    s2 = 2.0
    expected0 = 1 - np.exp(0.5 * np.log(2 * 1 * 1 / s2) - 1 / (4 * s2))
    sa, sb = np.sqrt(2.0), np.sqrt(0.5)
    expected2 = 1 - np.exp(0.5 * np.log(2 * sa * sb / 2.5))
    np.testing.assert_allclose(h2, [expected0, 0.0, expected2], rtol=1e-12, atol=1e-15)


def test_many_classes_chunked_min_equals_bruteforce():
    g = torch.Generator().manual_seed(0)
    K, C, D = 60, 5, 2
    lm = LayerMoments(torch.full((K,), 5), torch.randn(K, C, D, generator=g, dtype=torch.float64),
                      torch.rand(K, C, D, generator=g, dtype=torch.float64) + 0.1)
    from tvsprune.pruning.criteria import tvs as sc

    got = hellinger_pairs(lm).numpy()
    var = lm.var
    brute = np.full(C, np.inf)
    for a in range(K):
        for b in range(a + 1, K):
            s2 = var[a] + var[b]
            lbc = (0.5 * torch.log(2 * var[a].sqrt() * var[b].sqrt() / s2) - (lm.mean[a] - lm.mean[b]) ** 2 / (4 * s2)).sum(-1)
            brute = np.minimum(brute, (1 - torch.exp(lbc)).numpy())
    np.testing.assert_allclose(got, brute, rtol=1e-10, atol=1e-14)
    old = sc.WORKING_SET_BYTES
    try:  # force tiny slices (one class pair per step): the same answer, bit for bit
        sc.WORKING_SET_BYTES = 1
        np.testing.assert_allclose(hellinger_pairs(lm).numpy(), got, rtol=0, atol=0)
        np.testing.assert_allclose(hellinger_pairs(lm, "mean").numpy(), hellinger_pairs(lm, "mean").numpy())
    finally:
        sc.WORKING_SET_BYTES = old


def test_spearman():
    assert spearman(np.array([1, 2, 3, 4.0]), np.array([10, 20, 30, 40.0])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3, 4.0]), np.array([4, 3, 2, 1.0])) == pytest.approx(-1.0)


# ----------------------------------------------------------------------------- CLI
def test_a_mac_or_parameter_budget_warns_of_widths_off_the_8_channel_grid(tiny_calibrated, tmp_path):
    """Fewer MACs at odd widths can run slower than the base (RESULTS.md): said, in prune.json and
    on stderr; aligned widths (--round-to 8) are not warned about."""
    spec, weights, data, moments = tiny_calibrated
    for extra, name in (([], "odd"), (["--round-to", "8"], "r8")):
        r = run_cli("prune", spec, "--weights", weights, "--moments", moments, "--keep-params", "0.6",
                    "--out", tmp_path / name, "--calib-data", data, *extra)
        assert r.returncode == 0, r.stderr
        report = json.loads((tmp_path / name / "prune.json").read_text())
        odd = [l["layer"] for l in report["layers"] if l["channels_after"] != l["channels_before"]
               and l["channels_after"] % 8]
        warned = [w for w in report.get("warnings", []) if "off the 8-channel grid" in w]
        assert bool(odd) == bool(warned) == (name == "odd"), (odd, report.get("warnings"))
        assert all(layer in warned[0] for layer in odd[:3]) if odd else "off the 8-channel grid" not in r.stderr


@pytest.mark.parametrize("method", ["tvs", "l1", "l2", "random", "bn-scale", "fpgm", "mean-distance"])
def test_cli_prune_every_criterion(tiny_calibrated, tmp_path, method):
    spec, weights, data, moments = tiny_calibrated
    out = tmp_path / f"out-{method}"
    r = run_cli("prune", spec, "--weights", weights, "--moments", moments, "--method", method,
                "--target-params", "0.3", "--out", out, "--val-data", data)  # default repairs: ls + BatchNorm
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "prune.json").read_text())
    assert report["params"]["removed_frac"] >= 0.3
    assert "accuracy" in report and len(report["per_class"]) == 3
    assert set(report["spearman_tvs_vs"]) == {"l1", "l2", "random", "bn-scale", "fpgm"}
    if method not in ("tvs", "l1"):  # eval and replay read the plan, whatever criterion made it: two suffice
        return
    r = run_cli("eval", out, "--data", data)
    assert r.returncode == 0 and "top-1" in r.stdout, r.stderr
    # replaying the plan on a fresh model redoes the repairs and reproduces the weights exactly
    r = run_cli("replay", spec, "--weights", weights, "--plan", out / "plan.json", "--out", tmp_path / "replay")
    assert r.returncode == 0, r.stderr
    pruned, replayed = (load_file(str(d / "pruned.safetensors")) for d in (out, tmp_path / "replay"))
    assert pruned.keys() == replayed.keys() and all(torch.equal(pruned[k], replayed[k]) for k in pruned)
    if method == "tvs":  # structure only: same shapes, but the BatchNorm statistics are not re-estimated
        r = run_cli("replay", spec, "--weights", weights, "--plan", out / "plan.json", "--out", tmp_path / "struct",
                    "--structure-only")
        assert r.returncode == 0, r.stderr
        bare = load_file(str(tmp_path / "struct" / "pruned.safetensors"))
        assert {k: v.shape for k, v in bare.items()} == {k: v.shape for k, v in pruned.items() if k in bare}
        assert not all(torch.equal(pruned[k], bare[k]) for k in bare)


def test_cli_iter_tvs_logs_rounds(tiny_calibrated, tmp_path):
    spec, weights, data, moments = tiny_calibrated
    out = tmp_path / "iter"
    r = run_cli("prune", spec, "--weights", weights, "--moments", moments, "--method", "iter-tvs",
                "--target-params", "0.2", "--out", out, "--val-data", data, "--max-acc-drop", "100",
                "--step", "0.1")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "prune.json").read_text())
    assert report["rounds"] and report["rounds"][0]["round"] == 1
    assert report["stop"].startswith("reached the target")
    # an accuracy budget nothing fits: it stops short and says why
    r = run_cli("prune", spec, "--weights", weights, "--moments", moments, "--method", "iter-tvs",
                "--target-params", "0.5", "--out", tmp_path / "short", "--val-data", data, "--max-acc-drop", "-1",
                "--step", "0.1")
    assert r.returncode == 0, r.stderr
    short = json.loads((tmp_path / "short" / "prune.json").read_text())
    assert short["stop"].startswith("stopped short") and "--max-acc-drop" in short["stop"]
    assert "stopped short" in r.stderr
    assert "round" in r.stdout
    assert report["params"]["removed_frac"] >= 0.2 - 1e-9


def test_cli_prune_errors_leave_nothing(tiny_calibrated, tmp_path):
    spec, weights, data, moments = tiny_calibrated
    out = tmp_path / "none"
    r = run_cli("prune", spec, "--weights", weights, "--moments", moments, "--out", tmp_path / "default")
    assert r.returncode == 0, r.stderr  # no budget: the one default budget, as in the API and run
    assert json.loads((tmp_path / "default" / "prune.json").read_text())["budget"]["target"] == 0.3
    r = run_cli("prune", "resnet20", "--moments", moments, "--target-params", "0.2", "--out", out)
    assert r.returncode == 1 and "error:" in r.stderr and not out.exists()


def test_tied_scores_do_not_overshoot_the_budget():
    """Dead filters score 0 alike: the allocation must not remove every tie at once."""
    from tvsprune.models.probe import probe_model
    from tvsprune.pruning.costs import CostModel
    from tvsprune.pruning.graph import ChannelGraph
    from tvsprune.pruning.budget import make_plan

    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4)).eval()
    example = torch.randn(1, 3, 12, 12)
    probe = probe_model(model, example)
    graph = ChannelGraph(model, example, probe.logits_layer)
    cost = CostModel(model, graph, {l.name: l.out_shape for l in probe.layers})
    scores = {l.name: np.zeros(l.channels) for l in probe.layers}
    for allocation in ("global", "cost", "cost-rank"):
        plan = make_plan(graph, cost, scores, target=0.3, allocation=allocation)
        removed = plan.meta["params"]["removed_frac"]
        assert 0.3 <= removed < 0.36, (allocation, removed)


def test_magnitude_allocation_counts_by_l2_and_orders_by_the_criterion():
    """``magnitude``: each group loses as many channels as a global threshold on L2 norms
    takes (what ``global`` on the L2 scores removes), but the criterion picks which."""
    model = randomize_bn(TinyCNN())
    example, probe, graph, cost = _setup(model)
    layers = [l.name for l in probe.layers]
    l2 = layer_scores("l2", model, None, layers)
    other = layer_scores("random", model, None, layers, seed=3)
    by_l2 = make_plan(graph, cost, l2, target=0.3, allocation="global")
    mixed = make_plan(graph, cost, other, target=0.3, allocation="magnitude", count_scores=l2)
    implicit = make_plan(graph, cost, other, target=0.3, allocation="magnitude")  # L2 norms read from the model
    assert [len(g["kept"]) for g in mixed.groups] == [len(g["kept"]) for g in by_l2.groups]
    assert mixed.groups == implicit.groups
    from tvsprune.pruning.budget import block_scores, group_scores

    for g, t in zip(mixed.groups, block_scores(graph, group_scores(graph, other))):
        removed = np.setdiff1d(np.arange(g["channels"]), g["kept"])
        if len(removed) and t is not None:  # the lowest-scoring channels of the criterion went
            assert t[removed].max() <= np.sort(t)[len(removed) - 1] + 1e-12
    assert any(a["kept"] != b["kept"] for a, b in zip(mixed.groups, by_l2.groups))


def test_sensitivity_allocation_cuts_where_the_measured_kl_per_saving_is_lowest():
    """``sensitivity``: a group whose measured curve is flat loses channels before one whose
    curve is steep; the budget is met; more budget never removes fewer channels anywhere;
    which channels go is the criterion's order."""
    from tvsprune.errors import TvsError
    from tvsprune.pruning.allocations.sensitivity import lower_hull
    from tvsprune.pruning.budget import block_scores, group_scores

    model = randomize_bn(TinyCNN())
    example, probe, graph, cost = _setup(model)
    scores = layer_scores("l2", model, None, [l.name for l in probe.layers])
    live = [i for i, t in enumerate(block_scores(graph, group_scores(graph, scores))) if t is not None]
    assert len(live) >= 2
    flat, steep = live[0], live[1]
    curves = [None] * len(graph.groups)
    for i in live:
        c = graph.groups[i].block_size
        slope = 1e-3 if i == flat else 10.0
        curves[i] = [(n, slope * n) for n in range(1, c)]
    plans = [make_plan(graph, cost, scores, target=t, allocation="sensitivity", curves=curves)
             for t in (0.1, 0.2, 0.3)]
    for t, p in zip((0.1, 0.2, 0.3), plans):
        assert p.meta["params"]["removed_frac"] >= t - 1e-9
    cut = [[g["channels"] - len(g["kept"]) for g in p.groups] for p in plans]
    assert cut[0][flat] > 0 and cut[0][steep] == 0  # the flat curve pays first
    assert all(a <= b for lo, hi in zip(cut, cut[1:]) for a, b in zip(lo, hi))  # monotone in the budget
    gs = block_scores(graph, group_scores(graph, scores))
    for g, t in zip(plans[2].groups, gs):
        removed = np.setdiff1d(np.arange(g["channels"]), g["kept"])
        if len(removed) and t is not None:
            assert t[removed].max() <= np.sort(t)[len(removed) - 1] + 1e-12
    # curves flat at zero (a branch a zero-initialised BatchNorm silences: timm's ResNets)
    # cost nothing at any price: the budget is still met, not overshot
    zero = [None if c is None else [(n, 0.0) for n, _ in c] for c in curves]
    base = cost.cost()[0]
    one = max(base - cost.cost([g.expand(np.array([0])) if j == i else np.empty(0, dtype=np.int64)
                                for j in range(len(graph.groups))])[0] for i, g in enumerate(graph.groups))
    for t in (0.1, 0.3):
        p = make_plan(graph, cost, scores, target=t, allocation="sensitivity", curves=zero)
        assert t - 1e-9 <= p.meta["params"]["removed_frac"] <= t + one / base, (p.meta["params"], one / base)
    # a point above the chord of its neighbours is not on the lower hull
    assert lower_hull(np.array([0.0, 1, 2, 3]), np.array([0.0, 0.05, 5.0, 0.3])) == [0, 1, 3]
    with pytest.raises(TvsError, match="measured curves"):
        make_plan(graph, cost, scores, target=0.2, allocation="sensitivity")


def test_sensitivity_prices_each_cut_by_what_it_saves_not_by_the_count():
    """A measured latency is not linear in the width: a group that saves little until its
    width reaches the backend's block, then much, is cheap at that cut; priced as the count
    times one channel's saving, it would look like any other. A cut that saves no more than a
    smaller one is never taken. For MACs, what a cut saves is exactly the count times one
    channel's saving where no layer both reads and writes a group, so such networks' MAC and
    parameter plans are unchanged."""
    from tvsprune.pruning.allocations import Allocator
    from tvsprune.pruning.budget import _curve_savings

    t = np.linspace(0.1, 1.0, 8)
    curves = [[(2, 1.0), (4, 2.0), (6, 3.0)]] * 2  # the same KL per channel in both groups
    guards = Guards(0.0, 1, 1)
    by_count = Allocator("sensitivity", [t, t], [8, 8], guards, unit_costs=[1.0, 1.0], curves=curves)
    stepped = Allocator("sensitivity", [t, t], [8, 8], guards, unit_costs=[1.0, 1.0], curves=curves,
                        savings=[[2.0, 4.0, 6.0], [0.5, 0.4, 12.0]])
    assert by_count.counts(0.5) == [6, 6]
    assert stepped.counts(0.5) == [0, 6]  # the stepped group's 6-channel cut: 3 KL for 12 saved
    assert stepped.rule.steps[1][0].tolist() == [6]  # the 4-channel cut (saving 0.4 < 0.5) is not a hull point

    model = randomize_bn(TinyCNN())
    example, probe, graph, cost = _setup(model)
    curves = [None if g.root in graph.rigid else [(n, 0.1 * n) for n in range(1, g.block_size)] for g in graph.groups]
    base = cost.metric("macs")
    saved = _curve_savings(graph, cost, "macs", base, curves)
    one = [base - cost.metric("macs", [g.expand(np.array([0])) if j == i else np.empty(0, dtype=np.int64)
                                       for j in range(len(graph.groups))]) for i, g in enumerate(graph.groups)]
    assert any(s is not None for s in saved)
    for s, c, u in zip(saved, curves, one):
        assert s is None or s == [n * u for n, _ in c]


def test_sensitivity_budget_shrinks_images_then_points_then_gives_up(monkeypatch):
    """The measurement's cost is bounded by the network (cuts x images x MACs), not the machine."""
    from dataclasses import replace

    from tvsprune.pruning import selection as stage

    loaded = replace(load_model("resnet20"), module=randomize_bn(TinyCNN()))
    ctx = stage.Context.build(loaded, [3, 16, 16])
    assert stage.sensitivity_budget(ctx, 1000) == (len(stage.SENSITIVITY_FRACTIONS), stage.SENSITIVITY_IMAGES)
    assert stage.sensitivity_budget(ctx, 40) == (len(stage.SENSITIVITY_FRACTIONS), 40)  # few images: all of them
    macs = float(ctx.cost.cost()[1])
    live = sum(1 for g in ctx.graph.groups if g.root not in ctx.graph.rigid)
    monkeypatch.setattr(stage, "SENSITIVITY_WORK", 200 * 7 * live * macs)  # 200 images at 7 points
    assert stage.sensitivity_budget(ctx, 1000) == (7, 200)
    monkeypatch.setattr(stage, "SENSITIVITY_WORK", 128 * 4 * live * macs)  # 128 images fit at 4 points
    assert stage.sensitivity_budget(ctx, 1000) == (4, 128)
    monkeypatch.setattr(stage, "SENSITIVITY_WORK", 1.0)
    assert stage.sensitivity_budget(ctx, 1000) == (0, 0)


def test_auto_keeps_the_most_faithful_candidate_and_records_the_choice(tiny_calibrated, tmp_path):
    """The defaults (tvs combination, allocation and compensation auto) prune every candidate,
    keep the lowest KL(unpruned || pruned), and record it so that replay rebuilds it."""
    from tvsprune.compare.logits import chunks, collect_logits, forward_fn
    from tvsprune.calibration import DataOptions
    from tvsprune.pruning import PruneOptions, load_pruned, prune
    from tvsprune.pruning.selection import fidelity, fidelity_images

    spec, weights, data, moments = tiny_calibrated
    loaded = load_model(spec, str(weights))
    calib = DataOptions(path=str(data))
    opts = PruneOptions(target_params=0.3, repair_samples_per_class=3)  # 3 of 6 per class held out
    report = prune(loaded, moments, tmp_path / "p", opts, calib)
    sel = report["selection"]
    assert sel["held_out"] and sel["images"] == 9
    cands = sel["candidates"]
    assert {(c["tvs_saliency"], c["allocation"]) for c in cands} >= {("none", "cost"), ("l2", "global"),
                                                                      ("ls", "magnitude"), ("ls", "sensitivity"),
                                                                      ("l1", "sensitivity")}
    sens = next(c for c in cands if c["allocation"] == "sensitivity")
    assert sens["sensitivity"]["cuts"] > 0 and sens["sensitivity"]["images"] > 0
    assert any(c.get("compensation") == "ls-seq" for c in cands)  # few repair images, held-out ones: ls-seq too
    chosen = [c for c in cands if c.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["kl"] == min(c["kl"] for c in cands)
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert plan["criterion"]["tvs_saliency"] == chosen[0]["tvs_saliency"]
    assert plan["allocation"] == chosen[0]["allocation"]
    assert plan["repairs"]["compensation"] == chosen[0].get("compensation", "ls")
    xs, held_out = fidelity_images(calib, loaded, opts)
    assert held_out
    # every image used by the moments: those the repairs did not use; none left: the repair images
    every = DataOptions(path=str(data), samples_per_class=6)
    assert fidelity_images(every, loaded, opts)[0].shape[0] == 9 and fidelity_images(every, loaded, opts)[1]
    assert fidelity_images(every, loaded, PruneOptions(repair_samples_per_class=6))[1] is False
    base = collect_logits(forward_fn(loaded.module), chunks(xs))[0]
    saved = collect_logits(forward_fn(load_pruned(tmp_path / "p").module), chunks(xs))[0]
    assert fidelity(base, saved)["kl"] == pytest.approx(chosen[0]["kl"], rel=1e-5, abs=1e-9)
    # an explicit choice runs no selection
    report = prune(loaded, moments, tmp_path / "q", PruneOptions(target_params=0.3, tvs_saliency="none",
                                                                 allocation="cost", compensation="ls"), calib)
    assert "selection" not in report
    # every image is a repair image (100 per class asked, 6 there): ls-seq, fitted on them,
    # would be compared on the images it fitted, so compensation auto keeps ls
    report = prune(loaded, moments, tmp_path / "r", PruneOptions(target_params=0.3, tvs_saliency="none",
                                                                 allocation="cost"), calib)
    assert "selection" not in report
    assert json.loads((tmp_path / "r" / "plan.json").read_text())["repairs"]["compensation"] == "ls"


def test_tvs_with_the_l1_ranking_plans_what_l1_plans(tiny_calibrated, tmp_path):
    """auto's guard candidate: tvs with --tvs-saliency l1 ranks by the L1 norm alone, so with the
    same allocation it removes exactly the channels the l1 criterion removes."""
    from tvsprune.calibration import DataOptions
    from tvsprune.pruning import PruneOptions, prune

    spec, weights, data, moments = tiny_calibrated
    loaded = load_model(spec, str(weights))
    kw = dict(target_params=0.3, allocation="cost", compensation="none", bn_recalibrate=False)
    removed = {}
    for name, opts in {"tvs": PruneOptions(tvs_saliency="l1", **kw), "l1": PruneOptions(method="l1", **kw),
                       "tv": PruneOptions(tvs_saliency="none", **kw)}.items():
        prune(loaded, moments, tmp_path / name, opts, DataOptions(path=str(data)))
        plan = json.loads((tmp_path / name / "plan.json").read_text())
        removed[name] = [(g["members"], g["kept"]) for g in plan["groups"]]
    assert removed["tvs"] == removed["l1"]
    assert removed["tv"] != removed["l1"]  # the TV score ranks this network's channels otherwise
