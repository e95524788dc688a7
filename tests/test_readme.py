"""The README is for users: short, its two commands first, its four-command example runs as
written, and no word of the project's own process history anywhere in the repository."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
from helpers import REPO


def _readme() -> str:
    return (REPO / "README.md").read_text()


def test_readme_is_short_and_opens_with_its_two_commands():
    lines = _readme().splitlines()
    assert len(lines) < 300, len(lines)
    code = [line.strip() for line in lines[:6] if line.startswith("    ")]
    assert code[0].startswith("make demo") and code[1].startswith("make test"), code
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_no_project_history_words_in_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    pattern = re.compile(r"\b(stop|wave|session)s? [0-9]", re.I)
    hits = []
    for name in tracked:
        path = REPO / name
        if path.suffix in {".pt", ".png", ".jpg", ".safetensors", ".onnx"} or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        hits += [f"{name}: {m.group(0)}" for m in pattern.finditer(text)]
    assert not hits, hits[:5]


def _quickstart() -> list[list[str]]:
    block = _readme().split("<!-- quickstart -->", 1)[1].split("<!-- /quickstart -->", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line) for line in joined.splitlines() if line.strip()]


@pytest.mark.slow
def test_the_four_command_example_runs_as_written(tmp_path):
    commands = _quickstart()
    assert len(commands) == 4 and all(c[0] == "tvsprune" for c in commands)
    (tmp_path / "tvsprune").mkdir()
    (tmp_path / "tvsprune" / "demo_assets").symlink_to(REPO / "tvsprune" / "demo_assets")
    for argv in commands:
        r = subprocess.run([sys.executable, "-m", "tvsprune", *argv[1:]], cwd=tmp_path, capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, (argv, r.stderr[-2000:])
    assert r.stdout.rstrip().splitlines()[-1].startswith("verdict: pruned: ")
    assert (tmp_path / "my-run" / "report" / "report.html").is_file()
