"""Terminal output for the CLI only: progress bars and tables (library code only logs)."""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Sequence


@contextmanager
def progress_bar(desc: str, unit: str = "img", total: int | None = None) -> Iterator[Any]:
    """A tqdm bar on stderr showing items/s (a terminal only); yields an object with
    ``update(n)`` and ``total``. In a pipe the activity's heartbeat line carries the counts."""
    from tqdm import tqdm

    from tqdm.contrib.logging import logging_redirect_tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
               disable=None, mininterval=0.5, leave=False)
    counted = _Counted(bar, unit)
    _state["count"] = counted
    try:
        with logging_redirect_tqdm():  # a log line prints above the bar, not onto it
            yield counted
    finally:
        _state["count"] = None
        bar.close()


class _Counted:
    """A tqdm bar that also keeps its count for the heartbeat (tqdm counts nothing when disabled)."""

    def __init__(self, bar: Any, unit: str) -> None:
        self.bar, self.unit, self.n, self.t0 = bar, unit, 0, time.monotonic()
        self.total: int | None = bar.total

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name == "total" and "bar" in self.__dict__:
            self.bar.total = value
            self.bar.refresh()

    def update(self, n: int = 1) -> None:
        self.n += n
        self.bar.update(n)

    def describe(self) -> str:
        rate = self.n / max(1e-9, time.monotonic() - self.t0)
        of = f"/{self.total:,}" if self.total else ""
        eta = f", about {(self.total - self.n) / rate:.0f} s left" if self.total and rate > 0 else ""
        return f"{self.n:,}{of} {self.unit} at {rate:.0f} {self.unit}/s{eta}"


_status: Any = None
_state: dict[str, Any] = {"outer": None, "inner": "", "count": None}
HEARTBEAT_S = float(os.environ.get("TVSPRUNE_HEARTBEAT_S", "10"))  # a pipe gets a progress line this often


def short_list(items: Sequence[Any], limit: int = 8) -> str:
    """'a, b, c' or, past ``limit`` items, 'a, b, ..., h and 992 more' (a log line stays one line)."""
    items = [str(i) for i in items]
    if len(items) <= limit:
        return ", ".join(items)
    return f"{', '.join(items[:limit])} and {len(items) - limit} more"


@contextmanager
def activity(title: str) -> Iterator[None]:
    """Progress of a long command on stderr: a spinner naming the current step on a terminal,
    and in a pipe or CI log one line at least every HEARTBEAT_S seconds with the step, the
    elapsed time and the counts (-q gets nothing). Library code reports steps with :func:`step`
    and :func:`phase`."""
    global _status
    _state.update(outer=None, inner="", count=None)
    if not sys.stderr.isatty():
        stop = threading.Event()
        t0 = time.monotonic()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                print(f"... {title}: {_describe()} ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)

        thread = threading.Thread(target=beat, name="tvsprune-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
        return
    from rich.console import Console

    with Console(stderr=True).status(title) as st:
        _status = (st, title)
        try:
            yield
        finally:
            _status = None


def _describe() -> str:
    parts = [p for p in (_state["outer"], _state["inner"]) if p]
    if _state["count"] is not None:
        parts.append(_state["count"].describe())
    return ": ".join(parts) or "working"


def step(text: str) -> None:
    """Name the step a long operation is in: on the spinner or the heartbeat, and in the log (-v)."""
    import logging

    logging.getLogger("tvsprune.progress").info(text)
    _state["inner"] = text
    _refresh()


@contextmanager
def phase(text: str) -> Iterator[None]:
    """A step that holds smaller ones (``candidate 2/4``: its steps show after it)."""
    import logging

    logging.getLogger("tvsprune.progress").info(text)
    _state.update(outer=text, inner="")
    _refresh()
    try:
        yield
    finally:
        _state.update(outer=None, inner="")


def _refresh() -> None:
    if _status is not None:
        st, title = _status
        st.update(f"{title}: {_describe()}")


def print_table(rows: Sequence[dict[str, Any]], title: str | None = None, floatfmt: str = "{:.4g}",
                width: int | None = None, file: Any = None) -> None:
    """Render dict rows as a table on stdout (or ``file``, ``width`` columns wide)."""
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    table = Table(title=title, show_lines=False)
    keys: list[str] = []
    for row in rows:  # every key of every row, in first-seen order: values stay under their heading
        keys.extend(k for k in row if k not in keys)
    for key in keys:
        sample = next((r[key] for r in rows if r.get(key) is not None), None)
        table.add_column(str(key), justify="right" if isinstance(sample, (int, float)) else "left",
                         overflow="fold")  # a narrow terminal wraps a value, never cuts it to "…"
    for row in rows:
        table.add_row(*["" if row.get(k) is None else floatfmt.format(row[k]) if isinstance(row[k], float)
                        else str(row[k]) for k in keys])
    # a terminal gets its own width; a log file or pipe gets room for every column
    width = width or (max(100, Console().width) if sys.stdout.isatty() else 220)
    Console(width=width, file=file).print(table)
