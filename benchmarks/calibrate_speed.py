"""Calibration cost on this CPU, measured side by side (A/B interleaved batch by batch).

(a) calibrate time / plain inference time over the same pre-decoded batches, per resolution,
    with the consumers' input second moments (what least-squares compensation needs; the
    default) and, for contrast, without them at ``global``; each batch's plain forward runs
    right before or after calibrate's pass over it (A B, B A, ...);
(b) speedup over the reference code's scheme (one forward pass per sample per layer at
    batch size 1), timed on a subset and extrapolated (said so in the output);
(c) peak memory of `tvsprune calibrate` for 1x and 10x the samples, each in a fresh process.

    python benchmarks/calibrate_speed.py [--models resnet20,vgg11_bn] [--images 2000] [--rounds 3] [--resolutions pool:4,global]
        [--steady-allocator]

With glibc's default malloc, every large activation of a forward pass can come from fresh
pages (an mmap, or a heap the allocator trimmed), and the page faults (150,000 to 550,000 per
pass of 2,000 CIFAR images here, varying between processes) cost up to a third of plain
inference: the ratio then depends on the allocator's state as much as on the hooks' work.
``--steady-allocator`` re-runs the script with glibc's mmap and trim thresholds raised
(MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, as jemalloc- or tcmalloc-like reuse
would give), so both sides run without page faults and the ratio measures the work.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CHECKPOINTS, cifar10, machine  # noqa: E402

from tvsprune.calibration import DataOptions, collect_moments  # noqa: E402
from tvsprune.data import BatchStream, stratified_indices  # noqa: E402
from tvsprune.models import load_model  # noqa: E402
from tvsprune.models.probe import probe_model  # noqa: E402


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def alternated(model, probe, batches, classes, resolution: str, second: bool) -> tuple[float, float]:
    """(plain inference s, calibrate s) over ``batches``, measured batch by batch in A B / B A order."""
    plain = 0.0

    def forward(x):
        nonlocal plain
        t = time.perf_counter()
        with torch.inference_mode():
            model(x)
        plain += time.perf_counter() - t

    def stream():
        for i, (x, y) in enumerate(batches):
            if i % 2 == 0:
                forward(x)
            yield x, y
            if i % 2 == 1:
                forward(x)

    total = timed(lambda: collect_moments(model, probe, stream(), classes, resolution, second_moments=second))
    return plain, total - plain


def peak_rss_mb(model: str, data: Path, per_class: int) -> float:
    code = ("import resource, sys; from tvsprune.cli import main; "
            f"rc = main(['calibrate', '{model}', '--weights', '{CHECKPOINTS[model]}', '--data', '{data}', "
            f"'--samples-per-class', '{per_class}', '--out', '/tmp/tvsprune_mem.safetensors', '--batch-size', '128']); "
            "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    line = [l for l in r.stdout.splitlines() if l.startswith("MAXRSS")]
    if not line:
        raise RuntimeError(r.stderr[-2000:])
    return int(line[0].split()[1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,vgg11_bn")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ref-samples", type=int, default=10, help="samples timed for the reference scheme")
    ap.add_argument("--resolutions", default="global,global-plain,pool:2,pool:4,full",
                    help="which of (a)'s rows to time (global-plain: global without the second moments)")
    ap.add_argument("--steady-allocator", action="store_true",
                    help="re-run with glibc's mmap/trim thresholds raised: no page-fault churn on either side")
    args = ap.parse_args()
    steady = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "1099511627776"}
    if args.steady_allocator and any(os.environ.get(k) != v for k, v in steady.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **steady})
    torch.set_num_threads(2)
    root = cifar10()
    allocator = "steady allocator (glibc mmap/trim thresholds raised)" if args.steady_allocator else "default allocator"
    print(f"# calibrate speed on {machine()}, torch threads {torch.get_num_threads()}, {allocator}")
    for name in args.models.split(","):
        lm = load_model(name, str(CHECKPOINTS[name]))
        data = DataOptions(path=str(root / "test"), batch_size=128)
        src = data.open(lm)
        idx = stratified_indices(src.labels, args.images // len(src.classes), 0)
        batches = list(BatchStream(src, idx, 128))
        n = sum(len(y) for _, y in batches)
        model = lm.module.eval()
        probe = probe_model(model, batches[0][0][:1])

        ratios = {}
        variants = {"global": ("global", True), "global, no 2nd moments": ("global", False),
                    "pool:2": ("pool:2", True), "pool:4": ("pool:4", True), "full": ("full", True)}
        chosen = [r.replace("global-plain", "global, no 2nd moments") for r in args.resolutions.split(",")]
        variants = {k: v for k, v in variants.items() if k in chosen}
        # Plain inference and calibrate alternate batch by batch (A B, B A, A B, ...): every
        # batch's plain forward runs right before or right after calibrate's pass over the same
        # batch, so a slow spell of this shared machine (they last seconds here) falls on both
        # alike. Calibrate's time is its whole collect_moments call (setup, the final merge)
        # less the plain forwards run inside it.
        rounds: dict[str, list[tuple[float, float]]] = {label: [] for label in variants}
        for i in range(args.rounds):
            for label, (res, second) in variants.items():
                t_plain, t_cal = alternated(model, probe, batches, src.classes, res, second)
                rounds[label].append((t_plain, t_cal))
        for label, times in rounds.items():
            r = [c / p for p, c in times]
            ratios[label] = (float(np.median(r)), min(r), max(r), *times[-1])
        print(f"\n## {name}: {n} images, {len(probe.layers)} prunable layers, batch 128")
        print("(a) calibrate / plain inference over the same batches, alternated batch by batch (median of "
              f"{args.rounds} rounds [min-max]):")
        for res, (med, lo, hi, tp, tc) in ratios.items():
            target = "  target <= 1.3: " + ("met" if med <= 1.3 else "NOT met") if res in ("global", "pool:4") else ""
            print(f"    {res:23s} {med:.3f} [{lo:.3f}-{hi:.3f}]  (last round: plain {tp:.2f} s, calibrate {tc:.2f} s){target}")
        # (b) reference: one full forward per sample per layer at batch size 1
        if "global" in ratios:  # compared with calibrate at global
            xs = torch.cat([x for x, _ in batches])[: args.ref_samples]
            with torch.inference_mode():
                model(xs[:1])
                t = timed(lambda: [model(xs[i:i + 1]) for i in range(len(xs)) for _ in probe.layers])
            per_pass = t / (len(xs) * len(probe.layers))
            ref_total = per_pass * n * len(probe.layers)
            ours = ratios["global"][4]
            print(f"(b) reference scheme: {per_pass * 1e3:.2f} ms per batch-1 pass, timed on {len(xs)} samples x "
                  f"{len(probe.layers)} layers and EXTRAPOLATED to {n} samples: {ref_total:.1f} s vs tvsprune "
                  f"{ours:.2f} s at global -> speedup {ref_total / ours:.0f}x")
        # (c) memory: 1x and 10x the samples, fresh processes
        small = max(1, args.images // len(src.classes) // 10)
        m1 = peak_rss_mb(name, root / "test", small)
        m10 = peak_rss_mb(name, root / "test", small * 10)
        print(f"(c) peak RSS of `tvsprune calibrate`: {small * len(src.classes)} images {m1:.0f} MB, "
              f"{small * 10 * len(src.classes)} images {m10:.0f} MB (ratio {m10 / m1:.3f})")


if __name__ == "__main__":
    main()
