"""`basinmerge run RECIPE.yaml`: a merge (or an alignment) written down as a recipe."""

from __future__ import annotations

from pathlib import Path

import typer

from basinmerge.cli.app import app
from basinmerge.console import console


@app.command("run")
def run_cmd(
    recipe: Path = typer.Argument(..., help="Recipe file (YAML; see `basinmerge.recipe`)."),
    check: bool = typer.Option(False, "--check", help="Validate the recipe, print it with its "
                               "defaults resolved, and exit without running."),
) -> None:
    """Run a merge recipe: models, base, method and options (per-tensor overrides by name
    pattern), optional alignment and data, output path and format. It runs through the same
    merge engine as `basinmerge merge` (member guard, BatchNorm policy, atomic output); the
    output records the recipe in its metadata."""
    from basinmerge import recipe as recipe_mod

    rec = recipe_mod.load(recipe)
    if check:
        typer.echo(rec.to_yaml(), nl=False)
        return
    if rec.method is None:  # an alignment alone
        console.print(f"saved {rec.run()}")
        return
    from basinmerge.cli.merge import _print_result

    _print_result(rec.merge(), rec.data.spec if rec.data is not None else None)
