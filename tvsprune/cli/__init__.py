"""tvsprune: prune a trained CNN without retraining, export it (ONNX, INT8, TensorRT) and measure it against the original.

One module per command (calibrate, evaluate, prune, export, doctor, bench, run), each with a
``register(sub)`` that adds its parser; this module holds ``main`` and the global flags.

Exit codes: 0 success, 1 user error (bad input, unwritable output), 2 missing optional
dependency / hardware, 3 a check failed (e.g. parity outside tolerance with --strict),
4 the verdict missed bench's --fail-if gate, 64 usage error (unknown flag, bad flag value; EX_USAGE), 70 internal error (a bug in tvsprune,
EX_SOFTWARE; its traceback goes to the log file), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..version import __version__
from ..errors import TvsError
from . import bench, calibrate, doctor, evaluate, export, prune, run
from .bench import bench_options
from .common import data_options
from .prune import prune_options

log = logging.getLogger("tvsprune")
COMMANDS = (calibrate, evaluate, prune, export, doctor, bench, run)  # in the order --help lists them


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tvsprune", description=__doc__.splitlines()[0].replace("``", ""),
                     epilog="exit codes: 0 passed, 1 bad input, 2 missing optional backend, 3 check failed "
                            "(--strict), 64 usage, 70 internal error, 130 interrupted, 143 terminated")
    parser.add_argument("--version", action="version", version=f"tvsprune {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="errors and the final PASSED/FAILED line only")
    parser.add_argument("--log-file", help="also write the log (info level, debug with -vv) to this file")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


EXIT_USAGE = 64  # sysexits.h EX_USAGE; 2 stays "a missing optional backend"
EXIT_SOFTWARE = 70  # sysexits.h EX_SOFTWARE: an internal error, never the user's input
DIR_OUTPUTS = {"prune", "replay", "bench"}  # commands whose --out is a directory (run/demo lock in Pipeline)


class _Help(argparse.HelpFormatter):
    """Every option's help says its default (or that it is required)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or text == argparse.SUPPRESS or "default" in text.lower() \
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            return text
        if action.required:
            return f"{text} (required)".strip()
        if isinstance(action, (argparse._StoreTrueAction, argparse._CountAction)) and not action.default:
            return f"{text} (default: off)".strip()
        if action.default is None:
            return f"{text} (default: none)".strip()
        return f"{text} (default: %(default)s)".strip()


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on exit code 64 and the usual FAILED line; every option's
    help states its default; a misspelt option gets the closest one suggested."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        print(f"FAILED | usage | {self.prog.removeprefix('tvsprune').strip() or 'tvsprune'}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


class _CurrentStderr(logging.StreamHandler):
    """Log to whatever sys.stderr is when a record is written: under the terminal's spinner
    that is rich's redirect, which prints the line above the spinner instead of onto it."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Once(logging.Filter):
    """A warning already shown on the terminal during this command is not shown again: a prune's
    candidate networks each fit the same layers, and each fit warned about the same layer (one
    torchvision MobileNetV2 prune printed every 'the fit leans on its ridge' line twice). The log
    file keeps every one."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def _setup_logging(args: argparse.Namespace) -> None:
    """-q: errors only; default: warnings (each once); -v: info; -vv: debug; --log-file:
    everything, to a file."""
    level = logging.ERROR if args.quiet else logging.WARNING - 10 * min(args.verbose, 2)
    handlers: list[logging.Handler] = [_CurrentStderr()]
    handlers[0].setLevel(level)
    handlers[0].addFilter(_Once())
    if args.log_file:
        try:
            fh = logging.FileHandler(args.log_file)
        except OSError as e:
            raise TvsError(f"cannot open --log-file {args.log_file}: {e.strerror}") from None
        fh.setLevel(logging.DEBUG if args.verbose >= 2 else logging.INFO)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(fh)
    logging.basicConfig(level=min(h.level for h in handlers), format="%(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)
    for noisy in ("torch", "onnx", "onnxruntime", "onnxscript", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


INPUTS = ("model", "weights", "moments", "data", "calib_data", "val_data", "eval_data", "plan", "base", "pruned",
          "inputs", "config")  # argument names that hold files a command reads
FOLDER_INPUTS = {"model", "data", "calib_data", "val_data", "eval_data", "base", "pruned", "inputs"}  # read as folders


def _input_paths(args: argparse.Namespace) -> list[tuple[str, Path, bool]]:
    """(flag, existing path, read as a folder) for every file or folder the command reads (a
    ``file.py:Name`` spec counts as its file)."""
    found = []
    for name in INPUTS:
        values = getattr(args, name, None)
        for v in values if isinstance(values, list) else [values]:
            if not isinstance(v, str) or not v:
                continue
            path = Path(v)
            if not path.exists() and ":" in v and v.rsplit(":", 1)[0].endswith(".py"):
                path = Path(v.rsplit(":", 1)[0])
            if path.exists():
                found.append((name if name in ("model", "base", "pruned", "inputs") else "--" + name.replace("_", "-"),
                              path, name in FOLDER_INPUTS))
    return found


def _refuse_output_over_input(args: argparse.Namespace) -> None:
    """An output equal to an input, or inside an input folder, would destroy or pollute what the
    command reads: refused before anything runs (exit 64)."""
    out = getattr(args, "out", None)
    if not out:
        return
    target = Path(out).resolve()
    for flag, path, folder in _input_paths(args):
        source = path.resolve()
        if target == source or (folder and source.is_dir() and source in target.parents):
            where = "is" if target == source else "is inside"
            raise TvsError(f"--out {out} {where} the input {flag} {path}: choose an output path apart from the "
                           "inputs", EXIT_USAGE)


def _internal_error(error: BaseException, log_file: str | None) -> str:
    """Write ``error``'s traceback to ``log_file`` (or a new file in the temp folder); the one line to show."""
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(error))
    where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
    try:
        if log_file:
            with open(log_file, "a") as f:
                f.write(text)
            path = log_file
        else:
            fd, path = tempfile.mkstemp(prefix="tvsprune-internal-error-", suffix=".log")
            with os.fdopen(fd, "w") as f:
                f.write(text)
        kept = f"the full traceback is in {path}"
    except OSError:
        kept = "the traceback could not be written; rerun with -vv"
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return (f"internal error (a bug in tvsprune, not in your input): {type(error).__name__}: {first}{at}; "
            f"{kept}; please report it")


class Terminated(KeyboardInterrupt):
    """SIGTERM: unwinds like Ctrl-C (temporary files removed), exits 143 (128 + SIGTERM)."""


def _interrupt(signum: int, frame: Any) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv) == ["--version"]:  # without importing torch
        print(f"tvsprune {__version__}")
        return 0
    import signal

    # SIGTERM unwinds like Ctrl-C from the first moment (imports included), then is restored
    old_term = signal.signal(signal.SIGTERM, _interrupt) if hasattr(signal, "SIGTERM") else None
    try:
        return _main(argv)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The sub-parser that parsed ``args`` (``export onnx``'s, ``prune``'s, ...)."""
    p = parser
    for name in (getattr(args, "command", None), getattr(args, "target", None)):
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not name or not subs or name not in subs[0].choices:
            break
        p = subs[0].choices[name]
    return p


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, but ``bench BASE --weights W PRUNED...`` works (positionals after options),
    and a misspelt option is answered with the closest one of its command."""
    import difflib

    args, extra = parser.parse_known_args(argv)
    if not extra:
        return args
    if getattr(args, "command", None) == "bench" and not any(e.startswith("-") for e in extra):
        args.pruned = [*args.pruned, *extra]
        return args
    own = _command_parser(parser, args)
    options = [o for a in own._actions for o in a.option_strings if o.startswith("--")]
    hints = [f"{e} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(e.split("=")[0], options, n=1))
             else e for e in extra if e.startswith("-")]
    own.error(f"unrecognized arguments: {' '.join(hints or extra)}")
    raise AssertionError  # error() exits


def _main(argv: list[str] | None) -> int:
    try:  # a signal while the parser's registries (or torch) import: one line, no traceback
        parser = build_parser()
        args = _parse(parser, argv)
    except Terminated:
        print("tvsprune: error: terminated (SIGTERM); nothing was written", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("tvsprune: error: interrupted; nothing was written", file=sys.stderr)
        return 130
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        print("tvsprune: error: no command given", file=sys.stderr)
        print("FAILED | usage | tvsprune", file=sys.stderr)
        return EXIT_USAGE
    import contextlib

    from ..artifacts import output_lock

    t0 = time.perf_counter()
    label = args.command + (f" {args.target}" if getattr(args, "target", None) else "")

    def failed(message: str, code: int) -> int:
        print(f"tvsprune {label}: error: {message}", file=sys.stderr)
        print(f"FAILED | {label} | {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        return code

    try:
        _setup_logging(args)
        _refuse_output_over_input(args)
        with contextlib.ExitStack() as stack:
            rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 writes the output
            if getattr(args, "out", None) and args.command not in ("run", "demo") and rank0:
                stack.enter_context(output_lock(args.out, "dir" if args.command in DIR_OUTPUTS else "file"))
            if args.quiet:
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            else:
                from ..console import activity

                stack.enter_context(activity(f"tvsprune {label}"))
            code = args.func(args)
    except TvsError as e:
        return failed(str(e), e.exit_code)
    except OSError as e:  # the environment, not a bug: unwritable output, disk full, missing file
        what = f"cannot use {e.filename}: " if e.filename else ""
        return failed(f"{what}{e.strerror or e}", 1)
    except Terminated:
        return failed("terminated (SIGTERM); no partial output was kept", 143)
    except KeyboardInterrupt:
        return failed("interrupted; no partial output was kept", 130)
    except Exception as e:  # anything else is a bug in tvsprune: one line, the traceback to the log file
        return failed(_internal_error(e, args.log_file), EXIT_SOFTWARE)
    status = "PASSED" if code == 0 else "FAILED"
    print(f"{status} | {label} | {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return code



__all__ = ["bench_options", "build_parser", "data_options", "main", "prune_options"]
