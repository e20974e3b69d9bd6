"""`basinmerge fl` (one federated run) and `basinmerge experiment federated` (the study)."""

from __future__ import annotations

import dataclasses
import os
import shlex
import time
from pathlib import Path

import torch
import typer

from basinmerge import io
from basinmerge.cli.app import app, experiment_app
from basinmerge.cli.common import (
    DATA_ROOT_OPT,
    DATASET_HELP,
    DEVICE_OPT,
    comma_list,
    on_interrupt,
    parse_kv,
    print_table,
)
from basinmerge.console import console
from basinmerge.errors import ConfigError
from basinmerge.fl.strategy import strategy_help, strategy_names

BACKENDS = ("embedded", "flower", "flower-deployment")
THREADS_HELP = ("Torch CPU threads (small federated batches run fastest single-threaded, and two "
                "threads next to another busy process are many times slower).")
# CLI parameters -> the FLConfig fields they set (the others map one to one).
_FIELDS = {"width": "model_options", "depth": "model_options", "model_opt": "model_options",
           "opt": "strategy_options", "root": "data_root"}
_NOT_CONFIG = {"client_timeout", "backend", "out", "resume", "force", "threads", "device"}


def _model_options(model: str, width: float | None, depth: int | None,
                   model_opt: list[str]) -> dict:
    opts = parse_kv(model_opt)
    if width is not None:
        opts["width"] = float(width) if model == "vgg" else int(width)
    if depth is not None:
        opts["depth"] = int(depth)
    return opts


def _given(ctx: typer.Context) -> list[str]:
    """The parameters typed on the command line (not defaults)."""
    from click.core import ParameterSource

    return [n for n in ctx.params if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE]


def _resumed_config(folder: Path, values: dict, given: list[str]):
    """The run folder's configuration; options given again must agree (rounds may grow)."""
    from basinmerge.fl import FLConfig
    from basinmerge.fl.outputs import config_difference, read_run_config

    stored = FLConfig.from_dict(read_run_config(folder))
    fields = {_FIELDS.get(n, n) for n in given} - _NOT_CONFIG - {"rounds", "data_root"}
    diff = config_difference({f: getattr(stored, f) for f in fields},
                             {f: values[f] for f in fields}, ignore=())
    if diff:
        raise ConfigError(f"{folder} was run with other options ({'; '.join(diff)}); "
                          "give only --resume (and --rounds to extend it), or start a new --out")
    return dataclasses.replace(stored, data_root=values["data_root"],
                               rounds=values["rounds"] if "rounds" in given else stored.rounds)


def _check_out(folder: Path, resume: bool, force: bool) -> None:
    """Refuse to overwrite an earlier run, or a path that cannot be a run folder, before any
    work."""
    from basinmerge.fl.outputs import RUN_FILES

    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"output folder {folder} is a file")
    earlier = [f for f in RUN_FILES if (folder / f).exists()]
    if earlier and not (resume or force):
        raise ConfigError(f"{folder} already holds a run ({earlier[0]}); continue it with "
                          f"--resume {folder}, overwrite it with --force, or choose another --out")
    parent = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot write the output folder {folder} ({parent} is not a writable "
                          "folder)")


def _interrupt_note(folder: Path, backend: str) -> str:
    """What a Ctrl-C says (after "interrupted; ", printed by `basinmerge.cli.main`, exit 130):
    what was saved and the exact command to resume."""
    from basinmerge.fl.outputs import CHECKPOINT

    ckpt = folder / CHECKPOINT
    done = io.read_meta(ckpt).get("round") if ckpt.is_file() else None
    if backend != "embedded":
        return (f"the {backend} run was stopped; nothing to resume (its rounds so far are in "
                f"{folder}/rounds.json if any)")
    if done is None:
        return "stopped before the first checkpoint; nothing was saved"
    return (f"round {done} is saved in {ckpt}; resume with: basinmerge fl "
            f"--resume {shlex.quote(str(folder))}")


@app.command("fl", epilog="Strategies and their --opt options:\n\n" +
             "\n\n".join(strategy_help().splitlines()))
def fl_cmd(
    ctx: typer.Context,
    dataset: str = typer.Option("fashion-mnist", "--dataset", "--data", "-d", help=(
        DATASET_HELP[:-1] + ", or a data spec of labelled examples with tensor inputs: a "
        ".safetensors/.pt file with x and y, or a datasets folder (its train split; its test "
        "split scores the global model unless --test-data is given).")),
    test_data: str = typer.Option(None, "--test-data", help="Held-out data spec that scores "
                                  "the global model (needed when --dataset is a file)."),
    model: str = typer.Option("mlp", "--model", "-m", help="Architecture: mlp, vgg, resnet20."),
    width: float = typer.Option(None, "--width", help="mlp units / vgg channel multiplier."),
    depth: int = typer.Option(None, "--depth", help="mlp hidden layers."),
    model_opt: list[str] = typer.Option([], "--model-opt", help="Extra architecture option key=value."),
    clients: int = typer.Option(20, "--clients", help="Number of clients."),
    scheme: str = typer.Option("dirichlet", "--scheme", help="Partition: iid, dirichlet or shards."),
    alpha: float = typer.Option(0.5, "--alpha", help="Dirichlet concentration (0.1 skewed, 5 near IID)."),
    classes_per_client: int = typer.Option(2, "--classes-per-client", help="Shards per client (shards scheme)."),
    min_size: int = typer.Option(10, "--min-size", help="Smallest client partition (dirichlet)."),
    rounds: int = typer.Option(50, "--rounds", help="Federated rounds."),
    local_epochs: int = typer.Option(2, "--local-epochs", help="Local epochs per round."),
    batch_size: int = typer.Option(64, "--batch-size"),
    lr: float = typer.Option(0.05, "--lr", help="Client learning rate."),
    optimizer: str = typer.Option("sgd", "--optimizer", help="Client optimizer: sgd, adam, adamw."),
    momentum: float = typer.Option(0.9, "--momentum"),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="Client weight decay."),
    fraction: float = typer.Option(0.5, "--fraction", help="Fraction of clients sampled per round, in (0, 1]."),
    strategy: str = typer.Option("fedavg", "--strategy", help=f"{', '.join(strategy_names())} (options below)."),
    opt: list[str] = typer.Option([], "--opt", help="Strategy option key=value (repeatable; see below), e.g. --opt lambda=1."),
    aggregate: str = typer.Option("mean", "--aggregate", help="mean (by sample count), median or trimmed-mean."),
    trim: float = typer.Option(0.1, "--trim", help="Trimmed-mean fraction cut at each end."),
    seed: int = typer.Option(0, "--seed"),
    train_limit: int = typer.Option(None, "--train-limit", help="Use a fixed random training subset of this size."),
    test_limit: int = typer.Option(None, "--test-limit", help="Evaluate on a fixed test subset of this size."),
    client_timeout: float = typer.Option(None, "--client-timeout", help="Drop a client whose update takes longer (seconds)."),
    backend: str = typer.Option("embedded", "--backend", help="embedded (in-process), flower (Flower's simulation engine, Ray) or flower-deployment (a local SuperLink, one SuperNode per client and `flwr run`)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder (default runs/fl/STRATEGY-DATASET-aALPHA-sSEED); an earlier run there is refused without --resume or --force."),
    resume: Path = typer.Option(None, "--resume", help="Continue the run checkpointed in this folder; its options are read from there (--rounds extends it)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an earlier run in --out."),
    threads: int = typer.Option(1, "--threads", help=THREADS_HELP),
    root: str | None = DATA_ROOT_OPT,
    device: str = DEVICE_OPT,
) -> None:
    """Federated training: clients on non-IID splits, one of the registered strategies at the
    server."""
    from basinmerge import fl
    from basinmerge.fl.outputs import finish_outputs
    from basinmerge.plots import partition_heatmap

    if backend not in BACKENDS:
        raise ConfigError(f"unknown --backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    if resume is not None and out is not None and Path(out) != Path(resume):
        raise ConfigError("--resume continues in its own folder; drop --out or give the same folder")
    if resume is not None and backend != "embedded":
        raise ConfigError("--resume works with the embedded backend only")
    if client_timeout is not None and not client_timeout > 0:
        raise ConfigError(f"--client-timeout must be > 0 seconds, got {client_timeout}")
    torch.set_num_threads(threads)
    # A file or folder is recorded by its absolute path: a resumed run or a Flower node
    # started elsewhere finds it.
    dataset, test_data = (str(Path(d).resolve()) if d is not None and Path(d).exists() else d
                          for d in (dataset, test_data))
    values = dict(
        dataset=dataset, model=model, model_options=_model_options(model, width, depth, model_opt),
        clients=clients, scheme=scheme, alpha=alpha, classes_per_client=classes_per_client,
        min_size=min_size, rounds=rounds, local_epochs=local_epochs, batch_size=batch_size, lr=lr,
        optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, fraction=fraction,
        strategy=strategy, strategy_options=parse_kv(opt), aggregate=aggregate, trim=trim,
        seed=seed, train_limit=train_limit, test_limit=test_limit, data_root=root,
        test_data=test_data)
    cfg = (fl.FLConfig(**values) if resume is None else
           _resumed_config(Path(resume), values, _given(ctx)))
    folder = Path(resume if resume is not None else
                  out or f"runs/fl/{cfg.strategy}-{Path(cfg.dataset).stem}-a{cfg.alpha:g}"
                         f"-s{cfg.seed}")
    _check_out(folder, resume is not None, force)
    train, test = fl.load_data(cfg)
    parts = fl.build_partitions(cfg, train)
    model_net = fl.build_model(cfg, train)  # checks the architecture against the data
    summary = fl.summarize(train.y, parts, train.num_classes)
    if force and resume is None:
        from basinmerge.fl.outputs import RUN_FILES

        for f in RUN_FILES:
            (folder / f).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    io.write_json(folder / "partition.json", summary)
    io.save_figure(partition_heatmap(summary["histogram"], train.info.classes,
                                     f"{cfg.scheme} partition (alpha={cfg.alpha:g})"),
                   folder / "partition.png")
    t0 = time.perf_counter()
    on_interrupt(lambda: _interrupt_note(folder, backend))  # Ctrl-C: what was saved
    if backend == "flower":
        from basinmerge.fl.flower_app import run_flower

        result = run_flower(cfg, out=folder, progress=True,
                            timeout=client_timeout if client_timeout is not None else 3600.0)
    elif backend == "flower-deployment":
        from basinmerge.fl.deployment import run_deployment

        result = run_deployment(cfg, out=folder)
    else:
        result = fl.simulate_config(cfg, model_net, train, test, parts, out=folder,
                                    resume=resume is not None, config=cfg.identity(),
                                    client_timeout=client_timeout, device=device)
        finish_outputs(folder, model_net, result.state, result.history,
                       {"federated": cfg.to_dict(), "backend": "embedded"},
                       title=cfg.strategy)
    seconds = time.perf_counter() - t0
    dropped = sum(len(r.get("dropped", {})) for r in result.history)
    rejected = sum(len(r.get("rejected", {})) for r in result.history)
    print_table(f"{cfg.strategy} on {cfg.dataset} ({cfg.clients} clients, alpha={cfg.alpha:g}, "
                f"{backend})",
                ["rounds", "final accuracy", "best accuracy", "dropped", "rejected", "seconds"],
                [[result.history[-1]["round"], result.final_accuracy, result.best_accuracy,
                  dropped, rejected, round(seconds, 1)]])
    if result.resumed_from is not None:
        console.print(f"resumed after round {result.resumed_from}")
    console.print(f"wrote {folder}/ (rounds.json, rounds.csv, accuracy.png, partition.png, "
                  "final.safetensors)")


@app.command("flower-app")
def flower_app_cmd(
    folder: Path = typer.Argument(..., help="App folder to write (pyproject.toml, wheels/)."),
    out: Path = typer.Option(Path("runs/fl-flower"), "--out", "-o", help="Where the ServerApp writes its results (made absolute)."),
    config: list[str] = typer.Option([], "--set", help="Run-config value key=value (FLConfig fields with dashes or underscores), e.g. --set strategy=wsa --set clients=2."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing pyproject.toml."),
) -> None:
    """Write a Flower app folder that runs exactly this basinmerge: its only dependency is a
    wheel of this code (by absolute file URL, never by name from an index), and its run config
    carries this code's hash, which every ServerApp/ClientApp checks (docs/flower.md)."""
    from basinmerge.fl import FLConfig
    from basinmerge.fl.deployment import write_app

    values = {k.replace("-", "_"): v for k, v in parse_kv(config).items()}
    cfg = FLConfig.from_dict(values)  # checks every value before anything is written
    if (folder / "pyproject.toml").exists() and not force:
        raise ConfigError(f"{folder / 'pyproject.toml'} exists; use --force to overwrite it")
    path = write_app(folder, cfg, out)
    console.print(f"wrote {path} and {folder}/wheels/; run it with: flwr run {folder} "
                  "<superlink> (docs/flower.md)")


@experiment_app.command("federated")
def federated_cmd(
    dataset: str = typer.Option("fashion-mnist", "--dataset", "-d", help=DATASET_HELP),
    scale: str = typer.Option("quick", "--scale", help="smoke, quick (<= 20 min on 2 cores) or full (GPU)."),
    seeds: int = typer.Option(3, "--seeds", help="Seeds per configuration."),
    models: str = typer.Option(None, "--models", help="Comma-separated architectures (mlp, vgg) "
                               "instead of the scale's own (quick: mlp; full: mlp,vgg)."),
    methods: str = typer.Option(None, "--methods", help="Comma-separated methods instead of all "
                                "(FedAvg, FedProx, weight decay, WSA (fused), WSA (global))."),
    alphas: str = typer.Option(None, "--alphas", help="Comma-separated Dirichlet alphas instead "
                               "of 0.1,0.5,5."),
    rounds: int = typer.Option(None, "--rounds", help="Rounds instead of the scale's own."),
    out: Path = typer.Option(Path("runs/experiments/federated"), "--out", "-o"),
    threads: int = typer.Option(1, "--threads", help=THREADS_HELP),
    root: str | None = DATA_ROOT_OPT,
    device: str = DEVICE_OPT,
) -> None:
    """FedAvg vs FedProx vs weight decay vs WSA under Dirichlet non-IID splits."""
    from basinmerge.experiments import federated
    from basinmerge.experiments.common import print_result, write_result

    if threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    result = federated.run(dataset=dataset, scale=scale, seeds=seeds, out=out, device=device,
                           data_root=root, models=comma_list(models, "--models"),
                           methods=comma_list(methods, "--methods"),
                           alphas=comma_list(alphas, "--alphas", float, "numbers"), rounds=rounds)
    extra = "".join(f" --{name} {shlex.quote(str(value))}" for name, value in
                    (("models", models), ("methods", methods), ("alphas", alphas),
                     ("rounds", rounds), ("threads", threads if threads != 1 else None))
                    if value is not None)
    result.command = (f"basinmerge experiment federated --dataset {dataset} --scale {scale} "
                      f"--seeds {seeds}{extra} --out {out}"
                      + (f" --device {device}" if device != "cpu" else ""))
    write_result(result, out)
    print_result(result)
    console.print(f"wrote {out}/result.md")
