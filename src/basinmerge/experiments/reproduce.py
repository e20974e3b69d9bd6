"""`basinmerge reproduce`: run every study suite and assemble one report.

Writes, under the output folder: one sub-folder per suite (its result.json, result.md and
PNGs), ``report.md`` (figures linked from the sub-folders) and ``report.html`` (self-contained,
figures inlined), with the exact commands, versions, seeds and machine.
"""

from __future__ import annotations

import importlib
import inspect
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from basinmerge import io
from basinmerge.console import console
from basinmerge.errors import ConfigError
from basinmerge.experiments import SUITES
from basinmerge.experiments.common import ExperimentResult, check_scale, environment, write_result
from basinmerge.report import figure_png, html_report, markdown_report


def run_suites(*, scale: str = "quick", out: str | Path = "report", dataset: str | None = None,
               device: str = "cpu", seed: int = 0, suites: Sequence[str] | None = None,
               seeds: int | None = None, command: str | None = None) -> dict:
    """Run the chosen suites (all by default) and write the combined report; returns the
    paths written and the results.

    `seeds`: seeds per suite; by default 1 at the smoke and quick scales (so that quick fits
    in about 20 minutes on 2 CPU cores; the tables in docs/results.md use 3-5 seeds, run suite
    by suite) and each suite's own default at full scale."""
    check_scale(scale)
    names = list(suites) if suites else list(SUITES)
    for n in names:
        if n not in SUITES:
            raise ConfigError(f"unknown suite '{n}'; choose from {', '.join(SUITES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[ExperimentResult] = []
    pngs: dict[str, dict[str, bytes]] = {}
    t0 = time.perf_counter()
    for n in names:
        console.rule(f"[bold]{n}[/] ({scale})")
        mod = importlib.import_module(SUITES[n])
        wanted = {"scale": scale, "device": device, "seed": seed, "out": out / n,
                  "seeds": seeds if seeds is not None else (None if scale == "full" else 1)}
        if dataset is not None:
            wanted["dataset"] = dataset
        # Every suite takes scale/device/out/dataset; a base seed only where the suite has one
        # (the others use their fixed seeds 0..N-1, so a re-run reproduces the same numbers).
        accepted = inspect.signature(mod.run).parameters
        res = mod.run(**{k: v for k, v in wanted.items() if k in accepted and v is not None})
        if not res.command:
            res.command = f"basinmerge experiment {n} --scale {scale}"
        pngs[res.name] = {k: figure_png(f) for k, f in res.figures.items()}
        write_result(res, out / n)
        results.append(res)
    header = {
        "command": command or "basinmerge " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "scale": scale, "seed": seed, "device": device,
        "seeds per suite": seeds if seeds is not None else ("suite default" if scale == "full" else 1),
        "machine": f"{platform.node()} {platform.machine()} ({platform.processor() or 'cpu'})",
        **{k: v for k, v in environment().items() if k != "date"},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "total time": f"{time.perf_counter() - t0:.0f} s",
    }
    title = f"basinmerge reproduction report ({scale})"
    md = markdown_report(title, results, header=header,
                         figure_dirs={r.name: n for r, n in zip(results, names, strict=True)})
    html = html_report(title, results, header=header, figures=pngs)
    md_path = io.write_text(out / "report.md", md)
    html_path = io.write_text(out / "report.html", html)
    return {"markdown": md_path, "html": html_path, "results": results}
