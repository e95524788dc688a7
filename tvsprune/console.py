"""Terminal output for the CLI only: progress bars and tables (library code only logs)."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterator, Sequence


@contextmanager
def progress_bar(desc: str, unit: str = "img", total: int | None = None) -> Iterator[Any]:
    """A tqdm bar on stderr showing items/s; yields an object with ``update(n)`` and ``total``."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
               disable=None, mininterval=0.5, leave=False)
    try:
        yield bar
    finally:
        bar.close()


_status: Any = None


def short_list(items: Sequence[Any], limit: int = 8) -> str:
    """'a, b, c' or, past ``limit`` items, 'a, b, ..., h and 992 more' (a log line stays one line)."""
    items = [str(i) for i in items]
    if len(items) <= limit:
        return ", ".join(items)
    return f"{', '.join(items[:limit])} and {len(items) - limit} more"


@contextmanager
def activity(title: str) -> Iterator[None]:
    """A spinner on stderr naming the current step of a long command (only on a terminal;
    pipes, CI logs and -q get nothing). Library code reports steps with :func:`step`."""
    global _status
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(title) as st:
        _status = (st, title)
        try:
            yield
        finally:
            _status = None


def step(text: str) -> None:
    """Name the step a long operation is in: on the spinner when one is shown, and in the log (-v)."""
    import logging

    logging.getLogger("tvsprune.progress").info(text)
    if _status is not None:
        st, title = _status
        st.update(f"{title}: {text}")


def print_table(rows: Sequence[dict[str, Any]], title: str | None = None, floatfmt: str = "{:.4g}") -> None:
    """Render dict rows as a table on stdout."""
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
        table.add_column(str(key), justify="right" if isinstance(sample, (int, float)) else "left")
    for row in rows:
        table.add_row(*["" if row.get(k) is None else floatfmt.format(row[k]) if isinstance(row[k], float)
                        else str(row[k]) for k in keys])
    # a terminal gets its own width; a log file or pipe gets room for every column
    width = max(100, Console().width) if sys.stdout.isatty() else 220
    Console(width=width).print(table)
