"""Terminal output: one rich console, progress bars that can be silenced, and tables."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

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
    """A context manager yielding `advance(n=1, **fields)`; nothing is drawn when disabled.

    On a terminal: a rich bar. Otherwise (a log file, a pipe, CI): plain lines on stderr, so a
    long run never sits silent: one per advance when `total` is small (stages, study cells),
    else one per finished ``epoch`` field or per tenth of the work, and one at the end."""
    if not enabled or _quiet:
        yield lambda n=1, **fields: None
        return
    if not err_console.is_terminal:
        with _plain_progress(description, total) as advance:
            yield advance
        return
    with make_progress() as prog:
        task = prog.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields: Any) -> None:
            prog.update(task, advance=n, info=_info(fields))

        yield advance


PLAIN_EVERY_ADVANCE = 100  # up to this many steps, each gets its own line when not on a terminal


@contextmanager
def _plain_progress(description: str, total: int | None) -> Iterator[Any]:
    t0 = time.perf_counter()
    state: dict[str, Any] = {"done": 0, "tenth": 0, "epoch": None, "last": None}

    def line(done: int, fields: dict) -> None:
        of = f"/{total}" if total else ""
        info = _info(fields)
        err_console.print(f"{description}: {done}{of}{'  ' + info if info else ''}  "
                          f"({time.perf_counter() - t0:.0f} s)", markup=False, highlight=False,
                          soft_wrap=True)
        state["last"] = done

    def advance(n: int = 1, **fields: Any) -> None:
        done = state["done"] = state["done"] + n
        if not total or total <= PLAIN_EVERY_ADVANCE:
            line(done, fields)
            return
        epoch = fields.get("epoch")
        tenth = done * 10 // total
        finished_epoch = (epoch is not None and state["epoch"] is not None
                          and epoch != state["epoch"])
        if finished_epoch:
            line(done - n, {**state["fields"]})
        elif epoch is None and tenth > state["tenth"]:
            line(done, fields)
        state["epoch"], state["fields"], state["tenth"] = epoch, fields, tenth

    yield advance
    if state["done"] and state["last"] != state["done"] and "fields" in state:
        line(state["done"], state["fields"])


def _info(fields: dict[str, Any]) -> str:
    return "  ".join(f"{k}={_fmt(v)}" for k, v in fields.items())


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
