"""Why INT8 is slower than FP32 on ONNX Runtime CPU here: time per operator and per layer.

For each model (unpruned, and pruned to half the latency with tvsprune's defaults), the FP32
export and its INT8 QDQ model (tvsprune's quantizer, 256 calibration images) are run with
ONNX Runtime's profiler on the same batch; the script prints the end-to-end ratio measured A/B
interleaved, the time per operator type after ONNX Runtime's graph optimizations (what the
QDQ pairs became), and the layers where INT8 loses the most.

The four artifacts (base and pruned, FP32 and INT8) are also timed together, A/B interleaved,
with their top-1 on the CIFAR-10 test images: pruned + INT8 against base FP32.

    python benchmarks/int8_profile.py [--models resnet20,vgg11_bn] [--batch 32] [--runs 20]
        [--target 0.5] [--latency-precision fp32|int8] [--test-per-class N] [--no-profile]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CHECKPOINTS, cifar10, machine  # noqa: E402
from accuracy_vs_sparsity import decode  # noqa: E402

from tvsprune.calibration import DataOptions, calibrate  # noqa: E402
from tvsprune.exporters import export_onnx  # noqa: E402
from tvsprune.exporters.int8 import calibration_batches, quantize_int8  # noqa: E402
from tvsprune.models import load_model  # noqa: E402
from tvsprune.pruning import PruneOptions, load_pruned, prune  # noqa: E402


def profile(path: Path, x: np.ndarray, runs: int) -> tuple[dict[str, float], dict[str, float]]:
    """Milliseconds per run by operator type and by node, from ONNX Runtime's profiler."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(path.with_suffix(""))
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for _ in range(3):
        sess.run(None, {name: x})
    sess.end_profiling()  # the warm-up in a file of its own, dropped
    so2 = ort.SessionOptions()
    so2.enable_profiling = True
    so2.profile_file_prefix = str(path.with_suffix("")) + "-timed"
    so2.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), so2, providers=["CPUExecutionProvider"])
    for _ in range(3):
        sess.run(None, {name: x})
    for _ in range(runs):
        sess.run(None, {name: x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    by_node: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        by_op[op] += e["dur"] / 1e3 / (runs + 3)
        by_node[f"{op} {e['name'].removesuffix('_kernel_time')}"] += e["dur"] / 1e3 / (runs + 3)
    return dict(by_op), dict(by_node)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,vgg11_bn")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--target", type=float, default=0.5, help="the pruned network's --target-latency")
    ap.add_argument("--latency-precision", default="fp32", choices=("fp32", "int8"),
                    help="what that latency budget times (int8: pruning and INT8 as one decision)")
    ap.add_argument("--test-per-class", type=int, default=None, help="top-1 images per class (default: all 1,000)")
    ap.add_argument("--no-profile", action="store_true", help="the four artifacts' table only")
    args = ap.parse_args()
    from tvsprune.backends import make_runner
    from tvsprune.bench.ort_eval import onnx_logits
    from tvsprune.compare.on_backend import time_runners

    root = cifar10()
    print(f"# INT8 vs FP32 on ONNX Runtime CPU, batch {args.batch}; pruned: --target-latency {args.target} "
          f"--latency-precision {args.latency_precision}; {machine()}")
    tmp = Path(tempfile.mkdtemp(prefix="tvsprune-int8p-"))
    for name in args.models.split(","):
        lm = load_model(name, str(CHECKPOINTS[name]))
        calib = DataOptions(path=str(root / "train"), samples_per_class=200, seed=1, batch_size=250)
        mpath = tmp / f"{name}.m.safetensors"
        calibrate(lm, calib, mpath, "pool:4")
        prune(lm, mpath, tmp / f"{name}-pruned", PruneOptions.build(
            target_latency=args.target, latency_precision=args.latency_precision, compare_criteria=False), calib)
        xs, _ = decode(calib, lm, 26)
        x = xs[:args.batch].numpy()
        files = {}
        for label, model in (("base", lm), ("pruned", load_pruned(tmp / f"{name}-pruned"))):
            fp32 = tmp / f"{name}-{label}.onnx"
            export_onnx(model, fp32, input_shape=[3, 32, 32])
            int8 = tmp / f"{name}-{label}.int8.onnx"
            quantize_int8(fp32, calibration_batches(xs), int8)
            files[f"{label} FP32"], files[f"{label} INT8"] = fp32, int8
        runners = {k: make_runner("ort-cpu", p).activate() for k, p in files.items()}
        ms = time_runners(runners, {k: x for k in files}, rounds=5, min_time_s=0.2)
        for r in runners.values():
            r.deactivate()
        test = DataOptions(path=str(root / "test")).open(lm)
        cap = args.test_per_class * len(test.classes) if args.test_per_class else None
        top1 = {}
        for k, p in files.items():
            logits, y = onnx_logits(p, test, cap)
            top1[k] = float((logits.argmax(1) == y).mean()) * 100
        print(f"\n## {name}, batch {args.batch}, A/B interleaved; top-1 on {len(y)} test images\n"
              "| artifact | ms | speedup vs base FP32 | top-1 | points lost |\n|---|---|---|---|---|")
        for k in files:
            print(f"| {k} | {ms[k]:.2f} | {ms['base FP32'] / ms[k]:.2f}x | {top1[k]:.2f} | "
                  f"{top1['base FP32'] - top1[k]:+.2f} |")
        if args.no_profile:
            continue
        for label in ("base", "pruned"):
            fp32, int8 = files[f"{label} FP32"], files[f"{label} INT8"]
            print(f"\n### {name} {label}: INT8 {ms[f'{label} FP32'] / ms[f'{label} INT8']:.2f}x of FP32")
            (f_op, _), (i_op, i_node) = profile(fp32, x, args.runs), profile(int8, x, args.runs)
            print("| operator (after ONNX Runtime's fusions) | FP32 ms | INT8 ms |\n|---|---|---|")
            for op in sorted(set(f_op) | set(i_op), key=lambda o: -(f_op.get(o, 0) + i_op.get(o, 0))):
                print(f"| {op} | {f_op.get(op, 0):.2f} | {i_op.get(op, 0):.2f} |")
            top = sorted(i_node.items(), key=lambda kv: -kv[1])[:6]
            print("INT8's six slowest nodes: " + "; ".join(f"{k} {v:.2f} ms" for k, v in top))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
