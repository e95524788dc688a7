"""``tvsprune calibrate`` and ``tvsprune merge-moments``."""
from __future__ import annotations

import argparse
import logging
from typing import Any

from ..errors import TvsError
from .common import _device, add_data_args, add_model_args, data_options, defaults_from, loaded_model

log = logging.getLogger("tvsprune")



def _resolution(text: str) -> str:
    """global, pool:K (1 <= K <= 64) or full; anything else is a usage error."""
    from ..calibration.options import parse_resolution
    from ..errors import TvsError

    try:
        parse_resolution(text)
    except TvsError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text

def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..calibration import calibrate
    from ..calibration.options import CalibrateOptions
    from ..calibration.stage import moments_table
    from ..console import print_table, progress_bar, short_list
    from ..pruning.artifact import is_pruned_artifact

    if not args.weights and not args.allow_random_weights and not is_pruned_artifact(args.model):
        raise TvsError(f"no --weights given: {args.model} would be calibrated with its random initial weights; "
                       "give --weights, or --allow-random-weights if the model loads its own")
    opts, data = CalibrateOptions.from_args(args), data_options(args)  # checked before the model loads
    model = loaded_model(args)
    with progress_bar("calibrate") as bar:
        moments = calibrate(model, data, args.out, opts.resolution, opts.layers, opts.device,
                            progress=bar.update, on_total=lambda n: setattr(bar, "total", n))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return 0
    print_table(moments_table(moments), title=f"moments at {args.resolution} ({moments.meta['samples']} images, "
                f"{moments.meta['elapsed_s']:.1f} s)")
    counts = moments.meta["class_counts"]
    print(f"classes: {len(counts)}; samples per class min {min(counts)} max {max(counts)}"
          + (f"; skipped files: {moments.meta['skipped']}" if moments.meta.get("skipped") else "")
          + (f"; EMPTY classes: {short_list(moments.meta['empty_classes'])}" if moments.meta.get("empty_classes") else ""))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def cmd_merge_moments(args: argparse.Namespace) -> int:
    from ..calibration import merge_moment_files

    m = merge_moment_files(args.inputs, args.out)
    print(f"merged {len(args.inputs)} files ({m.meta['samples']} samples) -> {args.out}")
    return 0


def register(sub: Any) -> None:
    from ..calibration.options import CalibrateOptions

    p = sub.add_parser("calibrate", help="collect class-conditional filter moments in one streaming pass")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--out", required=True, help="moments file to write (.safetensors)")
    p.add_argument("--resolution", type=_resolution, help="global | pool:K | full (default %(default)s)")
    p.add_argument("--layers", help="comma-separated globs of layer names (default: every prunable layer)")
    p.add_argument("--device", type=_device,
                   help="cpu or cuda[:N]; moments accumulate on that device (default %(default)s)")
    p.add_argument("--allow-random-weights", action="store_true",
                   help="calibrate without --weights (only for a model that loads its own weights)")
    defaults_from(p, CalibrateOptions)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("merge-moments", help="merge moments files collected on disjoint shards")
    p.add_argument("inputs", nargs="+", help="moments files of disjoint shards (same model, data preprocessing)")
    p.add_argument("--out", required=True, help="merged moments file to write")
    p.set_defaults(func=cmd_merge_moments)
