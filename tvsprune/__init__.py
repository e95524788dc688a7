"""tvsprune: prune trained CNNs with TVSPrune and export them for deployment.

Pipeline stages (each a CLI subcommand and a Python API, file -> file):
calibrate -> prune -> export -> bench, and `run` / `demo` for all of them.

On a model you hold::

    moments = tvsprune.calibrate(model, "calib_images/")
    pruned = tvsprune.prune(model, moments, target_flops=0.3)
    tvsprune.export_onnx(pruned, "pruned.onnx")
    report = tvsprune.bench("resnet20", pruned, out="report/", data="eval_images/")

The API is imported on first use, so ``import tvsprune`` (and ``tvsprune --version``)
does not import torch.
"""
from .version import __version__

_API = {"calibrate", "prune", "export", "export_onnx", "Pruned"}
_OTHER = {"BenchOptions": ".bench.options", "CalibrateOptions": ".calibration.options", "DataOptions": ".data.options",
          "ExportOptions": ".exporters.options", "PruneOptions": ".pruning.options", "Moments": ".calibration.moments",
          "TvsError": ".errors"}


def __getattr__(name: str):
    import importlib

    if name == "bench":  # the bench package, callable as the API's bench()
        return importlib.import_module(".bench", __name__)
    if name in _API:
        return getattr(importlib.import_module(".api", __name__), name)
    if name in _OTHER:
        return getattr(importlib.import_module(_OTHER[name], __name__), name)
    raise AttributeError(f"module 'tvsprune' has no attribute {name!r}")


__all__ = ["BenchOptions", "CalibrateOptions", "DataOptions", "ExportOptions", "Moments", "PruneOptions", "Pruned",
           "TvsError", "bench", "calibrate", "export", "export_onnx", "prune", "__version__"]
