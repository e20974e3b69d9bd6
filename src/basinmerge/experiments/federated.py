"""Study: federated learning under label skew — FedAvg vs FedProx vs weight decay vs WSA vs
SCAFFOLD, FedDyn, MOON and FedBN.

20 clients on Dirichlet(α) splits (α ∈ {0.1, 0.5, 5}), half of them sampled per round, 2 local
epochs of SGD (lr 0.05, momentum 0.9, batch 64). Methods:

- FedAvg; FedProx (μ = 0.01); FedAvg with client weight decay (1e-3);
- WSA with the fused target (the clients' last-round scopes, moment-matched, weighted by sample
  count) and with the global model's scope as target (the default λ, KL, mean over layers);
- SCAFFOLD, FedDyn (α = 0.01), MOON (μ = 1, τ = 0.5) and FedBN (= FedAvg on models without
  BatchNorm), each with its registered defaults.

Reported per (model, α, method): final and best test accuracy of the global model (mean ± std
over seeds), the client scope divergence in the last round, accuracy and divergence curves, and
the partitions. ``quick`` (<= ~20 min on 2 CPU cores) trains the MLP only, on a fixed 6,000-example
training subset for 15 rounds; ``full`` adds the small CNN (VGG at width 1/4) on all of
Fashion-MNIST for 50 rounds (for a GPU). ``models=["vgg"]`` (CLI ``--models vgg``) runs the CNN
at any scale (quick: about 17 minutes on 2 CPU cores). WSA runs record the round in which the
strategy reported a collapsing target and the first round with a rejected (NaN) update.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from basinmerge.console import progress_task
from basinmerge.errors import ConfigError
from basinmerge.experiments.common import (
    ExperimentResult,
    StudyScale,
    Table,
    fmt_mean_std,
    mean_std,
)
from basinmerge.fl import (
    FLConfig,
    build_model,
    build_partitions,
    load_data,
    simulate_config,
    summarize,
)

MODELS: dict[str, dict[str, Any]] = {"mlp": {"width": 256, "depth": 2}, "vgg": {"width": 0.25}}

# Each method: FLConfig fields over the study's common settings; strategy options are the
# registered defaults (basinmerge.fl.strategies) unless given here.
METHODS: dict[str, dict] = {
    "FedAvg": {"strategy": "fedavg"},
    "FedProx": {"strategy": "fedprox"},
    "weight decay": {"strategy": "fedavg", "weight_decay": 1e-3},
    "WSA (fused)": {"strategy": "wsa", "strategy_options": {"target": "fused"}},
    "WSA (global)": {"strategy": "wsa", "strategy_options": {"target": "global"}},
    "SCAFFOLD": {"strategy": "scaffold"},
    "FedDyn": {"strategy": "feddyn"},
    "MOON": {"strategy": "moon"},
    "FedBN": {"strategy": "fedbn"},
}



def _among(what: str, given: Sequence[str], known: Sequence[str]) -> None:
    bad = [g for g in given if g not in known]
    if bad or not given:
        raise ConfigError(f"federated study {what} must be among {', '.join(known)}, got "
                          f"{', '.join(given) or 'none'}")


@dataclass(frozen=True)
class ScaleConfig(StudyScale, study="federated"):
    """What a scale fixes (and what a run may replace: models, methods, alphas, rounds).
    `train_limit` / `test_limit` None: the whole split; `model_options`: per architecture,
    over `MODELS`."""

    models: tuple[str, ...]
    alphas: tuple[float, ...]
    clients: int
    rounds: int
    local_epochs: int
    train_limit: int | None
    test_limit: int | None
    model_options: Mapping[str, Mapping[str, Any]]
    min_size: int
    methods: tuple[str, ...] = tuple(METHODS)

    def check(self) -> None:
        _among("models", self.models, list(MODELS))
        _among("methods", self.methods, list(METHODS))
        if not self.alphas or any(not a > 0 for a in self.alphas):
            raise ConfigError(f"federated study alphas must be positive numbers, got "
                              f"{list(self.alphas)}")
        if self.rounds < 1:
            raise ConfigError(f"federated study rounds must be >= 1, got {self.rounds}")


ScaleConfig.define("smoke", models=("mlp",), alphas=(0.5,), clients=4, rounds=2, local_epochs=1,
                   train_limit=400, test_limit=200, model_options={"mlp": {"width": 32}},
                   min_size=5)
ScaleConfig.define("quick", models=("mlp",), alphas=(0.1, 0.5, 5.0), clients=20, rounds=15,
                   local_epochs=2, train_limit=6000, test_limit=2000, model_options={},
                   min_size=10)
ScaleConfig.define("full", models=("mlp", "vgg"), alphas=(0.1, 0.5, 5.0), clients=20, rounds=50,
                   local_epochs=2, train_limit=None, test_limit=None, model_options={},
                   min_size=10)


def study_models(scale: str, models: Sequence[str] | None = None) -> list[str]:
    """The architectures a run covers: the scale's own list unless `models` names others."""
    return list(settings(scale, models=models).models)


def settings(scale: str, *, models: Sequence[str] | None = None,
             methods: Sequence[str] | None = None, alphas: Sequence[float] | None = None,
             rounds: int | None = None) -> ScaleConfig:
    """The scale's config with any of its architectures, methods (run in `METHODS` order),
    Dirichlet alphas or number of rounds replaced (each checked: one clear error naming the
    bad value)."""
    cfg = ScaleConfig.at(scale, models=models, methods=methods, alphas=alphas, rounds=rounds)
    return replace(cfg, methods=tuple(m for m in METHODS if m in cfg.methods))


def configs(dataset: str, scale: str, seeds: int, data_root: str | None = None, **overrides):
    """Every (model, alpha, method, seed, FLConfig) of a scale, in run order; `overrides` are
    those of `settings` (models, methods, alphas, rounds)."""
    s = settings(scale, **overrides)
    for model in s.models:
        opts = {**MODELS[model], **s.model_options.get(model, {})}
        for alpha in s.alphas:
            for method in s.methods:
                over = METHODS[method]
                for seed in range(seeds):
                    yield model, alpha, method, seed, FLConfig(
                        dataset=dataset, model=model, model_options=opts, clients=s.clients,
                        scheme="dirichlet", alpha=alpha, min_size=s.min_size,
                        rounds=s.rounds, local_epochs=s.local_epochs, fraction=0.5,
                        train_limit=s.train_limit, test_limit=s.test_limit, seed=seed,
                        data_root=data_root, **over)


def _divergence_cell(values: list) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a (no update)"
    cell = f"{mean_std(vals)[0]:.2e}"
    return cell if len(vals) == len(values) else f"{cell} ({len(vals)}/{len(values)} runs)"


def _rounds_cell(runs: list[dict]) -> str:
    """Per run 'w/n': the round of the WSA target-collapse warning and of the first rejected
    update ('-' where none happened); '-' when no run had either."""
    pairs = [(r.get("target_collapse_round"), r.get("first_rejected_round")) for r in runs]
    if all(w is None and n is None for w, n in pairs):
        return "-"
    return ", ".join(f"{w or '-'}/{n or '-'}" for w, n in pairs)


def accuracy_table(runs: list[dict], models: list[str], alphas: list[float], seeds: int,
                   rounds: int) -> Table:
    """The study's main table from its per-run records (also rebuilt from result.json)."""
    rows = []
    for model in models:
        for alpha in alphas:
            base = {r["seed"]: r["final_accuracy"] for r in runs
                    if (r["model"], r["alpha"], r["method"]) == (model, alpha, "FedAvg")}
            for method in METHODS:
                sel = [r for r in runs if (r["model"], r["alpha"], r["method"]) == (model, alpha, method)]
                if not sel:
                    continue
                final = [r["final_accuracy"] for r in sel]
                delta = [r["final_accuracy"] - base[r["seed"]] for r in sel if r["seed"] in base]
                delta_cell = fmt_mean_std(delta) if delta else "-"
                rows.append([model, alpha, method, fmt_mean_std(final),
                             fmt_mean_std([r["best_accuracy"] for r in sel]), delta_cell,
                             _divergence_cell([r["scope_divergence"][-1] for r in sel]),
                             sum(r["rejected"] for r in sel), _rounds_cell(sel)])
    return Table(
        ["model", "alpha", "method", "final accuracy", "best accuracy", "final - FedAvg (paired)",
         "client scope divergence (last round)", "rejected updates",
         "target collapse warned / first NaN update (round)"], rows,
        caption=f"Global-model test accuracy after {rounds} rounds, mean ± std over {seeds} "
                "seeds; the difference to FedAvg is paired by seed (same initialization, "
                "partition and client sampling). Scope divergence: mean over the accepted clients "
                "of the layer-averaged KL between a client's weight scope and the clients' fused "
                "scope (n/a when no update was accepted). Rejected updates: client updates with "
                "NaN/Inf weights, summed over seeds. Last column, per seed: the round in which "
                "the WSA target's std collapse was reported / the first round with a rejected "
                "update.")


def _strategy_settings(method: str) -> dict:
    """Every option of the method's strategy, defaults included (for the result's record)."""
    from basinmerge.fl.strategy import strategy_class

    spec = METHODS[method]
    return strategy_class(spec["strategy"]).parse_options(spec.get("strategy_options", {}))


def _first_round(history: list[dict], key: str) -> int | None:
    """The first round whose record has a non-empty `key` (None: none has)."""
    return next((r["round"] for r in history if r.get(key)), None)


def run(*, dataset: str = "fashion-mnist", scale: str = "quick", seeds: int = 3,
        out: str | Path | None = None, device: str = "cpu", data_root: str | None = None,
        progress: bool = True, models: Sequence[str] | None = None,
        methods: Sequence[str] | None = None, alphas: Sequence[float] | None = None,
        rounds: int | None = None) -> ExperimentResult:
    """Run the study. `models` (e.g. ``["vgg"]``), `methods` (names in `METHODS`), `alphas`
    and `rounds` replace the scale's own."""
    from basinmerge.plots import fl_round_curves, partition_heatmap

    t_start = time.perf_counter()
    overrides: dict[str, Any] = dict(models=models, methods=methods, alphas=alphas, rounds=rounds)
    s = settings(scale, **overrides)
    plan = list(configs(dataset, scale, seeds, data_root, **overrides))
    runs: list[dict] = []
    partitions: dict[float, dict] = {}
    with progress_task(f"federated study ({scale})", len(plan), enabled=progress) as advance:
        for model, alpha, method, seed, cfg in plan:
            train, test = load_data(cfg)
            parts = build_partitions(cfg, train)
            if seed == 0 and alpha not in partitions:
                partitions[alpha] = {**summarize(train.y, parts, train.num_classes),
                                     "classes": list(train.info.classes or [])}
            res = simulate_config(cfg, build_model(cfg, train), train, test, parts,
                                  device=device, progress=False)
            runs.append({"model": model, "alpha": alpha, "method": method, "seed": seed,
                         "final_accuracy": res.final_accuracy, "best_accuracy": res.best_accuracy,
                         "accuracy": res.accuracy_curve(),
                         "scope_divergence": [r["scope_divergence"] for r in res.history],
                         "dropped": sum(len(r["dropped"]) for r in res.history),
                         "rejected": sum(len(r["rejected"]) for r in res.history),
                         "first_rejected_round": _first_round(res.history, "rejected"),
                         "target_collapse_round": _first_round(res.history, "warnings"),
                         "seconds": res.timings["total_seconds"]})
            advance(1, model=model, alpha=alpha, method=method, acc=res.final_accuracy)

    result = ExperimentResult(
        name="Federated learning: FedAvg, FedProx, weight decay, WSA, SCAFFOLD, FedDyn, MOON, "
             "FedBN",
        config={"dataset": dataset, "scale": scale, "seeds": seeds, "device": device,
                **s.to_dict(), "model_architectures": MODELS,
                "method_settings": {m: {**METHODS[m], "strategy_options": _strategy_settings(m)}
                                    for m in s.methods}, "fraction": 0.5,
                "batch_size": 64, "lr": 0.05,
                "optimizer": "sgd (momentum 0.9)"},
        data={"runs": runs, "partitions": partitions})
    result.tables["accuracy"] = accuracy_table(runs, list(s.models), list(s.alphas), seeds, s.rounds)
    for model in s.models:
        acc_panels = {f"alpha={a:g}": {m: [r["accuracy"] for r in runs
                                           if (r["model"], r["alpha"], r["method"]) == (model, a, m)]
                                       for m in s.methods} for a in s.alphas}
        div_panels = {f"alpha={a:g}": {m: [r["scope_divergence"] for r in runs
                                           if (r["model"], r["alpha"], r["method"]) == (model, a, m)]
                                       for m in s.methods} for a in s.alphas}
        result.figures[f"accuracy_{model}"] = fl_round_curves(acc_panels, "test accuracy",
                                                              title=f"{model}: global model")
        result.figures[f"scope_divergence_{model}"] = fl_round_curves(
            div_panels, "client scope divergence (KL)", logy=True, title=f"{model}: clients' scopes")
    for alpha, summ in partitions.items():
        result.figures[f"partition_alpha{alpha:g}"] = partition_heatmap(
            summ["histogram"], summ["classes"] or None, f"Dirichlet alpha={alpha:g} (seed 0)")
    result.notes.append(
        f"scale={scale}: models {', '.join(s.models)}; {s.clients} clients, 50% sampled per "
        f"round, {s.rounds} rounds, {s.local_epochs} local epochs; training subset "
        f"{s.train_limit or 'all'}, test subset {s.test_limit or 'all'} (fixed subsets)."
        + (" The CNN runs at scale=full, or when the models include vgg." if "vgg" not in s.models else ""))
    result.seconds = time.perf_counter() - t_start
    return result
