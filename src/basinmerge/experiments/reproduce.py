"""`basinmerge reproduce`: run every study suite and assemble one report.

Writes, under the output folder: one sub-folder per suite (its result.json, result.md and
PNGs), ``report.md`` (figures linked from the sub-folders) and ``report.html`` (self-contained,
figures inlined), with the exact commands, versions, seeds and machine.

``run.json`` in the output folder records the options; ``resume=True`` continues an interrupted
run with them (`resume_options`), reusing every suite whose ``result.json`` was written.
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

RUN_FILE = "run.json"
DEFAULTS = {"scale": "quick", "dataset": None, "device": "cpu", "seed": 0, "suites": None,
            "seeds": None}


def resume_options(folder: str | Path, given: dict) -> dict:
    """The options of the run in `folder` (its run.json), checked against the options `given`
    again (None: not given); one `ConfigError` naming every option that differs."""
    folder = Path(folder)
    if not (folder / RUN_FILE).is_file():
        raise ConfigError(f"{folder}: no {RUN_FILE}, so no reproduce run to resume there")
    stored = {**DEFAULTS, **io.read_json(folder / RUN_FILE).get("options", {})}
    differ = [f"{k}: the run used {stored[k]!r}, given {v!r}" for k, v in given.items()
              if v is not None and k in stored and _norm(v) != _norm(stored[k])]
    if differ:
        raise ConfigError(f"{folder}: options differ from the run being resumed ("
                          + "; ".join(differ) + ")")
    return {k: stored[k] for k in DEFAULTS}


def _norm(v):
    return list(v) if isinstance(v, tuple | list) else v


def finished_suites(out: str | Path) -> list[str]:
    """The suites of a run folder whose results are written (what a resume reuses)."""
    return [n for n in SUITES if (Path(out) / n / "result.json").is_file()]


def run_suites(*, scale: str = "quick", out: str | Path = "report", dataset: str | None = None,
               device: str = "cpu", seed: int = 0, suites: Sequence[str] | None = None,
               seeds: int | None = None, command: str | None = None,
               resume: bool = False) -> dict:
    """Run the chosen suites (all by default) and write the combined report; returns the
    paths written and the results. With `resume`, a suite whose result.json is in `out` is
    read back instead of run again.

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
    io.write_json(out / RUN_FILE, {"options": {"scale": scale, "dataset": dataset,
                                               "device": device, "seed": seed,
                                               "suites": list(suites) if suites else None,
                                               "seeds": seeds}})
    done = set(finished_suites(out)) if resume else set()
    results: list[ExperimentResult] = []
    pngs: dict[str, dict[str, bytes]] = {}
    t0 = time.perf_counter()
    for n in names:
        if n in done:
            res, png = ExperimentResult.from_folder(out / n)
            console.print(f"{n}: reusing the result written by the interrupted run")
            pngs[res.name] = png
            results.append(res)
            continue
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
