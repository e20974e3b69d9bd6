"""`basinmerge merge` and `basinmerge experiment merging`."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import typer

from basinmerge import io
from basinmerge import merge as merge_mod
from basinmerge import train as train_mod
from basinmerge.cli.app import app, experiment_app
from basinmerge.cli.common import (
    DATA_ROOT_OPT,
    DATASET_HELP,
    DEVICE_OPT,
    JSON_OPT,
    load_splits,
    print_json,
    print_table,
)
from basinmerge.console import console
from basinmerge.errors import ConfigError
from basinmerge.state import with_state

# CLI option name -> keyword of the merge functions; None values are "not given".
_METHOD_OPTIONS = ("weights", "density", "scale", "trim_mode", "drop", "then", "trim", "alpha",
                   "bias", "granularity", "steps", "lr", "lam", "units", "optimizer", "init",
                   "clip", "reference", "seed", "num_examples", "batch_size", "align")


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ConfigError(f"--weights must be comma-separated numbers, got '{text}'") from e


def _parse_units(text: str | None) -> str | list[str] | None:
    if text is None or text in ("tensor", "module"):
        return text
    return [u.strip() for u in text.split(",") if u.strip()]


def _parse_reference(text: str | None) -> Any:
    if text is None or text == "average":
        return text
    try:
        return int(text)
    except ValueError as e:
        raise ConfigError(f"--reference must be 'average' or a model index, got '{text}'") from e


def _method_options(method: merge_mod.Method, given: dict[str, Any]) -> dict[str, Any]:
    """The options the user gave, checked against what the method accepts."""
    accepted = set(method.options())
    opts = {}
    for k, v in given.items():
        if v is None:
            continue
        if k not in accepted:
            raise ConfigError(f"--{k.replace('_', '-')} does not apply to method '{method.name}'")
        opts[k] = v
    return opts


@app.command("merge")
def merge_cmd(
    checkpoints: list[Path] = typer.Argument(..., help="Checkpoints to merge (.safetensors)."),
    method: str = typer.Option("average", "--method", "-m",
                               help=f"Merge method: {', '.join(merge_mod.methods())}."),
    base: Path = typer.Option(None, "--base", help="Shared base checkpoint (task_arithmetic, ties, "
                              "dare, adamerging)."),
    out: Path = typer.Option(..., "--out", "-o", help="Merged checkpoint to write (.safetensors)."),
    dataset: str = typer.Option(None, "--dataset", "-d", help=DATASET_HELP + " Data for data-using "
                                "methods and BN reset; the merged model's test accuracy is printed."),
    data_examples: int = typer.Option(2000, "--data-examples", help="Training examples (a random "
                                      "subset) given to data-using methods and the BN reset."),
    weights: str = typer.Option(None, "--weights", help="Comma-separated per-model weights "
                                "(average, weighted, fisher)."),
    density: float = typer.Option(None, "--density", help="TIES: fraction of each task vector kept."),
    scale: float = typer.Option(None, "--scale", help="task_arithmetic/ties/dare: task-vector scale."),
    trim_mode: str = typer.Option(None, "--trim-mode", help="TIES trimming: global (per model, "
                                  "paper) or tensor."),
    drop: float = typer.Option(None, "--drop", help="DARE drop probability."),
    then: str = typer.Option(None, "--then", help="DARE: task_arithmetic or ties afterwards."),
    trim: float = typer.Option(None, "--trim", help="trimmed_mean: fraction dropped at each end."),
    alpha: float = typer.Option(None, "--alpha", help="RegMean off-diagonal scale in [0, 1]."),
    bias: str = typer.Option(None, "--bias", help="RegMean: average or regress the biases."),
    granularity: str = typer.Option(None, "--granularity", help="AdaMerging: task or layer."),
    steps: int = typer.Option(None, "--steps", help="AdaMerging / soft: optimization steps."),
    lr: float = typer.Option(None, "--lr", help="AdaMerging / soft: learning rate."),
    lam: float = typer.Option(None, "--lam", help="soft: weight of the expected-L0 penalty."),
    units: str = typer.Option(None, "--units", help="soft: tensor, module, or comma-separated "
                              "parameter/module names."),
    optimizer: str = typer.Option(None, "--optimizer", help="soft: sgd or adam."),
    init: float = typer.Option(None, "--init", help="AdaMerging initial lambda / soft initial "
                               "gate log-alpha."),
    clip: float = typer.Option(None, "--clip", help="soft: gate-gradient clip value."),
    reference: str = typer.Option(None, "--reference", help="soft: 'average' or a model index for "
                                  "the units that are not gated."),
    seed: int = typer.Option(None, "--seed", help="DARE / AdaMerging / soft seed."),
    num_examples: int = typer.Option(None, "--num-examples", help="fisher / regmean: examples "
                                     "per model."),
    batch_size: int = typer.Option(None, "--batch-size", help="AdaMerging / soft batch size."),
    align: str = typer.Option(None, "--align", help="soft: permute every model's units onto the "
                              "first's first (weight or activation), for models from different "
                              "initializations."),
    stream: bool = typer.Option(None, "--stream/--no-stream", help="Stream tensor by tensor "
                                "(default: when the method allows and all inputs are safetensors)."),
    block_mib: float = typer.Option(1.0, "--block-mib", help="Streaming: MiB of a tensor read "
                                    "from each model at a time (coordinate-wise methods)."),
    reset_bn: bool = typer.Option(True, "--reset-bn/--no-reset-bn", help="Recompute BatchNorm "
                                  "statistics on the data after merging (needs --dataset)."),
    gates_out: Path = typer.Option(None, "--gates-out", help="soft: write the gate table (JSON) "
                                   "here (default: next to --out)."),
    root: str | None = DATA_ROOT_OPT,
    device: str = DEVICE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Merge checkpoints with one method and save the result; with --dataset, print accuracies."""
    m = merge_mod.get_method(method)
    given = dict(weights=_parse_weights(weights), density=density, scale=scale,
                 trim_mode=trim_mode, drop=drop, then=then, trim=trim, alpha=alpha, bias=bias,
                 granularity=granularity, steps=steps, lr=lr, lam=lam, units=_parse_units(units),
                 optimizer=optimizer, init=init, clip=clip, reference=_parse_reference(reference),
                 seed=seed, num_examples=num_examples, batch_size=batch_size, align=align)
    opts = _method_options(m, given)
    if m.needs_base and base is None:
        raise ConfigError(f"method '{method}' needs --base")
    if not m.needs_base and base is not None:
        raise ConfigError(f"method '{method}' does not use --base")
    if m.needs_data and dataset is None:
        raise ConfigError(f"method '{method}' needs data: pass --dataset")
    train = test = None
    if dataset is not None:
        train, test = load_splits(dataset, root, data_examples, seed or 0)
    names = [str(p) for p in checkpoints]
    inputs = list(checkpoints) + ([base] if base is not None else [])
    can_stream = m.streams and all(p.suffix == ".safetensors" for p in inputs)
    if stream and not can_stream:
        raise ConfigError(f"method '{method}' cannot stream here (data-free methods over "
                          ".safetensors files only)")
    record = {"method": method, "options": opts, "inputs": names,
              "base": str(base) if base is not None else None}
    info: dict = {}
    if can_stream and stream is not False:
        merge_mod.stream_merge(checkpoints, method, out, base=base, block_mib=block_mib,
                               device=device, **opts)
        merged = meta = None
        if train is not None:  # only the BN reset and the accuracies need the merged model
            merged, meta = io.load(out)
    else:
        first, meta = io.load(checkpoints[0])
        if m.needs_data:
            models = [first] + [io.load(p)[0] for p in checkpoints[1:]]
            base_model = io.load(base)[0] if base is not None else None
            for mod in models + ([base_model] if base_model is not None else []):
                mod.to(device)
            if "reset_bn" in m.options():
                opts["reset_bn"] = reset_bn
            state, info = merge_mod.merge(models, method, base=base_model, data=train.to(device),
                                          names=names, return_info=True, **opts)
        else:
            states = [io.load_state(p)[0] for p in checkpoints]
            base_state = io.load_state(base)[0] if base is not None else None
            state = merge_mod.merge(states, method, base=base_state, names=names, **opts)
        merged = with_state(first, {k: v.cpu() for k, v in state.items()})
        meta = {**meta, "merge": {**record, "streamed": False}}
    if train is not None and reset_bn and train_mod.has_batchnorm(merged) and not m.needs_data:
        train_mod.reset_bn_stats(merged, train)
        meta["merge"]["bn_reset"] = True
    if merged is not None and meta is not None and (
            not (can_stream and stream is not False) or meta["merge"].get("bn_reset")):
        io.save(merged.cpu(), out, {k: v for k, v in meta.items() if k != "model"})
    _report_gates(info, out, gates_out, as_json)
    rows = []
    if test is not None:
        for p in checkpoints:
            rows.append([str(p), train_mod.evaluate(io.load(p)[0], test)["accuracy"]])
        rows.append([f"merged ({method})", train_mod.evaluate(merged, test)["accuracy"]])
    if as_json:
        print_json({"out": str(out), "method": method, "options": {k: v for k, v in opts.items()
                    if k != "names"}, "test_accuracy": {r[0]: r[1] for r in rows}})
        return
    if rows:
        print_table(f"test accuracy on {dataset}", ["model", "accuracy"], rows)
    console.print(f"saved {out}")


def _report_gates(info: dict, out: Path, gates_out: Path | None, as_json: bool) -> None:
    gates = info.get("gates")
    if gates is None:
        return
    path = gates_out or out.with_suffix(".gates.json")
    io.write_json(path, gates.to_dict())
    if not as_json:
        print_table("soft merging gates (test time)", ["model", "mean gate", "closed (=0)", "open (=1)"],
                    [[r["model"], r["mean_gate"], r["closed"], r["open"]] for r in gates.model_summary()])
        console.print(f"gate table: {path}")


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
