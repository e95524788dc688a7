"""What every command shares: flag types, model and data flags, the model they load."""
from __future__ import annotations

import argparse
from typing import Any, Callable



def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    """Comma-separated positive integers (batch sizes, shapes)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (1 for sizes and counts, 0 for worker processes)."""
    what = "a positive integer" if low == 1 else f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value
    return parse


_count, _nonneg = _int_at_least(1), _int_at_least(0)


def _side(text: str) -> int:
    """An image side in pixels: 1 .. MAX_SIDE (a resize to 100,000 would ask for 120 GB per image)."""
    from ..data.options import MAX_SIDE

    value = _count(text)
    if value > MAX_SIDE:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_SIDE} pixels, got {value}")
    return value


def _device(text: str) -> str:
    """A torch device name (cpu, cuda, cuda:N, mps, ...); whether it is present is checked where it is used."""
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:1, got {text!r}") \
            from None
    return text


def _limited(name: str) -> Callable[[str], float]:
    """An argparse type for the numeric option ``name``: a finite number within its limit
    (``tvsprune.pruning.options.LIMITS``, which the config checks too); else a usage error."""
    from ..pruning.options import LIMITS

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        try:
            return LIMITS[name].check("--" + name.replace("_", "-"), value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = name  # argparse names the type in its message
    return parse


def add_model_args(p: argparse.ArgumentParser, optional: str | None = None) -> None:
    """MODEL, --weights, --model-kwargs, --base-model; ``optional``: why MODEL may be left out."""
    p.add_argument("model", metavar="MODEL", nargs="?" if optional else None,
                   help="zoo name (resnet20, vgg11_bn, ...), file.py:Name, module:Name, "
                        "torchvision:NAME, timm:NAME, or a pruned artifact directory" + (f"; {optional}" if optional else ""))
    p.add_argument("--weights", help="checkpoint (.pt/.pth via torch.load(weights_only=True), or .safetensors)")
    p.add_argument("--model-kwargs", nargs="*", metavar="K=V",
                   help="keyword arguments for the model constructor (key=value pairs or one JSON object)")
    add_base_model_arg(p)


def add_base_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", metavar="SPEC",
                   help="for a pruned artifact whose base model is code (file.py:Name, module:Name) and that you did "
                        "not prune on this machine: the base model, named by you (the artifact's own record of it "
                        "is never run); default: none")


def defaults_from(p: argparse.ArgumentParser, *models: Any) -> None:
    """Every flag of ``p`` whose ``dest`` is a field of one of the options ``models`` gets
    that field's default (the one definition of it); help texts show it with %(default)s."""
    dests = {a.dest for a in p._actions}
    p.set_defaults(**{name: m.default(name) for m in models for name in m.model_fields if name in dests})


def add_data_args(p: argparse.ArgumentParser, required: bool = True, flag: str = "--data") -> None:
    g = p.add_argument_group("data")
    g.add_argument(flag, dest="data", required=required,
                   help="image folder (root/<class>/*.jpg), .npz with x and y (or images and labels), or CIFAR "
                        "python batches")
    g.add_argument("--split", choices=["train", "test"],
                   help="split for CIFAR batch folders and .npz files of both (train_images, test_images, ...; "
                        "default %(default)s)")
    g.add_argument("--samples-per-class", type=_count,
                   help="seeded stratified subset of N images per class (default: every image)")
    g.add_argument("--seed", type=_nonneg, help="seed for sampling (default %(default)s)")
    _add_image_flags(g)
    _data_defaults(p)


def _data_defaults(p: argparse.ArgumentParser) -> None:
    from ..data.options import DataOptions

    defaults_from(p, DataOptions)


def _add_image_flags(g: Any) -> None:
    """Resize, crop, normalisation and loading flags, shared by every command that reads images."""
    g.add_argument("--resize", type=_side, help="resize the shorter side to N pixels (default: no resize)")
    g.add_argument("--crop", type=_side, help="center-crop to N x N (default: no crop)")
    g.add_argument("--mean", type=_floats, help="normalisation mean, e.g. 0.485,0.456,0.406 (default: checkpoint's)")
    g.add_argument("--std", type=_floats, help="normalisation std (default: checkpoint's)")
    g.add_argument("--batch-size", type=_count, help="images per batch (default %(default)s)")
    g.add_argument("--workers", type=_nonneg, help="data-loading worker processes (default %(default)s)")
    g.add_argument("--skip-bad", action="store_true", help="skip and count undecodable files instead of failing")


def data_options(args: argparse.Namespace, path: str | None = None, **values: Any):
    """The DataOptions that a command's data flags describe, for ``--data`` or ``path``."""
    from ..data.options import DataOptions

    return DataOptions.from_args(args, path=path or args.data, **values)


def add_preprocess_args(p: argparse.ArgumentParser, what: str) -> None:
    """Preprocessing flags for commands whose data comes from other folders (--calib-data, --val-data)."""
    g = p.add_argument_group(f"preprocessing of {what} (default: as recorded in the moments file / checkpoint)")
    _add_image_flags(g)
    _data_defaults(p)


def loaded_model(args: argparse.Namespace):
    from ..models import load_model, parse_kwargs

    return load_model(args.model, args.weights, parse_kwargs(args.model_kwargs), getattr(args, "base_model", None))
