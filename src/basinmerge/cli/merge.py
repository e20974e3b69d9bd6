"""`basinmerge merge` and `basinmerge experiment merging`."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from basinmerge import datasource
from basinmerge.cli.app import app, experiment_app
from basinmerge.cli.common import (
    DATA_HELP,
    DATA_ROOT_OPT,
    DATASET_HELP,
    DEVICE_OPT,
    FORCE_OPT,
    FORMAT_OPT,
    JSON_OPT,
    LIKE_OPT,
    MAX_SHARD_OPT,
    PRINT_RECIPE_OPT,
    REPAIR_MODE_OPT,
    SEQ_LEN_OPT,
    TOKENIZER_OPT,
    comma_list,
    data_record,
    parse_kv,
    print_json,
    print_table,
)
from basinmerge.console import console, err_console
from basinmerge.errors import ConfigError
from basinmerge.merge.engine import MergeResult, merge_checkpoints
from basinmerge.merge.registry import MergeMethod, all_methods, get_method, methods
from basinmerge.recipe_record import plain_record


def _methods_epilog() -> str:
    """The methods and their options, from the registry (shown under `merge --help`)."""
    lines = ["Methods and their options (a list as 1,2,3):"]
    for m in all_methods():
        lines.extend(m.help_lines())
    return "\n\n".join(lines)  # typer's help keeps a paragraph per line


def _cli_options(method: MergeMethod, given: list[str]) -> dict[str, Any]:
    """``--opt key=value`` strings as the method's options (only those the command line can
    give; the registry checks names and types)."""
    opts = parse_kv(given)
    for k in opts:
        if k in method.options and not method.options[k].cli:
            raise ConfigError(f"merge method '{method.name}': option '{k}' takes a Python object "
                              "and cannot be given on the command line")
    return opts


@app.command("merge", epilog=_methods_epilog())
def merge_cmd(
    checkpoints: list[Path] = typer.Argument(..., help="Checkpoints to merge: .safetensors, HF "
                                             "model folders, .pt/.bin."),
    method: str = typer.Option("average", "--method", "-m",
                               help=f"Merge method: {', '.join(methods())} (options below)."),
    opt: list[str] = typer.Option(None, "--opt", "-O", help="A method option as NAME=VALUE "
                                  "(repeatable), e.g. --opt density=0.3; see the list below."),
    base: Path = typer.Option(None, "--base", help="Shared base checkpoint (methods marked "
                              "'needs base')."),
    out: Path = typer.Option(..., "--out", "-o", help="Merged checkpoint to write (a file, or a "
                             "folder for HF models)."),
    weights: str = typer.Option(None, "--weights", help="Comma-separated per-model weights "
                                "(average, weighted, fisher): the same as --opt weights=..."),
    data: str = typer.Option(None, "--data", "--dataset", "-d", help=DATA_HELP + " Data for "
                             "data-using methods and the BatchNorm reset; for a dataset named "
                             "without a split, the members' and the merge's test accuracy are "
                             "printed."),
    data_examples: int = typer.Option(2000, "--data-examples", help="Examples (a random subset) "
                                      "given to data-using methods and the BN reset."),
    data_seed: int = typer.Option(0, "--data-seed", help="Seed of that random subset."),
    seq_len: int = SEQ_LEN_OPT,
    tokenizer: str = TOKENIZER_OPT,
    stream: bool = typer.Option(None, "--stream/--no-stream", help="Stream tensor by tensor "
                                "(default: when the method allows and all inputs are safetensors)."),
    block_mib: float = typer.Option(1.0, "--block-mib", help="Streaming: MiB of a tensor read "
                                    "from each model at a time (coordinate-wise methods)."),
    reset_bn: bool = typer.Option(None, "--reset-bn/--no-reset-bn", help="Recompute BatchNorm "
                                  "statistics on the data after merging (default: whenever "
                                  "--data is given)."),
    align: str = typer.Option(None, "--align", help="Permute every member's hidden units onto "
                              "the first member's before merging: weight, activation or ste "
                              "(Git Re-Basin; activation and ste run on --data)."),
    repair: bool = typer.Option(False, "--repair", help="REPAIR the merge of two members "
                                "(average or weighted) on --data: each merged unit gets the "
                                "members' interpolated statistics."),
    repair_mode: str = REPAIR_MODE_OPT,
    strict: bool = typer.Option(False, "--strict", help="Stop with an error when the member guard "
                                "finds a member far outside the others' weight scope."),
    gates_out: Path = typer.Option(None, "--gates-out", help="soft: write the gate table (JSON) "
                                   "here (default: next to --out)."),
    root: str | None = DATA_ROOT_OPT,
    device: str = DEVICE_OPT,
    like: Path = LIKE_OPT,
    out_format: str = FORMAT_OPT,
    max_shard_mib: float = MAX_SHARD_OPT,
    force: bool = FORCE_OPT,
    print_recipe: bool = PRINT_RECIPE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Merge checkpoints with one method and save the result; the summary shows each member's
    scope distance (the member guard) and, with --data, test accuracies.

    Checkpoints may be basinmerge files, HF model folders (written as an HF folder, config and
    tokenizer from --base or the first model) or bare safetensors / .pt files; --data takes
    any data spec (a dataset, a datasets folder, a tensor file, a text corpus)."""
    if repair_mode != "auto" and not repair:
        raise ConfigError(f"--repair-mode {repair_mode} needs --repair")
    m = get_method(method)
    options = _cli_options(m, opt or [])
    parsed_weights = comma_list(weights, "--weights", float, "numbers")
    # the registry's own check first (its errors name the method and option), then the record
    m.check({**options, **({"weights": parsed_weights} if parsed_weights else {})},
            has_base=base is not None, has_data=data is not None and bool(m.needs_data),
            num_models=len(checkpoints))
    fields = {
        "models": [str(p) for p in checkpoints], "base": None if base is None else str(base),
        "method": method,
        "options": {**options, **({"weights": parsed_weights} if parsed_weights else {})},
        **({} if reset_bn is None else {"reset_bn": reset_bn}),
        "data": data_record(data, examples=data_examples, seed=data_seed, seq_len=seq_len,
                            tokenizer=tokenizer, root=root),
        **({"align": {"method": align}} if align is not None else {}),
        **({"repair": True if repair_mode == "auto" else repair_mode} if repair else {}),
        "like": None if like is None else str(like), "stream": stream, "block_mib": block_mib,
        "device": device, "strict": strict, "output": {"path": str(out), "format": out_format, "force": force,
                                     "max_shard_mib": max_shard_mib}}
    # a plain command line is recorded as is (its fields were checked above and are checked
    # again by the engine before any work); anything else, and --print-recipe, goes through
    # the recipe schema (pydantic: imported only then)
    record = None if print_recipe else plain_record(fields, m.streams)
    if record is None:
        from basinmerge import recipe as recipe_mod

        rec = recipe_mod.validate(fields, "merge")
        if print_recipe:
            typer.echo(rec.to_yaml(), nl=False)
            return
        record = rec.to_dict()
    train = test = None
    if data is not None:
        train, test = datasource.train_test(data, n=data_examples, seed=data_seed,
                                            seq_len=seq_len, tokenizer=tokenizer, root=root,
                                            model=base if base is not None else checkpoints[0])
    res = merge_checkpoints(checkpoints, method, base=base, options=options,
                            weights=parsed_weights, out=out, data=train, stream=stream,
                            block_mib=block_mib, device=device, reset_bn=reset_bn, strict=strict,
                            eval_data=test, gates_out=gates_out, like=like,
                            out_format=None if out_format == "auto" else out_format,
                            force=force, max_shard_mib=max_shard_mib,
                            align=None if align is None else {"method": align},
                            repair=record.get("repair", False), meta={"recipe": record})
    if as_json:
        report = res.to_dict()
        if test is not None:
            report["test_accuracy"] = {**{mem.name: mem.accuracy for mem in res.members},
                                       f"merged ({method})": res.accuracy}
        print_json(report)
        return
    _print_result(res, data)


def _print_result(res: MergeResult, dataset: str | None) -> None:
    cols = ["model", "scope distance", "worst layer", "flagged"]
    acc = res.accuracy is not None
    if acc:
        cols.append(f"test accuracy ({dataset})")
    rows = []
    for mem in res.members:
        row = [mem.name, round(mem.scope_distance, 2), mem.worst_layer or "-",
               "yes" if mem.flagged else "no"]
        rows.append(row + ([mem.accuracy] if acc else []))
    if acc:
        rows.append([f"merged ({res.method})", "", "", "", res.accuracy])
    print_table(f"merge: {res.method}" + (" (streamed)" if res.streamed else ""), cols, rows)
    gates = res.gates
    if gates is not None:
        print_table("soft merging gates (test time)", ["model", "mean gate", "closed (=0)", "open (=1)"],
                    [[r["model"], r["mean_gate"], r["closed"], r["open"]] for r in gates.model_summary()])
        console.print(f"gate table: {res.gates_path}")
    if res.bn != "none":
        console.print(f"BatchNorm statistics: {res.bn}")
    for w in res.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    console.print(f"saved {res.out}")


@experiment_app.command("merging")
def merging_cmd(
    dataset: str = typer.Option("fashion-mnist", "--dataset", "-d", help=DATASET_HELP),
    scale: str = typer.Option("quick", "--scale", help="smoke, quick or full."),
    seeds: int = typer.Option(None, "--seeds", help="Number of seeds (default: 1 smoke, 3 quick, "
                              "5 full)."),
    seed: int = typer.Option(0, "--seed", help="First seed."),
    out: Path = typer.Option(Path("runs/merging"), "--out", "-o", help="Output folder."),
    root: str | None = DATA_ROOT_OPT,
    device: str = DEVICE_OPT,
) -> None:
    """Every merge method vs the best single model and the ensemble, K = 4 class-skewed
    fine-tunes of one base, with and without a malicious member."""
    from basinmerge.experiments import merging
    from basinmerge.experiments.common import print_result, write_result

    result = merging.run(dataset=dataset, scale=scale, seeds=seeds, seed=seed, out=out,
                         device=device, root=root)
    result.command = (f"basinmerge experiment merging --dataset {shlex.quote(dataset)} "
                      f"--scale {scale} --seeds {result.config['seeds']} --seed {seed} "
                      f"--out {shlex.quote(str(out))}")
    write_result(result, out)
    print_result(result)
    console.print(f"results in {out}")
