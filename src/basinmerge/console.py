"""Terminal output: one rich console, progress bars that can be silenced, and tables."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

T = TypeVar("T")

console = Console(stderr=False)
err_console = Console(stderr=True)

_quiet = os.environ.get("BASINMERGE_QUIET", "") not in ("", "0")


def set_quiet(quiet: bool) -> None:
    """Silence (or re-enable) progress bars globally."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    return _quiet


def make_progress(transient: bool = True) -> Progress:
    # 4 redraws a second instead of rich's 10: each redraw costs ~1 ms of CPU in a background
    # thread that competes for the GIL, which showed as a few percent of a training epoch.
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=transient,
        disable=_quiet,
        refresh_per_second=4,
    )


@contextmanager
def progress_task(description: str, total: int | None, enabled: bool = True) -> Iterator[Any]:
    """A context manager yielding `advance(n=1, **fields)`; nothing is drawn when disabled."""
    if not enabled or _quiet:
        yield lambda n=1, **fields: None
        return
    with make_progress() as prog:
        task = prog.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields: Any) -> None:
            info = "  ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
            prog.update(task, advance=n, info=info)

        yield advance


def track(items: Iterable[T], description: str, total: int | None = None,
          enabled: bool = True) -> Iterator[T]:
    """Iterate with a progress bar."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_task(description, total, enabled) as advance:
        for item in items:
            yield item
            advance()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """A rich table; floats are formatted to 4 significant digits."""
    t = Table(title=title, show_lines=False)
    for c in columns:
        t.add_column(str(c))
    for r in rows:
        t.add_row(*[_fmt(v) for v in r])
    return t


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """The same table as GitHub markdown."""
    lines = ["| " + " | ".join(map(str, columns)) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(v) for v in r) + " |")
    return "\n".join(lines) + "\n"
