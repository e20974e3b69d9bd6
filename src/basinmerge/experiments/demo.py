"""The main job (`basinmerge demo`, `make demo`): every capability once, on real data, in a few
minutes on 2 CPU cores.

1. Two MLPs from one initialization, SGD vs Adam: their weight-scope mismatch.
2. The same pair trained with WSA toward their fused scope (refreshed in lockstep).
3. Two different seeds: interpolation barriers naive / WSA / permutation-aligned / both.
4. Merging four fine-tuned models with the main merge methods, with and without a malicious
   member (soft merging's gates should shut it out).
5. A short federated run, FedAvg vs WSA, on label-skewed clients.

Fashion-MNIST is used when present, else MNIST-1D (the output says which and why).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from basinmerge import align as align_mod
from basinmerge import connectivity, fl, merge, models, plots, scope, wsa
from basinmerge import data as data_mod
from basinmerge.console import console, progress_task
from basinmerge.experiments.common import ExperimentResult, StudyScale, Table
from basinmerge.state import with_state
from basinmerge.train import Trainer, evaluate, train_lockstep


@dataclass(frozen=True)
class ScaleConfig(StudyScale, study="demo"):
    """The demo's sizes: "quick" is the real demo (minutes), "smoke" is for the test suite
    (seconds). `train` / `test`: examples used; `fl_*`: the federated step."""

    train: int
    test: int
    width: int
    epochs: int
    points: int
    merge_ft_epochs: int
    soft_steps: int
    fl_clients: int
    fl_rounds: int
    fl_epochs: int
    fl_train: int


ScaleConfig.define("quick", train=20000, test=10000, width=256, epochs=3, points=11,
                   merge_ft_epochs=2, soft_steps=300, fl_clients=10, fl_rounds=10, fl_epochs=2,
                   fl_train=12000)
ScaleConfig.define("smoke", train=600, test=300, width=32, epochs=1, points=3, merge_ft_epochs=1,
                   soft_steps=10, fl_clients=4, fl_rounds=2, fl_epochs=1, fl_train=400)
WSA_LAMBDA = wsa.DEFAULT_LAMBDA  # KL, mean over layers (docs/methods.md, "Weight Scope Alignment")
SGD: dict[str, Any] = dict(optimizer="sgd", lr=0.05, momentum=0.9)
ADAM: dict[str, Any] = dict(optimizer="adam", lr=1e-3)


def _pair(init_a: nn.Module, init_b: nn.Module, train, cfg_a: dict, cfg_b: dict, epochs: int,
          seed: int, lam: float = 0.0) -> tuple[nn.Module, nn.Module]:
    """Train two runs side by side; with lam > 0 each is pulled toward the pair's fused scope."""
    a, b = copy.deepcopy(init_a), copy.deepcopy(init_b)
    pens_a, pens_b = [], []
    if lam > 0:
        refresh = wsa.fused_refresh([a, b])
        target = refresh(0, a)
        pens_a = [wsa.WSARegularizer(target, lam, refresh=refresh, refresh_every=10)]
        pens_b = [wsa.WSARegularizer(target, lam, refresh=refresh, refresh_every=10)]
    ta = Trainer(a, train, epochs=epochs, seed=seed, batch_size=128, penalties=pens_a, **cfg_a)
    tb = Trainer(b, train, epochs=epochs, seed=seed + 1, batch_size=128, penalties=pens_b, **cfg_b)
    train_lockstep([ta, tb])
    return a, b


def _mismatch_rows(a: nn.Module, b: nn.Module) -> list[list]:
    sa, sb = scope.weight_scope(a), scope.weight_scope(b)
    kl = scope.divergence(sa, sb, "kl").per_layer
    return [[k, sa[k].std, sb[k].std, sb[k].std / sa[k].std, kl[k]] for k in sa]


def run(*, out: str | Path = "runs/demo", dataset: str | None = None, scale: str = "quick",
        seed: int = 0, device: str = "cpu", progress: bool = True) -> ExperimentResult:
    z = ScaleConfig.at(scale)
    t0 = time.perf_counter()
    notes = []
    if dataset is None:
        dataset = data_mod.first_available(("fashion-mnist", "mnist1d"))
        if dataset != "fashion-mnist":
            notes.append("Fashion-MNIST is not installed (sudo apt-get install dataset-fashion-mnist), "
                         "so the demo uses MNIST-1D, which is generated offline.")
    train_full = data_mod.load(dataset, "train")
    test_full = data_mod.load(dataset, "test")
    train = train_full.subset(min(z.train, len(train_full)), seed=seed)
    test = test_full.subset(min(z.test, len(test_full)), seed=seed)
    notes.append(f"Data: {dataset}, {len(train)} training and {len(test)} test examples; "
                 f"MLP with 2 hidden layers of {z.width} units; {z.epochs} epochs per run.")
    splits = {"test": test}
    shape, k = train.input_shape, train.num_classes

    def build(s: int) -> nn.Module:
        return models.build("mlp", shape, k, seed=s, width=z.width)

    tables: dict[str, Table] = {}
    figures: dict = {}
    data: dict = {}
    methods = ("average", "task_arithmetic", "ties", "median", "soft")
    # Sub-steps: 2 pairs + 2 curves; 2 pairs + 2 alignments + 4 curves; base + 4 experts +
    # 2 merges per method; 2 federated runs.
    steps = 4 + 8 + (1 + 4 + 2 * len(methods)) + 2
    with progress_task("demo", steps, enabled=progress) as advance:
        # 1-2. scope mismatch of SGD vs Adam from one initialization, plain and with WSA
        init = build(seed)
        plain = _pair(init, init, train, SGD, ADAM, z.epochs, seed)
        advance(1, step="1. SGD/Adam pair trained")
        aligned_scopes = _pair(init, init, train, SGD, ADAM, z.epochs, seed, lam=WSA_LAMBDA)
        advance(1, step="2. SGD/Adam pair trained with WSA")
        rows = []
        for name, (a, b) in (("plain", plain), (f"WSA λ={WSA_LAMBDA}", aligned_scopes)):
            div = scope.divergence(scope.weight_scope(a), scope.weight_scope(b), "kl")
            bar = connectivity.barriers(connectivity.interpolate(a, b, splits, num_points=z.points,
                                                                 progress=False))["test"]
            rows.append([name, evaluate(a, test)["accuracy"], evaluate(b, test)["accuracy"],
                         div.total, bar["loss_barrier"], bar["acc_barrier"]])
            advance(1, step=f"2. {name} pair interpolated")
        tables["1. SGD vs Adam from one initialization: per-layer scopes (plain)"] = Table(
            ["layer", "σ SGD", "σ Adam", "σ ratio", "KL(SGD‖Adam)"], _mismatch_rows(*plain))
        tables["2. SGD vs Adam with and without WSA"] = Table(
            ["training", "acc SGD", "acc Adam", "scope KL (sum)", "loss barrier", "acc barrier"], rows)
        values = {"SGD": scope.layer_values(plain[0]), "Adam": scope.layer_values(plain[1])}
        figures["scopes_sgd_vs_adam"] = plots.weight_histograms(
            values, {"SGD": scope.weight_scope(plain[0]), "Adam": scope.weight_scope(plain[1])},
            title="weight scopes of SGD vs Adam (one initialization)")

        # 3. different seeds: naive, WSA, aligned, WSA + aligned
        ia, ib = build(seed + 10), build(seed + 11)
        naive = _pair(ia, ib, train, SGD, SGD, z.epochs, seed)
        advance(1, step="3. two-seed pair trained")
        wsa_pair = _pair(ia, ib, train, SGD, SGD, z.epochs, seed, lam=WSA_LAMBDA)
        advance(1, step="3. two-seed pair trained with WSA")
        naive_aligned = align_mod.align(naive[0], naive[1], "weight")
        advance(1, step="3. two-seed pair aligned")
        wsa_aligned = align_mod.align(wsa_pair[0], wsa_pair[1], "weight")
        advance(1, step="3. WSA pair aligned")
        variants = {
            "naive": naive,
            "WSA": wsa_pair,
            "weight-aligned": (naive[0], naive_aligned),
            "WSA + aligned": (wsa_pair[0], wsa_aligned),
        }
        curves, rows = {}, []
        for name, (a, b) in variants.items():
            c = connectivity.interpolate(a, b, splits, num_points=z.points, progress=False, label=name)
            bar = connectivity.barriers(c)["test"]
            curves[name] = c
            rows.append([name, bar["acc_a"], bar["acc_b"], bar["loss_barrier"], bar["acc_barrier"],
                         bar["mid_acc"]])
            advance(1, step=f"3. {name} pair interpolated")
        tables["3. Two seeds: interpolation barriers (test)"] = Table(
            ["pair", "acc A", "acc B", "loss barrier", "acc barrier", "midpoint acc"], rows)
        figures["interpolation_two_seeds"] = plots.interpolation_curves(curves, "two seeds, test split")
        data["curves"] = {n: c.to_dict() for n, c in curves.items()}

        # 4. merging four fine-tuned models (+ a malicious one)
        base = build(seed + 20)
        Trainer(base, train, epochs=1, seed=seed, **SGD).run(progress=False)
        advance(1, step="4. base model trained")
        shards = fl.partition(train.y, 4, scheme="shards", classes_per_client=3, seed=seed)
        experts = []
        for i, idx in enumerate(shards):
            m = copy.deepcopy(base)
            Trainer(m, train.subset(idx), epochs=z.merge_ft_epochs, seed=seed + i, **ADAM).run(progress=False)
            experts.append(m)
            advance(1, step=f"4. expert {i + 1} fine-tuned")
        # The malicious member: every parameter replaced by N(0, 10²) noise. (Scaling all weights of
        # a ReLU MLP by 1000 would not change its predictions, only their confidence.)
        bad = copy.deepcopy(experts[0])
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in bad.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 10.0)
        holdout = train.subset(min(2000, len(train)), seed=seed + 99)
        rows = [["best single model", max(evaluate(m, test)["accuracy"] for m in experts), "—"]]
        options: dict[str, dict] = {"average": {}, "task_arithmetic": {"base": base, "scale": 0.3},
                                    "ties": {"base": base, "density": 0.2, "scale": 1.0},
                                    "median": {}, "soft": {"data": holdout,
                                                           "steps": z.soft_steps,
                                                           "progress": False}}
        for method in methods:
            opts = options[method]
            accs = []
            for members in (experts, experts + [bad]):
                merged = merge.merge(members, method, **opts)
                net = merged[0] if isinstance(merged, tuple) else with_state(base, merged)
                accs.append(evaluate(net, test)["accuracy"])
                advance(1, step=f"4. {method} merge of {len(members)}")
            rows.append([method, accs[0], accs[1]])
        tables["4. Merging 4 fine-tuned experts (test accuracy; + one N(0, 10²) noise member)"] = Table(
            ["method", "4 experts", "4 experts + malicious"], rows)

        # 5. federated: FedAvg vs WSA on label-skewed clients
        fl_train = train.subset(min(z.fl_train, len(train)), seed=seed + 5)
        parts = fl.partition(fl_train.y, z.fl_clients, scheme="dirichlet", alpha=0.1,
                             min_size=10, seed=seed)
        local = fl.LocalTraining(epochs=z.fl_epochs, batch_size=64, lr=0.05)
        fl_curves, rows = {}, []
        for name in ("fedavg", "wsa"):
            strategy = fl.make_strategy(name, fraction=0.5, seed=seed)
            res = fl.simulate(build(seed + 30), fl_train, test, parts, strategy, local,
                              rounds=z.fl_rounds, seed=seed, progress=False)
            fl_curves[name] = res.accuracy_curve()
            rows.append([name, res.final_accuracy, res.best_accuracy])
            advance(1, step=f"5. federated {name}")
        tables["5. Federated learning, Dirichlet α=0.1 clients"] = Table(
            ["strategy", "final accuracy", "best accuracy"], rows)
        figures["federated_accuracy"] = plots.fl_round_curves(
            {"Dirichlet α=0.1": {n: [c] for n, c in fl_curves.items()}}, "test accuracy")
    notes.append("Different seeds need permutation alignment before their weights can be averaged; "
                 "scope alignment alone changes the barrier little (see docs/results.md).")
    result = ExperimentResult(name="basinmerge demo", config={"dataset": dataset, "scale": scale,
                                                              "seed": seed, **z.to_dict()},
                              tables=tables, figures=figures, data=data, notes=notes,
                              command=f"basinmerge demo --scale {scale} --seed {seed}")
    result.seconds = time.perf_counter() - t0
    console.print(f"[dim]demo finished in {result.seconds:.0f} s[/]")
    return result
