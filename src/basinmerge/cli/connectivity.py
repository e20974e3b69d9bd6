"""`basinmerge interpolate` and `basinmerge experiment mode-connectivity`."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

import typer
from torch import nn

from basinmerge import checks, connectivity, datasource, io, plots
from basinmerge.cli.app import app, experiment_app
from basinmerge.cli.common import (
    DATA_HELP,
    DATA_ROOT_OPT,
    DATASET_HELP,
    DEVICE_OPT,
    FORCE_OPT,
    JSON_OPT,
    LIKE_OPT,
    REPAIR_MODE_OPT,
    SEQ_LEN_OPT,
    TOKENIZER_OPT,
    check_file_out,
    check_run_out,
    comma_list,
    command_line,
    on_interrupt,
    print_json,
    print_table,
)
from basinmerge.console import console
from basinmerge.errors import ConfigError
from basinmerge.experiments.common import print_result, write_result
from basinmerge.state import as_state_dict, check_compatible


@dataclass
class CurveSpec:
    """One curve of the `interpolate` command: the path from model A to `model_b`, with extra
    options for `connectivity.interpolate` (e.g. a REPAIR transform). Alignment options add
    specs (``aligned``, ``aligned + repair``) beside the ``naive`` one."""

    name: str
    model_b: nn.Module
    options: dict = field(default_factory=dict)


def _eval_subset(ds, limit: int | None):
    if limit is None or limit >= len(ds):
        return ds
    if limit < 1:
        raise ConfigError(f"--eval-limit must be >= 1, got {limit}")
    return datasource.subset(ds, limit, seed=0)


@app.command("interpolate")
def interpolate_cmd(
    model_a: Path = typer.Argument(..., help="First checkpoint (α = 0)."),
    model_b: Path = typer.Argument(..., help="Second checkpoint (α = 1)."),
    data_spec: str = typer.Option(None, "--data", "--dataset", "-d", help=DATA_HELP + " Default: "
                                  "the first checkpoint's dataset (both its splits)."),
    points: int = typer.Option(25, "--points", help="Grid points on α ∈ [0, 1]."),
    plot: Path = typer.Option(None, "--plot", help="Write the loss/accuracy curves to this PNG."),
    as_json: bool = JSON_OPT,
    no_bn_reset: bool = typer.Option(False, "--no-bn-reset",
                                     help="Keep the interpolated BatchNorm statistics (shows the "
                                          "variance collapse) instead of recomputing them at "
                                          "every point, the two endpoints included."),
    eval_limit: int = typer.Option(None, "--eval-limit",
                                   help="Evaluate on a random subset of this size per split."),
    align: str = typer.Option(None, "--align", help="Also interpolate to B permuted onto A: "
                              "weight, activation or ste (Git Re-Basin)."),
    repair: bool = typer.Option(False, "--repair", help="With --align, also the REPAIRed aligned "
                                "curve (each merged unit gets the endpoints' interpolated statistics)."),
    seq_len: int = SEQ_LEN_OPT,
    tokenizer: str = TOKENIZER_OPT,
    repair_mode: str = REPAIR_MODE_OPT,
    like: Path = LIKE_OPT,
    root: str | None = DATA_ROOT_OPT,
    device: str = DEVICE_OPT,
) -> None:
    """Loss and accuracy along the straight line between two checkpoints, and its barriers: on
    a dataset's train and test splits, or on the data a spec names."""
    check_file_out(plot, (".png",))
    from basinmerge.align.repair import check_mode

    check_mode(repair_mode)
    net_a, meta_a = checks.load_model(model_a, like=like)
    net_b, meta_b = checks.load_model(model_b, like=like)
    check_compatible([as_state_dict(net_a), as_state_dict(net_b)], [str(model_a), str(model_b)])
    name = data_spec or meta_a.get("dataset") or meta_b.get("dataset")
    if name is None:
        raise ConfigError(f"{model_a}: the checkpoint names no dataset; pass --data")
    train, test = datasource.train_test(name, seq_len=seq_len, tokenizer=tokenizer, root=root,
                                        model=model_a)
    for net, meta, path in ((net_a, meta_a, model_a), (net_b, meta_b, model_b)):
        checks.check_data_fits(net, train, meta=meta, source=str(path))
    data = ({"train": _eval_subset(train, eval_limit), "test": _eval_subset(test, eval_limit)}
            if test is not None else {"data": _eval_subset(train, eval_limit)})
    bn_data = next(iter(data.values()))
    net_a, net_b = net_a.to(device), net_b.to(device)

    specs = [CurveSpec("naive", net_b)]
    if repair and align is None:
        raise ConfigError("--repair needs --align (REPAIR corrects an aligned merge)")
    if align is not None:
        from basinmerge.align import align as align_model

        aligned = align_model(net_a, net_b, align, data=None if align == "weight" else train)
        specs.append(CurveSpec(f"{align}-aligned", aligned))
        if repair:
            label = "REPAIR" if repair_mode == "auto" else f"REPAIR ({repair_mode})"
            specs.append(CurveSpec(f"{align}-aligned + {label}", aligned,
                                   {"repair": repair_mode, "bn_data": bn_data}))
    curves = {s.name: connectivity.interpolate(
        net_a, s.model_b, data, num_points=points, bn_reset=not no_bn_reset, label=s.name,
        **s.options) for s in specs}

    if plot is not None:
        io.save_figure(plots.interpolation_curves(curves, title=f"{model_a.name} → {model_b.name}"), plot)
    if as_json:
        print_json({"a": str(model_a), "b": str(model_b), "dataset": name,
                    "curves": {k: {"barriers": connectivity.barriers(c), **c.to_dict()}
                               for k, c in curves.items()}})
        return
    print_table(f"barriers: {model_a.name} → {model_b.name} on {name}", connectivity.BARRIER_COLUMNS,
                connectivity.barrier_rows(curves))
    if plot is not None:
        console.print(f"saved {plot}")


@experiment_app.command("mode-connectivity")
def mode_connectivity_cmd(
    dataset: str = typer.Option("fashion-mnist", "--dataset", "-d", help=DATASET_HELP),
    model: str = typer.Option("mlp", "--model", "-m", help="Architecture: mlp, vgg (a CNN), resnet20."),
    seeds: int = typer.Option(None, "--seeds", help="Seeds per cell (default: 3 quick, 1 smoke, 5 full)."),
    scale: str = typer.Option("quick", "--scale", help="smoke (seconds), quick (<= 20 min on 2 "
                              "CPU cores), full (paper-sized, for a GPU)."),
    out: Path = typer.Option(Path("results/mode-connectivity"), "--out", "-o", help="Output folder."),
    conditions: str = typer.Option(None, "--conditions", help="Comma-separated subset of the "
                                   "conditions (optimizer, lr, batch, data, seed)."),
    treatments: str = typer.Option(None, "--treatments", help="Comma-separated treatment names or "
                                   "name prefixes (plain, weight-decay, proximal, wsa-fused, ...)."),
    root: str | None = DATA_ROOT_OPT,
    device: str = DEVICE_OPT,
    force: bool = FORCE_OPT,
) -> None:
    """Do pairs trained under different conditions lie on a low-loss line, and does weight scope
    alignment (or weight decay, or a proximal term) lower the barrier?"""
    from basinmerge.experiments import mode_connectivity

    check_run_out(out, force)
    on_interrupt(f"nothing was saved (the study writes {out} when it ends). Run again: "
                 f"{command_line()}")
    result = mode_connectivity.run(dataset=dataset, model=model, scale=scale, seeds=seeds,
                                   device=device, root=root,
                                   conditions=comma_list(conditions, "--conditions") or None,
                                   treatments=comma_list(treatments, "--treatments") or None)
    args = ["--dataset", dataset, "--model", model, "--scale", scale]
    args += ["--seeds", str(seeds)] if seeds is not None else []
    args += ["--conditions", conditions] if conditions else []
    args += ["--treatments", treatments] if treatments else []
    args += ["--device", device] if device != "cpu" else []
    args += ["--out", str(out)]
    result.command = "basinmerge experiment mode-connectivity " + " ".join(shlex.quote(a) for a in args)
    write_result(result, out)
    print_result(result)
    console.print(f"wrote {out}/result.json, result.md and {len(result.figures)} figures")

