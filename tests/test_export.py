"""Export: ONNX checker/parity/size/batches, INT8 QDQ, TensorRT (marker) and its clean failure."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import randomize_bn, run_cli
from tiny_models import TinyCNN

from tvsprune.exporters import export_onnx
from tvsprune.backends.onnxruntime_backend import ort_session
from tvsprune.exporters.probe import probe_environment
from tvsprune.models import LoadedModel, ModelSpec

TINY = Path(__file__).parent / "tiny_models.py"


def _tiny_loaded() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel(module=randomize_bn(TinyCNN()), spec=ModelSpec("tiny"), input_shape=(3, 16, 16))


def test_onnx_export_checked_cleaned_and_dynamic(tmp_path):
    out = tmp_path / "m.onnx"
    rep = export_onnx(_tiny_loaded(), out)
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["parameters"] == str(sum(p.numel() for p in _tiny_loaded().module.parameters()))
    assert {"tvsprune_version", "source_spec", "macs", "weights_sha256", "plan_sha256"} <= set(meta)
    assert rep["parity"]["within_tolerance"] and rep["parity"]["batch_sizes"] == [1, 7, 64]
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node) or rep["exporter"] == "torchscript"
    sidecar = json.loads(out.with_suffix(".export.json").read_text())
    assert sidecar["sha256"] and sidecar["checker"].startswith("passed")
    sess = ort_session(out)
    for bs in (1, 3, 64):
        assert sess.run(None, {"input": np.zeros((bs, 3, 16, 16), np.float32)})[0].shape == (bs, 3)


def test_a_model_built_from_a_spec_exports_with_torch_export(tmp_path):
    """Built from a spec, the model's forward reads a 'logits' entry (models.probe.logits_only); its
    signature stays the model's, which torch.export binds the dynamic batch to (with (*args,
    **kwargs) every spec-built model fell back to TorchScript, a warning nobody asserted)."""
    from tvsprune.models import load_model

    rep = export_onnx(load_model(f"{TINY}:TinyCNN"), tmp_path / "m.onnx", input_shape=[3, 16, 16])
    assert rep["exporter"] == "dynamo" and rep["fallback_reason"] is None, rep["fallback_reason"]


def test_torchscript_exporter_switch(tmp_path):
    rep = export_onnx(_tiny_loaded(), tmp_path / "ts.onnx", exporter="torchscript")
    assert rep["exporter"] == "torchscript" and rep["parity"]["within_tolerance"]


def test_a_parity_miss_names_the_file(tmp_path, caplog):
    """A prune's latency checks export networks of their own: the warning says which file missed."""
    rep = export_onnx(_tiny_loaded(), tmp_path / "pruned.onnx", exporter="torchscript", tolerance=-1.0)
    assert not rep["parity"]["within_tolerance"]
    assert any(r.levelname == "WARNING" and r.getMessage().startswith("parity outside tolerance (pruned.onnx): ")
               for r in caplog.records), caplog.records


def test_parity_shape_mismatch_is_fatal_and_leaves_no_file(tmp_path, monkeypatch):
    from tvsprune.errors import TvsError
    from tvsprune.exporters import onnx_export

    def broken(model, path, inputs, tolerance, batch_sizes):
        raise onnx_export.ParityShapeError("ONNX Runtime output shape [1, 4] differs from PyTorch's [1, 3]")

    monkeypatch.setattr(onnx_export, "parity_check", broken)
    out = tmp_path / "bad.onnx"
    with pytest.raises(TvsError, match="differs"):
        onnx_export.export_onnx(_tiny_loaded(), out)
    assert list(tmp_path.iterdir()) == []


def _zero_points(path: Path) -> list[np.ndarray]:
    model = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]


def test_int8_qdq_activations_uint8_by_default_int8_symmetric_on_request(tmp_path, image_folder):
    src = tmp_path / "tiny_models.py"
    shutil.copy(TINY, src)
    weights = tmp_path / "w.pt"
    torch.save(randomize_bn(TinyCNN()).state_dict(), weights)
    fp32 = tmp_path / "m.onnx"
    r = run_cli("export", "onnx", f"{src}:TinyCNN", "--weights", weights, "--out", fp32, "--data", image_folder,
                "--parity-samples", "16")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "m.int8.onnx"
    r = run_cli("export", "int8", fp32, "--calib-data", image_folder, "--out", out, "--eval-data", image_folder,
                "--calib-samples", "12")
    assert r.returncode == 0, r.stderr
    zps = _zero_points(out)
    assert zps and all(z.dtype == np.uint8 for z in zps)  # ONNX Runtime CPU's scheme (U8S8)
    rep = json.loads((tmp_path / "m.int8.json").read_text())
    assert rep["activations"] == "uint8 asymmetric"
    assert "evaluation" in rep and 0.0 <= rep["evaluation"]["int8_top1"] <= 1.0
    sym = tmp_path / "s.int8.onnx"
    r = run_cli("export", "int8", fp32, "--calib-data", image_folder, "--out", sym, "--calib-samples", "12",
                "--activations", "int8")
    assert r.returncode == 0, r.stderr
    zps = _zero_points(sym)
    assert zps and all(z.dtype == np.int8 and np.all(z == 0) for z in zps)  # what TensorRT requires
    # a TensorRT INT8 engine from the uint8 model is refused before TensorRT is looked for
    r = run_cli("export", "trt", out, "--out", tmp_path / "m.engine", "--precision", "int8")
    errors = [l for l in r.stderr.splitlines() if "error:" in l]
    assert r.returncode != 0 and len(errors) == 1 and "--activations int8" in errors[0], r.stderr
    assert not (tmp_path / "m.engine").exists()


class _Residual(torch.nn.Module):
    """Two residual blocks, the shape that ONNX Runtime left half float with int8 activations."""

    def __init__(self) -> None:
        super().__init__()
        c = 16
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, c, 3, padding=1), torch.nn.BatchNorm2d(c), torch.nn.ReLU())
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(
            torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.BatchNorm2d(c), torch.nn.ReLU(),
            torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.BatchNorm2d(c)) for _ in range(2))
        self.fc = torch.nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = torch.relu(b(x) + x)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("activations", ["uint8", "int8"])
def test_int8_uint8_activations_fuse_every_conv_on_ort_cpu(tmp_path, activations):
    import onnxruntime as ort

    from tvsprune.exporters.int8 import quantize_int8

    torch.manual_seed(0)
    model = randomize_bn(_Residual()).eval()
    fp32 = tmp_path / "r.onnx"
    export_onnx(LoadedModel(model, ModelSpec(spec="<residual>"), input_shape=(3, 16, 16)), fp32,
                input_shape=[3, 16, 16])
    q = tmp_path / "r.int8.onnx"
    quantize_int8(fp32, [np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)], q,
                  activations=activations)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(q), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert ops.count("QLinearConv") + ops.count("Conv") == 5
    if activations == "uint8":  # every convolution runs as INT8 (int8 activations left float ones: RESULTS.md)
        assert ops.count("Conv") == 0, ops


def test_tensorrt_absent_fails_cleanly_with_exit_code_2(tmp_path):
    env = probe_environment()
    if "tensorrt" in env and env.get("gpus"):
        pytest.skip("TensorRT and a GPU are present: the clean-failure path does not apply")
    onnx_file = tmp_path / "m.onnx"
    export_onnx(_tiny_loaded(), onnx_file)
    r = run_cli("export", "trt", onnx_file, "--out", tmp_path / "m.engine", "--precision", "fp16")
    assert r.returncode == 2
    errors = [l for l in r.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1 and ("TensorRT" in errors[0]) and ("container" in errors[0])
    assert "Traceback" not in r.stderr and not (tmp_path / "m.engine").exists()


def test_doctor_runs():
    r = run_cli("doctor")
    assert r.returncode == 0, r.stderr
    assert "onnxruntime" in r.stdout and "tensorrt" in r.stdout
    from tvsprune.backends.blocks import int8_dot_saturates, isa_block

    assert f"channel block {isa_block()}" in r.stdout
    assert ("7-bit weights" if int8_dot_saturates() else "8-bit weights") in r.stdout


def _trt_ready() -> str | None:
    env = probe_environment()
    if "tensorrt" not in env:
        return "TensorRT is not installed (run in the container)"
    if not env.get("gpus"):
        return "no CUDA GPU visible"
    return None


@pytest.mark.trt
def test_tensorrt_fp16_engine_matches_onnxruntime(tmp_path):
    reason = _trt_ready()
    if reason:
        pytest.skip(reason)
    import tensorrt as trt

    from tvsprune.backends import make_runner
    from tvsprune.exporters.tensorrt import build_engine

    loaded = LoadedModel(module=randomize_bn(TinyCNN()), spec=ModelSpec("tiny"), input_shape=(3, 16, 16))
    onnx_file = tmp_path / "m.onnx"
    export_onnx(loaded, onnx_file)
    rep = build_engine(onnx_file, tmp_path / "m.engine", "fp16", 1, 4, 8, timing_cache=tmp_path / "cache")
    assert rep["tensorrt"] == trt.__version__ and rep["device_memory_size_v2"] is not None
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    ref = ort_session(onnx_file).run(None, {"input": x})[0]
    with make_runner("tensorrt", tmp_path / "m.engine") as runner:
        got = runner.infer(x)
    assert np.abs(got - ref).max() < 5e-2 and (got.argmax(1) == ref.argmax(1)).all()


# ------------------------------------------------------------------ acceptance on shared models
@pytest.fixture(scope="module")
def pruned_pair(tmp_path_factory, shared_models, cifar_dir):
    """vgg11_bn and resnet20, unpruned and ~40 % pruned (l1, no repair: fast and deterministic)."""
    out = {}
    root = tmp_path_factory.mktemp("pruned")
    for name, ckpt in (("vgg11_bn", "vgg11_bn_cifar10.pt"), ("resnet20", "resnet20_cifar10.pt")):
        d = root / name
        r = run_cli("prune", name, "--weights", shared_models / ckpt, "--method", "l1", "--target-params", "0.4",
                    "--out", d, "--no-repair")
        assert r.returncode == 0, r.stderr
        out[name] = (shared_models / ckpt, d)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg11_bn", "resnet20"])
@pytest.mark.parametrize("pruned", [False, True])
def test_acceptance_onnx_parity_on_cifar(pruned_pair, cifar_dir, tmp_path, name, pruned):
    ckpt, pdir = pruned_pair[name]
    out = tmp_path / "m.onnx"
    args = (pdir,) if pruned else (name, "--weights", ckpt)
    r = run_cli("export", "onnx", *args, "--out", out, "--data", cifar_dir / "test", "--parity-samples", "512")
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.with_suffix(".export.json").read_text())
    onnx.checker.check_model(str(out), full_check=True)
    assert rep["parity"]["samples"] == 512 and rep["parity"]["inputs"] == "calibration images"
    assert rep["parity"]["max_abs_diff"] <= 1e-4 and rep["parity"]["top1_agreement"] == 1.0
    assert rep["parity"]["batch_sizes"] == [1, 7, 64]
    if pruned:
        params = rep["parameters"]
        assert abs(out.stat().st_size - 4 * params) <= 0.05 * 4 * params + 64 * 1024
        prune_report = json.loads((pdir / "prune.json").read_text())
        assert 0.39 <= prune_report["params"]["removed_frac"] <= 0.45


def test_int8_reduces_the_weight_range_where_u8s8_kernels_saturate(tmp_path, monkeypatch):
    """uint8 x int8 on an AVX2 CPU without VNNI saturates in ONNX Runtime (VPMADDUBSW): weights
    are then 7-bit by default; with VNNI, on ARM, or for symmetric int8, they keep 8 bits."""
    from tvsprune.backends import blocks
    from tvsprune.errors import TvsError
    from tvsprune.exporters.int8 import quantize_int8, reduce_range_for

    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    assert blocks.int8_dot_saturates(avx2, "x86_64")
    assert not blocks.int8_dot_saturates(avx2.replace("avx2", "avx2 avx512f avx512_vnni"), "x86_64")
    assert not blocks.int8_dot_saturates(avx2.replace("avx2", "avx2 avx_vnni"), "x86_64")
    assert not blocks.int8_dot_saturates(avx2, "aarch64") and not blocks.int8_dot_saturates("", "x86_64")
    torch.manual_seed(0)
    fp32 = tmp_path / "r.onnx"
    export_onnx(LoadedModel(randomize_bn(_Residual()).eval(), ModelSpec(spec="<residual>"), input_shape=(3, 16, 16)),
                fp32, input_shape=[3, 16, 16])
    batches = [np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)]

    def widest_weight(path: Path) -> int:
        model = onnx.load(str(path))
        return max(int(np.abs(onnx.numpy_helper.to_array(i).astype(np.int32)).max())
                   for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4)

    monkeypatch.setattr(blocks, "int8_dot_saturates", lambda *a: True)  # an AVX2 CPU without VNNI
    assert reduce_range_for("uint8") and not reduce_range_for("int8") and not reduce_range_for("uint8", "off")
    rep = quantize_int8(fp32, batches, tmp_path / "a.int8.onnx")
    assert rep["reduce_range"] and widest_weight(tmp_path / "a.int8.onnx") <= 64
    monkeypatch.setattr(blocks, "int8_dot_saturates", lambda *a: False)
    rep = quantize_int8(fp32, batches, tmp_path / "b.int8.onnx")
    assert not rep["reduce_range"] and widest_weight(tmp_path / "b.int8.onnx") == 127
    assert quantize_int8(fp32, batches, tmp_path / "c.int8.onnx", reduce_range="on")["reduce_range"]
    with pytest.raises(TvsError, match="reduce-range"):
        reduce_range_for("uint8", "maybe")
