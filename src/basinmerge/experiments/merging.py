"""Study: every merge method on K = 4 class-skewed fine-tunes of one base, with and without a
malicious member.

Per seed: a random training subset is split into a labeled *merge set* (held out: used for
greedy soup, soft merging, AdaMerging's unlabeled inputs and the choice of task-vector scales)
and a pool. A base MLP is trained briefly on the whole pool; K = 4 copies are fine-tuned on
class-skewed shards of it (each shard owns 2-3 classes: 80% of an owned class's examples go to
its owner, the rest spread uniformly). Every method merges the fine-tunes; the baselines are
the base, the best single member (chosen on the merge set) and the output ensemble (mean of the
members' softmax). Conditions: the K clean members, and the K members plus one malicious copy
of member 0 (weights x1000, replaced by N(0, 10) noise, or sign-flipped). Reported: test
accuracy, mean +- std over seeds.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from basinmerge import data as data_mod
from basinmerge import merge as M
from basinmerge import models, plots
from basinmerge.console import progress_task
from basinmerge.errors import ConfigError
from basinmerge.experiments.common import (
    ExperimentResult,
    StudyScale,
    Table,
    fmt_mean_std,
    mean_std,
)
from basinmerge.merge._common import StateSource
from basinmerge.merge.guard import check_members
from basinmerge.merge.registry import all_methods
from basinmerge.state import StateDict, with_state
from basinmerge.train import evaluate, fit, predict_logits

K = 4
MALICIOUS = ("x1000", "noise", "flip")
CONDITIONS = ("clean",) + tuple(f"+{m}" for m in MALICIOUS)
SCALE_GRID = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class ScaleConfig(StudyScale, study="merging"):
    """What a scale fixes. `train_limit` / `test_limit` None: the whole split; `scales`: the
    task-vector scales tried on the merge set; `seeds`: how many seeds by default."""

    train_limit: int | None
    merge_examples: int
    width: int
    depth: int
    base_epochs: int
    ft_epochs: int
    soft_steps: int
    ada_steps: int
    fisher_examples: int
    regmean_examples: int
    test_limit: int | None
    scales: tuple[float, ...]
    seeds: int

    def check(self) -> None:
        if self.seeds < 1:
            raise ConfigError(f"seeds must be >= 1, got {self.seeds}")


ScaleConfig.define("smoke", train_limit=1200, merge_examples=300, width=32, depth=2,
                   base_epochs=4, ft_epochs=2, soft_steps=40, ada_steps=20, fisher_examples=16,
                   regmean_examples=200, test_limit=500, scales=(0.5, 1.0), seeds=1)
ScaleConfig.define("quick", train_limit=12000, merge_examples=2000, width=256, depth=2,
                   base_epochs=1, ft_epochs=2, soft_steps=300, ada_steps=200,
                   fisher_examples=256, regmean_examples=1000, test_limit=None,
                   scales=SCALE_GRID, seeds=3)
ScaleConfig.define("full", train_limit=None, merge_examples=5000, width=512, depth=2,
                   base_epochs=3, ft_epochs=5, soft_steps=1000, ada_steps=500,
                   fisher_examples=1000, regmean_examples=2000, test_limit=None,
                   scales=SCALE_GRID, seeds=5)

# The study runs every registered merge method (`basinmerge.merge.registry`), in registry
# order, with the library's defaults except where these tables say otherwise. What a method
# gets follows from what it declares: a base when it needs one; the labeled merge set, or its
# inputs, for labeled / unlabeled data (each member's own shard for PER_MEMBER_DATA); the
# study's network (option `model`), seed (`seed`) and no progress bar (`progress`) where it
# has those options; and its `scale` chosen on the merge set from the scale's grid.
BASELINES = ("base model", "best single", "ensemble")
SKIPPED = {"weighted": "it needs one weight per model; 'average' is the equal-weight case"}
STUDY_OPTIONS: dict[str, dict[str, Any]] = {
    "trimmed_mean": {"trim": 0.25}, "ties": {"density": 0.2}, "dare": {"drop": 0.5},
    "regmean": {"alpha": 0.9}}
# Options whose value is a field of the scale config (option -> field).
SCALE_OPTIONS: dict[str, dict[str, str]] = {
    "regmean": {"num_examples": "regmean_examples"}, "adamerging": {"steps": "ada_steps"},
    "soft": {"steps": "soft_steps"}}
# Methods that run once per value of one option: (option, values, row label format).
VARIANTS: dict[str, tuple[str, tuple[Any, ...], str]] = {
    "adamerging": ("granularity", ("task", "layer"), "{}"),
    "soft": ("units", ("tensor", "module"), "{} units")}
PER_MEMBER_DATA = frozenset({"fisher", "regmean"})


@dataclass(frozen=True)
class PlanRow:
    """One row of the comparison: its label, the registered method and its fixed options."""

    row: str
    method: str
    options: dict[str, Any]

    @property
    def data(self) -> str | None:
        """What data the method gets: None, "merge set", "merge inputs" or "shards"."""
        needs = M.METHODS[self.method].needs_data
        if needs is None:
            return None
        if self.method in PER_MEMBER_DATA:
            return "shards"
        return "merge set" if needs == "labeled" else "merge inputs"

    @property
    def tune(self) -> bool:
        """True when the method's `scale` is chosen on the merge set."""
        return "scale" in M.METHODS[self.method].options


def study_rows() -> list[PlanRow]:
    """Every merge the study runs, derived from the registry and the tables above."""
    rows = []
    for m in all_methods():
        if m.name in SKIPPED:
            continue
        option, values, label = VARIANTS.get(m.name, ("", (None,), ""))
        for value in values:
            extra = {option: value} if option else {}
            name = f"{m.name} ({label.format(value)})" if option else m.name
            rows.append(PlanRow(name, m.name, {**STUDY_OPTIONS.get(m.name, {}), **extra}))
    return rows


def study_plan(net: torch.nn.Module, cfg: ScaleConfig, seed: int) -> list[tuple[PlanRow, dict]]:
    """Every row with its full options for one seed (see the tables above); options not
    given are the library's defaults."""
    plan = []
    for row in study_rows():
        declared = M.METHODS[row.method].options
        runtime = {"model": net, "seed": seed, "progress": False}
        opts = {k: v for k, v in runtime.items() if k in declared}
        opts.update({k: getattr(cfg, f) for k, f in SCALE_OPTIONS.get(row.method, {}).items()})
        plan.append((row, {**opts, **row.options}))
    return plan


def method_rows() -> list[str]:
    """The rows of the accuracy table: the baselines, then every merge the study runs (read
    from the registry when called, so a method registered after import is included)."""
    return list(BASELINES) + [r.row for r in study_rows()]


def skewed_shards(y: torch.Tensor, k: int, dominant: float, generator: torch.Generator) -> list[torch.Tensor]:
    """A partition of the indices into k class-skewed shards: class c is owned by shard
    c * k // num_classes; an example goes to its class's owner with probability `dominant`,
    else to a uniformly random shard."""
    num_classes = int(y.max()) + 1
    owner = (y * k) // num_classes
    to_owner = torch.rand(y.shape[0], generator=generator) < dominant
    random_shard = torch.randint(0, k, (y.shape[0],), generator=generator)
    shard = torch.where(to_owner, owner, random_shard)
    return [torch.nonzero(shard == i).flatten() for i in range(k)]


def malicious(state: StateDict, kind: str, generator: torch.Generator) -> StateDict:
    """A corrupted copy of `state`: weights x1000, N(0, 10) noise, or sign-flipped."""
    out = {}
    for key, v in state.items():
        if not v.is_floating_point():
            out[key] = v.clone()
        elif kind == "x1000":
            out[key] = v * 1000
        elif kind == "noise":
            out[key] = torch.randn(v.shape, generator=generator) * 10
        elif kind == "flip":
            out[key] = -v
        else:
            raise ValueError(kind)
    return out


def _ensemble_accuracy(net: torch.nn.Module, states: list[StateDict], test) -> float:
    probs = torch.stack([torch.softmax(predict_logits(with_state(net, s), test.x), dim=-1)
                         for s in states]).sum(0)
    return float((probs.argmax(-1) == test.y).double().mean())


def _tuned(build: Callable[[float], StateDict], scales, score: Callable[[StateDict], float]) -> tuple[StateDict, float]:
    """The merge whose scale scores best on the merge set."""
    best: tuple[StateDict, float, float] | None = None
    for s in scales:
        state = build(s)
        acc = score(state)
        if best is None or acc > best[1]:
            best = (state, acc, s)
    if best is None:
        raise ConfigError("tuning needs at least one scale")
    return best[0], best[2]


def _record_info(method: str, opts: dict, info: dict, ada: dict, gates: dict) -> None:
    """Keep what AdaMerging and soft merging learned (their tables)."""
    if method == "adamerging":
        ada[opts["granularity"]] = {
            "entropy_first": info["entropy_first"], "entropy_last": info["entropy_last"],
            "mean_lambda": [float(sum(v.values()) / len(v)) if isinstance(v, dict) else float(v)
                            for v in info["lambdas"].values()]}
    elif method == "soft":
        gates[opts["units"]] = info["gates"].model_summary()


def run_condition(net: torch.nn.Module, base: StateDict, members: list[StateDict],
                  shard_data: list, merge_set, test, cfg: ScaleConfig, seed: int,
                  fishers: list[StateDict | None]) -> tuple[dict, dict, dict]:
    """Accuracy (and seconds) of every method for one set of members. `fishers` holds the
    members' diagonal Fishers already computed (None: compute; filled in place), so the clean
    members' Fishers are computed once per seed."""
    acc: dict[str, float] = {}
    secs: dict[str, float] = {}
    extra: dict[str, Any] = {}
    val_x = merge_set.x

    def test_acc(state: StateDict) -> float:
        return evaluate(with_state(net, state), test)["accuracy"]

    def val_acc(state: StateDict) -> float:
        return evaluate(with_state(net, state), merge_set)["accuracy"]

    acc["base model"] = test_acc(base)
    vals = [val_acc(s) for s in members]
    acc["best single"] = test_acc(members[max(range(len(members)), key=lambda i: vals[i])])
    acc["ensemble"] = _ensemble_accuracy(net, members, test)
    scales = cfg.scales
    chosen: dict[str, float] = {}
    ada: dict[str, dict] = {}
    gates: dict[str, list] = {}
    datas = {None: None, "merge set": merge_set, "merge inputs": val_x, "shards": shard_data}
    for plan_row, options in study_plan(net, cfg, seed):
        row, method = plan_row.row, plan_row.method
        m = M.METHODS[method]
        opts = dict(options)
        t0 = time.perf_counter()
        if method == "fisher":  # the members' Fishers, computed once per seed and member
            for i, f in enumerate(fishers):
                if f is None:
                    fishers[i] = M.diagonal_fisher(net, members[i], shard_data[i],
                                                   num_examples=cfg.fisher_examples)
            opts["fishers"] = fishers

        def build(scale: float | None = None, method=method, m=m, opts=opts,
                  data_kind=plan_row.data) -> tuple[StateDict, dict]:
            extra_opts: dict[str, Any] = {} if scale is None else {"scale": scale}
            return M.merge(members, method, base=base if m.needs_base else None,
                           data=datas[data_kind], return_info=True, **opts, **extra_opts)

        info: dict
        if plan_row.tune:
            def merged(sc: float, build=build) -> StateDict:
                return build(sc)[0]

            state, s = _tuned(merged, scales, val_acc)
            chosen[row], info = s, {}
        else:
            state, info = build()
        secs[row] = time.perf_counter() - t0
        acc[row] = test_acc(state)
        _record_info(method, opts, info, ada, gates)
    extra["scales"] = chosen
    extra["adamerging"] = ada
    extra["soft_gates"] = gates
    report = check_members(StateSource(members))  # the member guard of `merge_checkpoints`
    extra["guard"] = {"distance": report.distance, "flagged": report.flagged()}
    return acc, secs, extra


def run(*, dataset: str | None = None, scale: str = "quick", seeds: int | None = None,
        seed: int = 0, out: str | Path | None = None, device: str = "cpu",
        root: str | None = None, progress: bool = True) -> ExperimentResult:
    """Run the merging study over seeds ``seed .. seed + seeds - 1`` (default count per scale:
    the scale's `seeds`); `dataset` defaults to Fashion-MNIST, else MNIST-1D. `out` is only
    recorded (the CLI writes the result there)."""
    cfg = ScaleConfig.at(scale, seeds=seeds)
    seeds = cfg.seeds
    if dataset is None:
        dataset = data_mod.first_available(("fashion-mnist", "mnist1d"))
    t_start = time.perf_counter()
    train_full = data_mod.load(dataset, "train", root)
    test = data_mod.load(dataset, "test", root)
    if cfg.test_limit is not None and cfg.test_limit < len(test):
        test = test.subset(cfg.test_limit, seed=0)
    limit = cfg.train_limit
    if limit is not None and limit >= len(train_full):
        limit = None
    per_seed: list[dict] = []
    with progress_task("merging study", seeds * len(CONDITIONS), enabled=progress) as advance:
        first = seed
        for seed in range(first, first + seeds):
            g = torch.Generator().manual_seed(1000 + seed)
            pool_all = train_full.subset(limit, seed=seed) if limit is not None else train_full
            perm = torch.randperm(len(pool_all), generator=g)
            n_merge = min(cfg.merge_examples, len(pool_all) // 5)
            merge_set = pool_all.subset(perm[:n_merge])
            pool = pool_all.subset(perm[n_merge:])
            net = models.build("mlp", train_full.input_shape, train_full.num_classes, seed=seed,
                               width=cfg.width, depth=cfg.depth).to(device)
            fit(net, pool, optimizer="sgd", lr=0.05, epochs=cfg.base_epochs, seed=seed,
                progress=False, device=device)
            base = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            shards = skewed_shards(pool.y, K, 0.8, g)
            members, shard_data = [], []
            for i, idx in enumerate(shards):
                m = copy.deepcopy(net)
                fit(m, pool.subset(idx), optimizer="sgd", lr=0.05, epochs=cfg.ft_epochs,
                    seed=seed * 100 + i, progress=False, device=device)
                members.append({k: v.detach().cpu().clone() for k, v in m.state_dict().items()})
                shard_data.append(pool.subset(idx))
            net = net.cpu()
            record: dict[str, Any] = {"seed": seed, "shard_sizes": [int(s.numel()) for s in shards],
                                      "member_test_accuracy": [evaluate(with_state(net, s), test)["accuracy"]
                                                               for s in members]}
            clean_fishers: list[StateDict | None] = [None] * K
            for cond in CONDITIONS:
                ms, sd, fs = list(members), list(shard_data), clean_fishers
                if cond != "clean":
                    ms.append(malicious(members[0], cond[1:], g))
                    sd.append(shard_data[0])
                    fs = clean_fishers + [None]
                acc, secs, extra = run_condition(net, base, ms, sd, merge_set, test, cfg, seed, fs)
                record[cond] = {"accuracy": acc, "seconds": secs, **extra}
                advance(1, seed=seed, condition=cond)
            per_seed.append(record)
    return _result(dataset, scale, seeds, cfg, per_seed, out, len(train_full), limit,
                   time.perf_counter() - t_start)


def _result(dataset: str, scale: str, seeds: int, cfg: ScaleConfig, per_seed: list[dict], out,
            n_train: int, limit: int | None, seconds: float) -> ExperimentResult:
    rows = []
    series: dict[str, tuple[list[float], list[float]]] = {c: ([], []) for c in CONDITIONS}
    names = method_rows()
    for name in names:
        row = [name]
        for cond in CONDITIONS:
            vals = [r[cond]["accuracy"][name] for r in per_seed]
            row.append(fmt_mean_std(vals))
            m, s = mean_std(vals)
            series[cond][0].append(m)
            series[cond][1].append(s)
        row.append(f"{mean_std([r['clean']['seconds'].get(name, 0.0) for r in per_seed])[0]:.2f}"
                   if name in per_seed[0]["clean"]["seconds"] else "-")
        rows.append(row)
    gate_rows = []
    for cond in CONDITIONS[1:]:
        for units in ("tensor", "module"):
            bad = [r[cond]["soft_gates"][units][-1] for r in per_seed]
            good = [g for r in per_seed for g in r[cond]["soft_gates"][units][:-1]]
            gate_rows.append([cond, units, fmt_mean_std([b["closed"] for b in bad], 2),
                              fmt_mean_std([b["mean_gate"] for b in bad], 3),
                              fmt_mean_std([g["mean_gate"] for g in good], 3)])
    guard_rows = []
    for cond in CONDITIONS:
        recs = [r[cond]["guard"] for r in per_seed]
        bad_name = f"model {K}"
        right = sum(rec["flagged"] == ([bad_name] if cond != "clean" else []) for rec in recs)
        guard_rows.append([cond, f"{right}/{len(recs)}",
                           fmt_mean_std([max(rec["distance"][:K]) for rec in recs], 2),
                           fmt_mean_std([rec["distance"][K] for rec in recs], 1)
                           if cond != "clean" else "-"])
    ada_rows = []
    for cond in CONDITIONS:
        for gran in ("task", "layer"):
            recs = [r[cond]["adamerging"][gran] for r in per_seed]
            good = [x for rec in recs for x in rec["mean_lambda"][:K]]
            bad = [rec["mean_lambda"][K] for rec in recs if len(rec["mean_lambda"]) > K]
            ada_rows.append([cond, gran, fmt_mean_std(good, 3),
                             fmt_mean_std(bad, 3) if bad else "-",
                             fmt_mean_std([rec["entropy_first"] for rec in recs], 3),
                             fmt_mean_std([rec["entropy_last"] for rec in recs], 3)])
    sub = (f"a random {limit:,}-example subset of the {n_train:,} training examples"
           if limit is not None else f"all {n_train:,} training examples")
    notes = [f"Trained on {sub}; {cfg.merge_examples:,} of them are held out as the merge set "
             f"(greedy soup, soft merging, AdaMerging inputs, scale choice).",
             f"MLP {cfg.depth}x{cfg.width}, base {cfg.base_epochs} epoch(s) SGD 0.05; "
             f"K = {K} fine-tunes, {cfg.ft_epochs} epoch(s) each on a class-skewed shard.",
             "task_arithmetic / ties (density 0.2) / dare (drop 0.5, then task arithmetic) / della "
             "(drop 0.7, epsilon 0.1) / breadcrumbs (beta 0.01, gamma 0.85): scale chosen on the "
             f"merge set from {list(cfg.scales)}; slerp: the pairwise chain over the members; "
             "model_stock: no parameter.",
             f"fisher / regmean: each member on {cfg.fisher_examples} / "
             f"{cfg.regmean_examples} examples of its own shard (the malicious copy on member "
             f"0's shard); adamerging: {cfg.ada_steps} steps on unlabeled merge-set inputs; "
             f"soft: {cfg.soft_steps} SGD steps on the labeled merge set (library defaults "
             "otherwise)."]
    result = ExperimentResult(
        name="merging",
        config={"dataset": dataset, "scale": scale, "seeds": seeds,
                "first_seed": per_seed[0]["seed"], "K": K, **cfg.to_dict(),
                "scales": list(cfg.scales), "out": str(out) if out is not None else None},
        tables={
            "test accuracy": Table(["method"] + [c for c in CONDITIONS] + ["seconds (clean)"], rows,
                                   f"Test accuracy (mean ± std over {seeds} seed(s)); '+x1000' etc. "
                                   "add one malicious copy of member 0 to the K members."),
            "soft merging gates of the malicious member": Table(
                ["condition", "units", "fraction of its gates = 0", "its mean gate",
                 "mean gate of good members"], gate_rows),
            "member guard": Table(
                ["condition", "runs flagging exactly the malicious member (none when clean)",
                 "largest scope distance of a good member", "scope distance of the malicious member"],
                guard_rows, "basinmerge.merge.guard on the members before merging: robust z of "
                "each layer's log sigma, mean and cosine to the members' median; flagged above 6."),
            "adamerging coefficients": Table(
                ["condition", "granularity", "mean lambda of good members",
                 "lambda of the malicious member", "entropy first step", "entropy last step"],
                ada_rows, "Learned task-arithmetic coefficients (start 0.3, clamped to [0, 1]; "
                "'layer': mean over the member's tensors) and the batch prediction entropy."),
        },
        data={"per_seed": per_seed},
        notes=notes,
        seconds=seconds,
    )
    result.figures["merging_accuracy"] = plots.grouped_bars(
        names, series, title=f"merging on {dataset} ({scale}, {seeds} seed(s))")
    return result
