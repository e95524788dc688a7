"""Moments: exactness against a NumPy float64 reference, shard merging, torchrun, file format."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_bn, run_cli
from tiny_models import TinyCNN

from tvsprune.calibration import LayerMoments, Moments, collect_moments, reduce_map
from tvsprune.models.probe import probe_model


def _batches(n: int = 50, classes: int = 3, seed: int = 0, bs: int = 7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g) * 2 + 1
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)], x, y


@pytest.mark.parametrize("resolution", ["global", "pool:2", "pool:16", "full"])  # pool:16: an 8x8 map repeated
def test_moments_match_numpy_reference(resolution):
    model = randomize_bn(TinyCNN())
    batches, x, y = _batches()
    probe = probe_model(model, x[:1])
    moments = collect_moments(model, probe, batches, ["a", "b", "c"], resolution)
    # Reference: the same activations, captured separately, reduced in float64 with NumPy.
    acts: dict[str, list] = {l.name: [] for l in probe.layers}
    modules = dict(model.named_modules())
    hooks = [modules[l.stat_module].register_forward_hook(
        lambda m, i, o, name=l.name: acts[name].append(reduce_map(o, resolution).double().numpy()))
        for l in probe.layers]
    with torch.no_grad():
        for xb, _ in batches:  # same batches, so the float32 activations are bit-identical
            model(xb)
    for h in hooks:
        h.remove()
    acts = {k: np.concatenate(v) for k, v in acts.items()}
    yn = y.numpy()
    assert set(acts) == set(moments.layers) == {"features.0", "features.4", "classifier.0"}
    for name, a in acts.items():
        lm = moments.layers[name]
        for k in range(3):
            sel = a[yn == k]
            assert int(lm.count[k]) == len(sel)
            np.testing.assert_allclose(lm.mean[k].numpy(), sel.mean(0), rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(lm.var[k].numpy(), sel.var(0, ddof=1), rtol=1e-9, atol=1e-12)


class _Irregular(torch.nn.Module):
    """conv2 runs twice on even-sized batches; conv3 is skipped on batches whose size divides by 3."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        for _ in range(2 if x.shape[0] % 2 == 0 else 1):
            x = F.relu(self.bn2(self.conv2(x)))
        if x.shape[0] % 3:
            x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("model", ["inplace-relu", "irregular"])
def test_fused_layer_groups_equal_layers_one_by_one(model, monkeypatch):
    """The class moments of fused layer groups are bit-identical to each layer's own: with an
    in-place ReLU after the statistic point (the group must copy, not hold a view), and with
    a layer that runs twice or not at all in some passes (the group falls back to single layers)."""
    import tvsprune.calibration.collector as collector

    if model == "inplace-relu":
        net = randomize_bn(TinyCNN())
        for m in net.modules():
            if isinstance(m, torch.nn.ReLU):
                m.inplace = True
    else:
        net = randomize_bn(_Irregular())
    batches = [(x, y) for x, y in _batches(n=60, bs=7)[0]] + [(x, y) for x, y in _batches(n=24, bs=6, seed=1)[0]]
    probe = probe_model(net, batches[0][0][:1])
    fused = collect_moments(net, probe, batches, ["a", "b", "c"], "pool:2", second_moments=False)
    monkeypatch.setattr(collector, "FUSE_MAX", 0)  # every layer its own group
    alone = collect_moments(net, probe, batches, ["a", "b", "c"], "pool:2", second_moments=False)
    assert list(fused.layers) == list(alone.layers) == [l.name for l in probe.layers]
    for name, lm in alone.layers.items():
        for a, b in zip((lm.count, lm.mean, lm.m2), (fused.layers[name].count, fused.layers[name].mean,
                                                      fused.layers[name].m2)):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("hw", [(32, 32), (8, 8), (16, 8), (4, 4), (2, 2), (1, 1), (2, 4), (6, 6), (30, 30), (33, 35)])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_pool_windows_equal_adaptive_avg_pool(hw, k):
    """The same windows (sums to float32 rounding); a map smaller than K repeats its positions exactly."""
    y = torch.randn(3, 5, *hw, generator=torch.Generator().manual_seed(0)).relu()
    exact = hw[0] <= k and hw[1] <= k
    torch.testing.assert_close(reduce_map(y, f"pool:{k}"), F.adaptive_avg_pool2d(y, k).flatten(2),
                               rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6)


def test_batches_holding_few_of_many_classes_match_numpy():
    """50 classes, batches of 8: every batch holds a few classes (the rows merged), the
    others are copied; some classes never appear."""
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 45, (200,), generator=g)
    a = torch.randn(200, 4, 3, generator=g) * 3 + torch.arange(45).view(45, 1, 1)[y.clamp(max=44)]
    lm = LayerMoments.zeros(50, 4, 3)
    for i in range(0, 200, 8):
        lm = lm.add_batch(a[i:i + 8], y[i:i + 8])
    an, yn = a.double().numpy(), y.numpy()
    for k in range(50):
        sel = an[yn == k]
        assert int(lm.count[k]) == len(sel)
        if len(sel) == 0:
            assert not lm.mean[k].any() and not lm.m2[k].any()
            continue
        np.testing.assert_allclose(lm.mean[k].numpy(), sel.mean(0), rtol=1e-12, atol=1e-12)
        if len(sel) > 1:
            np.testing.assert_allclose(lm.var[k].numpy(), sel.var(0, ddof=1), rtol=1e-9, atol=1e-12)


def test_stat_point_is_batchnorm_after_conv():
    probe = probe_model(TinyCNN(), torch.zeros(1, 3, 16, 16))
    stats = {l.name: l.stat_module for l in probe.layers}
    assert stats == {"features.0": "features.1", "features.4": "features.5", "classifier.0": "classifier.0"}
    assert probe.logits_layer == "classifier.2"


def test_merge_uneven_shards_one_missing_a_class_equals_one_pass():
    model = randomize_bn(TinyCNN())
    batches, x, y = _batches(n=60)
    probe = probe_model(model, x[:1])
    # Three uneven shards; the second holds no sample of class 2.
    no2 = torch.nonzero(y != 2).flatten()
    second = no2[:11]
    rest = torch.tensor([i for i in range(60) if i not in set(second.tolist())])
    shards = [rest[:5], second, rest[5:]]
    # (a) The merge itself, on the *same* activations (captured once from one forward):
    # exact to float64 rounding, whatever the CPU's float32 kernels do with batch shapes.
    acts: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [modules[l.stat_module].register_forward_hook(
        lambda m, i, o, name=l.name: acts.__setitem__(name, reduce_map(o, "pool:2"))) for l in probe.layers]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for name, a in acts.items():
        zero = LayerMoments.zeros(3, a.shape[1], a.shape[2])
        whole = zero.add_batch(a, y)
        parts = [zero.add_batch(a[s], y[s]) for s in shards]
        assert int(parts[1].count[2]) == 0
        merged = parts[0].merge(parts[1]).merge(parts[2])
        regrouped = parts[0].merge(parts[1].merge(parts[2]))  # associativity
        for other in (merged, regrouped):
            assert torch.equal(other.count, whole.count)
            torch.testing.assert_close(other.mean, whole.mean, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(other.var, whole.var, rtol=1e-9, atol=1e-12)
    # (b) End to end through collect_moments: shard forwards see other batch shapes, so
    # float32 activations may differ in the last bits (CPU-dependent): float32 tolerance.
    whole = collect_moments(model, probe, [(x, y)], ["a", "b", "c"], "pool:2")
    parts = [collect_moments(model, probe, [(x[s], y[s])], ["a", "b", "c"], "pool:2") for s in shards]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    for name, lm in whole.layers.items():
        assert torch.equal(merged.layers[name].count, lm.count)
        torch.testing.assert_close(merged.layers[name].mean, lm.mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged.layers[name].var, lm.var, rtol=1e-4, atol=1e-6)


def test_file_roundtrip_loads_with_safetensors_alone(tmp_path):
    model = randomize_bn(TinyCNN())
    batches, x, _ = _batches()
    m = collect_moments(model, probe_model(model, x[:1]), batches, ["a", "b", "c"], "global",
                        meta={"weights_sha256": "x"})
    path = tmp_path / "m.safetensors"
    m.save(path)
    from safetensors.numpy import load_file

    raw = load_file(str(path))
    assert raw["features.0/count"].dtype == np.int64 and raw["features.0/mean"].dtype == np.float64
    assert raw["features.0/mean"].shape == (3, 8, 1) and raw["features.0/var"].shape == (3, 8, 1)
    back = Moments.load(path)
    assert back.meta["resolution"] == "global" and back.classes == ["a", "b", "c"]
    torch.testing.assert_close(back.layers["features.4"].var, m.layers["features.4"].var, rtol=0, atol=0)
    # merging a loaded file (m2 rebuilt from var) stays exact
    torch.testing.assert_close(back.merge(back).layers["features.4"].mean, m.layers["features.4"].mean)


def test_dead_filter_and_single_sample_class_do_not_produce_nan():
    lm = LayerMoments.zeros(2, 3, 1)
    lm = lm.add_batch(torch.zeros(3, 3, 1), torch.tensor([0, 0, 1]))
    assert torch.isfinite(lm.var).all() and float(lm.var.abs().sum()) == 0.0


# ------------------------------------------------------------------ CLI-level behaviour
def test_cli_calibrate_writes_file(tiny_setup, tmp_path):
    spec, weights, data = tiny_setup
    out = tmp_path / "m.safetensors"
    r = run_cli("calibrate", spec, "--weights", weights, "--data", data, "--out", out, "--samples-per-class", "4")
    assert r.returncode == 0, r.stderr
    m = Moments.load(out)
    assert m.meta["class_counts"] == [4, 4, 4]
    assert m.meta["model"]["spec"] == spec and len(m.meta["weights_sha256"]) == 64
    assert m.meta["data"]["preprocess"]["mean"] == [0.5, 0.5, 0.5]  # from the checkpoint


def _assert_one_line_failure(r, out: Path, *needles: str):
    assert r.returncode != 0
    err_lines = [l for l in r.stderr.splitlines() if "error:" in l]
    assert len(err_lines) == 1, r.stderr
    for n in needles:
        assert n in err_lines[0], err_lines[0]
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temp left


def test_corrupt_image_is_named(tiny_setup, tmp_path):
    spec, weights, data = tiny_setup
    bad = data / "class1" / "001.png"
    bad.write_bytes(b"not an image at all")
    out = tmp_path / "m.safetensors"
    r = run_cli("calibrate", spec, "--weights", weights, "--data", data, "--out", out)
    _assert_one_line_failure(r, out, "001.png", "corrupt")
    r = run_cli("calibrate", spec, "--weights", weights, "--data", data, "--out", out, "--skip-bad")
    assert r.returncode == 0, r.stderr
    assert Moments.load(out).meta["skipped"] == 1


def test_empty_folder(tiny_setup, tmp_path):
    spec, weights, _ = tiny_setup
    empty = tmp_path / "empty"
    (empty / "class0").mkdir(parents=True)
    out = tmp_path / "m.safetensors"
    _assert_one_line_failure(run_cli("calibrate", spec, "--weights", weights, "--data", empty, "--out", out),
                             out, "no images", str(empty))


def test_wrong_checkpoint(tiny_setup, tmp_path):
    spec, _, data = tiny_setup
    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": TinyCNN(width=4).state_dict()}, wrong)
    out = tmp_path / "m.safetensors"
    _assert_one_line_failure(run_cli("calibrate", spec, "--weights", wrong, "--data", data, "--out", out),
                             out, "does not fit the model", "mis-shaped", "features.0.weight")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    _assert_one_line_failure(run_cli("calibrate", spec, "--weights", garbage, "--data", data, "--out", out),
                             out, "garbage.pt")


class Payload:
    """Stands for arbitrary code a malicious pickle would run."""


def test_pickled_code_in_checkpoint_is_refused(tiny_setup, tmp_path):
    spec, _, data = tiny_setup
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": TinyCNN().state_dict(), "hook": Payload()}, evil)  # an arbitrary class: refused
    out = tmp_path / "m.safetensors"
    _assert_one_line_failure(run_cli("calibrate", spec, "--weights", evil, "--data", data, "--out", out),
                             out, "weights_only")


def test_wrong_input_size_and_class_count(tiny_setup, tmp_path):
    _, _, data = tiny_setup
    out = tmp_path / "m.safetensors"
    # the zoo's VGG expects 32x32 inputs; 16x16 images break its classifier
    _assert_one_line_failure(run_cli("calibrate", "vgg11_bn", "--data", data, "--out", out, "--allow-random-weights",
                                     "--model-kwargs", "num_classes=3"), out, "input of shape [3, 16, 16]")
    _assert_one_line_failure(run_cli("calibrate", "resnet20", "--data", data, "--out", out, "--allow-random-weights"),
                             out, "3 classes", "10 logits")


def test_torchrun_two_processes_equal_one(tiny_setup, tmp_path):
    spec, weights, data = tiny_setup
    single, dual = tmp_path / "single.safetensors", tmp_path / "dual.safetensors"
    r = run_cli("calibrate", spec, "--weights", weights, "--data", data, "--out", single,
                "--resolution", "pool:2", "--batch-size", "1")  # per-image kernels: bit-identical activations
    assert r.returncode == 0, r.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                "-m", "tvsprune", "calibrate", spec, "--weights", str(weights), "--data", str(data),
                "--out", str(dual), "--resolution", "pool:2", "--batch-size", "1"]
    r = subprocess.run(torchrun, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "TVSPRUNE_DIST_BACKEND": "gloo"})
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = Moments.load(single), Moments.load(dual)
    assert b.meta["world_size"] == 2
    for name in a.layers:
        assert torch.equal(a.layers[name].count, b.layers[name].count)
        torch.testing.assert_close(b.layers[name].mean, a.layers[name].mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(b.layers[name].var, a.layers[name].var, rtol=1e-9, atol=1e-12)


def test_merge_moments_cli(tiny_setup, tmp_path):
    spec, weights, data = tiny_setup
    paths = []
    for seed in (1, 2):
        p = tmp_path / f"s{seed}.safetensors"
        r = run_cli("calibrate", spec, "--weights", weights, "--data", data, "--out", p,
                    "--samples-per-class", "2", "--seed", str(seed))
        assert r.returncode == 0, r.stderr
        paths.append(p)
    out = tmp_path / "merged.safetensors"
    r = run_cli("merge-moments", *paths, "--out", out)
    assert r.returncode == 0, r.stderr
    assert Moments.load(out).meta["class_counts"] == [4, 4, 4]


@pytest.mark.slow
def test_acceptance_resnet20_on_cifar(shared_models, cifar_dir, tmp_path):
    out = tmp_path / "m.safetensors"
    r = run_cli("calibrate", "resnet20", "--weights", shared_models / "resnet20_cifar10.pt",
                "--data", cifar_dir / "test", "--samples-per-class", "100", "--out", out)
    assert r.returncode == 0, r.stderr
    from safetensors import safe_open

    with safe_open(str(out), framework="numpy") as f:
        assert f.get_tensor("conv1/count").tolist() == [100] * 10
        assert f.get_tensor("layers.8.conv2/mean").shape == (10, 64, 16)  # pool:4 by default
