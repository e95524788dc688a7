"""ImageNet scale: resnet50 (random weights), 1,000 classes, 224x224 synthetic images.

Prints, for this machine (and the GPU when one is present, named):
(a) calibrate time / plain inference time over the same batches (A/B interleaved), at
    ``global`` resolution with the consumers' second moments (the stored default is
    ``pool:4``; at 1,000 classes ``global`` is what fits, see (b));
(b) the moments' size in memory at global and pool:4, and peak RSS of the process;
(c) the time of the 1,000-class pairwise minimum (499,500 class pairs per filter, chunked
    to a 256 MB working set) over every prunable layer.

    .venv/bin/pip install --no-deps torchvision
    .venv/bin/python benchmarks/imagenet_scale.py [--images 1000] [--device cuda]

Images are synthetic (seeded normal noise, labels cycling over the 1,000 classes): the
timings do not depend on content. With --images below 10,000 the 10,000-image figures are
EXTRAPOLATED from the per-image rate, and the output says so.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import machine  # noqa: E402
from hub_models import import_hub  # noqa: E402

from tvsprune.calibration import collect_moments  # noqa: E402
from tvsprune.models.probe import probe_model  # noqa: E402
from tvsprune.pruning.scores import hellinger_pairs  # noqa: E402


def batches(n: int, batch: int, device: str):
    g = torch.Generator().manual_seed(0)
    for start in range(0, n, batch):
        b = min(batch, n - start)
        x = torch.randn(b, 3, 224, 224, generator=g)
        y = torch.arange(start, start + b) % 1000
        yield x.to(device), y.to(device)


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    tv = import_hub("torchvision")
    if tv is None:
        print("torchvision is not installed (pip install --no-deps torchvision)")
        return 2
    dev = args.device
    where = torch.cuda.get_device_name(0) if dev.startswith("cuda") else machine()
    print(f"# ImageNet scale on {where}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    model = tv.resnet50(num_classes=1000).eval().to(dev)
    probe = probe_model(model, torch.zeros(1, 3, 224, 224, device=dev))
    classes = [str(i) for i in range(1000)]

    def plain():
        with torch.inference_mode():
            for x, _ in batches(args.images, args.batch, dev):
                model(x)

    result = {}

    def calibrate():
        result["m"] = collect_moments(model, probe, batches(args.images, args.batch, dev), classes, "global",
                                      device=dev, second_moments=True)

    t_plain1, t_cal, t_plain2 = timed(plain), timed(calibrate), timed(plain)  # A B A
    t_plain = (t_plain1 + t_plain2) / 2
    moments = result["m"]
    n = args.images
    print(f"(a) {n} images at 224x224, batch {args.batch}: plain inference {t_plain:.1f} s "
          f"({n / t_plain:.1f} img/s; runs {t_plain1:.1f}/{t_plain2:.1f} s), calibrate {t_cal:.1f} s "
          f"-> ratio {t_cal / t_plain:.2f}")
    if n < 10_000:
        print(f"    EXTRAPOLATED to 10,000 images (--samples-per-class 10): calibrate ~{t_cal / n * 1e4 / 60:.1f} min, "
              f"plain inference ~{t_plain / n * 1e4 / 60:.1f} min")
    class_bytes = sum(lm.mean.numel() * lm.mean.element_size() * 3 for lm in moments.layers.values())
    input_bytes = sum(im.mean.numel() * 8 + (im.cov.numel() * 8 if im.cov is not None else 0)
                      for im in moments.inputs.values())
    channels = sum(l.channels for l in probe.layers)
    print(f"(b) moments at global: {len(probe.layers)} layers, {channels} filters x 1,000 classes: class moments "
          f"{class_bytes / 2**20:.0f} MiB, input second moments {input_bytes / 2**20:.0f} MiB; at pool:4 the "
          f"class moments would be {class_bytes * 16 / 2**30:.1f} GiB (16 positions per filter)")
    print(f"    peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    # (c) needs every class present: with fewer images than classes the collected moments
    # hold only some, so the timing runs on moments of the same shapes with all 1,000 classes
    # (seeded values; the cost does not depend on them).
    from tvsprune.calibration.moments import LayerMoments

    g = torch.Generator().manual_seed(0)
    full = [LayerMoments(torch.full((1000,), 10, dtype=torch.int64),
                         torch.randn(*lm.mean.shape, generator=g, dtype=torch.float64),
                         torch.rand(*lm.mean.shape, generator=g, dtype=torch.float64) * 9 + 0.9)
            for lm in moments.layers.values()]
    present = int((next(iter(moments.layers.values())).count > 0).sum())
    t0 = time.perf_counter()
    for lm in full:
        hellinger_pairs(lm, "min", device=dev)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    t_score = time.perf_counter() - t0
    print(f"(c) pairwise minimum over 499,500 class pairs (all 1,000 classes present; the calibration above "
          f"saw {present}) for all {channels} filters: {t_score:.1f} s (chunks of <= 256 MB); peak RSS now "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
