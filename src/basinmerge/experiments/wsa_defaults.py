"""A small, focused study that chose the WSA regularizer's defaults (divergence and reduce).

Two MLPs are trained side by side in lockstep, one with SGD (momentum 0.9) and one with Adam
(the condition under which the WSA paper reports the strongest scope mismatch), either from a
shared initialization or from two independent ones. Each run carries a `WSARegularizer` whose
target follows the fused (moment-matched) scope of both current models, refreshed every
`refresh_every` steps (`WSARegularizer.following`). Variants: no penalty, each divergence at two
strengths on its own scale (KL and reverse KL: λ; squared W2 lives on the σ² scale, so λ is
~300x larger), and the sum over layers instead of the mean.

Per pair: the scope divergence between the two endpoints (symmetrized KL, mean per layer, over
all weights and over the weights of live units), the mean excess kurtosis, the test accuracy
of both endpoints and the linear-interpolation barriers (`basinmerge.connectivity`). This is not
the mode-connectivity study (that one lives elsewhere); it only compares WSA's options.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from basinmerge import data as data_mod
from basinmerge import models
from basinmerge.connectivity import barriers, interpolate
from basinmerge.console import progress_task
from basinmerge.errors import ConfigError
from basinmerge.experiments.common import ExperimentResult, StudyScale, Table, fmt_mean_std
from basinmerge.scope import (
    divergence,
    excess_kurtosis,
    live_input_masks,
    symmetric_kl,
    weight_scope,
)
from basinmerge.train import Trainer, evaluate, train_lockstep
from basinmerge.wsa import WSARegularizer


@dataclass(frozen=True)
class Variant:
    name: str
    divergence: str | None = None  # None: no penalty
    lam: float = 0.0
    reduce: str = "mean"


VARIANTS = (
    Variant("none"),
    Variant("kl λ=0.1", "kl", 0.1),
    Variant("kl λ=1", "kl", 1.0),
    Variant("kl λ=0.1 sum", "kl", 0.1, "sum"),
    Variant("reverse_kl λ=0.1", "reverse_kl", 0.1),
    Variant("reverse_kl λ=1", "reverse_kl", 1.0),
    Variant("w2 λ=30", "w2", 30.0),
    Variant("w2 λ=300", "w2", 300.0),
)



@dataclass(frozen=True)
class ScaleConfig(StudyScale, study="wsa_defaults"):
    """What a scale fixes: the dataset, training examples and evaluated examples (None: all),
    the MLP width, epochs, seeds and the variants compared (names in `VARIANTS`)."""

    dataset: str
    train: int | None
    evaluate: int | None
    width: int
    epochs: int
    seeds: tuple[int, ...]
    variants: tuple[str, ...]

    def check(self) -> None:
        known = [v.name for v in VARIANTS]
        bad = [v for v in self.variants if v not in known]
        if bad or not self.variants:
            raise ConfigError((f"unknown variant '{bad[0]}'" if bad else "no variant given")
                              + f"; choose from: {', '.join(known)}")
        if not self.seeds:
            raise ConfigError("wsa_defaults study seeds: give at least one seed")


ScaleConfig.define("smoke", dataset="digits", train=None, evaluate=None, width=32, epochs=6,
                   seeds=(0,), variants=("none", "kl λ=1"))
ScaleConfig.define("quick", dataset="fashion-mnist", train=10_000, evaluate=5_000, width=512,
                   epochs=3, seeds=(0, 1, 2), variants=tuple(v.name for v in VARIANTS))
ScaleConfig.define("full", dataset="fashion-mnist", train=None, evaluate=None, width=512,
                   epochs=10, seeds=(0, 1, 2, 3, 4), variants=tuple(v.name for v in VARIANTS))
INITS = ("shared", "independent")


def _pair(variant: Variant, init: str, seed: int, train, test, evals, width: int, epochs: int,
          refresh_every: int, device: str) -> dict:
    build = dict(name="mlp", in_shape=train.input_shape, num_classes=train.num_classes, width=width,
                 depth=2)
    a = models.build(**build, seed=1000 + seed)
    b = models.build(**build, seed=1000 + seed if init == "shared" else 2000 + seed)
    regs: list[list[WSARegularizer]] = [[], []]
    if variant.divergence is not None:
        regs = [[WSARegularizer.following([a, b], variant.lam, every=refresh_every,
                                          divergence=variant.divergence, reduce=variant.reduce)]
                for _ in range(2)]
    ta = Trainer(a, train, optimizer="sgd", lr=0.05, momentum=0.9, batch_size=128, epochs=epochs,
                 seed=seed, penalties=regs[0], device=device)
    tb = Trainer(b, train, optimizer="adam", lr=1e-3, batch_size=128, epochs=epochs,
                 seed=seed + 100, penalties=regs[1], device=device)
    train_lockstep([ta, tb])
    x_live = train.x[:2000]
    sa, sb = weight_scope(a), weight_scope(b)
    la = weight_scope(a, input_masks=live_input_masks(a, x_live))
    lb = weight_scope(b, input_masks=live_input_masks(b, x_live))
    bar = barriers(interpolate(a, b, evals, num_points=11, progress=False))
    kurt = [float(np.mean(list(excess_kurtosis(m).values()))) for m in (a, b)]
    return {
        "variant": variant.name, "init": init, "seed": seed,
        "scope_kl": symmetric_kl(sa, sb), "scope_kl_live": symmetric_kl(la, lb, same_counts=False),
        "scope_kl_head": 0.5 * (divergence(sa, sb).per_layer["head.weight"]
                                + divergence(sb, sa).per_layer["head.weight"]),
        "kurtosis_sgd": kurt[0], "kurtosis_adam": kurt[1],
        "acc_sgd": evaluate(a, test)["accuracy"], "acc_adam": evaluate(b, test)["accuracy"],
        "loss_barrier_test": bar["test"]["loss_barrier"],
        "loss_barrier_train": bar["train"]["loss_barrier"],
        "acc_barrier_test": bar["test"]["acc_barrier"],
    }


COLUMNS = ["variant", "scope sym-KL (all)", "sym-KL (live)", "sym-KL head", "kurtosis SGD",
           "kurtosis Adam", "test acc SGD", "test acc Adam", "loss barrier (test)",
           "loss barrier (train)", "acc barrier (test)"]
KEYS = ["scope_kl", "scope_kl_live", "scope_kl_head", "kurtosis_sgd", "kurtosis_adam", "acc_sgd",
        "acc_adam", "loss_barrier_test", "loss_barrier_train", "acc_barrier_test"]


def run(*, dataset: str | None = None, scale: str = "quick", seeds: Sequence[int] | None = None,
        out=None, device: str = "cpu", refresh_every: int = 5,
        variants: Sequence[str] | None = None, inits: Sequence[str] = INITS) -> ExperimentResult:
    """Train the SGD/Adam pairs of every (variant, init, seed) and tabulate mean ± std."""
    cfg = ScaleConfig.at(scale, dataset=dataset or None, seeds=seeds, variants=variants)
    dataset, seeds, names = cfg.dataset, cfg.seeds, cfg.variants
    by_name = {v.name: v for v in VARIANTS}
    chosen = [by_name[n] for n in names]
    t0 = time.perf_counter()
    train = data_mod.load(dataset, "train")
    test = data_mod.load(dataset, "test")
    if cfg.train is not None and cfg.train < len(train):
        train = train.subset(cfg.train, seed=0)
    n_eval = cfg.evaluate
    evals = {"train": train.subset(min(n_eval, len(train)), seed=1) if n_eval else train,
             "test": test.subset(min(n_eval, len(test)), seed=1) if n_eval else test}
    records = []
    jobs = [(v, i, s) for i in inits for v in chosen for s in seeds]
    with progress_task("wsa defaults", len(jobs)) as advance:
        for v, init, s in jobs:
            records.append(_pair(v, init, s, train, test, evals, cfg.width, cfg.epochs,
                                 refresh_every, device))
            advance(1, variant=v.name, init=init, seed=s)
    result = ExperimentResult(
        name="WSA regularizer defaults",
        config={"dataset": dataset, "scale": scale, "seeds": list(seeds), **{
            k: getattr(cfg, k) for k in ("train", "evaluate", "width", "epochs")},
            "refresh_every": refresh_every, "variants": list(names), "inits": list(inits),
            "sgd": {"lr": 0.05, "momentum": 0.9}, "adam": {"lr": 1e-3}, "batch_size": 128},
        data={"records": records},
    )
    for init in inits:
        rows = []
        for v in chosen:
            recs = [r for r in records if r["variant"] == v.name and r["init"] == init]
            rows.append([v.name] + [fmt_mean_std([r[k] for r in recs], 3) for k in KEYS])
        result.tables[f"{init} initialization"] = Table(
            COLUMNS, rows, caption=f"SGD vs Adam from {'one shared' if init == 'shared' else 'two independent'} "
            f"initialization(s); mean ± std over seeds {list(seeds)}.")
    result.seconds = time.perf_counter() - t0
    return result
