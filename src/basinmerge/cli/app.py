"""The typer apps of the `basinmerge` command line: `app` (the root) and `experiment_app` (the
study suites). Command modules register on them by importing this module; the package
`basinmerge.cli` imports the command modules, so nothing imports back up into the package."""

from __future__ import annotations

import typer

from basinmerge.console import set_quiet

app = typer.Typer(
    name="basinmerge",
    help="Merge neural networks: weight scope alignment, permutation alignment, soft merging, "
         "merge baselines, interpolation analysis and federated learning.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
experiment_app = typer.Typer(help="Run a study suite; each writes JSON, markdown and PNG to --out.",
                             no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")


def _version_callback(value: bool) -> None:
    if value:
        from basinmerge import __version__

        typer.echo(f"basinmerge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    # --debug is read by `main` from the arguments themselves; it is not stored in os.environ,
    # which would make every later in-process call (tests, notebooks) show tracebacks too.
    if quiet:
        set_quiet(True)
