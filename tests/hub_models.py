"""torchvision and timm models for the architecture matrix (tests and benchmarks/architectures.py).

TEST-ENVIRONMENT WORKAROUND. torchvision's PyPI wheels are CUDA builds; with this
machine's CPU build of torch, ``import torchvision`` fails while it registers fake
kernels for its compiled operators (nms, roi_align, ...), which do not exist here. The
model definitions themselves are pure Python. :func:`tolerant_fake_registration` lets
that registration skip operators torch does not know, for the duration of the import
only. tvsprune itself never does this: it imports torchvision only for
``torchvision:NAME`` specs, and says so when the import fails. Install the packages with
``pip install --no-deps torchvision timm`` (the Makefile's test target does).
"""
from __future__ import annotations

import contextlib
import importlib
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

# name -> (constructor keyword arguments, input size); 10 classes everywhere
TORCHVISION = {
    "resnet18": ({}, 64), "resnet50": ({}, 64), "resnext50_32x4d": ({}, 64), "wide_resnet50_2": ({}, 64),
    "mobilenet_v2": ({}, 64), "mobilenet_v3_small": ({}, 64), "efficientnet_b0": ({}, 64),
    "densenet121": ({}, 64), "googlenet": ({"aux_logits": False, "init_weights": True}, 64),
    # Inception v3 needs at least 75x75 inputs. GoogLeNet and Inception v3 use torchvision's own
    # random initialisation (init_weights=True, truncated normal): with PyTorch's default
    # initialisation instead, Inception v3 is so ill-conditioned that its unpruned float32
    # network differs from float64 by 6e-5 and from ONNX Runtime by 1.1e-4 (scaled).
    "inception_v3": ({"aux_logits": False, "init_weights": True}, 96),
    "shufflenet_v2_x1_0": ({}, 64), "squeezenet1_1": ({}, 64), "regnet_y_400mf": ({}, 64),
    "convnext_tiny": ({}, 64), "mnasnet0_5": ({}, 64), "vgg16_bn": ({}, 64),
    "vit_b_16": ({"image_size": 64}, 64), "swin_t": ({}, 64),
}
TIMM = {
    "resnet18d": ({}, 64), "efficientnet_b0": ({}, 64), "mobilenetv3_small_100": ({}, 64),
    "regnety_002": ({}, 64), "convnext_atto": ({}, 64), "ghostnet_100": ({}, 64),
}
# user-written networks (tests/user_patterns.py), random weights: the tutorial CNN's BatchNorm
# after max-pooling once broke calibrate's fused moment groups
USER = {"tutorial": ({}, 32)}
ATTENTION = {"vit_b_16", "swin_t"}  # the only models allowed to be refused
HUBS = {"torchvision": TORCHVISION, "timm": TIMM, "user": USER}


@contextlib.contextmanager
def tolerant_fake_registration():
    """``torch.library.register_fake`` skips operators torch does not have (see module docstring)."""
    real = torch.library.register_fake

    def register_fake(op, *args, **kwargs):
        name = op if isinstance(op, str) else getattr(op, "_name", "")
        try:
            torch._C._dispatch_find_schema_or_throw(str(name), "")
        except RuntimeError:
            return lambda fn=None: fn
        return real(op, *args, **kwargs)

    torch.library.register_fake = register_fake
    try:
        yield
    finally:
        torch.library.register_fake = real


def import_hub(name: str):
    """``torchvision.models`` or ``timm``, or None when the package is not installed."""
    if importlib.util.find_spec(name) is None:
        return None
    with tolerant_fake_registration():
        importlib.import_module("torchvision")
        return importlib.import_module("torchvision.models" if name == "torchvision" else name)


def image_tensors(folder: Path, mean: float = 0.5, std: float = 0.25) -> torch.Tensor:
    from PIL import Image

    files = sorted(Path(folder).rglob("*.png"))
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255)
                     .permute(2, 0, 1) for f in files])
    return (x - mean) / std


def build(hub: str, name: str, kwargs: dict[str, Any], images: torch.Tensor) -> torch.nn.Module:
    """A randomly initialised model with 10 classes whose BatchNorm statistics come from ``images``."""
    from tvsprune.pruning.repairs import recalibrate_batchnorm

    torch.manual_seed(0)
    if hub == "torchvision":
        model = import_hub("torchvision").get_model(name, num_classes=10, **kwargs)
    elif hub == "timm":
        model = import_hub("timm").create_model(name, num_classes=10, pretrained=False, **kwargs)
    else:
        import user_patterns

        model = user_patterns.build(name, num_classes=10, **kwargs)
    # mixed-class batches: the image folder is class-sorted, and batches of one class give
    # running variances far below the data's, an ill-conditioned network (parity misses)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    shuffled = images[order]
    recalibrate_batchnorm(model, [(shuffled[i:i + 8], None) for i in range(0, len(shuffled), 8)])
    return model.eval()


def reload(hub: str, name: str, kwargs: dict[str, Any], model: torch.nn.Module, out: Path, size: int):
    """``model``'s weights saved as users save them (``torch.save({"state_dict": ...})``, which
    keeps the module versions in ``_metadata``) and loaded back through tvsprune's loader."""
    from tvsprune.models import load_model

    weights = out / f"{name}.pt"
    torch.save({"state_dict": model.state_dict()}, weights)
    if hub == "user":
        spec, kwargs = f"{Path(__file__).with_name('user_patterns.py')}:build", {"name": name, **kwargs}
    elif hub == "timm":
        spec, kwargs = f"timm:{name}", {"pretrained": False, **kwargs}
    else:
        spec = f"{hub}:{name}"
    loaded = load_model(spec, str(weights), {"num_classes": 10, **kwargs})
    loaded.input_shape, loaded.normalize = (3, size, size), None  # the synthetic images' own
    return loaded


def run_case(hub: str, name: str, folder: Path, out: Path, methods=("tvs", "l1"), target: float = 0.3,
             size: int | None = None, export_base: bool = True, **options: Any) -> dict[str, Any]:
    """calibrate -> prune (each method) -> ONNX export with parity; one row of the matrix.

    The model is built with random weights, saved as a checkpoint and loaded back through
    tvsprune's own loader (:func:`reload`), as a user's trained model would be.

    Parity is checked on the calibration images (as ``export onnx --data`` does): random
    normal inputs are far outside what BatchNorm statistics estimated on images expect,
    and a randomly initialised network amplifies rounding there. The unpruned network's own
    parity is recorded too (``base_parity_scaled``): where a random network is so
    ill-conditioned that float32 rounding alone crosses the tolerance, the unpruned network
    misses it as well (Inception v3 with PyTorch's default initialisation: see TORCHVISION).

    ``export_base=False`` skips the unpruned network's export (a test that expects a refusal);
    ``options`` go to ``tvsprune.prune`` (the matrix runs its defaults).

    ``status``: "ok", "refused" (a TvsError: one clean line), or "error" (anything else,
    with its traceback: a bug).
    """
    import tvsprune
    from tvsprune.data.options import DataOptions
    from tvsprune.errors import TvsError

    kwargs, default_size = HUBS[hub].get(name, ({}, 64))
    size = size or default_size
    row: dict[str, Any] = {"model": f"{hub}:{name}", "input": size}
    t0 = time.perf_counter()
    try:
        images = image_tensors(folder)
        if images.shape[-1] != size:
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear")
        out.mkdir(parents=True, exist_ok=True)
        model = reload(hub, name, kwargs, build(hub, name, kwargs, images), out, size)
        row["params"] = sum(p.numel() for p in model.module.parameters())
        data = DataOptions(path=str(folder), resize=size, mean=[0.5] * 3, std=[0.25] * 3)
        if export_base:
            base = tvsprune.export_onnx(model, out / f"{name}-base.onnx", input_shape=[3, size, size],
                                        parity_inputs=images)
            row["base_parity_scaled"] = base["parity"]["max_scaled_diff"]  # the unpruned network's own
            row["base_exporter"] = base["exporter"]
        moments = tvsprune.calibrate(model, data)
        for method in methods:
            pruned = tvsprune.prune(model, moments, method=method, target_params=target, calib_data=data,
                                    out=out / f"{name}-{method}", **options)
            side = tvsprune.export_onnx(pruned, out / f"{name}-{method}.onnx", input_shape=[3, size, size],
                                        parity_inputs=images)
            plan = pruned.plan.meta
            row[method] = {"params_removed": round(plan["params"]["removed_frac"], 3),
                           "macs_removed": round(plan["macs"]["removed_frac"], 3),
                           "unpruned_groups": len(plan.get("rigid_groups", {})),
                           "parity_scaled": side["parity"]["max_scaled_diff"],
                           "parity_ok": side["parity"]["within_tolerance"], "exporter": side["exporter"]}
        row["status"] = "ok"
    except TvsError as e:
        row["status"], row["reason"] = "refused", str(e)
    except Exception as e:  # noqa: BLE001 - a traceback is what the matrix exists to find
        row["status"], row["reason"] = "error", f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc()
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row
