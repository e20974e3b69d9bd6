"""`basinmerge align` (permutation alignment of two checkpoints) and `basinmerge experiment
rebasin` (the Git Re-Basin study)."""

from __future__ import annotations

import copy
import shlex
import time
from pathlib import Path
from typing import Any

import torch
import typer

from basinmerge import checks, io
from basinmerge import train as train_mod
from basinmerge.align import METHODS, find_permutation, objective, permuted_copy
from basinmerge.cli.app import app, experiment_app
from basinmerge.cli.common import (
    DATA_ROOT_OPT,
    DATASET_HELP,
    DEVICE_OPT,
    FORCE_OPT,
    FORMAT_OPT,
    LIKE_OPT,
    MAX_SHARD_OPT,
    PRINT_RECIPE_OPT,
    check_file_out,
    check_run_out,
    command_line,
    load_splits,
    on_interrupt,
    print_table,
)
from basinmerge.console import console
from basinmerge.errors import ConfigError
from basinmerge.state import check_compatible, lerp


def _midpoint(a, b, train, test) -> dict:
    net = copy.deepcopy(a)
    net.load_state_dict(lerp(a.state_dict(), b.state_dict(), 0.5))
    if train_mod.has_batchnorm(net):
        train_mod.reset_bn_stats(net, train)
    return train_mod.evaluate(net, test)


@app.command("align")
def align_cmd(
    model_a: Path = typer.Argument(..., help="Reference checkpoint A (left unchanged)."),
    model_b: Path = typer.Argument(..., help="Checkpoint B, whose hidden units are permuted toward A."),
    method: str = typer.Option("weight", "--method", help="weight (data-free), activation or ste."),
    data: str = typer.Option(None, "--data", help=DATASET_HELP + " Needed by activation and ste; "
                             "with it, A, B and their midpoints are evaluated."),
    out: Path = typer.Option(..., "--out", "-o", help="Aligned B to write (.safetensors)."),
    statistic: str = typer.Option("corr", "--statistic", help="Activation matching: corr or ols."),
    steps: int = typer.Option(100, "--steps", help="STE: optimizer steps."),
    lr: float = typer.Option(1e-3, "--lr", help="STE: Adam learning rate."),
    seed: int = typer.Option(0, "--seed", help="Seed of the matching (visiting order, batches)."),
    max_iter: int = typer.Option(100, "--max-iter", help="Weight matching: most sweeps."),
    train_limit: int = typer.Option(5000, "--train-limit", help="Training examples used for "
                                    "statistics, STE and BN reset."),
    eval_limit: int = typer.Option(None, "--eval-limit", help="Evaluate on this many test examples."),
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
        raise ConfigError(f"--method {method} needs --data (a dataset name)")
    from basinmerge import recipe as recipe_mod  # pydantic: only when run

    options: dict[str, Any] = {"seed": seed, "max_iter": max_iter, "activation_method": statistic,
               "num_examples": train_limit, "steps": steps, "lr": lr}
    rec = recipe_mod.validate({
        "models": [str(model_a), str(model_b)], "method": None,
        "align": {"method": method, "options": options},
        "data": None if data is None else {"dataset": data, "examples": train_limit,
                                           "root": root, "seed": seed},
        "like": None if like is None else str(like), "device": device,
        "output": {"path": str(out), "format": out_format, "force": force,
                   "max_shard_mib": max_shard_mib}}, "align")
    if print_recipe:
        typer.echo(rec.to_yaml(), nl=False)
        return
    if io.output_format(model_b, None if out_format == "auto" else out_format) == "hf":
        io.check_output(out, folder=True, overwrite=force,
                        overwrite_hint="choose another --out, or pass --force to replace it")
    else:
        check_file_out(out, (".safetensors", *io.PT_SUFFIXES))
    net_a, meta_a = checks.load_model(model_a, like=like)
    net_b, meta_b = checks.load_model(model_b, like=like)
    check_compatible([net_a.state_dict(), net_b.state_dict()], [str(model_a), str(model_b)])
    net_a, net_b = net_a.to(device), net_b.to(device)
    train = test = None
    if data is not None:
        train, test = load_splits(data, root, train_limit, seed)
        for net, meta, path in ((net_a, meta_a, model_a), (net_b, meta_b, model_b)):
            checks.check_data_fits(net, train, meta=meta, source=str(path))
        if eval_limit is not None and eval_limit < len(test):
            test = test.subset(eval_limit)
    t0 = time.perf_counter()
    perm, spec, info = find_permutation(net_a, net_b, method, train, **options)
    seconds = time.perf_counter() - t0
    aligned = permuted_copy(net_b, spec, perm)
    pa = {k: v.detach() for k, v in net_a.named_parameters()}
    before = objective(pa, {k: v.detach() for k, v in net_b.named_parameters()})
    after = objective(pa, {k: v.detach() for k, v in aligned.named_parameters()})
    drift = None
    if test is not None or isinstance(getattr(net_b, "config", None), dict):
        probe = (test.x[:64] if test is not None else
                 torch.randn(8, *net_b.config["in_shape"])).to(device)
        with torch.no_grad():
            drift = float((net_b.eval()(probe) - aligned.eval()(probe)).abs().max())
    rows: list[list[Any]] = [["method", method], ["permutations", len(spec.perms)], ["seconds", seconds],
            ["⟨θ_A, θ_B⟩ before", before], ["⟨θ_A, π(θ_B)⟩ after", after],
            ["max |Δ logits| B vs aligned B", drift]]
    if method == "weight":
        rows.insert(2, ["sweeps", info["sweeps"]])
    if test is not None:
        rows += [["test acc A / B", f"{train_mod.evaluate(net_a, test)['accuracy']:.4f} / "
                                    f"{train_mod.evaluate(net_b, test)['accuracy']:.4f}"]]
        naive, al = _midpoint(net_a, net_b, train, test), _midpoint(net_a, aligned, train, test)
        rows += [["midpoint test loss naive / aligned", f"{naive['loss']:.4f} / {al['loss']:.4f}"],
                 ["midpoint test acc naive / aligned",
                  f"{naive['accuracy']:.4f} / {al['accuracy']:.4f}"]]
    print_table(f"align {model_b.name} to {model_a.name}", ["", "value"], rows)
    meta = {**meta_b, "aligned_to": str(model_a), "recipe": rec.to_dict(),
            "alignment": {"method": method, "seconds": seconds, "objective_before": before,
                          "objective_after": after,
                          **({"sweeps": info["sweeps"]} if method == "weight" else {})}}
    io.save_like(aligned.cpu().state_dict(), out, model_b, meta,
                 fmt=None if out_format == "auto" else out_format, max_shard_mib=max_shard_mib,
                 force=force, inputs=[model_a])
    console.print(f"saved {out}")


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
