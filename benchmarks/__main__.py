"""`make bench`: run every benchmarks/bench_*.py (or those named) and rebuild docs/benchmarks.md.

Each module has `run() -> str`, returning a markdown section (starting with a `## ` heading and
naming the command that produced it). Sections are kept in benchmarks/results/<module>.md, so
running one benchmark refreshes only its own section.
"""

from __future__ import annotations

import importlib
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOC = HERE.parent / "docs" / "benchmarks.md"


def machine() -> str:
    try:
        import os
        cores = os.cpu_count()
    except Exception:  # pragma: no cover
        cores = "?"
    return (f"Python {platform.python_version()}, torch {torch.__version__}, "
            f"{cores} CPU cores, {torch.get_num_threads()} torch threads by default (a benchmark "
            f"that sets its own says so above), {platform.machine()}")


def assemble() -> None:
    parts = ["# Benchmarks\n",
             "Measured with `make bench` (all) or `.venv/bin/python -m benchmarks bench_NAME` (one).",
             "Speeds are ratios against a plain baseline run in the same process; absolute times "
             "depend on the machine.\n"]
    for f in sorted(RESULTS.glob("*.md")):
        parts.append(f.read_text(encoding="utf-8").rstrip() + "\n")
    from basinmerge.io import write_text

    write_text(DOC, "\n".join(parts))


# Run on their own, not by `make bench`: bench_gpu needs a GPU machine (its section is written by
# `benchmarks/bench_gpu.py` itself into its --out folder, to be copied into results/).
MANUAL = {"bench_gpu"}


def main(argv: list[str]) -> int:
    if argv == ["--assemble"]:  # rebuild docs/benchmarks.md from results/ only
        assemble()
        print(f"wrote {DOC}")
        return 0
    names = argv or sorted(p.stem for p in HERE.glob("bench_*.py") if p.stem not in MANUAL)
    manual = [n for n in names if n in MANUAL]
    if manual:
        print(f"{manual[0]} runs on its own: PYTHONPATH=src python benchmarks/{manual[0]}.py --help")
        return 2
    for name in names:
        mod = importlib.import_module(f"benchmarks.{name}")
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        section = mod.run()
        stamp = f"\n_Machine: {machine()}; ran {time.strftime('%Y-%m-%d')} in {time.perf_counter() - t0:.0f} s._\n"
        from basinmerge.io import write_text

        write_text(RESULTS / f"{name}.md", section.rstrip() + "\n" + stamp)
        print(section)
    assemble()
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
