"""run / demo: strict config, manifest, skip and resume, overrides, Dockerfile structure."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from helpers import REPO, run_cli, write_run_config as _config

from tvsprune.errors import TvsError
from tvsprune.pipeline import load_config




def test_misspelt_key_names_it_and_suggests(tmp_path):
    cfg = _config(tmp_path, prune_extra="target_parms = 0.4")
    r = run_cli("run", cfg)
    assert r.returncode == 1
    err = [l for l in r.stderr.splitlines() if "error:" in l]
    assert len(err) == 1 and "prune.target_parms" in err[0] and "prune.target_params" in err[0]
    assert not (tmp_path / "out").exists()


def test_missing_data_folder_names_the_path(tmp_path):
    cfg = _config(tmp_path)
    shutil.rmtree(tmp_path / "calib")
    r = run_cli("run", cfg)
    assert r.returncode == 1 and str(tmp_path / "calib") in r.stderr and "data.calibration" in r.stderr
    assert not (tmp_path / "out").exists()


def test_override_and_unknown_override(tmp_path):
    cfg = _config(tmp_path)
    c, _ = load_config(cfg, ["prune.target_params=0.5", "bench.batch_sizes=[2]"])
    assert c.prune.target_params == 0.5 and c.bench.batch_sizes == [2]
    with pytest.raises(TvsError, match="unknown key 'prune.targt'"):
        load_config(cfg, ["prune.targt=1"])


def test_one_budget_replaces_the_default_and_two_are_refused(tmp_path):
    cfg = _config(tmp_path)
    c, _ = load_config(cfg)
    assert (c.prune.target_params, c.prune.target_flops) == (0.3, None)  # the default budget
    c, _ = load_config(cfg, ["prune.target_params=0.5"])
    assert c.prune.target_params == 0.5
    flops = tmp_path / "flops.toml"
    flops.write_text(cfg.read_text().replace("target_params = 0.3", "target_flops = 0.25"))
    c, _ = load_config(flops)
    assert (c.prune.target_params, c.prune.target_flops) == (None, 0.25)
    with pytest.raises(TvsError, match="give one budget, not target_params and target_flops"):
        load_config(cfg, ["prune.target_flops=0.2"])


def test_run_skips_unchanged_and_resumes_after_kill_during_prune(tmp_path):
    cfg = _config(tmp_path)
    out = tmp_path / "out"
    r = run_cli("run", cfg, env={"TVSPRUNE_FAULT_AT": "prune"})
    assert r.returncode == 137  # killed at the start of prune
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["calibrate"]["status"] == "passed"
    assert manifest["stages"]["prune"]["status"] == "running"
    assert not list(out.rglob("*.tvsprune-tmp")) and not (out / "pruned").exists()
    moments = out / "moments.safetensors"
    stamp = moments.stat().st_mtime_ns
    # killed again at the end of prune: its files are on disk, but the manifest never recorded
    # them, so they are not trusted and prune runs again
    r = run_cli("run", cfg, env={"TVSPRUNE_FAULT_AT": "prune:end"})
    assert r.returncode == 137 and "SKIPPED | calibrate" in r.stderr
    assert (out / "pruned" / "prune.json").is_file()
    assert json.loads((out / "manifest.json").read_text())["stages"]["prune"]["status"] == "running"
    r = run_cli("run", cfg, "--dry-run")
    assert r.returncode == 0 and "SKIP calibrate" in r.stdout and "RUN  prune" in r.stdout
    r = run_cli("run", cfg)
    assert r.returncode == 0, r.stderr
    assert "SKIPPED | calibrate" in r.stderr and re.search(r"PASSED \| prune \| [\d.]+ s", r.stderr)
    assert moments.stat().st_mtime_ns == stamp  # the moments were not recomputed
    for f in ("pruned/plan.json", "pruned/pruned.safetensors", "export/pruned.onnx", "report/report.html"):
        assert (out / f).is_file(), f
    # nothing changed: everything is skipped; --force redoes one stage and what follows it
    r = run_cli("run", cfg)
    assert r.stderr.count("SKIPPED |") == 4
    r = run_cli("run", cfg, "--force", "bench")
    assert "SKIPPED | export" in r.stderr and "PASSED | bench" in r.stderr
    # a changed prune setting reruns prune and everything downstream, not calibrate
    r = run_cli("run", cfg, "--set", "prune.target_params=0.4")
    assert "SKIPPED | calibrate" in r.stderr and "PASSED | prune" in r.stderr and "PASSED | bench" in r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["prune"]["target_params"] == 0.4
    assert all(len(h) == 64 for h in manifest["stages"]["export"]["outputs"].values())


def test_dockerfile_structure():
    """hadolint when installed; otherwise a structural check of the two stages."""
    text = (REPO / "Dockerfile").read_text()
    import sys

    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint:
        import subprocess

        r = subprocess.run([hadolint, "--failure-threshold", "error", str(REPO / "Dockerfile")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, flags=re.M))
    stages = [(re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), image), name)
              for image, name in re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, flags=re.M | re.I)]
    assert len(stages) >= 2
    assert "nvcr.io/nvidia/" in stages[0][0] and stages[0][1]
    assert any(s[1].lower() == "runtime" for s in stages)
    assert re.search(r"^ENTRYPOINT\s+\[.*tvsprune", text, flags=re.M)
    assert re.search(r"pip install[^\n]*\.\[tensorrt\]|tvsprune\[tensorrt\]", text)
    for line in text.splitlines():
        word = line.split(maxsplit=1)[0].upper() if line.strip() and not line.lstrip().startswith("#") else None
        assert word is None or line.startswith((" ", "\t")) or word in {
            "FROM", "RUN", "COPY", "ENV", "ARG", "WORKDIR", "ENTRYPOINT", "CMD", "LABEL", "USER", "EXPOSE",
            "HEALTHCHECK", "SHELL", "VOLUME"}, line


@pytest.mark.parametrize("key,value,closest", [
    ("prune.method", '"tsv"', "'tvs'"), ("prune.allocation", '"costt"', "'cost'"),
    ("calibrate.resolution", '"pool:x"', "'pool:4'"), ("bench.backends", '["ort-cpuu"]', "'ort-cpu'"),
    ("prune.compensation", '"lss"', "'ls'"), ("export.int8_method", '"minmaxx"', "'minmax'"),
])
def test_misspelt_enumerations_are_refused_at_load_naming_the_closest(tmp_path, key, value, closest):
    cfg = _config(tmp_path)
    with pytest.raises(TvsError) as e:
        load_config(cfg, [f"{key}={value}"])
    msg = str(e.value)
    assert key in msg and f"did you mean {closest}" in msg, msg
    assert "\n" not in msg


def test_run_removes_only_its_own_temporary_files(tmp_path, monkeypatch):
    """A resumed run sweeps the temporary files of killed writes, never a user's own .tmp files."""
    from tvsprune.pipeline.config import load_config, resolve_paths
    from tvsprune.pipeline.run import Pipeline

    cfg = _config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    mine = out / ".notes.tmp"
    mine.write_text("the user's")
    killed = out / ".moments.safetensors.abc123.tvsprune-tmp"
    killed.write_text("half a file")
    monkeypatch.chdir(tmp_path)
    config, base = load_config(cfg)
    pipe = Pipeline(resolve_paths(config, base))
    monkeypatch.setattr(pipe, "enabled", lambda: [])  # no stage: only the start-of-run sweep
    pipe.run()
    assert mine.read_text() == "the user's" and not killed.exists()


def test_run_reruns_when_the_data_or_the_model_source_changes_and_says_why(tmp_path):
    """Stage reuse is by content: an image replaced under the same name, or the model's .py file
    edited, re-runs calibrate (and what follows) with a line naming what changed."""
    import os
    import time

    cfg = _config(tmp_path)
    quick = ["--set", "bench.enabled=false", "--set", "export.onnx=false"]
    r = run_cli("run", cfg, *quick)
    assert r.returncode == 0, r.stderr
    r = run_cli("run", cfg, *quick)
    assert "SKIPPED | calibrate" in r.stderr, r.stderr
    image = sorted((tmp_path / "calib" / "class0").iterdir())[0]
    st = image.stat()
    image.write_bytes(image.read_bytes())  # the same bytes written again: nothing to redo
    r = run_cli("run", cfg, *quick)
    assert "SKIPPED | calibrate" in r.stderr, r.stderr
    other = sorted((tmp_path / "calib" / "class1").iterdir())[0].read_bytes()
    image.write_bytes(other)  # another image under the same name, its old mtime restored
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = run_cli("run", cfg, *quick)
    assert r.returncode == 0, r.stderr
    assert "RERUN | calibrate | changed since its last run: calibration_files" in r.stderr, r.stderr
    source = tmp_path / "tiny_models.py"
    source.write_text(source.read_text() + "\n# edited\n")
    r = run_cli("run", cfg, *quick)
    assert r.returncode == 0, r.stderr
    assert "RERUN | calibrate" in r.stderr and "model_source_sha256" in r.stderr, r.stderr


def test_dry_run_prints_the_resolved_settings_and_the_manifest_keeps_relative_paths(tmp_path):
    cfg = _config(tmp_path)
    r = run_cli("run", cfg, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "prune.target_params = 0.3" in r.stdout and "bench.rounds = 2" in r.stdout, r.stdout
    assert "RUN  calibrate" in r.stdout
    r = run_cli("run", cfg, "--set", "bench.enabled=false", "--set", "export.onnx=false")
    assert r.returncode == 0, r.stderr
    import json

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    outputs = [p for s in manifest["stages"].values() for p in s["outputs"]]
    assert outputs and all(not p.startswith("/") for p in outputs), outputs
