"""INT8 activation schemes on ONNX Runtime CPU across the architecture matrix: uint8
(asymmetric, tvsprune's default for ort-cpu) against symmetric int8 (what TensorRT needs).

For every CNN of the matrix (tests/hub_models.py: torchvision, timm and the tutorial CNN;
random weights, BatchNorm statistics from random images), the FP32 export and both INT8
models (32 calibration inputs) are timed together, A/B interleaved, at batch 32, and compared
on 32 other inputs: cosine similarity of the logits to FP32's and top-1 agreement (random
weights: low margins, so agreement is noisy; the cosine is the steadier figure). Also
printed: how many convolutions ONNX Runtime left in float after its graph optimizations.

    python benchmarks/int8_schemes.py [NAME ...]
"""
from __future__ import annotations

import collections
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402
from hub_models import ATTENTION, HUBS, build  # noqa: E402

from tvsprune.backends import make_runner  # noqa: E402
from tvsprune.compare.on_backend import time_runners  # noqa: E402
from tvsprune.exporters import export_onnx  # noqa: E402
from tvsprune.exporters.int8 import ACTIVATIONS, quantize_int8  # noqa: E402
from tvsprune.models import LoadedModel, ModelSpec  # noqa: E402


def float_convs(path: Path, x: np.ndarray) -> int:
    """Convolutions left in float after ONNX Runtime's CPU optimizations."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(path) + ".opt"
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    sess.run(None, {sess.get_inputs()[0].name: x})
    ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    return ops.get("Conv", 0) + ops.get("FusedConv", 0)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def main() -> None:
    only = set(sys.argv[1:])
    out = Path(tempfile.mkdtemp(prefix="tvsprune-int8s-"))
    print(f"# INT8 activation schemes on ort-cpu, batch 32; {machine()}")
    print("| model | uint8 vs FP32 | int8 vs FP32 | cosine uint8 / int8 | agreement uint8 / int8 | "
          "float convs FP32 / uint8 / int8 |\n|---|---|---|---|---|---|")
    for hub, table in HUBS.items():
        for name, (kw, size) in table.items():
            if name in ATTENTION or (only and name not in only):
                continue
            try:
                torch.manual_seed(0)
                images = torch.randn(64, 3, size, size)
                model = build(hub, name, kw, images)
                files = {"fp32": out / f"{hub}-{name}.onnx"}
                export_onnx(LoadedModel(model, ModelSpec(spec=name), input_shape=(3, size, size)), files["fp32"],
                            input_shape=[3, size, size])
                for act in ACTIVATIONS:
                    files[act] = out / f"{hub}-{name}.{act}.onnx"
                    quantize_int8(files["fp32"], [images[:16].numpy(), images[16:32].numpy()], files[act],
                                  activations=act)
                x = images[32:].numpy()
                runners = {k: make_runner("ort-cpu", p).activate() for k, p in files.items()}
                logits = {k: r.infer(x) for k, r in runners.items()}
                ms = time_runners(runners, {k: x for k in files}, rounds=3, min_time_s=0.1)
                for r in runners.values():
                    r.deactivate()
                convs = {k: float_convs(p, x) for k, p in files.items()}
                agree = {k: float((logits["fp32"].argmax(1) == logits[k].argmax(1)).mean()) for k in ACTIVATIONS}
                print(f"| {hub}:{name} | {ms['fp32'] / ms['uint8']:.2f}x | {ms['fp32'] / ms['int8']:.2f}x | "
                      f"{cosine(logits['fp32'], logits['uint8']):.4f} / {cosine(logits['fp32'], logits['int8']):.4f} | "
                      f"{agree['uint8']:.2f} / {agree['int8']:.2f} | "
                      f"{convs['fp32']} / {convs['uint8']} / {convs['int8']} |", flush=True)
            except Exception as e:  # one model's failure is a row, not the end of the run
                print(f"| {hub}:{name} | FAILED: {type(e).__name__}: {str(e)[:120]} |||||", flush=True)


if __name__ == "__main__":
    main()
