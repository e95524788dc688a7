"""Timing on a backend what is not a user's model: one layer alone (the latency table's grid
points) and a pruned network against its base (the latency budget's check). Each is built as
the backend runs it (a module, an ONNX file, a quantized ONNX file or a TensorRT engine) and
timed through the backend's runner, like bench."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn

from ..backends import backend_kind, make_runner
from ..console import step

if TYPE_CHECKING:
    from ..pruning.layer_latency import LayerShape

MIN_TIME_S = 0.02    # each grid point is timed at least this long per round
ROUNDS = 3           # rounds over a layer's grid points, in alternating order (drift cancels)


def _onnx_layer(shape: "LayerShape", cin: int, cout: int, batch: int, path: Path) -> None:
    """A one-layer ONNX graph (the layer, then ReLU for a convolution) with random weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes = [], []
    if shape.kind == "conv":
        g = cin if shape.tied else shape.groups
        w = rng.standard_normal((cout, cin // g, *shape.kernel)).astype(np.float32) * 0.1
        x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, cin, *shape.size])
        inits.append(numpy_helper.from_array(w, "w"))
        ins = ["input", "w"]
        if shape.bias:
            inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), "b"))
            ins.append("b")
        ph, pw = shape.padding
        nodes.append(helper.make_node("Conv", ins, ["y"], kernel_shape=list(shape.kernel), strides=list(shape.stride),
                                      pads=[ph, pw, ph, pw], dilations=list(shape.dilation), group=g))
        nodes.append(helper.make_node("Relu", ["y"], ["output"]))
    else:
        x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch * shape.size[0], cin])
        inits.append(numpy_helper.from_array(rng.standard_normal((cout, cin)).astype(np.float32) * 0.1, "w"))
        inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), "b"))
        nodes.append(helper.make_node("Gemm", ["input", "w", "b"], ["output"], transB=1))
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph(nodes, "layer", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))


def _layer_input(shape: "LayerShape", cin: int, batch: int) -> np.ndarray:
    dims = (batch, cin, *shape.size) if shape.kind == "conv" else (batch * shape.size[0], cin)
    return np.random.default_rng(1).standard_normal(dims).astype(np.float32)


def _layer_artifact(backend: str, precision: str, shape: "LayerShape", cin: int, cout: int, batch: int,
                    folder: Path, label: str) -> Any:
    """What ``backend`` runs for one grid point: a module, an ONNX file or an engine."""
    kind = backend_kind(backend)
    if kind == "torch":
        if shape.kind == "conv":
            g = cin if shape.tied else shape.groups
            layer = nn.Conv2d(cin, cout, shape.kernel, shape.stride, shape.padding, shape.dilation, g, shape.bias)
            module, dims = nn.Sequential(layer, nn.ReLU()), (cin, *shape.size)
        else:
            module, dims = nn.Linear(cin, cout, shape.bias), (cin,)
        return SimpleNamespace(module=module.eval(), input_shape=dims)
    path = folder / f"{label}.onnx"
    _onnx_layer(shape, cin, cout, batch, path)
    return _finish_onnx(path, precision, backend, batch, _layer_input(shape, cin, batch))


def _finish_onnx(path: Path, precision: str, backend: str, batch: int, sample: np.ndarray) -> Any:
    """The ONNX file as the backend runs it: quantized (INT8, in the backend's scheme), or built
    into an engine."""
    if precision == "int8":
        from ..exporters.int8 import activations_for, quantize_int8

        q = path.with_suffix(".int8.onnx")
        quantize_int8(path, [sample], q, activations=activations_for(backend))
        path = q
    if backend_kind(backend) == "engine":
        from ..exporters.tensorrt import build_engine

        engine = path.with_suffix(".engine")
        build_engine(path, engine, precision, batch, batch, batch)
        return engine
    return path


def time_runners(runners: dict[str, Any], inputs: dict[str, np.ndarray], rounds: int = ROUNDS,
                 min_time_s: float = MIN_TIME_S, per_round: bool = False) -> dict[str, Any]:
    """Median milliseconds of each runner on its input: ``rounds`` rounds in alternating order,
    each timing every runner for at least ``min_time_s`` (3 to 30 calls); the median of the
    rounds (``per_round``: the list of the rounds' medians)."""
    labels = list(runners)
    iters = {}
    for k in labels:
        runners[k].infer(inputs[k])
        t = runners[k].infer_timed(inputs[k])["compute"]
        iters[k] = int(min(30, max(3, math.ceil(min_time_s / max(t, 1e-6)))))
    meds: dict[str, list[float]] = {k: [] for k in labels}
    for r in range(rounds):
        for k in labels if r % 2 == 0 else labels[::-1]:
            meds[k].append(float(np.median([runners[k].infer_timed(inputs[k])["compute"] for _ in range(iters[k])])))
    if per_round:
        return {k: [x * 1e3 for x in v] for k, v in meds.items()}
    return {k: float(np.median(v)) * 1e3 for k, v in meds.items()}


def measure_layer(backend: str, precision: str, shape: "LayerShape", points: list[tuple[int, int]], batch: int
                   ) -> dict[tuple[int, int], float]:
    runners: dict[str, Any] = {}
    inputs: dict[str, np.ndarray] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="tvsprune-latency-") as d:
            for i, (ci, co) in enumerate(points):
                label = f"p{i}"
                runners[label] = make_runner(backend, _layer_artifact(backend, precision, shape, ci, co, batch,
                                                                      Path(d), label)).activate()
                inputs[label] = _layer_input(shape, ci, batch)
            ms = time_runners(runners, inputs)
    finally:
        for r in runners.values():
            r.deactivate()
    return {p: ms[f"p{i}"] for i, p in enumerate(points)}


def network_artifact(backend: str, module: nn.Module, input_shape: list[int], batch: int, precision: str,
                     folder: Path, label: str, exporter: str = "auto") -> Any:
    """What ``backend`` runs for a whole network: the module, its ONNX export, or an engine."""
    kind = backend_kind(backend)
    if kind == "torch":
        return SimpleNamespace(module=module.eval(), input_shape=tuple(input_shape))
    from ..exporters import export_onnx
    from ..models import LoadedModel, ModelSpec

    path = folder / f"{label}.onnx"
    export_onnx(LoadedModel(module.eval(), ModelSpec(spec=f"<{label}>"), input_shape=tuple(input_shape)), path,
                input_shape=list(input_shape), exporter=exporter,
                parity_inputs=torch.randn(4, *input_shape))  # checked on a few inputs: it is only timed
    sample = np.random.default_rng(1).standard_normal((batch, *input_shape)).astype(np.float32)
    return _finish_onnx(path, precision, backend, batch, sample)


def measure_speedup(backend: str, base: nn.Module, pruned: nn.Module, input_shape: list[int], batch: int,
                    precision: str = "fp32", rounds: int = 5, iters: int = 10) -> dict[str, float]:
    """The pruned network against the base on ``backend`` at ``batch``, A/B interleaved: the
    median per-round speedup, its range, and each one's median milliseconds."""
    from ..compare.latency import LatencyConfig, measure_interleaved

    runners: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="tvsprune-latency-") as d:
            for label, m in (("base", base), ("pruned", pruned)):
                art = network_artifact(backend, m, input_shape, batch, precision, Path(d), label)
                runners[label] = make_runner(backend, art).activate()
            step(f"timing the pruned network against the base on {backend} at batch {batch}")  # not the export's
            x = np.random.default_rng(0).standard_normal((batch, *input_shape)).astype(np.float32)
            res = measure_interleaved(runners, x, LatencyConfig(rounds=rounds, iters=iters))
    finally:
        for r in runners.values():
            r.deactivate()
    sp = res["speedup_vs_base"]["pruned"]
    return {"speedup": sp["speedup_median"], "speedup_min": sp["speedup_min"], "speedup_max": sp["speedup_max"],
            "base_ms": res["stats"]["base"]["p50_ms"], "pruned_ms": res["stats"]["pruned"]["p50_ms"]}


def time_networks(backend: str, precision: str, modules: dict[str, nn.Module], input_shape: list[int], batch: int,
                  rounds: int = 5, min_time_s: float = 0.05) -> dict[str, list[float]]:
    """Per-round median milliseconds of whole networks on ``backend`` (the latency table's
    one-group-narrowed networks): exported with the TorchScript exporter, the quick one."""
    runners: dict[str, Any] = {}
    x = np.random.default_rng(1).standard_normal((batch, *input_shape)).astype(np.float32)
    try:
        with tempfile.TemporaryDirectory(prefix="tvsprune-latency-") as d:
            for label, m in modules.items():
                art = network_artifact(backend, m, input_shape, batch, precision, Path(d), label, "torchscript")
                runners[label] = make_runner(backend, art).activate()
            step(f"timing {len(runners)} networks on {backend} at batch {batch}")  # the last export's step was shown
            return time_runners(runners, {k: x for k in runners}, rounds, min_time_s, per_round=True)
    finally:
        for r in runners.values():
            r.deactivate()
