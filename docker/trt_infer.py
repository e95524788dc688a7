"""Minimal TensorRT inference and latency benchmark for the runtime container.

Depends on tensorrt, cuda-python and numpy only. Usage:
    python trt_infer.py model.engine [--batch 1,8,32] [--iters 200] [--input x.npy]
Prints p50/p90/p99 latency (CUDA events) and images/s per batch size; with --input, the
predicted classes of the first rows.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def check(res):
    err, *rest = res if isinstance(res, tuple) else (res,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("engine")
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--input", help=".npy array (N, C, H, W) float32 to classify")
    args = ap.parse_args()
    data = Path(args.engine).read_bytes()
    if data.startswith(b"Not an engine"):
        print("no engine in this image: build the runtime stage with --build-arg ENGINE=...", file=sys.stderr)
        return 2
    import tensorrt as trt
    from cuda.bindings import runtime as cudart

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(data)
    if engine is None:
        print("TensorRT could not deserialize the engine (other GPU or TensorRT version?)", file=sys.stderr)
        return 2
    ctx = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inp = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
    out = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
    chw = tuple(engine.get_tensor_shape(inp))[1:]
    stream = check(cudart.cudaStreamCreate())
    batches = [int(b) for b in args.batch.split(",")]
    x_all = np.load(args.input).astype(np.float32) if args.input else None
    for bs in batches:
        x = x_all[:bs] if x_all is not None else np.random.default_rng(0).standard_normal((bs, *chw), np.float32)
        bs = len(x)
        ctx.set_input_shape(inp, (bs, *chw))
        oshape = tuple(ctx.get_tensor_shape(out))
        y = np.empty(oshape, np.float32)
        d_in = check(cudart.cudaMalloc(x.nbytes))
        d_out = check(cudart.cudaMalloc(y.nbytes))
        ctx.set_tensor_address(inp, d_in)
        ctx.set_tensor_address(out, d_out)
        check(cudart.cudaMemcpy(d_in, x.ctypes.data, x.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
        for _ in range(20):
            ctx.execute_async_v3(stream)
        check(cudart.cudaStreamSynchronize(stream))
        start, end = check(cudart.cudaEventCreate()), check(cudart.cudaEventCreate())
        times = []
        for _ in range(args.iters):
            check(cudart.cudaEventRecord(start, stream))
            ctx.execute_async_v3(stream)
            check(cudart.cudaEventRecord(end, stream))
            check(cudart.cudaEventSynchronize(end))
            times.append(check(cudart.cudaEventElapsedTime(start, end)))
        check(cudart.cudaMemcpy(y.ctypes.data, d_out, y.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
        t = np.asarray(times)
        p50 = float(np.percentile(t, 50))
        print(f"batch {bs}: p50 {p50:.3f} ms  p90 {np.percentile(t, 90):.3f} ms  p99 {np.percentile(t, 99):.3f} ms  "
              f"{bs / p50 * 1e3:.0f} images/s")
        if x_all is not None:
            print("predicted classes:", y.argmax(1)[:16].tolist())
        cudart.cudaFree(d_in)
        cudart.cudaFree(d_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
