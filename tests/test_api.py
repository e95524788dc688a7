"""The README's five-line Python API example, executed as written."""
from __future__ import annotations

import re

import torch
from helpers import REPO, write_image_folder


def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "the README lost its Python API example"
    return block.group(1)


def test_readme_api_example_runs(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "calib_images", classes=10, per_class=4, size=32)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), scope)
    pruned, model = scope["pruned"], scope["model"]
    assert isinstance(pruned.module, torch.nn.Module) and pruned.plan.groups
    assert sum(p.numel() for p in pruned.module.parameters()) < sum(p.numel() for p in model.parameters())
    assert pruned.report["macs"]["removed_frac"] >= 0.3 - 1e-9
    assert (tmp_path / "pruned.onnx").is_file()
    report = scope["report"]
    assert (tmp_path / "report" / "report.json").is_file() and len(report["models"]) == 2
    with torch.no_grad():
        assert pruned.module(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_api_refuses_unknown_options_and_checks_weights(tmp_path, monkeypatch):
    import pytest

    import tvsprune
    from tvsprune.models import build_module

    write_image_folder(tmp_path / "imgs", classes=10, per_class=2, size=32)
    model = build_module("resnet20")
    moments = tvsprune.calibrate(model, tmp_path / "imgs")
    with pytest.raises(tvsprune.TvsError, match="unknown prune option"):
        tvsprune.prune(model, moments, target_param=0.3)
    other = build_module("resnet20")  # other weights: the moments do not describe it
    with pytest.raises(tvsprune.TvsError, match="other weights"):
        tvsprune.prune(other, moments, out=tmp_path / "o")
