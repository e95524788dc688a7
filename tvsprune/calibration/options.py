"""``CalibrateOptions``: how calibrate turns activations into moments."""
from __future__ import annotations

from pydantic import field_validator

from ..errors import TvsError
from ..options import Options, one_of

RESOLUTIONS = ("global", "pool:K", "full")
POOL_MAX = 64  # pool:K: at most 64 x 64 windows per filter


def parse_resolution(resolution: str) -> tuple[str, int]:
    """``global`` -> ("global", 1); ``pool:K`` -> ("pool", K); ``full`` -> ("full", 0)."""
    if resolution in ("global", "full"):
        return resolution, 1 if resolution == "global" else 0
    if resolution.startswith("pool:"):
        try:
            k = int(resolution[5:])
        except ValueError:
            k = 0
        if 1 <= k <= POOL_MAX:
            return "pool", k
        if k > POOL_MAX:
            raise TvsError(f"resolution {resolution!r}: K is at most {POOL_MAX} ({POOL_MAX * POOL_MAX} features per "
                           "filter); use a smaller K or full")
    raise TvsError(f"unknown resolution {resolution!r} (use global, pool:K or full)")


class CalibrateOptions(Options):
    # pool:4 is what the accuracy benchmark measured; the collector's default is this one too
    resolution: str = "pool:4"
    layers: str | None = None  # comma-separated globs of layer names; None: every prunable layer
    device: str = "cpu"

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, v: str) -> str:
        try:
            parse_resolution(v)
        except TvsError as e:
            if "at most" in str(e):  # pool:K with K too large: the bound, as parse_resolution says it
                raise ValueError(str(e)) from None
            if v.startswith("pool"):
                raise ValueError(f"unknown resolution {v!r} (did you mean 'pool:4'? valid: global, pool:K "
                                 "with K >= 1, full)") from None
            one_of(v, ("global", "pool:4", "full"), "resolution")
        return v


DEFAULT_RESOLUTION: str = CalibrateOptions.default("resolution")
