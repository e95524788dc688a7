"""One definition of every default: the CLI with no flags, the Python API and an empty config agree."""
from __future__ import annotations

import inspect
from dataclasses import asdict

from tvsprune import api
from tvsprune.bench.stage import BenchOptions
from tvsprune.calibration.stage import DataOptions
from tvsprune.cli import bench_options, build_parser, data_options, prune_options
from tvsprune.exporters import defaults as ED
from tvsprune.exporters.int8 import quantize_int8
from tvsprune.exporters.tensorrt import build_engine
from tvsprune.pipeline import load_config
from tvsprune.pipeline import run as pipeline
from tvsprune.pruning.options import PruneOptions

EMPTY = {"model": {"spec": "resnet20"}, "data": {"calibration": "imgs"}}


def _cli(*argv: str):
    return build_parser().parse_args(list(argv))


def _config():
    return load_config(raw={k: dict(v) for k, v in EMPTY.items()})[0]


def _defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}


def test_data_defaults_agree():
    cli = data_options(_cli("calibrate", "resnet20", "--data", "imgs", "--out", "m.safetensors"))
    config = pipeline._data(_config(), "imgs", _config().data.samples_per_class)
    api_opts = api._data("imgs")
    assert asdict(cli) == asdict(config) == asdict(api_opts) == asdict(DataOptions(path="imgs"))


def test_calibrate_defaults_agree():
    args = _cli("calibrate", "resnet20", "--data", "imgs", "--out", "m.safetensors")
    c = _config().calibrate
    a = _defaults(api.calibrate)
    assert args.resolution == c.resolution == a["resolution"]
    assert args.device == c.device == a["device"]
    assert args.layers is c.layers is None


def test_prune_defaults_agree():
    cli = prune_options(_cli("prune", "resnet20", "--out", "p"))
    config = pipeline.prune_options(_config())
    assert asdict(cli) == asdict(config) == asdict(PruneOptions())
    assert PruneOptions().target_params == 0.3  # the one default budget


def test_export_defaults_agree():
    onnx = _cli("export", "onnx", "resnet20", "--out", "m.onnx")
    int8 = _cli("export", "int8", "m.onnx", "--out", "q.onnx", "--calib-data", "imgs")
    trt = _cli("export", "trt", "m.onnx", "--out", "m.engine")
    e = _config().export
    assert onnx.opset is e.opset is _defaults(api.export_onnx)["opset"] is None
    assert onnx.tolerance == e.tolerance == _defaults(api.export_onnx)["tolerance"] == ED.TOLERANCE
    assert onnx.parity_samples == e.parity_samples == ED.PARITY_SAMPLES
    assert int8.calib_samples == e.int8_samples == ED.INT8_SAMPLES
    assert int8.method == e.int8_method == _defaults(quantize_int8)["method"] == ED.INT8_METHOD
    b = _defaults(build_engine)
    assert (trt.min_batch, trt.opt_batch, trt.max_batch) == (e.min_batch, e.opt_batch, e.max_batch) \
        == (b["min_batch"], b["opt_batch"], b["max_batch"])


def test_bench_defaults_agree():
    cli = bench_options(_cli("bench", "resnet20", "--out", "b"))
    config = pipeline.bench_options(_config())
    assert asdict(cli) == asdict(config) == asdict(BenchOptions())


def test_preprocessing_flags_are_shown_in_help():
    for argv in (["prune", "-h"], ["replay", "-h"], ["export", "int8", "-h"]):
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
            build_parser().parse_args(argv)
        text = buf.getvalue()
        for flag in ("--resize", "--crop", "--mean", "--std"):
            assert flag in text, (argv, flag)
        assert "--data-unused" not in text
