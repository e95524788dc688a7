"""The base of every stage's options model (``DataOptions``, ``CalibrateOptions``,
``PruneOptions``, ``ExportOptions``, ``BenchOptions``).

A stage's options are one strict pydantic model: unknown keys are refused, every choice
is a ``Literal`` or a registry check, every default is written once, on its field. The
TOML config's sections *are* these models, the CLI reads its defaults from them and
validates its flags into them (:meth:`Options.from_args`), and the Python API validates
its keywords with them (:meth:`Options.build`). Adding an option is one field here plus
its flag.
"""
from __future__ import annotations

import argparse
import difflib
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import TvsError
from .registry import unknown

O = TypeVar("O", bound="Options")


class Options(BaseModel):
    """A strict options model; construct it with :meth:`build` (or :meth:`from_args`) to get
    a :class:`TvsError` naming the key instead of pydantic's ValidationError."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def build(cls: type[O], **values: Any) -> O:
        """Validate ``values`` into the model; a bad or unknown key is one TvsError line."""
        try:
            return cls(**values)
        except ValidationError as e:
            raise TvsError(explain(e, cls)) from None

    @classmethod
    def from_args(cls: type[O], args: argparse.Namespace, **values: Any) -> O:
        """The model from a command's parsed flags: every field whose flag the command has
        (an argparse ``dest`` equal to the field's name), then ``values``. A refusal names
        the flags (``--target-flops``) and is a usage error (exit 64)."""
        given = {name: getattr(args, name) for name in cls.model_fields if hasattr(args, name)}
        try:
            return cls.build(**{**given, **values})
        except TvsError as e:
            flags = re.sub(r"\b(" + "|".join(sorted(given, key=len, reverse=True)) + r")\b",
                           lambda m: "--" + m.group(1).replace("_", "-"), str(e)) if given else str(e)
            raise TvsError(flags.replace("'--", "--").replace("': ", ": "), exit_code=64) from None

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field ``name`` (for a flag's ``default=``)."""
        field = cls.model_fields[name]
        return field.get_default(call_default_factory=True)


def _known_keys(model: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    cls: Any = model
    for part in loc[:-1]:
        field = cls.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        cls = field.annotation
    return list(cls.model_fields)


def explain(e: ValidationError, model: type[BaseModel]) -> str:
    """A pydantic error as this project's one-line wording: the key, and the closest valid
    key or value."""
    msgs = []
    for err in e.errors():
        loc = tuple(str(p) for p in err["loc"])
        dotted = ".".join(loc)
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc[-1], _known_keys(model, loc), n=1)
            hint = f" (did you mean '{'.'.join(loc[:-1] + (close[0],))}'?)" if close else ""
            msgs.append(f"unknown key '{dotted}'{hint}")
        elif err["type"] == "missing":
            msgs.append(f"missing key '{dotted}'")
        elif err["type"] == "literal_error":
            valid = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))
            msgs.append(f"'{dotted}': {unknown('value', err.get('input'), tuple(valid))}")
        elif not loc:
            msgs.append(err["msg"].removeprefix("Value error, "))
        else:
            msgs.append(f"'{dotted}': {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(msgs)


def one_of(value: str, valid: list[str] | tuple[str, ...], what: str) -> str:
    """``value`` if valid, else a ValueError naming the closest valid value."""
    if value in valid:
        return value
    raise ValueError(unknown(what, value, tuple(valid)))
