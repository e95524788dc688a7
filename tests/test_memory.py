"""Memory the user can act on: measured for each model in a fresh process, so a pruned model's
figures are its own. On resnet20 and vgg11_bn, base and pruned are non-zero and ordered as
their weights are, on both CPU backends."""
from __future__ import annotations

import pytest
from helpers import run_cli

from tvsprune.bench.memprobe import measure


@pytest.mark.slow
@pytest.mark.parametrize("net", ["resnet20", "vgg11_bn"])
def test_fresh_process_memory_is_the_models_own(net, tmp_path):
    pruned = tmp_path / "pruned"
    r = run_cli("prune", net, "--method", "l1", "--keep-params", "0.4", "--no-repair", "--out", pruned)
    assert r.returncode == 0, r.stderr
    for spec, onnx in ((net, tmp_path / "base.onnx"), (str(pruned), tmp_path / "pruned.onnx")):
        r = run_cli("export", "onnx", spec, "--out", onnx)
        assert r.returncode == 0, r.stderr
    batches = [1, 32]
    for backend in ("torch-cpu", "ort-cpu"):
        figures = {}
        for label, spec, onnx in (("base", net, tmp_path / "base.onnx"), ("pruned", str(pruned), tmp_path / "pruned.onnx")):
            req = {"backend": backend, "shape": [3, 32, 32], "batch_sizes": batches}
            req.update({"onnx": str(onnx)} if backend == "ort-cpu" else {"spec": spec})
            figures[label] = measure(req)
            assert "error" not in figures[label], figures[label]
        b, p = figures["base"], figures["pruned"]
        assert b["weights_bytes"] > p["weights_bytes"] > 0, (backend, b, p)
        for bs in map(str, batches):
            assert b["peak_bytes"][bs] > 0 and p["peak_bytes"][bs] > 0, (backend, bs, b, p)
        assert b["peak_bytes"]["32"] > p["peak_bytes"]["32"], (backend, b, p)
