"""Memory of one model on one backend, measured in a fresh process so that the figures are
the model's and not those of a process holding every model:

- ``weights_bytes``: the bytes of its parameters and buffers (torch) or initializers (ONNX);
- ``loaded_bytes``: how much resident memory loading it added (weights, session, arenas);
- ``peak_bytes``: per batch size, the memory inference needs: the weights plus the peak
  resident memory above the loaded process while it runs (the kernel's high-water mark,
  reset before each batch size with ``/proc/self/clear_refs``).

``python -m tvsprune.bench.memprobe REQUEST.json`` prints the figures as JSON;
:func:`measure` runs it for one model and backend.
"""
from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from .memory import _status, current_rss


def _settle() -> int:
    """Free what can be freed (and give it back to the system); the resident bytes after."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return current_rss() or 0


def _weights_bytes(kind: str, artifact: Any) -> int:
    if kind == "onnx":
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(artifact))
        return int(sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer))
    return int(sum(t.numel() * t.element_size() for t in artifact.module.state_dict().values()))


def _probe(request: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from ..backends import backend_kind, make_runner

    kind = backend_kind(request["backend"])
    if kind == "torch":
        import torch  # noqa: F401 (imported before the baseline: the library is not the model)

        from ..models import ModelSpec, load_model

        base = ModelSpec.from_dict(request["base"]) if request.get("base") else None
    else:
        import onnxruntime  # noqa: F401 (neither torch nor onnx: the probe of an ONNX model starts in 0.3 s, not 2)
    before = _settle()
    if kind == "torch":
        artifact = load_model(request["spec"], request.get("weights"), request.get("kwargs") or {}, base)
    else:
        artifact = request["onnx"]
    shape = request["shape"]
    with make_runner(request["backend"], artifact, **(request.get("options") or {})) as runner:
        loaded = _settle()
        peaks = {}
        for bs in sorted(request["batch_sizes"]):
            x = np.random.default_rng(0).standard_normal((bs, *shape)).astype(np.float32)
            runner.infer(x)  # the first run allocates what the later ones reuse
            _settle()
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            for _ in range(3):
                runner.infer(x)
            peaks[str(bs)] = max(0, (_status("VmHWM") or current_rss() or 0) - loaded)
    # an ONNX file's initializers are counted by measure(), in the parent: onnx is not imported here
    return {"weights_bytes": _weights_bytes(kind, artifact) if kind == "torch" else None,
            "loaded_bytes": max(0, loaded - before), "peak_bytes": peaks}


def _with_weights(figures: dict[str, Any], weights: int) -> dict[str, Any]:
    """What the model needs to run: its weights plus the peak working memory of inference above
    the loaded process (what building it left behind, e.g. a pruned model's tracing, is not its)."""
    return {**figures, "weights_bytes": weights,
            "peak_bytes": {bs: weights + v for bs, v in figures["peak_bytes"].items()},
            "method": "fresh process: weights + VmHWM (reset by clear_refs) above the loaded RSS"}


def measure(request: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """The probe's figures for one model and backend (``request``: backend, shape,
    batch_sizes, and spec/weights/kwargs/base for torch or onnx for ONNX backends); on
    failure, {"error": ...}: memory is a figure of the report, not a reason to fail it."""
    import os
    import tempfile

    fd, path = tempfile.mkstemp(suffix=".json", prefix="tvsprune-memprobe-")
    with os.fdopen(fd, "w") as f:
        json.dump(request, f)
    try:
        r = subprocess.run([sys.executable, "-m", "tvsprune.bench.memprobe", path], capture_output=True, text=True,
                           timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                                                                              "1")})
    except subprocess.TimeoutExpired:
        return {"error": f"the memory probe took over {timeout:.0f} s"}
    finally:
        os.unlink(path)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    weights = figures["weights_bytes"]
    return _with_weights(figures, weights if weights is not None else _weights_bytes("onnx", request["onnx"]))


if __name__ == "__main__":
    print(json.dumps(_probe(json.loads(Path(sys.argv[1]).read_text()))))
