"""Every module imports on its own, in a fresh interpreter (no import cycle, no order
dependence), and the registries find their entries without being told about them."""
from __future__ import annotations

import os
from pathlib import Path
import pkgutil
from concurrent.futures import ThreadPoolExecutor
import subprocess
import sys

import pytest

import tvsprune

MODULES = sorted(m.name for m in pkgutil.walk_packages(tvsprune.__path__, "tvsprune.")
                 if not m.name.startswith("tvsprune.demo_assets") and not m.name.endswith("__main__"))


# One interpreter imports the heavy third-party packages once, then forks a child per
# module: each child's first tvsprune import is that module (what the test is about),
# without paying torch's import ~80 times. Without fork: a fresh interpreter per module.
_FORKED = r"""
import importlib, os, sys, traceback
for dep in ("numpy", "torch", "torch_pruning", "onnx", "onnxruntime", "safetensors", "PIL"):
    try:
        importlib.import_module(dep)
    except ImportError:
        pass
assert not any(m == "tvsprune" or m.startswith("tvsprune.") for m in sys.modules)
failed = 0
for module in sys.argv[1:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(module)
            os._exit(0)
        except BaseException:
            os.write(w, traceback.format_exc()[-500:].encode())
            os._exit(1)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        err = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failed += 1
        print(f"FAILED {module}: {err}", flush=True)
sys.exit(1 if failed else 0)
"""


def _import_alone(module: str) -> tuple[str, int, str]:
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    return module, r.returncode, r.stderr.strip()[-500:]


def test_every_module_imports_alone():
    """Each module is the first tvsprune module its interpreter imports."""
    assert len(MODULES) > 40
    if hasattr(os, "fork"):
        r = subprocess.run([sys.executable, "-c", _FORKED, *MODULES], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr[-2000:]
        return
    with ThreadPoolExecutor(4) as pool:
        failed = {m: err for m, rc, err in pool.map(_import_alone, MODULES) if rc != 0}
    assert not failed, failed


def test_import_tvsprune_does_not_import_torch():
    code = "import sys, tvsprune; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("registry,expected", [
    ("tvsprune.pruning.criteria:CRITERIA", {"tvs", "mean-distance", "l1", "l2", "random", "bn-scale", "fpgm"}),
    ("tvsprune.pruning.allocations:ALLOCATIONS", {"alpha", "global", "uniform", "ldiff", "cost", "cost-rank"}),
    ("tvsprune.models.sources:SOURCES", {"zoo", "file", "module", "torchvision", "timm", "pruned"}),
    ("tvsprune.backends:BACKENDS", {"torch-cpu", "torch-cuda", "torch-cuda-graphs", "ort-cpu", "ort-cuda",
                                    "ort-trt", "tensorrt"}),
])
def test_registries_discover_their_modules(registry, expected):
    """names() imports the package's modules; declared() reads them from the source where it can
    (the CLI's parser lists the criteria so, without torch): both give the same names."""
    module, attr = registry.split(":")
    code = f"from {module} import {attr}; print(','.join({attr}.declared())); print(','.join({attr}.names()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    declared, names = out.strip().splitlines()
    assert expected <= set(names.split(",")) and declared == names, (declared, names)


def test_the_cli_parser_and_help_do_not_import_torch():
    """``tvsprune --help``, a subcommand's help and a usage error build every parser (the criteria
    and allocations as choices) without importing torch: it took 1.7 s, 1.1 s of it torch."""
    code = ("import sys\nfrom tvsprune.cli import main\n"
            "for argv in (['--help'], ['prune', '--help'], ['prune', '--method', 'tsv'], ['run', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-800:]
    assert "did you mean" in r.stderr or "invalid choice: 'tsv'" in r.stderr, r.stderr[-400:]
    assert "fpgm" in r.stdout and "bn-scale" in r.stdout  # the criteria listed, from their source


def test_unknown_name_names_the_closest():
    from tvsprune.errors import TvsError
    from tvsprune.pruning.criteria import CRITERIA

    with pytest.raises(TvsError, match=r"unknown criterion 'tsv' \(did you mean 'tvs'\?"):
        CRITERIA.get("tsv")


def _import_graph() -> dict[str, set[str]]:
    """tvsprune's modules -> the tvsprune modules they import, read from every import statement at
    any depth (function-level ones too), imports under ``if TYPE_CHECKING:`` left out."""
    import ast

    root = Path(tvsprune.__file__).parent
    mods = {}
    for path in root.rglob("*.py"):
        parts = ["tvsprune", *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                for child in node.body for n in ast.walk(child)}
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def test_no_import_circle_between_the_package_files():
    """Every arrow runs one way: no file reaches itself through imports (Tarjan's components)."""
    graph = _import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, circles


def test_the_import_graph_sees_function_level_imports():
    """The circle test must not miss an import written inside a function."""
    graph = _import_graph()
    assert "tvsprune.pruning.artifact" in graph["tvsprune.cli.calibrate"]  # imported inside a function there
