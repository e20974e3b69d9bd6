"""Foundation commands: train, eval, datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from basinmerge import checks, datasource, io, models, wsa
from basinmerge import data as data_mod
from basinmerge import train as train_mod
from basinmerge.cli.app import app
from basinmerge.cli.common import (
    DATA_HELP,
    DATA_ROOT_OPT,
    DATASET_HELP,
    DEVICE_OPT,
    JSON_OPT,
    LIKE_OPT,
    SEQ_LEN_OPT,
    TOKENIZER_OPT,
    check_file_out,
    command_line,
    data_record,
    load_splits,
    on_interrupt,
    parse_kv,
    print_json,
    print_table,
)
from basinmerge.console import console
from basinmerge.errors import ConfigError
from basinmerge.scope import divergence, weight_scope
from basinmerge.wsa import DEFAULT_LAMBDA as DEFAULT_WSA_LAMBDA

TARGET_HELP = f"WSA target scope: {wsa.TARGET_SPECS}."


@app.command("datasets")
def datasets_cmd(root: str | None = DATA_ROOT_OPT, as_json: bool = JSON_OPT) -> None:
    """List the registered datasets and where each was found."""
    rows = data_mod.datasets(root)
    if as_json:
        print_json(rows)
        return
    print_table("datasets", ["name", "description", "found"],
                [[r["name"], r["description"], r["found"] or f"missing: {r['how_to_get']}"] for r in rows])


@app.command("train")
def train_cmd(
    dataset: str = typer.Option("fashion-mnist", "--dataset", "-d", help=DATASET_HELP),
    model: str = typer.Option("mlp", "--model", "-m", help="Architecture: mlp, vgg, resnet20."),
    width: float = typer.Option(None, "--width", help="Width (mlp units; vgg/resnet20 multiplier)."),
    depth: int = typer.Option(None, "--depth", help="mlp hidden layers."),
    norm: str = typer.Option(None, "--norm", help="none, batch or layer."),
    model_opt: list[str] = typer.Option([], "--model-opt", help="Extra architecture option key=value."),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd, adam or adamw."),
    lr: float = typer.Option(0.05, "--lr", help="Learning rate."),
    momentum: float = typer.Option(0.9, "--momentum"),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    batch_size: int = typer.Option(128, "--batch-size"),
    epochs: int = typer.Option(3, "--epochs"),
    schedule: str = typer.Option("constant", "--schedule", help="constant or cosine."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialization and the batch order."),
    init_seed: int = typer.Option(None, "--init-seed", help="Seed of the initialization only "
                                  "(default: --seed); equal init seeds give a shared initialization."),
    train_limit: int = typer.Option(None, "--train-limit", help="Train on a random subset of this size."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint to write (.safetensors)."),
    wsa_target: str = typer.Option(None, "--wsa-target", help=TARGET_HELP),
    wsa_lambda: float = typer.Option(None, "--wsa-lambda",
                                     help="WSA strength λ (default 1, for KL with mean)."),
    wsa_divergence: str = typer.Option(None, "--wsa-divergence",
                                       help="kl, reverse_kl or w2 (default kl)."),
    wsa_reduce: str = typer.Option(None, "--wsa-reduce", help="mean or sum over layers "
                                   "(default mean)."),
    wsa_bias: bool = typer.Option(False, "--wsa-bias", help="Also align the biases' scopes."),
    wsa_every: int = typer.Option(None, "--wsa-every", help="Lazy regularization: apply the "
                                  "penalty (times this) every this many steps (default 1)."),
    root: str | None = DATA_ROOT_OPT,
    device: str = DEVICE_OPT,
) -> None:
    """Train a model and save it as a checkpoint with its config and metrics; with
    --wsa-target, under the Weight Scope Alignment penalty toward that target."""
    check_file_out(out, (".safetensors",))
    on_interrupt(f"nothing was saved ({out} is written when training ends). Run again: "
                 f"{command_line()}")
    train, test = load_splits(dataset, root, train_limit, seed)
    cfg = parse_kv(model_opt)
    for k, v in (("width", width), ("depth", depth), ("norm", norm)):
        if v is not None:
            # mlp/resnet20 widths are integers; a fractional one is passed on for the model to
            # reject rather than silently truncated.
            cfg[k] = int(v) if k == "width" and model != "vgg" and float(v).is_integer() else v
    net = models.build(model, train.input_shape, train.num_classes,
                       seed=seed if init_seed is None else init_seed, **cfg)
    train_cfg: dict[str, Any] = dict(optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                     batch_size=batch_size, epochs=epochs, schedule=schedule,
                                     seed=seed)
    reg = None
    if wsa_target is None:
        given = [o for o, v in (("--wsa-lambda", wsa_lambda), ("--wsa-divergence", wsa_divergence),
                                ("--wsa-reduce", wsa_reduce), ("--wsa-bias", wsa_bias or None),
                                ("--wsa-every", wsa_every))
                 if v is not None]
        if given:
            raise ConfigError(f"{given[0]} needs --wsa-target")
    else:
        reg = wsa.from_spec(wsa_target, net, DEFAULT_WSA_LAMBDA if wsa_lambda is None else wsa_lambda,
                            wsa_divergence or "kl", wsa_reduce or "mean", wsa_bias, wsa_every or 1)
    hist = train_mod.fit(net, train, device=device, penalties=[reg] if reg is not None else (), **train_cfg)
    metrics = {"train": train_mod.evaluate(net, train), "test": train_mod.evaluate(net, test)}
    meta = {"dataset": dataset, "train_limit": train_limit, "training": train_cfg,
            "metrics": metrics, "history": hist.to_dict()}
    if reg is not None:
        final = weight_scope(net, include_bias=wsa_bias)
        meta["wsa"] = {"target": wsa_target, "include_bias": wsa_bias, **reg.config(),
                       "target_scope": reg.target.to_dict(),
                       "final_divergence": divergence(final, reg.target, reg.kind).to_dict()}
    io.save(net, out, meta)
    print_table(f"{model} on {dataset}", ["split", "loss", "accuracy"],
                [[s, m["loss"], m["accuracy"]] for s, m in metrics.items()])
    console.print(f"saved {out}")


@app.command("eval")
def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="Checkpoint to evaluate."),
    data: str = typer.Option(None, "--data", "--dataset", "-d", help=DATA_HELP + " Default: the "
                             "checkpoint's dataset."),
    split: str = typer.Option("test", "--split", help="train or test (a dataset named without "
                              "a split)."),
    seq_len: int = SEQ_LEN_OPT,
    tokenizer: str = TOKENIZER_OPT,
    like: Path = LIKE_OPT,
    root: str | None = DATA_ROOT_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Evaluate a checkpoint on data (a dataset split, a datasets folder, a tensor file, a
    text corpus)."""
    net, meta = checks.load_model(checkpoint, like=like)
    spec = data or meta.get("dataset")
    if spec is None:
        raise ConfigError(f"{checkpoint}: the checkpoint names no dataset; pass --data")
    ds = datasource.load(spec, split=split, seq_len=seq_len, tokenizer=tokenizer, root=root,
                         model=checkpoint)
    checks.check_data_fits(net, ds, meta=meta, source=str(checkpoint))
    res = train_mod.evaluate(net, ds)
    name = datasource.describe(ds) or spec
    if as_json:
        print_json({"checkpoint": str(checkpoint), "dataset": spec,
                    "split": getattr(getattr(ds, "info", None), "split", None), **res,
                    "data": data_record(spec, seq_len=seq_len, tokenizer=tokenizer, root=root)})
    else:
        print_table(f"{checkpoint} on {name}", ["loss", "accuracy"], [[res["loss"], res["accuracy"]]])
