"""Least-squares compensation: the fold against a replacement reference, second-moment merges,
old moments files, singular covariances, and one set of repair defaults for prune and run."""
from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import randomize_bn, run_cli
from safetensors.torch import load_file, save_file
from tiny_models import TinyCNN

from tvsprune.calibration import InputMoments, Moments, collect_moments
from tvsprune.calibration.moments import CoMoments
from tvsprune.models.probe import probe_model
from tvsprune.pruning import Plan, apply_plan
from tvsprune.pruning.compensation import DEFAULT_RIDGE, fold_from_moments, refit_sequential
from tvsprune.pruning.graph import ChannelGraph
from tvsprune.pruning.options import PruneOptions



class NoPadNet(nn.Module):
    """No zero padding anywhere, so the fold is exact at every position."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class LinearFirstNet(NoPadNet):
    def forward(self, x):
        return self.fc(torch.relu(self.bn2(self.conv2(self.conv1(x)))).mean((2, 3)))


def _data(n=40, seed=0, size=10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 3, (n,), generator=g)


def _plan_removing(graph: ChannelGraph, root: str, rm: list[int]) -> Plan:
    return Plan([{"root": g.root, "members": g.members, "channels": g.channels,
                  "kept": [i for i in range(g.channels) if not (g.root == root and i in rm)]} for g in graph.groups])


def test_ls_fold_equals_running_the_unpruned_network_with_reconstructed_channels():
    torch.manual_seed(0)
    model = randomize_bn(NoPadNet()).double()
    x, y = _data()
    x = x.double()
    probe = probe_model(model, x[:1])
    moments = collect_moments(model, probe, [(x[i:i + 8], y[i:i + 8]) for i in range(0, 40, 8)], ["a", "b", "c"])
    assert set(moments.inputs) == {"conv1", "conv2", "fc"}
    rm = [1, 4, 6]
    keep = [i for i in range(8) if i not in rm]
    # The reference regression, written independently (NumPy): a_R ~ M a_K + c.
    im = moments.inputs["conv2"]
    cov, mean = im.cov.numpy(), im.mean.numpy()
    ckk = cov[np.ix_(keep, keep)]
    lam = DEFAULT_RIDGE * np.trace(ckk) / len(keep)
    m = np.linalg.solve(ckk + lam * np.eye(len(keep)), cov[np.ix_(keep, rm)]).T  # [R, K]
    c = mean[rm] - m @ mean[keep]
    ref = copy.deepcopy(model)

    def replace(module, inp):
        a = inp[0].clone()
        ak = a[:, keep].permute(0, 2, 3, 1)
        a[:, rm] = (ak @ torch.as_tensor(m).T + torch.as_tensor(c)).permute(0, 3, 1, 2)
        return (a,)

    ref.conv2.register_forward_pre_hook(replace)
    pruned = copy.deepcopy(model)
    example = x[:1]
    graph = ChannelGraph(pruned, example, probe.logits_layer)
    plan = _plan_removing(graph, "conv1", rm)
    report = fold_from_moments(graph, plan, moments.inputs, "ls", {l.name: l.stat_module for l in probe.layers})
    assert report.consumers == 1 and not report.fallback_mean
    apply_plan(pruned, plan, example, probe.logits_layer, graph=graph)
    assert pruned.conv2.in_channels == 5
    xt, _ = _data(16, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(pruned(xt.double()), ref(xt.double()), rtol=0, atol=1e-5)
        # and the fold is not a no-op: plain removal differs
        bare = apply_plan(copy.deepcopy(model), plan, example, probe.logits_layer)
        assert (bare(xt.double()) - ref(xt.double())).abs().max() > 1e-3


def test_ls_seq_refit_recovers_an_exactly_reconstructable_channel():
    """A removed channel that is a linear function of kept ones is rebuilt exactly by ls-seq."""
    torch.manual_seed(0)
    model = LinearFirstNet().double().eval()
    with torch.no_grad():  # conv1 channel 3 = 2 x channel 0 - channel 5 (no nonlinearity before conv2)
        model.conv1.weight[3] = 2 * model.conv1.weight[0] - model.conv1.weight[5]
        model.conv1.bias[3] = 2 * model.conv1.bias[0] - model.conv1.bias[5]
    x, _ = _data(24)
    example = x[:1].double()
    probe = probe_model(model, example)
    graph = ChannelGraph(model, example, probe.logits_layer)
    plan = _plan_removing(graph, "conv1", [3])
    pruned = apply_plan(copy.deepcopy(model), plan, example, probe.logits_layer)
    order = ["conv1", "conv2", "fc"]
    report = refit_sequential(model, pruned, graph, plan, order, [(x.double(), None)], {}, ridge=1e-12)
    assert report.consumers == 2
    xt, _ = _data(8, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(pruned(xt.double()), model(xt.double()), rtol=0, atol=1e-5)



def test_ls_seq_reads_the_unpruned_rows_in_slices_with_the_same_fit(monkeypatch):
    """The unpruned network's rows are read once for as many consumers as fit ROWS_BYTES: a
    budget of one consumer per pass and one of all at once give the same weights, bit for bit,
    over several batches."""
    from tvsprune.pruning import compensation

    torch.manual_seed(0)
    model = LinearFirstNet().eval()
    x, _ = _data(24)
    batches = [(x[i:i + 8], None) for i in range(0, 24, 8)]
    example = x[:1]
    probe = probe_model(model, example)
    graph = ChannelGraph(model, example, probe.logits_layer)
    plan = _plan_removing(graph, "conv1", [1, 3])
    fitted = []
    for budget in (1, 2**30):
        monkeypatch.setattr(compensation, "ROWS_BYTES", budget)
        pruned = apply_plan(copy.deepcopy(model), plan, example, probe.logits_layer)
        report = refit_sequential(model, pruned, graph, plan, ["conv1", "conv2", "fc"], batches, {})
        assert report.consumers == 2
        fitted.append(pruned.state_dict())
    assert all(torch.equal(fitted[0][k], fitted[1][k]) for k in fitted[0])

def test_streaming_co_moments_equal_one_float64_pass():
    """Float32 batches whose means drift (class-sorted data), uneven sizes, 200 channels
    (three block rows of the upper-triangle product): the streamed float64 statistics
    match one float64 pass over all rows to float32 product rounding."""
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 200, generator=g) * (1 + i) + 5 * i + 40).relu() for i, n in enumerate((300, 1, 77, 512))]
    acc = CoMoments(200)
    for b in batches:
        acc.add(b)
    got = acc.result()
    rows = torch.cat(batches).double()
    centred = rows - rows.mean(0)
    assert got.n == rows.shape[0]
    torch.testing.assert_close(got.mean, rows.mean(0), rtol=1e-7, atol=0)
    torch.testing.assert_close(got.cov, centred.T @ centred / (rows.shape[0] - 1), rtol=1e-5, atol=1e-5 * got.cov.diag().max().item())
    torch.testing.assert_close(got.cov, got.cov.T, rtol=0, atol=0)  # mirrored, not recomputed
    # float64 rows: float64 accuracy, and add_rows (ls-seq's path) is the same computation
    exact = InputMoments.zeros(200).add_rows(rows)
    torch.testing.assert_close(exact.cov, centred.T @ centred / (rows.shape[0] - 1), rtol=1e-10, atol=1e-10)


def test_input_second_moments_merge_of_uneven_shards_equals_one_pass():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(100, 5, generator=g, dtype=torch.float64) * 3 + 1e3  # a large offset: Chan, not naive sums
    whole = InputMoments.zeros(5).add_rows(rows)
    parts = [InputMoments.zeros(5).add_rows(rows[s]) for s in (slice(0, 7), slice(7, 8), slice(8, 100))]
    for merged in (parts[0].merge(parts[1]).merge(parts[2]), parts[0].merge(parts[1].merge(parts[2]))):
        assert merged.n == 100
        torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-12, atol=0)
        torch.testing.assert_close(merged.cov, whole.cov, rtol=1e-9, atol=1e-12)
    centred = rows - rows.mean(0)
    torch.testing.assert_close(whole.cov, centred.T @ centred / 99, rtol=1e-9, atol=1e-12)
    # through the moments file: the same activations in two shards merge to one pass
    model = randomize_bn(TinyCNN())
    x, y = _data(30, size=16)
    probe = probe_model(model, x[:1])
    one = collect_moments(model, probe, [(x, y)], ["a", "b", "c"], "global")
    halves = [collect_moments(model, probe, [(x[s], y[s])], ["a", "b", "c"], "global")
              for s in (slice(0, 11), slice(11, 30))]
    merged = halves[0].merge(halves[1])
    for name, im in one.inputs.items():
        assert merged.inputs[name].n == im.n
        torch.testing.assert_close(merged.inputs[name].cov, im.cov, rtol=1e-4, atol=1e-6)  # float32 forwards


def test_singular_covariance_and_three_images_give_finite_weights_and_a_warning(caplog):
    model = randomize_bn(TinyCNN())
    with torch.no_grad():  # duplicated filters: the consumer's input covariance is singular
        for i in range(0, 8, 2):
            model.features[0].weight[i + 1] = model.features[0].weight[i]
            model.features[0].bias[i + 1] = model.features[0].bias[i]
            for t in ("weight", "bias", "running_mean", "running_var"):
                getattr(model.features[1], t)[i + 1] = getattr(model.features[1], t)[i]
    x, y = _data(3, size=16)
    probe = probe_model(model, x[:1])
    moments = collect_moments(model, probe, [(x, y)], ["a", "b", "c"], "global")
    graph = ChannelGraph(model, x[:1], probe.logits_layer)
    plan = _plan_removing(graph, "features.0", [0, 3, 5])
    with caplog.at_level(logging.WARNING):
        report = fold_from_moments(graph, plan, moments.inputs, "ls", {l.name: l.stat_module for l in probe.layers})
    assert report.warnings and "compensation" in caplog.text
    assert all(torch.isfinite(p).all() for p in model.parameters())
    pruned = apply_plan(model, plan, x[:1], probe.logits_layer, graph=graph)
    assert torch.isfinite(pruned(x)).all()


@pytest.fixture
def tiny_run(tmp_path):
    from test_pipeline import _config

    return _config(tmp_path)


def test_prune_without_flags_equals_run_with_default_config(tiny_run, tmp_path, monkeypatch):
    from tvsprune.pipeline import load_config
    from tvsprune.pipeline.run import Pipeline

    monkeypatch.chdir(tmp_path)
    cfg, _ = load_config(tiny_run)
    assert cfg.prune.compensation == PruneOptions.default("compensation") and cfg.prune.bn_recalibrate
    pipe = Pipeline(cfg)
    pipe.stage_calibrate()
    pipe.stage_prune()
    out = tmp_path / "out"
    cli = tmp_path / "cli"
    r = run_cli("prune", f"{tmp_path / 'tiny_models.py'}:TinyCNN", "--weights", tmp_path / "w.pt",
                "--moments", out / "moments.safetensors", "--target-params", "0.3", "--out", cli)
    assert r.returncode == 0, r.stderr
    a, b = (json.loads((d / "plan.json").read_text()) for d in (out / "pruned", cli))
    assert a["groups"] == b["groups"] and a["repairs"] == b["repairs"]
    assert a["repairs"] == {"compensation": "ls", "bn_recalibrate": True, "ridge": DEFAULT_RIDGE}
    wa, wb = (load_file(str(d / "pruned.safetensors")) for d in (out / "pruned", cli))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # --no-repair turns all of it off
    r = run_cli("prune", f"{tmp_path / 'tiny_models.py'}:TinyCNN", "--weights", tmp_path / "w.pt",
                "--moments", out / "moments.safetensors", "--target-params", "0.3", "--out", tmp_path / "bare",
                "--no-repair")
    assert r.returncode == 0, r.stderr
    bare = json.loads((tmp_path / "bare" / "plan.json").read_text())
    assert bare["repairs"]["compensation"] == "none" and not bare["repairs"]["bn_recalibrate"]


def test_old_format_moments_file_still_prunes_with_mean_fallback(tmp_path, tiny_setup):
    spec, weights, image_folder = tiny_setup
    new = tmp_path / "m2.safetensors"
    r = run_cli("calibrate", spec, "--weights", weights, "--data", image_folder, "--out", new)
    assert r.returncode == 0, r.stderr
    # rewrite it as format 1 wrote it: no input statistics
    from safetensors import safe_open

    with safe_open(str(new), framework="pt") as f:
        meta = json.loads(f.metadata()["tvsprune"])
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("@in/")}
    meta["format"] = "tvsprune.moments/1"
    meta.pop("inputs")
    old = tmp_path / "m1.safetensors"
    save_file(tensors, str(old), metadata={"tvsprune": json.dumps(meta)})
    assert not Moments.load(old).inputs and Moments.load(new).inputs
    out = tmp_path / "pruned"
    r = run_cli("prune", spec, "--weights", weights, "--moments", old, "--target-params", "0.3",
                "--out", out, "--compensation", "ls")
    assert r.returncode == 0, r.stderr
    assert "falls back to mean" in r.stderr
    report = json.loads((out / "prune.json").read_text())
    assert report["repair_steps"]["compensation"]["method"] == "mean"
    # the defaults (compensation auto: ls, then ls-seq when more faithful) prune it too
    r = run_cli("prune", spec, "--weights", weights, "--moments", old, "--target-params", "0.3",
                "--out", tmp_path / "auto")
    assert r.returncode == 0, r.stderr
    assert "falls back to mean" in r.stderr
    report = json.loads((tmp_path / "auto" / "prune.json").read_text())
    assert report["repair_steps"]["compensation"]["method"] in ("mean", "ls-seq")
    assert not any(c["tvs_saliency"] == "ls" for c in report["selection"]["candidates"])  # no second moments
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "pruned.safetensors")).values())
