"""The `basinmerge` command line (typer).

Errors a user can cause are printed as one line (``error: ...``) with a non-zero exit code; the
traceback is shown only with ``--debug`` (or ``BASINMERGE_DEBUG=1``).

The typer apps live in `basinmerge.cli.app`; each command group lives in its own module and
registers itself there (on `app`, or on `experiment_app` for the study suites) when imported at
the bottom of this file.
"""

from __future__ import annotations

import os
import sys

from rich.markup import escape

from basinmerge import threads
from basinmerge.cli.app import app, experiment_app
from basinmerge.console import err_console


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("BASINMERGE_DEBUG", "") not in ("", "0")


def _interrupted(common) -> None:
    """Ctrl-C: one line saying what was saved and the exact command that continues (or redoes)
    the work; the exit code is 130."""
    err_console.print(common.interrupt_message(), markup=False, highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning any error into one line unless --debug."""
    args = list(sys.argv[1:] if argv is None else argv)
    from basinmerge.cli import common

    common.invocation = ["basinmerge", *args]
    common.on_interrupt(None)
    threads.apply_default()
    try:
        app(args=args, prog_name="basinmerge", standalone_mode=True)
    except SystemExit as e:
        # typer turns a KeyboardInterrupt into a silent exit 130 (click's convention)
        if e.code == 130:
            _interrupted(common)
        raise
    except KeyboardInterrupt:
        _interrupted(common)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the one place every error is reported
        if _debug_requested(args):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        from basinmerge.errors import BasinmergeError

        prefix = "error" if isinstance(e, BasinmergeError) else f"error ({type(e).__name__})"
        # escape: the message may hold brackets ("[batch, layer]") that rich would eat as
        # markup; soft_wrap: one line however narrow the terminal (or 80 columns off a tty).
        err_console.print(f"[bold red]{prefix}:[/] {escape(msg)}", highlight=False, markup=True,
                          soft_wrap=True)
        err_console.print("[dim](run with --debug for the traceback)[/]")
        sys.exit(1)


# Command groups register themselves on import (on the apps of `basinmerge.cli.app`).
from basinmerge.cli import align, connectivity, core, demo, fl, merge, recipe, scope  # noqa: E402,F401,I001

__all__ = ["app", "experiment_app", "main"]
