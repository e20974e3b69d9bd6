"""The main job: `basinmerge demo` (what `make demo` runs) and `basinmerge reproduce`."""

from __future__ import annotations

from pathlib import Path

import typer

from basinmerge import io
from basinmerge.cli.app import app
from basinmerge.cli.common import FORCE_OPT, check_run_out, command_line, on_interrupt
from basinmerge.console import console
from basinmerge.errors import ConfigError
from basinmerge.experiments.common import print_result, write_result


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Output folder."),
    dataset: str = typer.Option(None, "--dataset", "-d",
                                help="Dataset (default: fashion-mnist when installed, else mnist1d)."),
    scale: str = typer.Option("quick", "--scale", help="quick (minutes) or smoke (seconds, for tests)."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device"),
    force: bool = FORCE_OPT,
) -> None:
    """Every capability once on real data: scope mismatch, WSA, alignment, merging, federated."""
    from basinmerge.experiments import demo
    from basinmerge.report import markdown_report

    check_run_out(out, force)
    on_interrupt(f"nothing was saved (the demo writes {out} when it ends). Run again: "
                 f"{command_line()}")

    res = demo.run(out=out, dataset=dataset, scale=scale, seed=seed, device=device)
    write_result(res, out)
    report = io.write_text(out / "report.md", markdown_report("basinmerge demo", [res],
                                                              header=res.config))
    print_result(res)
    console.print(f"report: [bold]{report}[/] (figures and result.json beside it)")


@app.command("reproduce")
def reproduce_cmd(
    scale: str = typer.Option(None, "--scale", help="smoke (a minute), quick (<= 20 min on 2 CPU "
                                                    "cores) or full (paper scale, for a GPU). "
                                                    "Default: quick."),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder (default: report)."),
    dataset: str = typer.Option(None, "--dataset", "-d", help="Dataset for every suite (default: each suite's)."),
    device: str = typer.Option(None, "--device", help="Torch device (default: cpu)."),
    seed: int = typer.Option(None, "--seed", help="Base seed; the same seed reproduces the same "
                                                  "numbers (default: 0)."),
    suite: list[str] = typer.Option([], "--suite", help="Run only these suites (repeatable)."),
    seeds: int = typer.Option(None, "--seeds", help="Seeds per suite (default: 1 at smoke/quick, "
                                                   "each suite's default at full)."),
    resume: Path = typer.Option(None, "--resume", help="Continue the interrupted run in this "
                                "folder with its own options (suites already written are reused)."),
    force: bool = FORCE_OPT,
) -> None:
    """Run every study suite and write report.md and a self-contained report.html."""
    from basinmerge.experiments.reproduce import (
        DEFAULTS,
        finished_suites,
        resume_options,
        run_suites,
    )

    given = {"scale": scale, "dataset": dataset, "device": device, "seed": seed,
             "suites": suite or None, "seeds": seeds}
    if resume is not None:
        if out is not None and Path(out) != Path(resume):
            raise ConfigError("--resume continues in its own folder; drop --out or give the same folder")
        opts, out = resume_options(resume, given), Path(resume)
    else:
        opts = {k: DEFAULTS[k] if v is None else v for k, v in given.items()}
        out = Path("report") if out is None else out
        check_run_out(out, force)

    def saved() -> str:
        done = finished_suites(out)
        what = (f"suites {', '.join(done)} are saved under {out}" if done
                else "no suite had finished, nothing was saved")
        return f"{what}. Resume: {command_line(['reproduce', '--resume', str(out)])}"

    on_interrupt(saved)
    paths = run_suites(scale=opts["scale"], out=out, dataset=opts["dataset"],
                       device=opts["device"], seed=opts["seed"], suites=opts["suites"],
                       seeds=opts["seeds"], resume=resume is not None)
    for r in paths["results"]:
        print_result(r)
    console.print(f"report: [bold]{paths['markdown']}[/] and [bold]{paths['html']}[/]")
