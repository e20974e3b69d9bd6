"""`python -m basinmerge` and the `basinmerge` script: the command line (`basinmerge.cli.main`).

Start-up: importing torch and the CLI allocates millions of long-lived objects, and Python's
cyclic garbage collector, triggered by allocation counts, walks all of them on every full
collection it starts meanwhile (about 0.1 s of a ``basinmerge --help``, measured:
benchmarks/bench_startup.py). Nothing imported is garbage, so `run` collects nothing while it
imports, then freezes what it imported (`gc.freeze`: later collections skip it) and turns the
collector back on before any command runs."""

from __future__ import annotations

import gc


def run() -> None:
    """The command line's entry point, with the collector held off during the imports."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        from basinmerge.cli import main
    finally:
        if enabled:
            gc.enable()
    gc.freeze()
    main()


if __name__ == "__main__":
    run()
