"""The main job: `basinmerge demo` (what `make demo` runs) and `basinmerge reproduce`."""

from __future__ import annotations

from pathlib import Path

import typer

from basinmerge import io
from basinmerge.cli.app import app
from basinmerge.console import console
from basinmerge.experiments.common import print_result, write_result


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Output folder."),
    dataset: str = typer.Option(None, "--dataset", "-d",
                                help="Dataset (default: fashion-mnist when installed, else mnist1d)."),
    scale: str = typer.Option("quick", "--scale", help="quick (minutes) or smoke (seconds, for tests)."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Every capability once on real data: scope mismatch, WSA, alignment, merging, federated."""
    from basinmerge.experiments import demo
    from basinmerge.report import markdown_report

    res = demo.run(out=out, dataset=dataset, scale=scale, seed=seed, device=device)
    write_result(res, out)
    report = io.write_text(out / "report.md", markdown_report("basinmerge demo", [res],
                                                              header=res.config))
    print_result(res)
    console.print(f"report: [bold]{report}[/] (figures and result.json beside it)")


@app.command("reproduce")
def reproduce_cmd(
    scale: str = typer.Option("quick", "--scale", help="smoke (a minute), quick (<= 20 min on 2 "
                                                      "CPU cores) or full (paper scale, for a GPU)."),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="Output folder."),
    dataset: str = typer.Option(None, "--dataset", "-d", help="Dataset for every suite (default: each suite's)."),
    device: str = typer.Option("cpu", "--device"),
    seed: int = typer.Option(0, "--seed", help="Base seed; the same seed reproduces the same numbers."),
    suite: list[str] = typer.Option([], "--suite", help="Run only these suites (repeatable)."),
    seeds: int = typer.Option(None, "--seeds", help="Seeds per suite (default: 1 at smoke/quick, "
                                                   "each suite's default at full)."),
) -> None:
    """Run every study suite and write report.md and a self-contained report.html."""
    from basinmerge.experiments.reproduce import run_suites

    paths = run_suites(scale=scale, out=out, dataset=dataset, device=device, seed=seed,
                       suites=suite or None, seeds=seeds)
    for r in paths["results"]:
        print_result(r)
    console.print(f"report: [bold]{paths['markdown']}[/] and [bold]{paths['html']}[/]")
