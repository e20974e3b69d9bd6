"""`basinmerge fl` (one federated run) and `basinmerge experiment federated` (the study)."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import torch
import typer

from basinmerge import io
from basinmerge.cli.app import app, experiment_app
from basinmerge.cli.common import DATA_ROOT_OPT, DATASET_HELP, DEVICE_OPT, parse_kv, print_table
from basinmerge.console import console
from basinmerge.errors import ConfigError
from basinmerge.fl.strategy import DEFAULT_WSA_LAMBDA

BACKENDS = ("embedded", "flower")
THREADS_HELP = ("Torch CPU threads (small federated batches run fastest single-threaded, and two "
                "threads next to another busy process are many times slower).")


def _model_options(model: str, width: float | None, depth: int | None,
                   model_opt: list[str]) -> dict:
    opts = parse_kv(model_opt)
    if width is not None:
        opts["width"] = float(width) if model == "vgg" else int(width)
    if depth is not None:
        opts["depth"] = int(depth)
    return opts


@app.command("fl")
def fl_cmd(
    dataset: str = typer.Option("fashion-mnist", "--dataset", "-d", help=DATASET_HELP),
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
    strategy: str = typer.Option("fedavg", "--strategy", help="fedavg, fedprox or wsa."),
    aggregate: str = typer.Option("mean", "--aggregate", help="mean (by sample count), median or trimmed-mean."),
    trim: float = typer.Option(0.1, "--trim", help="Trimmed-mean fraction cut at each end."),
    mu: float = typer.Option(0.01, "--mu", help="FedProx proximal weight."),
    wsa_lambda: float = typer.Option(DEFAULT_WSA_LAMBDA, "--wsa-lambda", help="WSA penalty weight."),
    wsa_target: str = typer.Option("fused", "--wsa-target", help="fused (clients' scopes) or global (the global model's; ratchets down and diverges under label skew, warned when its std collapses)."),
    divergence: str = typer.Option("kl", "--divergence", help="kl, reverse_kl or w2."),
    fusion: str = typer.Option("moment", "--fusion", help="Scope fusion: moment or mean."),
    seed: int = typer.Option(0, "--seed"),
    train_limit: int = typer.Option(None, "--train-limit", help="Use a fixed random training subset of this size."),
    test_limit: int = typer.Option(None, "--test-limit", help="Evaluate on a fixed test subset of this size."),
    client_timeout: float = typer.Option(None, "--client-timeout", help="Drop a client whose update takes longer (seconds)."),
    backend: str = typer.Option("embedded", "--backend", help="embedded (in-process) or flower (Flower's simulation engine, Ray)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder (default runs/fl/STRATEGY-DATASET-aALPHA-sSEED)."),
    resume: Path = typer.Option(None, "--resume", help="Continue the run checkpointed in this folder (same options)."),
    threads: int = typer.Option(1, "--threads", help=THREADS_HELP),
    root: str | None = DATA_ROOT_OPT,
    device: str = DEVICE_OPT,
) -> None:
    """Federated training: clients on non-IID splits, FedAvg / FedProx / WSA at the server."""
    from basinmerge import fl
    from basinmerge.fl.simulator import finish_outputs
    from basinmerge.plots import partition_heatmap

    if backend not in BACKENDS:
        raise ConfigError(f"unknown --backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    if resume is not None and out is not None and Path(out) != Path(resume):
        raise ConfigError("--resume continues in its own folder; drop --out or give the same folder")
    if resume is not None and backend != "embedded":
        raise ConfigError("--resume works with the embedded backend only")
    torch.set_num_threads(threads)
    cfg = fl.FLConfig(
        dataset=dataset, model=model, model_options=_model_options(model, width, depth, model_opt),
        clients=clients, scheme=scheme, alpha=alpha, classes_per_client=classes_per_client,
        min_size=min_size, rounds=rounds, local_epochs=local_epochs, batch_size=batch_size, lr=lr,
        optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, fraction=fraction,
        strategy=strategy, aggregate=aggregate, trim=trim, mu=mu, wsa_lambda=wsa_lambda,
        wsa_target=wsa_target, divergence=divergence, fusion=fusion, seed=seed,
        train_limit=train_limit, test_limit=test_limit, data_root=root)
    folder = Path(resume if resume is not None else
                  out or f"runs/fl/{strategy}-{dataset}-a{alpha:g}-s{seed}")
    train, test = fl.load_data(cfg)
    parts = fl.build_partitions(cfg, train)
    summary = fl.summarize(train.y, parts, train.num_classes)
    folder.mkdir(parents=True, exist_ok=True)
    io.write_json(folder / "partition.json", summary)
    io.save_figure(partition_heatmap(summary["histogram"], train.info.classes,
                                     f"{cfg.scheme} partition (alpha={cfg.alpha:g})"),
                   folder / "partition.png")
    t0 = time.perf_counter()
    if backend == "flower":
        from basinmerge.fl.flower_app import run_flower

        result = run_flower(cfg, out=folder, progress=True,
                            timeout=client_timeout if client_timeout is not None else 3600.0)
    else:
        model_net = fl.build_model(cfg, train)
        result = fl.simulate(model_net, train, test, parts, cfg.make_strategy(),
                             cfg.local_training(), rounds=cfg.rounds, seed=cfg.seed, out=folder,
                             resume=resume is not None, config=cfg.identity(),
                             client_timeout=client_timeout, device=device)
        finish_outputs(folder, model_net, result.state, result.history,
                                    {"federated": cfg.to_dict(), "backend": "embedded"},
                                    title=strategy)
    seconds = time.perf_counter() - t0
    dropped = sum(len(r.get("dropped", {})) for r in result.history)
    rejected = sum(len(r.get("rejected", {})) for r in result.history)
    print_table(f"{strategy} on {dataset} ({clients} clients, alpha={alpha:g}, {backend})",
                ["rounds", "final accuracy", "best accuracy", "dropped", "rejected", "seconds"],
                [[result.history[-1]["round"], result.final_accuracy, result.best_accuracy,
                  dropped, rejected, round(seconds, 1)]])
    if result.resumed_from is not None:
        console.print(f"resumed after round {result.resumed_from}")
    console.print(f"wrote {folder}/ (rounds.json, rounds.csv, accuracy.png, partition.png, "
                  "final.safetensors)")


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
    def items(text: str | None) -> list[str] | None:
        return None if text is None else [t.strip() for t in text.split(",") if t.strip()]

    try:
        alpha_list = None if alphas is None else [float(a) for a in items(alphas)]
    except ValueError as e:
        raise ConfigError(f"--alphas must be comma-separated numbers, got '{alphas}'") from e
    result = federated.run(dataset=dataset, scale=scale, seeds=seeds, out=out, device=device,
                           data_root=root, models=items(models), methods=items(methods),
                           alphas=alpha_list, rounds=rounds)
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
