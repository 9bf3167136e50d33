"""Everything the terminal sees. The only module that imports rich.

Human output (tables, lines, progress) goes to stdout, or to stderr when
``--json`` owns stdout; errors always go to stderr. Markup is never parsed in
text that comes from the user (paths, layer names, messages). Off a terminal
(a pipe, a file, CI logs) nothing is wrapped to a guessed width: tables are as
wide as their content and numbers are never split across lines.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

T = TypeVar("T")

#: Width of output that is not a terminal: wide enough that no table is ever wrapped.
WIDE = 100_000


class _Stream:
    """A rich Console for stdout or stderr, made when printing: the stream (and whether it is a terminal) may change."""

    def __init__(self, stderr: bool):
        self.stderr = stderr

    @property
    def console(self) -> Console:
        console = Console(stderr=self.stderr, markup=False, highlight=False, soft_wrap=True)
        if not console.is_terminal:
            console = Console(stderr=self.stderr, markup=False, highlight=False, soft_wrap=True, width=WIDE)
        return console

    @property
    def is_terminal(self) -> bool:
        return self.console.is_terminal

    def print(self, *objects: Any) -> None:
        self.console.print(*objects)


_out = _Stream(stderr=False)
_err = _Stream(stderr=True)


def use_stderr_for_humans(flag: bool) -> None:
    """With ``--json``, stdout carries the report alone; human output moves to stderr."""
    global _out
    _out = _Stream(stderr=flag)


def error(message: str) -> None:
    _err.print(Text("Error: ", style="bold red") + Text(message))


def warning(message: str) -> None:
    _err.print(Text("Warning: ", style="yellow") + Text(message))


def line(message: str, style: str | None = None) -> None:
    _out.print(Text(message, style=style or ""))


def success(message: str) -> None:
    line(message, style="green")


def failure(message: str) -> None:
    line(message, style="bold red")


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], caption: str | None = None) -> None:
    """A table of plain values; ``None`` renders as an empty cell."""
    t = Table(title=title, caption=caption, title_justify="left", caption_justify="left", expand=False)
    for column in columns:
        t.add_column(column, overflow="fold")
    for row in rows:
        t.add_row(*(Text("" if v is None else str(v)) for v in row))
    _out.print(t)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def progress(
    iterable: Iterable[T],
    *,
    total: int | None,
    description: str,
    enabled: bool = True,
    unit: str = "batches",
    samples: Any = None,
) -> Iterator[T]:
    """Wrap ``iterable`` in a progress bar (off when stderr is not a terminal or ``enabled`` is false).

    ``samples``, when given, is a callable returning how many samples have
    been seen so far; the bar then shows samples per second.
    """
    err = _err.console
    if not enabled or not err.is_terminal:
        yield from iterable
        return
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task(description, total=total, rate="")
        for item in iterable:
            yield item
            rate = ""
            if samples is not None:
                elapsed = bar.tasks[0].elapsed or 0.0
                rate = f"{samples() / elapsed:,.0f} samples/s" if elapsed > 0 else ""
            bar.update(task, advance=1, rate=rate)
