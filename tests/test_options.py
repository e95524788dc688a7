"""Every option of every stage is one field of its options model, and the CLI, the TOML
config and the Python API all accept it with that field's default."""
from __future__ import annotations

import argparse
import contextlib
import io
import re

import pytest
from helpers import REPO

import tvsprune
from tvsprune import api
from tvsprune.bench.options import BenchOptions
from tvsprune.calibration.options import CalibrateOptions
from tvsprune.cli import build_parser
from tvsprune.data.options import DataOptions, ReadOptions
from tvsprune.errors import TvsError
from tvsprune.exporters import defaults as ED
from tvsprune.exporters.int8 import quantize_int8
from tvsprune.exporters.options import ExportOptions
from tvsprune.exporters.tensorrt import build_engine
from tvsprune.pipeline import load_config
from tvsprune.pipeline.config import RunConfig, config_reference
from tvsprune.pruning.options import PruneOptions

# model -> (config section, the commands that carry its flags, fields no flag carries and why)
STAGES = {
    ReadOptions: ("data", [("calibrate",), ("bench",), ("export", "onnx")], {}),
    CalibrateOptions: ("calibrate", [("calibrate",)], {}),
    PruneOptions: ("prune", [("prune",)], {}),
    ExportOptions: ("export", [("export", "onnx"), ("export", "int8"), ("export", "trt")],
                    {"onnx": "the subcommand", "int8": "the subcommand", "tensorrt": "the subcommand"}),
    BenchOptions: ("bench", [("bench",)], {}),
}
EMPTY = {"model": {"spec": "resnet20"}, "data": {"calibration": "imgs"}}


def _subparser(*names: str) -> argparse.ArgumentParser:
    p = build_parser()
    for name in names:
        sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        p = sub.choices[name]
    return p


def _flags(*names: str) -> dict[str, argparse.Action]:
    return {a.dest: a for a in _subparser(*names)._actions}


def _fields():
    for model, (section, commands, no_flag) in STAGES.items():
        for name in model.model_fields:
            yield pytest.param(model, section, commands, no_flag, name, id=f"{model.__name__}.{name}")


@pytest.mark.parametrize("model,section,commands,no_flag,name", list(_fields()))
def test_every_field_is_a_flag_a_config_key_and_an_api_keyword(model, section, commands, no_flag, name):
    default = model.default(name)
    # CLI: a --field-name flag in one of the stage's commands, with the field's default
    if name not in no_flag:
        found = [(cmd, a) for cmd in commands for dest, a in _flags(*cmd).items() if dest == name]
        assert found, f"no flag for {model.__name__}.{name} in {commands}"
        for cmd, action in found:
            assert "--" + name.replace("_", "-") in action.option_strings, (cmd, action.option_strings)
            assert action.default == default, (cmd, name, action.default, default)
    # config: the section is the model (or adds to it), and an empty config holds the default
    assert issubclass(RunConfig.model_fields[section].annotation, model)
    cfg = load_config(raw={k: dict(v) for k, v in EMPTY.items()})[0]
    if (section, name) != ("prune", "target_params"):  # the one default budget fills it in
        assert getattr(getattr(cfg, section), name) == default
    # config and API: the key is accepted at its default value
    load_config(raw={**{k: dict(v) for k, v in EMPTY.items()}, section: {**EMPTY.get(section, {}), name: default}})
    _api_accepts(model, {name: default})


def _api_accepts(model, options: dict) -> None:
    """The API function of ``model``'s stage gets past its keyword check (and fails later, on
    the object() given as the model): a key it did not know would fail first."""
    call = {ReadOptions: lambda **o: api.calibrate(object(), "imgs", **o),
            CalibrateOptions: lambda **o: api.calibrate(object(), "imgs", **o),
            PruneOptions: lambda **o: api.prune(object(), "missing.safetensors", **o),
            ExportOptions: lambda **o: api.export(object(), "out", "imgs", **o),
            BenchOptions: lambda **o: api.bench(object(), out="out", **o)}[model]
    with pytest.raises(TvsError) as e:
        call(**options)
    assert "option" not in str(e.value), str(e.value)
    with pytest.raises(TvsError, match="unknown .* option 'no_such_key'"):
        call(no_such_key=1)


def test_stage_defaults_have_one_definition():
    """The CLI with no flags, an empty config and the API build equal options models."""
    cfg = load_config(raw={k: dict(v) for k, v in EMPTY.items()})[0]
    from tvsprune.cli import bench_options, data_options, prune_options

    ns = build_parser().parse_args(["prune", "resnet20", "--out", "p"])
    assert prune_options(ns) == cfg.prune == PruneOptions()
    assert PruneOptions().target_params == 0.3  # the one default budget
    ns = build_parser().parse_args(["bench", "resnet20", "--out", "b"])
    assert bench_options(ns) == BenchOptions.build(**cfg.bench.model_dump(exclude={"enabled"}))
    ns = build_parser().parse_args(["calibrate", "resnet20", "--data", "imgs", "--out", "m"])
    assert data_options(ns) == cfg.data.at("imgs") == api._data("imgs") == DataOptions(path="imgs")
    assert CalibrateOptions.from_args(ns) == cfg.calibrate == CalibrateOptions()
    # the export functions' own defaults are ExportOptions' (both read exporters.defaults)
    e = ExportOptions()
    assert e.int8_method == ED.INT8_METHOD == quantize_int8.__defaults__[0]
    assert (e.min_batch, e.opt_batch, e.max_batch) == build_engine.__defaults__[1:4]
    # the collector's resolution is the stage's (benchmarks that call it get the user's default)
    from tvsprune.calibration.collector import collect_moments

    assert collect_moments.__defaults__[0] == CalibrateOptions().resolution


def test_options_refuse_unknown_keys_and_bad_values_in_one_line():
    with pytest.raises(TvsError, match=r"unknown key 'target_param' \(did you mean 'target_params'\?\)"):
        PruneOptions.build(target_param=0.5)
    with pytest.raises(TvsError, match="give one budget, not target_params and target_flops"):
        PruneOptions.build(target_params=0.5, target_flops=0.5)
    with pytest.raises(TvsError, match="did you mean 'ls'"):
        PruneOptions.build(compensation="lss")
    with pytest.raises(TvsError, match="unknown method 'tsv'"):
        PruneOptions.build(method="tsv")
    with pytest.raises(TvsError, match="target_flops must be in"):
        PruneOptions.build(target_flops=50)
    with pytest.raises(TvsError, match="min_batch <= opt_batch <= max_batch"):
        ExportOptions.build(min_batch=16, opt_batch=8)
    with pytest.raises(TvsError, match="unknown backend 'ort-cpy'"):
        BenchOptions.build(backends=["ort-cpy"])
    with pytest.raises(TvsError, match="K is at most 64"):
        CalibrateOptions.build(resolution="pool:65")
    with pytest.raises(TvsError, match="unknown key 'rezise'"):
        DataOptions.build(path="x", rezise=32)
    for e in (pytest.raises(TvsError),):
        with e:
            tvsprune.prune(object(), "m.safetensors", target_flop=0.3)


def test_readme_config_reference_lists_every_field_with_its_default():
    readme = (REPO / "README.md").read_text()
    for row in config_reference():
        assert row in readme, f"README's config reference is out of date; expected the row:\n{row}"
    listed = " ".join(config_reference())
    for model, (section, _, _) in STAGES.items():
        for name in model.model_fields:
            assert re.search(rf"`\[{section}\]` \|.*`{name}`", listed), (section, name)


def test_preprocessing_flags_are_shown_in_help():
    for argv in (["prune", "-h"], ["replay", "-h"], ["export", "int8", "-h"]):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
            build_parser().parse_args(argv)
        text = buf.getvalue()
        for flag in ("--resize", "--crop", "--mean", "--std"):
            assert flag in text, (argv, flag)
        assert "--data-unused" not in text


def test_one_budget_convention_keep_fractions_with_the_removed_spelling_as_alias():
    from tvsprune.pruning.options import budget_words

    assert PruneOptions.build(keep_macs=0.5).budget() == (0.5, "macs")
    kept, alias = PruneOptions.build(keep_params=0.75).budget(), PruneOptions.build(target_params=0.25).budget()
    assert kept == alias == (0.25, "params")
    assert PruneOptions().budget() == (0.3, "params")  # the default: keep 70 % of the parameters
    with pytest.raises(TvsError, match="give one budget, not keep_macs and target_flops"):
        PruneOptions.build(keep_macs=0.5, target_flops=0.5)
    with pytest.raises(TvsError, match="keep_macs must be in"):
        PruneOptions.build(keep_macs=1.0)
    assert budget_words("macs", 0.5) == "keep 50 % of MACs (2.00x fewer)"
    assert budget_words("params", 0.3) == "keep 70 % of parameters (1.43x fewer)"
    ns = build_parser().parse_args(["prune", "resnet20", "--out", "p", "--keep-macs", "0.6"])
    from tvsprune.cli import prune_options

    removed, metric = prune_options(ns).budget()
    assert metric == "macs" and abs(removed - 0.4) < 1e-12


def _all_parsers(p: argparse.ArgumentParser, path: tuple = ()):
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _all_parsers(sub, path + (name,))


def test_every_option_help_states_its_default():
    missing = []
    for path, p in _all_parsers(build_parser()):
        formatter = p._get_formatter()
        for a in p._actions:
            if not a.option_strings or a.help == argparse.SUPPRESS or isinstance(
                    a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            text = formatter._expand_help(a) if a.help else ""
            if not re.search(r"default|required", text, re.I):
                missing.append((" ".join(path), a.option_strings[0]))
    assert not missing, missing


def test_positionals_may_follow_options_and_misspelt_options_get_a_suggestion(capsys):
    from tvsprune.cli import _parse

    args = _parse(build_parser(), ["bench", "resnet20", "--weights", "w.pt", "p1", "p2", "--out", "b"])
    assert args.base == "resnet20" and args.pruned == ["p1", "p2"] and args.weights == "w.pt"
    with pytest.raises(SystemExit) as e:
        _parse(build_parser(), ["prune", "resnet20", "--out", "p", "--traget-flops", "0.3"])
    assert e.value.code == 64 and "did you mean --target-flops?" in capsys.readouterr().err
