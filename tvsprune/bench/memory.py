"""Memory footprint: peak resident set size of this process around an inference run."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int | None:
    return _status("VmRSS")


@contextmanager
def peak_rss() -> Iterator[dict[str, int | None]]:
    """Peak RSS (bytes) of the process during the block.

    Resets the kernel's high-water mark (``/proc/self/clear_refs``) when allowed, else
    samples VmRSS every millisecond in a thread.
    """
    out: dict[str, int | None] = {"before": current_rss(), "peak": None}
    reset = False
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        pass
    stop = threading.Event()
    sampled = [out["before"] or 0]

    def sample() -> None:
        while not stop.is_set():
            sampled[0] = max(sampled[0], current_rss() or 0)
            time.sleep(0.001)

    t = None if reset else threading.Thread(target=sample, daemon=True)
    if t:
        t.start()
    try:
        yield out
    finally:
        stop.set()
        if t:
            t.join()
        out["peak"] = _status("VmHWM") if reset else sampled[0]
        out["method"] = "VmHWM after clear_refs" if reset else "VmRSS sampling"  # type: ignore[assignment]
