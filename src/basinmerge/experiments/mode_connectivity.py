"""The WSA mode-connectivity study: do two runs trained under different conditions lie on a
low-loss line, and does a regularizer during training (weight scope alignment, weight decay, a
proximal term) lower the barrier on that line?

*Conditions* (`CONDITIONS`) are pairs of training runs: from one shared initialization differing
in optimizer (SGD momentum vs Adam), learning rate (10x apart), batch size (32 vs 512) or data
(two class-skewed halves, a Dirichlet split); and from different initializations.

*Treatments* (`TREATMENTS`, a registry name -> factory ``ScaleConfig -> [Treatment]``) say how a
pair is trained and post-processed: plain, weight decay, a proximal term toward the shared
initialization, and WSA toward a shared target (the initialization's scope, a plainly trained
reference model's scope, or the fused scope of the two runs refreshed during training), each
with KL and squared-W2 divergences over a λ grid on its own scale. Every pair is trained in
lockstep (two `Trainer`s stepped in proportion to their progress), which for independent runs
changes nothing and lets the fused target follow both runs. A treatment can also reuse the
trained pair of another one and transform it before interpolation (`Treatment.reuse`,
`Treatment.post`): the permutation-alignment columns are added that way, e.g.::

    def _aligned(cfg):
        return [Treatment("aligned", "aligned", "plain, then B weight-matched to A",
                          reuse="plain", post=align_post, conditions=("seed",))]
    TREATMENTS["aligned"] = _aligned

For every pair: endpoint test accuracies, barriers on the linear path (`connectivity.barriers`),
the endpoints' scope divergence over all units and over live units only, and excess kurtosis;
mean ± std over seeds, and each treatment's barrier change against the plain pair of the same
seed with its 95% confidence interval (paired t).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn

from basinmerge import data as data_mod
from basinmerge import models, plots
from basinmerge.align import align
from basinmerge.connectivity import Curve, barriers, interpolate
from basinmerge.console import progress_task
from basinmerge.data import Dataset
from basinmerge.errors import ConfigError
from basinmerge.experiments.common import (
    ExperimentResult,
    StudyScale,
    Table,
    cpu_threads,
    fmt_mean_std,
    mean_std,
)
from basinmerge.penalties import ProximalPenalty
from basinmerge.scope import (
    Scope,
    excess_kurtosis,
    fuse,
    live_input_masks,
    scope_keys,
    symmetric_kl,
    weight_scope,
)
from basinmerge.train import Trainer, evaluate, train_lockstep
from basinmerge.wsa import WSARegularizer, fused_refresh

# --------------------------------------------------------------------------- conditions


@dataclass(frozen=True)
class RunConfig:
    """The training configuration of one run of a pair."""

    optimizer: str = "sgd"
    lr: float = 0.05
    batch_size: int = 128
    momentum: float = 0.9

    def describe(self) -> str:
        opt = f"SGD m={self.momentum:g}" if self.optimizer == "sgd" else self.optimizer.capitalize()
        return f"{opt} lr {self.lr:g} bs {self.batch_size}"


@dataclass(frozen=True)
class Condition:
    """A pair of runs: how they differ."""

    name: str
    description: str
    a: RunConfig
    b: RunConfig
    shared_init: bool = True
    data: str = "same"  # "same": both see the training set; "dirichlet": class-skewed halves


BASE = RunConfig()
CONDITIONS: dict[str, Condition] = {c.name: c for c in (
    Condition("optimizer", "shared init; SGD momentum vs Adam", BASE, RunConfig("adam", 1e-3)),
    Condition("lr", "shared init; SGD learning rates 10x apart", RunConfig(lr=0.01), RunConfig(lr=0.1)),
    Condition("batch", "shared init; batch size 32 vs 512", RunConfig(batch_size=32),
              RunConfig(batch_size=512)),
    Condition("data", "shared init; two class-skewed halves of the training set (Dirichlet)",
              BASE, BASE, data="dirichlet"),
    Condition("seed", "different initializations (and batch orders)", BASE, BASE, shared_init=False),
)}

# --------------------------------------------------------------------------- scales


@dataclass(frozen=True)
class ScaleConfig(StudyScale, study="mode_connectivity"):
    """Everything a scale fixes. `train_limit`/`eval_train`/`eval_test` None: the whole split."""

    train_limit: int | None
    epochs: int
    model_cfg: Mapping[str, Mapping]
    points: int
    eval_train: int | None
    eval_test: int | None
    kl_grid: tuple[float, ...]
    w2_grid: tuple[float, ...]
    seeds: int
    weight_decay: float = 1e-3
    prox_mu: float = 0.01
    refresh_every: int = 10
    dirichlet_alpha: float = 0.5
    reference: RunConfig = BASE

    def check(self) -> None:
        if self.seeds < 1:
            raise ConfigError(f"seeds must be >= 1, got {self.seeds}")


ScaleConfig.define("smoke", train_limit=256, epochs=3, points=5, eval_train=256, eval_test=256,
                   model_cfg={"mlp": {"width": 32, "depth": 1}, "vgg": {"width": 0.125},
                              "resnet20": {"width": 1}},
                   kl_grid=(0.1,), w2_grid=(300.0,), seeds=1, refresh_every=2)
ScaleConfig.define("quick", train_limit=10_000, epochs=3, points=11, eval_train=2_000,
                   eval_test=5_000, model_cfg={"mlp": {"width": 256, "depth": 2},
                                               "vgg": {"width": 0.5}, "resnet20": {"width": 1}},
                   kl_grid=(0.01, 0.1), w2_grid=(100.0, 1000.0), seeds=3)
ScaleConfig.define("full", train_limit=None, epochs=20, points=25, eval_train=10_000,
                   eval_test=None, model_cfg={"mlp": {"width": 512, "depth": 2},
                                              "vgg": {"width": 1.0}, "resnet20": {"width": 2}},
                   kl_grid=(1e-3, 1e-2, 1e-1, 1.0), w2_grid=(100.0, 300.0, 1000.0), seeds=5)

# --------------------------------------------------------------------------- treatments


@dataclass
class PairContext:
    """What a treatment may use to set up a pair: the condition, the seed, the untouched initial
    models, each run's training data, and (lazily) the reference model's scope."""

    condition: Condition
    seed: int
    scale: ScaleConfig
    init_a: nn.Module
    init_b: nn.Module
    data_a: Dataset
    data_b: Dataset
    eval_data: dict[str, Dataset]
    device: str
    reference: Callable[[], Scope]

    def init_scope(self) -> Scope:
        """The initialization's scope (fused over both inits when they differ)."""
        sa, sb = weight_scope(self.init_a), weight_scope(self.init_b)
        return sa if self.condition.shared_init else fuse([sa, sb])


@dataclass
class PairSetup:
    """Per-run penalties and trainer keyword overrides (e.g. ``weight_decay``)."""

    penalties: tuple[list, list] = field(default_factory=lambda: ([], []))
    overrides: tuple[dict, dict] = field(default_factory=lambda: ({}, {}))


@dataclass
class Endpoints:
    """The two models to interpolate, with extra `interpolate` options (e.g. a transform)."""

    a: nn.Module
    b: nn.Module
    interp: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Treatment:
    """How a pair is trained (`setup`) or which treatment's trained pair it reuses (`reuse`),
    and what is done to the pair before interpolating (`post`). `conditions`: where it
    applies (None: everywhere)."""

    name: str
    family: str
    description: str
    setup: Callable[[PairContext, nn.Module, nn.Module], PairSetup] | None = None
    reuse: str | None = None
    post: Callable[[PairContext, nn.Module, nn.Module], Endpoints] | None = None
    conditions: tuple[str, ...] | None = None

    def applies_to(self, condition: str) -> bool:
        return self.conditions is None or condition in self.conditions


def _plain(cfg: ScaleConfig) -> list[Treatment]:
    return [Treatment("plain", "plain", "no regularizer", setup=lambda ctx, a, b: PairSetup())]


def _weight_decay(cfg: ScaleConfig) -> list[Treatment]:
    wd = cfg.weight_decay
    return [Treatment("weight-decay", "weight decay", f"L2 weight decay {wd:g} (in the optimizer)",
                      setup=lambda ctx, a, b: PairSetup(overrides=({"weight_decay": wd},
                                                                   {"weight_decay": wd})))]


def _proximal(cfg: ScaleConfig) -> list[Treatment]:
    mu = cfg.prox_mu

    def setup(ctx: PairContext, a: nn.Module, b: nn.Module) -> PairSetup:
        # Toward the shared initialization; with different inits each run's own.
        return PairSetup(penalties=([ProximalPenalty(ctx.init_a, mu)], [ProximalPenalty(ctx.init_b, mu)]))

    return [Treatment("proximal", "proximal", f"μ/2‖w − w_init‖², μ = {mu:g}", setup=setup)]


WSA_TARGETS = ("init", "reference", "fused")


def _wsa_setup(target: str, kind: str, lam: float, refresh_every: int):
    def setup(ctx: PairContext, a: nn.Module, b: nn.Module) -> PairSetup:
        if target == "fused":
            refresh = fused_refresh([a, b])
            start = fuse([weight_scope(a), weight_scope(b)])
            regs = [WSARegularizer(start, lam, kind, refresh=refresh, refresh_every=refresh_every)
                    for _ in range(2)]
        else:
            scope = ctx.init_scope() if target == "init" else ctx.reference()
            regs = [WSARegularizer(scope, lam, kind) for _ in range(2)]
        return PairSetup(penalties=([regs[0]], [regs[1]]))

    return setup


def _wsa(cfg: ScaleConfig) -> list[Treatment]:
    out = []
    for target in WSA_TARGETS:
        for kind, grid in (("kl", cfg.kl_grid), ("w2", cfg.w2_grid)):
            for lam in grid:
                desc = {"init": "the initialization's scope",
                        "reference": "a plainly trained reference model's scope",
                        "fused": f"the pair's fused scope, refreshed every {cfg.refresh_every} steps"}[target]
                out.append(Treatment(f"wsa-{target}-{kind}-{lam:g}", f"wsa-{target}",
                                     f"WSA ({kind.upper()}, λ = {lam:g}) toward {desc}",
                                     setup=_wsa_setup(target, kind, lam, cfg.refresh_every)))
    return out


def _align_post(ctx: PairContext, a: nn.Module, b: nn.Module) -> Endpoints:
    """Permute B's hidden units onto A's by weight matching (Git Re-Basin) before interpolating."""
    return Endpoints(a, align(a, b, "weight", seed=ctx.seed))


def _aligned(cfg: ScaleConfig) -> list[Treatment]:
    """Permutation alignment of the different-seed pairs: the plain pair aligned, and each fused
    WSA pair aligned ("WSA + aligned"). Shared-init pairs need no alignment."""
    seeds_only = tuple(n for n, c in CONDITIONS.items() if not c.shared_init)
    out = [Treatment("aligned", "aligned", "the plain pair, B weight-matched onto A",
                     reuse="plain", post=_align_post, conditions=seeds_only)]
    for t in _wsa(cfg):
        if t.family == "wsa-fused":
            out.append(Treatment(f"{t.name}+aligned", "wsa+aligned",
                                 f"{t.description}, then B weight-matched onto A",
                                 reuse=t.name, post=_align_post, conditions=seeds_only))
    return out


TREATMENTS: dict[str, Callable[[ScaleConfig], list[Treatment]]] = {
    "plain": _plain,
    "weight-decay": _weight_decay,
    "proximal": _proximal,
    "wsa": _wsa,
    "aligned": _aligned,
}


def treatment_list(cfg: ScaleConfig, select: Sequence[str] | None = None) -> list[Treatment]:
    """All registered treatments for a scale, optionally only those whose name starts with one
    of `select` ("plain" is always kept: every other treatment is compared against it; a reused
    pair's source is kept too)."""
    every = [t for factory in TREATMENTS.values() for t in factory(cfg)]
    names = [t.name for t in every]
    if len(set(names)) != len(names):
        raise ConfigError("two registered treatments share a name")
    if select is None:
        return every
    chosen = {t.name for t in every if t.name == "plain" or any(t.name.startswith(s) for s in select)}
    unknown = [s for s in select if not any(n.startswith(s) for n in names)]
    if unknown:
        raise ConfigError(f"unknown treatment '{unknown[0]}'; choose from: {', '.join(names)}")
    chosen |= {t.reuse for t in every if t.name in chosen and t.reuse}
    return [t for t in every if t.name in chosen]


# --------------------------------------------------------------------------- training


def dirichlet_halves(labels: torch.Tensor, alpha: float, seed: int,
                     min_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Split example indices into two class-skewed halves: each class's share going to the first
    half is drawn from Dirichlet(α, α). Redrawn until each half holds >= `min_fraction`."""
    if alpha <= 0:
        raise ConfigError(f"Dirichlet alpha must be > 0, got {alpha}")
    y = labels.cpu().numpy()
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        first = []
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            first.append(idx[: int(round(rng.beta(alpha, alpha) * idx.size))])
        a = np.sort(np.concatenate(first))
        if min_fraction * y.size <= a.size <= (1 - min_fraction) * y.size:
            b = np.setdiff1d(np.arange(y.size), a)
            return torch.from_numpy(a), torch.from_numpy(b)
    raise ConfigError(f"could not draw a Dirichlet(α={alpha}) split with both halves >= "
                      f"{min_fraction:.0%} of the data")


def _trainer(model: nn.Module, data: Dataset, rc: RunConfig, cfg: ScaleConfig, seed: int,
             penalties: list, overrides: dict, device: str) -> Trainer:
    kw: dict[str, Any] = dict(optimizer=rc.optimizer, lr=rc.lr, momentum=rc.momentum, batch_size=rc.batch_size,
                              epochs=cfg.epochs, seed=seed, penalties=penalties, device=device)
    kw.update(overrides)
    return Trainer(model, data, **kw)


def train_pair(ctx: PairContext, treatment: Treatment) -> tuple[nn.Module, nn.Module]:
    """Train the pair of `ctx` under `treatment` (in lockstep) and return the two models."""
    if treatment.setup is None:
        raise ConfigError(f"treatment '{treatment.name}' has neither a setup nor a reuse")
    a, b = copy.deepcopy(ctx.init_a), copy.deepcopy(ctx.init_b)
    setup = treatment.setup(ctx, a, b)
    c = ctx.condition
    trainers = [_trainer(a, ctx.data_a, c.a, ctx.scale, 1000 + ctx.seed, setup.penalties[0],
                         setup.overrides[0], ctx.device),
                _trainer(b, ctx.data_b, c.b, ctx.scale, 2000 + ctx.seed, setup.penalties[1],
                         setup.overrides[1], ctx.device)]
    train_lockstep(trainers)
    return a, b


# --------------------------------------------------------------------------- measuring


def measure_pair(ctx: PairContext, ends: Endpoints, label: str) -> tuple[dict, Curve]:
    """Interpolate the pair and collect its metrics (one flat dict) and its curve."""
    curve = interpolate(ends.a, ends.b, ctx.eval_data, num_points=ctx.scale.points, label=label,
                        progress=False, **ends.interp)
    bars = barriers(curve)
    x_live = ctx.eval_data["train"].x
    m: dict = {}
    for split, b in bars.items():
        for k, v in b.items():
            m[f"{split}_{k}"] = v
    test = ctx.eval_data["test"]
    for tag, net in (("a", ends.a), ("b", ends.b)):
        m[f"test_acc_{tag}"] = evaluate(net, test)["accuracy"]
    scopes = [weight_scope(n) for n in (ends.a, ends.b)]
    masks = [live_input_masks(n, x_live) for n in (ends.a, ends.b)]
    live = [weight_scope(n, input_masks=mk) for n, mk in zip((ends.a, ends.b), masks, strict=True)]
    m["scope_div"] = symmetric_kl(scopes[0], scopes[1])
    m["scope_div_live"] = symmetric_kl(live[0], live[1], same_counts=False)
    kurt = [v for n in (ends.a, ends.b) for v in excess_kurtosis(n).values()]
    m["kurtosis"] = float(np.nanmean(kurt))
    hidden = [k for k in scope_keys(ends.a)][1:]  # inputs of the first layer are pixels
    m["live_fraction"] = float(np.mean([float(mk[k].float().mean()) for mk in masks for k in hidden])) \
        if hidden else 1.0
    m["scopes"] = {"a": scopes[0].to_dict(), "b": scopes[1].to_dict(),
                   "a_live": live[0].to_dict(), "b_live": live[1].to_dict()}
    return m, curve


# --------------------------------------------------------------------------- the study


def _ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of a t confidence interval; (mean, nan, nan) for a single value."""
    a = np.asarray(values, dtype=np.float64)
    mean = float(a.mean())
    if a.size < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, a.size - 1) * a.std(ddof=1) / math.sqrt(a.size))
    return mean, mean - half, mean + half


def _verdict(deltas: Sequence[float]) -> str:
    mean, lo, hi = _ci(deltas)
    if math.isnan(lo):
        return "n/a (1 seed)"
    if hi < 0:
        return "lower"
    if lo > 0:
        return "higher"
    return "within noise"


REAL_LOSS_BARRIER = 0.05
REAL_ACC_BARRIER = 0.01


def _is_real(loss_b: Sequence[float], acc_b: Sequence[float]) -> bool:
    """A condition has a real barrier when the plain pairs' test loss barrier is >= 0.05 or their
    accuracy barrier >= 1 point, at the lower end of the 95% interval over seeds (or for the
    single value with one seed)."""
    def low(v):
        m, lo, _ = _ci(v)
        return m if math.isnan(lo) else lo
    return low(loss_b) >= REAL_LOSS_BARRIER or low(acc_b) >= REAL_ACC_BARRIER


def _model_config(model: str, cfg: ScaleConfig) -> dict:
    if model not in models.ARCHITECTURES:
        raise ConfigError(f"unknown model '{model}'; choose one of: {', '.join(models.ARCHITECTURES)}")
    return dict(cfg.model_cfg.get(model, {}))


def run(*, dataset: str = "fashion-mnist", model: str = "mlp", scale: str = "quick",
        seeds: int | None = None, out=None, device: str = "cpu", root: str | None = None,
        conditions: Sequence[str] | None = None, treatments: Sequence[str] | None = None,
        threads: int | None = 1, progress: bool = True) -> ExperimentResult:
    """Run the study; see the module docstring. `out` is accepted for symmetry with the other
    studies (the CLI writes the result); nothing is cached on disk. `threads`: torch threads on
    the CPU during the run (1 is fastest on a shared 2-core machine), restored afterwards."""
    del out
    cfg = ScaleConfig.at(scale, seeds=seeds)
    n_seeds = cfg.seeds
    cond_names = list(conditions) if conditions else list(CONDITIONS)
    for c in cond_names:
        if c not in CONDITIONS:
            raise ConfigError(f"unknown condition '{c}'; choose from: {', '.join(CONDITIONS)}")
    treats = treatment_list(cfg, treatments)
    model_cfg = _model_config(model, cfg)

    t0 = time.perf_counter()
    with cpu_threads(threads, device):
        records, curves, weights = _run_all(dataset, model, model_cfg, cfg, n_seeds, cond_names,
                                            treats, device, root, progress)
    seconds = time.perf_counter() - t0
    result = _report(dataset, model, model_cfg, scale, cfg, n_seeds, cond_names, treats, records,
                     curves, weights, device)
    result.seconds = seconds
    return result


def _run_all(dataset: str, model: str, model_cfg: dict[str, Any], cfg: ScaleConfig, n_seeds: int,
             cond_names: list[str], treats: list[Treatment], device: str, root: str | None,
             progress: bool) -> tuple[list[dict], dict[tuple[str, str, int], Curve],
                                      dict[tuple[str, str], dict[str, dict[str, torch.Tensor]]]]:
    train_full = data_mod.load(dataset, "train", root)
    test = data_mod.load(dataset, "test", root)
    train = train_full.subset(cfg.train_limit, seed=0) if cfg.train_limit and cfg.train_limit < len(train_full) \
        else train_full
    eval_data = {
        "train": train.subset(cfg.eval_train, seed=1) if cfg.eval_train and cfg.eval_train < len(train) else train,
        "test": test.subset(cfg.eval_test, seed=1) if cfg.eval_test and cfg.eval_test < len(test) else test,
    }
    eval_data = {k: v.to(device) for k, v in eval_data.items()}
    train = train.to(device)

    def build(seed: int) -> nn.Module:
        return models.build(model, train.input_shape, train.num_classes, seed=seed, **model_cfg).to(device)

    records: list[dict] = []
    curves: dict[tuple[str, str, int], Curve] = {}
    weights: dict[tuple[str, str], dict[str, dict[str, torch.Tensor]]] = {}
    total = n_seeds * sum(t.applies_to(c) for c in cond_names for t in treats)
    hist_cond = _hist_condition(cond_names)
    with progress_task("mode connectivity", total, enabled=progress) as advance:
        for seed in range(n_seeds):
            ref_cache: dict[str, Scope] = {}

            def reference(seed=seed, ref_cache=ref_cache) -> Scope:
                if "scope" not in ref_cache:
                    net = build(seed)
                    _trainer(net, train, cfg.reference, cfg, 3000 + seed, [], {}, device).run(progress=False)
                    ref_cache["scope"] = weight_scope(net)
                return ref_cache["scope"]

            for cname in cond_names:
                cond = CONDITIONS[cname]
                if cond.data == "dirichlet":
                    ia, ib = dirichlet_halves(train.y, cfg.dirichlet_alpha, seed)
                    data_a, data_b = train.subset(ia), train.subset(ib)
                else:
                    data_a = data_b = train
                ctx = PairContext(cond, seed, cfg, build(seed), build(seed if cond.shared_init else 10_000 + seed),
                                  data_a, data_b, eval_data, device, reference)
                trained: dict[str, tuple[nn.Module, nn.Module]] = {}
                for tr in treats:
                    if not tr.applies_to(cname):
                        continue
                    t1 = time.perf_counter()
                    if tr.reuse is not None:
                        if tr.reuse not in trained:
                            raise ConfigError(f"treatment '{tr.name}' reuses '{tr.reuse}', which has "
                                              f"not run before it for condition '{cname}'")
                        a, b = (copy.deepcopy(m) for m in trained[tr.reuse])
                    else:
                        a, b = train_pair(ctx, tr)
                        trained[tr.name] = (a, b)
                    ends = tr.post(ctx, copy.deepcopy(a), copy.deepcopy(b)) if tr.post else Endpoints(a, b)
                    m, curve = measure_pair(ctx, ends, tr.name)
                    m.update(condition=cname, treatment=tr.name, family=tr.family, seed=seed,
                             seconds=time.perf_counter() - t1)
                    records.append(m)
                    curves[(cname, tr.name, seed)] = curve
                    if seed == 0 and cname == hist_cond:
                        weights[(cname, tr.name)] = {
                            "A": {k: v.detach().cpu().clone() for k, v in ends.a.state_dict().items()
                                  if k in set(scope_keys(ends.a))},
                            "B": {k: v.detach().cpu().clone() for k, v in ends.b.state_dict().items()
                                  if k in set(scope_keys(ends.b))}}
                    advance(1, seed=seed, condition=cname, treatment=tr.name,
                            barrier=m["test_loss_barrier"])
    return records, curves, weights


# --------------------------------------------------------------------------- the report

_COLUMNS = ["treatment", "acc A %", "acc B %", "Δ acc vs plain (pts)", "loss barrier",
            "Δ loss barrier vs plain [95% CI]", "acc barrier (pts)", "scope div (all)",
            "scope div (live)", "kurtosis"]
_MARK = {"lower": " ↓", "higher": " ↑", "within noise": "", "n/a (1 seed)": "", "—": ""}


def _fmt(values: Sequence[float], digits: int = 3) -> str:
    """mean ± std over seeds; the bare value for a single seed."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return fmt_mean_std(values, digits)


def _fmt_ci(values: Sequence[float], digits: int = 3) -> str:
    mean, lo, hi = _ci(values)
    if math.isnan(lo):
        return f"{mean:+.{digits}f}"
    return f"{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def _report(dataset, model, model_cfg, scale, cfg, n_seeds, cond_names, treats, records, curves,
            weights, device) -> ExperimentResult:
    by: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        by.setdefault((r["condition"], r["treatment"]), []).append(r)

    def col(cname, tname, key, factor=1.0):
        return [r[key] * factor for r in sorted(by.get((cname, tname), []), key=lambda r: r["seed"])]

    def paired(cname, tname, key):
        plain = {r["seed"]: r[key] for r in by.get((cname, "plain"), [])}
        return [r[key] - plain[r["seed"]] for r in by.get((cname, tname), []) if r["seed"] in plain]

    def mean_acc(r):
        return 0.5 * (r["test_acc_a"] + r["test_acc_b"])

    tables: dict[str, Table] = {}
    summary_rows = []
    aggregates: dict = {}
    real: dict[str, bool] = {}
    for cname in cond_names:
        cond = CONDITIONS[cname]
        rows = []
        lowered = []
        for tr in treats:
            if (cname, tr.name) not in by:
                continue
            recs = by[(cname, tr.name)]
            deltas = paired(cname, tr.name, "test_loss_barrier")
            verdict = "—" if tr.name == "plain" else _verdict(deltas)
            plain_acc = {r["seed"]: mean_acc(r) for r in by.get((cname, "plain"), [])}
            acc_cost = [mean_acc(r) - plain_acc[r["seed"]] for r in recs if r["seed"] in plain_acc]
            if verdict == "lower":
                lowered.append(f"{tr.name} (Δacc {100 * np.mean(acc_cost):+.1f} pts)")
            rows.append([tr.name, _fmt(col(cname, tr.name, "test_acc_a", 100), 2),
                         _fmt(col(cname, tr.name, "test_acc_b", 100), 2),
                         "—" if tr.name == "plain" else _fmt([100 * v for v in acc_cost], 2),
                         _fmt(col(cname, tr.name, "test_loss_barrier")),
                         "—" if tr.name == "plain" else _fmt_ci(deltas) + _MARK[verdict],
                         _fmt(col(cname, tr.name, "test_acc_barrier", 100), 2),
                         _fmt(col(cname, tr.name, "scope_div"), 4),
                         _fmt(col(cname, tr.name, "scope_div_live"), 4),
                         _fmt(col(cname, tr.name, "kurtosis"), 2)])
            aggregates.setdefault(cname, {})[tr.name] = {
                key: dict(zip(("mean", "std"), mean_std(col(cname, tr.name, key)), strict=True))
                for key in ("test_acc_a", "test_acc_b", "test_loss_barrier", "test_linear_loss_barrier",
                            "test_acc_barrier", "train_loss_barrier", "train_acc_barrier", "scope_div",
                            "scope_div_live", "kurtosis", "live_fraction")} | {
                "delta_test_loss_barrier": dict(zip(("mean", "low", "high"), _ci(deltas), strict=True))
                if deltas and tr.name != "plain" else None,
                "delta_mean_test_acc": mean_std(acc_cost)[0] if acc_cost else None,
                "verdict": verdict, "seeds": len(recs)}
        lb, ab = col(cname, "plain", "test_loss_barrier"), col(cname, "plain", "test_acc_barrier")
        real[cname] = bool(lb) and _is_real(lb, ab)
        tables[f"condition: {cname}"] = Table(
            _COLUMNS, rows,
            f"{cond.description}. A: {cond.a.describe()}; B: {cond.b.describe()}. Test split; acc: "
            f"endpoint test accuracy; Δ acc: change of the endpoints' mean accuracy; mean ± std over {n_seeds} seed(s); Δ: paired difference to the plain pair of the "
            f"same seed, mean [95% CI], ↓/↑ where the interval excludes 0 (train-split barriers are in the JSON). Real barrier: {'yes' if real[cname] else 'no'}.")
        summary_rows.append([cname, cond.description, _fmt(lb), _fmt([100 * v for v in ab], 2),
                             "yes" if real[cname] else "no", "; ".join(lowered) or "none"])
    tables = {"conditions": Table(
        ["condition", "pair", "plain loss barrier", "plain acc barrier (pts)", "real barrier",
         "treatments that lowered the loss barrier (95% CI below 0)"], summary_rows,
        f"Real barrier: the plain pairs' test loss barrier >= {REAL_LOSS_BARRIER} or accuracy "
        f"barrier >= {100 * REAL_ACC_BARRIER:.0f} point at the low end of the 95% interval over "
        f"seeds.")} | tables

    figures = _figures(cond_names, treats, by, curves, weights)
    notes = _notes(dataset, model, model_cfg, scale, cfg, n_seeds, device)
    data = {"records": [{k: v for k, v in r.items()} for r in records],
            "curves": [{"condition": c, "treatment": t, "seed": s, **cv.to_dict()}
                       for (c, t, s), cv in curves.items()],
            "aggregates": aggregates, "real_barrier": real,
            "conditions": {c: asdict(CONDITIONS[c]) for c in cond_names},
            "treatments": [{"name": t.name, "family": t.family, "description": t.description,
                            "reuse": t.reuse, "conditions": t.conditions} for t in treats]}
    config = {"dataset": dataset, "model": model, "model_cfg": dict(model_cfg), "scale": scale,
              "seeds": n_seeds, "device": device, "scale_config": {
                  k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(cfg).items()}}
    return ExperimentResult("mode-connectivity", config, tables, figures, data, notes)


def _best_wsa_per_target(cname: str, treats: Sequence[Treatment], by) -> list[str]:
    """Per WSA target, the setting with the lowest mean test loss barrier in this condition."""
    out = []
    for target in WSA_TARGETS:
        cands = [t.name for t in treats if t.family == f"wsa-{target}" and (cname, t.name) in by]
        if cands:
            out.append(min(cands, key=lambda n: np.mean([r["test_loss_barrier"] for r in by[(cname, n)]])))
    return out


def _hist_condition(cond_names: Sequence[str]) -> str:
    """The condition whose seed-0 pair is shown in the scope histograms (SGD vs Adam: the
    paper's Fig. 1 case, when it was run)."""
    return "optimizer" if "optimizer" in cond_names else cond_names[0]


def _figures(cond_names, treats, by, curves, weights) -> dict:
    figures = {}
    for cname in cond_names:
        names = [t.name for t in treats if not t.family.startswith("wsa")]
        names += _best_wsa_per_target(cname, treats, by)
        chosen = {n: curves[(cname, n, 0)] for n in names if (cname, n, 0) in curves}
        if chosen:
            figures[f"curves_{cname}"] = plots.interpolation_curves(
                chosen, title=f"{cname}: {CONDITIONS[cname].description} (seed 0)")
    hist_cond = _hist_condition(cond_names)
    best = _best_wsa_per_target(hist_cond, treats, by)
    if best and (hist_cond, "plain") in weights:
        wsa_name = min(best, key=lambda n: np.mean([r["test_loss_barrier"] for r in by[(hist_cond, n)]]))
        desc = (f"condition '{hist_cond}' (seed 0): A = {CONDITIONS[hist_cond].a.describe()}, "
                f"B = {CONDITIONS[hist_cond].b.describe()}")
        for name in ("plain", wsa_name):
            figures[f"scope_histograms_{name}"] = plots.weight_histograms(
                weights[(hist_cond, name)], title=f"weight scopes, {name}, {desc}")
    return figures


def _notes(dataset, model, model_cfg, scale, cfg: ScaleConfig, n_seeds, device) -> list[str]:
    arch = ", ".join(f"{k}={v}" for k, v in model_cfg.items())
    notes = [
        f"Scale '{scale}': {model} ({arch}) on {dataset}, "
        f"{'the full training set' if cfg.train_limit is None else f'a fixed random subset of {cfg.train_limit} training examples'}, "
        f"{cfg.epochs} epoch(s) per run, {n_seeds} seed(s), {cfg.points} points on the line; curves "
        f"evaluated on {cfg.eval_train or 'all'} training examples and "
        f"{cfg.eval_test or 'all'} test examples; device {device}.",
        f"λ grids: KL {list(cfg.kl_grid)}, squared W2 {list(cfg.w2_grid)} (mean over layers)"
        + (" — reduced from the full grids KL [0.001, 0.01, 0.1, 1], W2 [100, 300, 1000] to fit "
           "the time budget." if scale != "full" else "."),
        f"Weight decay {cfg.weight_decay:g}; proximal μ = {cfg.prox_mu:g} toward the shared "
        "initialization (for the different-seed pairs each run's own initialization: there is no "
        "shared one, so this term cannot pull the runs together). Reference target: one model per "
        f"seed trained plainly ({cfg.reference.describe()}) from that seed's initialization. Fused "
        f"target: moment-matched scope of the two runs, refreshed every {cfg.refresh_every} steps "
        "(runs stepped in lockstep).",
        "Scope divergence: mean over layers of the symmetric KL between the endpoints' layer "
        "Gaussians; 'live' uses only weights whose input unit is non-zero on some training "
        "example (dead ReLU units' outgoing weights excluded). Kurtosis: excess kurtosis averaged "
        "over layers and both endpoints.",
        "Verdict: 'lower'/'higher' when the 95% t-interval of the paired (same seed) difference "
        "in test loss barrier to the plain pair excludes 0; otherwise 'within noise'.",
    ]
    return notes
