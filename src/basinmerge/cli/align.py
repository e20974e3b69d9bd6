"""`basinmerge align` (permutation alignment of two checkpoints) and `basinmerge experiment
rebasin` (the Git Re-Basin study)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import typer

from basinmerge import adapter, datasource, io
from basinmerge.align import METHODS
from basinmerge.cli.app import app, experiment_app
from basinmerge.cli.common import (
    DATA_HELP,
    DATA_ROOT_OPT,
    DATASET_HELP,
    DEVICE_OPT,
    FORCE_OPT,
    FORMAT_OPT,
    LIKE_OPT,
    MAX_SHARD_OPT,
    PRINT_RECIPE_OPT,
    SEQ_LEN_OPT,
    TOKENIZER_OPT,
    check_file_out,
    check_run_out,
    command_line,
    data_record,
    on_interrupt,
    print_table,
)
from basinmerge.console import console
from basinmerge.errors import ConfigError
from basinmerge.merge.engine import AlignResult, align_checkpoints


@app.command("align")
def align_cmd(
    model_a: Path = typer.Argument(..., help="Reference checkpoint A (left unchanged)."),
    model_b: Path = typer.Argument(..., help="Checkpoint B, whose hidden units are permuted toward A."),
    method: str = typer.Option("weight", "--method", help="weight (data-free), activation or ste."),
    data: str = typer.Option(None, "--data", "--dataset", help=DATA_HELP + " Needed by "
                             "activation and ste; with it, A, B and their midpoints are "
                             "evaluated (on a dataset's test split, else on the data itself)."),
    out: Path = typer.Option(..., "--out", "-o", help="Aligned B to write (.safetensors)."),
    statistic: str = typer.Option("corr", "--statistic", help="Activation matching: corr or ols."),
    steps: int = typer.Option(100, "--steps", help="STE: optimizer steps."),
    lr: float = typer.Option(1e-3, "--lr", help="STE: Adam learning rate."),
    seed: int = typer.Option(0, "--seed", help="Seed of the matching (visiting order, batches) "
                             "and of the data subset."),
    max_iter: int = typer.Option(100, "--max-iter", help="Weight matching: most sweeps."),
    train_limit: int = typer.Option(5000, "--train-limit", help="Examples (a random subset) used "
                                    "for statistics, STE and BN reset."),
    eval_limit: int = typer.Option(None, "--eval-limit", help="Evaluate on this many examples."),
    seq_len: int = SEQ_LEN_OPT,
    tokenizer: str = TOKENIZER_OPT,
    like: Path = LIKE_OPT,
    out_format: str = FORMAT_OPT,
    max_shard_mib: float = MAX_SHARD_OPT,
    force: bool = FORCE_OPT,
    print_recipe: bool = PRINT_RECIPE_OPT,
    root: str | None = DATA_ROOT_OPT,
    device: str = DEVICE_OPT,
) -> None:
    """Permute B's hidden units to match A's (Git Re-Basin); B's function is unchanged.
    Checkpoints may be basinmerge files, HF model folders or bare files with --like; the
    output takes B's form."""
    if method not in METHODS:
        raise ConfigError(f"unknown --method '{method}'; choose one of {', '.join(METHODS)}")
    if method != "weight" and data is None:
        raise ConfigError(f"--method {method} needs --data (a data spec)")
    from basinmerge import recipe as recipe_mod  # pydantic: only when run

    options: dict[str, Any] = {"seed": seed, "max_iter": max_iter, "activation_method": statistic,
               "num_examples": train_limit, "steps": steps, "lr": lr}
    record = data_record(data, examples=train_limit, seed=seed, seq_len=seq_len,
                         tokenizer=tokenizer, root=root)
    rec = recipe_mod.validate({
        "models": [str(model_a), str(model_b)], "method": None,
        "align": {"method": method, "options": options}, "data": record,
        "like": None if like is None else str(like), "device": device,
        "output": {"path": str(out), "format": out_format, "force": force,
                   "max_shard_mib": max_shard_mib}}, "align")
    if print_recipe:
        typer.echo(rec.to_yaml(), nl=False)
        return
    fmt = None if out_format == "auto" else out_format
    if io.output_format(model_b, fmt) == "hf":
        io.check_output(out, folder=True, overwrite=force,
                        overwrite_hint="choose another --out, or pass --force to replace it")
    else:
        check_file_out(out, (".safetensors", *io.PT_SUFFIXES))
    train = test = None
    evaluated_on = "test"
    if data is not None:
        train, test = datasource.train_test(data, n=train_limit, seed=seed, seq_len=seq_len,
                                            tokenizer=tokenizer, root=root, model=model_a)
        if test is None:
            test, evaluated_on = train, "data"
        if eval_limit is not None and eval_limit < len(test):
            test = adapter.as_data(test, "evaluation data", limit=eval_limit)
    res = align_checkpoints(model_a, model_b, method, data=train, eval_data=test, options=options,
                            like=like, device=device, out=out, out_format=fmt, force=force,
                            max_shard_mib=max_shard_mib, meta={"recipe": rec.to_dict()})
    _print_alignment(res, model_a, model_b, evaluated_on)
    console.print(f"saved {res.out}")


def _print_alignment(res: AlignResult, model_a: Path, model_b: Path, on: str) -> None:
    """The alignment's table; `on` names the evaluation data (``test`` split or ``data``)."""
    rows: list[list[Any]] = [["method", res.method], ["permutations", res.permutations],
                             ["seconds", res.seconds], ["⟨θ_A, θ_B⟩ before", res.objective_before],
                             ["⟨θ_A, π(θ_B)⟩ after", res.objective_after],
                             ["max |Δ logits| B vs aligned B", res.drift]]
    if res.sweeps is not None:
        rows.insert(2, ["sweeps", res.sweeps])
    met = res.metrics
    if met:
        rows += [[f"{on} acc A / B", f"{met['a']['accuracy']:.4f} / {met['b']['accuracy']:.4f}"],
                 [f"midpoint {on} loss naive / aligned",
                  f"{met['naive']['loss']:.4f} / {met['aligned']['loss']:.4f}"],
                 [f"midpoint {on} acc naive / aligned",
                  f"{met['naive']['accuracy']:.4f} / {met['aligned']['accuracy']:.4f}"]]
    print_table(f"align {model_b.name} to {model_a.name}", ["", "value"], rows)


def _study(name: str, run, *, dataset: str, scale: str, seeds: int | None, device: str,
           out: Path, force: bool) -> None:
    """Run a study suite whose options are --dataset/--scale/--seeds/--device: the output
    folder checked first, Ctrl-C explained, the exact command recorded in the result."""
    from basinmerge.experiments.common import print_result, write_result

    check_run_out(out, force)
    on_interrupt(f"nothing was saved (the study writes {out} when it ends). Run again: "
                 f"{command_line()}")
    result = run()
    args = ["--dataset", dataset, "--scale", scale]
    args += ["--seeds", str(seeds)] if seeds is not None else []
    args += ["--device", device] if device != "cpu" else []
    args += ["--out", str(out)]
    result.command = f"basinmerge experiment {name} " + " ".join(shlex.quote(a) for a in args)
    print_result(result)
    write_result(result, out)
    console.print(f"wrote {out}/result.md ({result.seconds:.0f} s)")


@experiment_app.command("rebasin")
def rebasin_cmd(
    dataset: str = typer.Option("fashion-mnist", "--dataset", "-d", help=DATASET_HELP),
    scale: str = typer.Option("quick", "--scale", help="smoke (seconds), quick (~15 min on 2 CPU "
                              "cores), full (paper-sized, for a GPU)."),
    seeds: int = typer.Option(None, "--seeds", help="Pairs of models per MLP width (default: 1 "
                              "smoke, 2 quick, 3 full)."),
    out: Path = typer.Option(Path("results/rebasin"), "--out", "-o", help="Output folder."),
    root: str | None = DATA_ROOT_OPT,
    device: str = DEVICE_OPT,
    force: bool = FORCE_OPT,
) -> None:
    """Barriers between independently trained models: naive vs weight, activation and STE
    matching, each with and without BN reset / REPAIR; barrier against width; MergeMany."""
    from basinmerge.experiments import rebasin

    _study("rebasin", lambda: rebasin.run(dataset=dataset, scale=scale, seeds=seeds,
                                          device=device, root=root),
           dataset=dataset, scale=scale, seeds=seeds, device=device, out=out, force=force)


@experiment_app.command("transformers")
def transformers_cmd(
    dataset: str = typer.Option("fashion-mnist", "--dataset", "-d", help=DATASET_HELP + " (the ViTs'; "
                                "the LMs and MLMs read the Python standard library's source)"),
    scale: str = typer.Option("quick", "--scale", help="smoke (seconds), quick (~15 min on 2 CPU "
                              "cores), full (for a GPU)."),
    seeds: int = typer.Option(None, "--seeds", help="Pairs of models per family (default: 1 "
                              "smoke and quick, 3 full)."),
    out: Path = typer.Option(Path("results/transformers"), "--out", "-o", help="Output folder."),
    root: str | None = DATA_ROOT_OPT,
    device: str = DEVICE_OPT,
    force: bool = FORCE_OPT,
) -> None:
    """Barriers between independently trained ViTs, GPT-2-style LMs and BERT-style MLMs: naive
    vs weight (with restarts, from activation matching), activation and orthogonal alignment
    (not for post-LN BERT), activation matching + LayerNorm REPAIR; MergeMany of ViTs; WSA on
    ViTs."""
    from basinmerge.experiments import transformers

    _study("transformers", lambda: transformers.run(dataset=dataset, scale=scale, seeds=seeds,
                                                    device=device, root=root),
           dataset=dataset, scale=scale, seeds=seeds, device=device, out=out, force=force)
