"""Federated simulator cost: where the embedded simulator's time goes, and embedded vs Flower.

20 clients (Dirichlet α = 0.5), 10 rounds, half the clients per round, 2 local epochs of SGD
(batch 64) with the default MLP (784-512-512-10) on a fixed 12,000-example training subset of
Fashion-MNIST (the full 10,000-image test set for the per-round evaluation). Single-threaded
torch (the CLI default for federated runs). The baseline is plain `fit` processing the same
number of examples (same batch size) in this process.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

from basinmerge import fl
from basinmerge.console import markdown_table
from basinmerge.train import fit

CONFIG = dict(dataset="fashion-mnist", model="mlp", clients=20, alpha=0.5, rounds=10,
              local_epochs=2, batch_size=64, fraction=0.5, strategy="fedavg", train_limit=12000)
COMMAND = ".venv/bin/python -m benchmarks bench_fl"


def _embedded(cfg: fl.FLConfig):
    train, test = fl.load_data(cfg)
    parts = fl.build_partitions(cfg, train)
    t0 = time.perf_counter()
    res = fl.simulate(fl.build_model(cfg, train), train, test, parts, cfg.make_strategy(),
                      cfg.local_training(), rounds=cfg.rounds, seed=cfg.seed, progress=False)
    wall = time.perf_counter() - t0
    examples = sum(len(parts[c]) for r in res.history[1:] for c in r["clients"]) * cfg.local_epochs
    return res, wall, examples, train


def run() -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = fl.FLConfig(**CONFIG)
        res, wall, examples, train = _embedded(cfg)
        t = res.timings
        # plain baseline: the same number of examples through fit() (batch 64, one model)
        net = fl.build_model(cfg, train)
        epochs = max(1, round(examples / len(train)))
        t0 = time.perf_counter()
        fit(net, train, batch_size=cfg.batch_size, epochs=epochs, lr=cfg.lr, progress=False)
        plain = time.perf_counter() - t0
        plain_examples = epochs * len(train)

        os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
        os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        os.environ["FLWR_HOME"] = tempfile.mkdtemp(prefix="flwr-home-")
        from basinmerge.fl.flower_app import run_flower

        t0 = time.perf_counter()
        flw = run_flower(cfg, progress=False, num_cpus=os.cpu_count() or 1)
        flower_wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)

    split = [
        ["local training", f"{t['train_seconds']:.1f}", f"{t['train_seconds'] / wall:.1%}"],
        ["evaluation (10 x 10k test images + round 0)", f"{t['eval_seconds']:.1f}",
         f"{t['eval_seconds'] / wall:.1%}"],
        ["everything else (sampling, aggregation, scopes)", f"{wall - t['train_seconds'] - t['eval_seconds']:.2f}",
         f"{(wall - t['train_seconds'] - t['eval_seconds']) / wall:.1%}"],
        ["total (embedded)", f"{wall:.1f}", "100%"],
    ]
    per_ex_fl = t["train_seconds"] / examples
    per_ex_plain = plain / plain_examples
    compare = [
        ["plain fit, same examples processed (baseline)", f"{plain / plain_examples * examples:.1f}",
         "1.00"],
        ["embedded simulator, local training only", f"{t['train_seconds']:.1f}",
         f"{per_ex_fl / per_ex_plain:.2f}"],
        ["embedded simulator, whole run", f"{wall:.1f}", f"{wall / (per_ex_plain * examples):.2f}"],
        ["--backend flower (Ray simulation engine), whole run", f"{flower_wall:.1f}",
         f"{flower_wall / (per_ex_plain * examples):.2f}"],
    ]
    lines = [
        "## Federated learning simulator",
        "",
        f"Command: `{COMMAND}`",
        "",
        "20 clients (Dirichlet α = 0.5) x 10 rounds, 10 clients per round, 2 local epochs, SGD batch "
        "64, MLP 784-512-512-10 on a fixed **12,000-example training subset** of Fashion-MNIST "
        f"({examples:,} examples processed in local training), evaluation on the 10,000 test "
        "images every round; torch single-threaded (the federated CLI default).",
        "",
        "Embedded simulator, wall time split:",
        "",
        markdown_table(["part", "seconds", "share"], split),
        "Embedded vs Flower on the same configuration (ratio: seconds / the plain baseline "
        "scaled to the same number of examples):",
        "",
        markdown_table(["run", "seconds", "ratio vs plain fit"], compare),
        f"Flower / embedded wall-time ratio: **{flower_wall / wall:.2f}**. Final accuracy: "
        f"embedded {res.final_accuracy:.4f}, Flower {flw.final_accuracy:.4f} (the same "
        "sampled clients and seeds; Ray workers run one torch thread each like the embedded run, so "
        "the two agree up to float round-off of the reduction order). Flower's time includes "
        "starting Ray (about 10-20 s here) and one dataset load per Ray worker; with 2 CPU "
        "cores it runs 2 clients at a time.",
    ]
    return "\n".join(lines) + "\n"
