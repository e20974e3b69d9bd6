"""The embedded federated simulator: every client in this process, one after the other, no Ray.

`simulate(model, train, test, partitions, strategy, training, rounds=..., seed=...)` runs the
rounds: sample clients, send each the global model and the strategy's instructions, train
(`client_update`), screen and aggregate the replies (`Strategy.aggregate`), evaluate the new
global model on the test set. Robustness:

- a client that raises, or passes ``client_timeout`` seconds, is dropped for that round
  (logged, and listed in the round record); the run goes on;
- an update with NaN/Inf weights (or the wrong keys/shapes) is rejected by the strategy;
- with ``out``, the server state (global model, strategy state, history) is checkpointed
  atomically after every round, and ``resume=True`` continues from the last checkpoint to the
  same final model as an uninterrupted run: every random choice derives from
  (seed, round, client), never from what ran before. A checkpoint written under another
  configuration is refused.

Per-round records go to ``rounds.json`` / ``rounds.csv`` (written every round), the final
model to ``final.safetensors`` and the accuracy curve to ``accuracy.png``. The same writers
serve the Flower backend.
"""

from __future__ import annotations

import copy
import csv
import io as _io
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from basinmerge import io
from basinmerge.console import progress_task
from basinmerge.data import Dataset
from basinmerge.errors import ConfigError
from basinmerge.fl.client import ClientTimeout, ClientUpdate, LocalTraining, client_update
from basinmerge.fl.strategy import Strategy
from basinmerge.state import StateDict, clone_state
from basinmerge.train import evaluate

log = logging.getLogger("basinmerge.fl")

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_KIND = "basinmerge-fl-server"
CSV_COLUMNS = ("round", "test_accuracy", "test_loss", "train_loss", "scope_divergence",
               "clients", "accepted", "dropped", "rejected", "train_seconds", "eval_seconds",
               "other_seconds")
# Options that may change between a run and its resumption (they do not change any round).
RESUMABLE_CHANGES = ("rounds", "data_root")

UpdateFn = Callable[..., ClientUpdate]


@dataclass
class SimulationResult:
    """The final global state and the per-round records (round 0 = the initial model)."""

    state: StateDict
    history: list[dict]
    resumed_from: int | None = None
    timings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # backend details (Flower: worker pids, ...)

    @property
    def final_accuracy(self) -> float:
        return float(self.history[-1]["test_accuracy"])

    @property
    def best_accuracy(self) -> float:
        return float(max(r["test_accuracy"] for r in self.history))

    def accuracy_curve(self) -> list[float]:
        return [float(r["test_accuracy"]) for r in self.history]


def total_timings(history: Sequence[Mapping]) -> dict:
    """Seconds spent in local training, evaluation and everything else, summed over rounds."""
    keys = ("train_seconds", "eval_seconds", "other_seconds")
    tot = {k: float(sum(r.get(k, 0.0) for r in history)) for k in keys}
    tot["total_seconds"] = sum(tot.values())
    return tot


# --------------------------------------------------------------------------- outputs


def finite_or_none(x: float | None) -> float | None:
    """NaN/Inf become None, so the JSON outputs stay strict JSON."""
    return None if x is None or not math.isfinite(x) else float(x)


def history_csv(history: Sequence[Mapping]) -> str:
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in history:
        row = []
        for c in CSV_COLUMNS:
            v = r.get(c, "")
            if isinstance(v, list | tuple):
                v = " ".join(str(x) for x in v)
            elif isinstance(v, dict):
                v = " ".join(str(x) for x in v)
            row.append(v)
        w.writerow(row)
    return buf.getvalue()


def write_history(out: Path, history: Sequence[Mapping]) -> None:
    io.write_json(out / "rounds.json", list(history))
    io.write_text(out / "rounds.csv", history_csv(history))


def write_checkpoint(out: Path, state: Mapping[str, torch.Tensor], server_round: int,
                     config: Mapping, strategy: Strategy, history: Sequence[Mapping]) -> Path:
    """The whole server state after `server_round`, written atomically (temp file + rename)."""
    meta = {"kind": CHECKPOINT_KIND, "round": server_round, "config": dict(config),
            "strategy": strategy.name, "strategy_state": strategy.state_dict(),
            "history": list(history)}
    return io.save_state(state, out / CHECKPOINT, meta)


def read_checkpoint(folder: Path, config: Mapping, strategy: Strategy) -> tuple[StateDict, int, list]:
    """Load a server checkpoint for `resume`, refusing one made under another configuration."""
    path = folder / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"{folder}: no {CHECKPOINT} to resume from (was the run started with "
                          "--out pointing there?)")
    state, meta = io.load_state(path)
    if meta.get("kind") != CHECKPOINT_KIND:
        raise ConfigError(f"{path}: not a federated server checkpoint")
    stored = {k: v for k, v in dict(meta.get("config", {})).items() if k not in RESUMABLE_CHANGES}
    current = {k: v for k, v in dict(config).items() if k not in RESUMABLE_CHANGES}
    if stored != current:
        from basinmerge.fl.config import first_difference

        raise ConfigError(f"{folder}: the checkpoint belongs to another configuration "
                          f"({first_difference(stored, current)}); resume with the same options "
                          "or start a new --out folder")
    strategy.load_state_dict(meta.get("strategy_state", {}))
    return state, int(meta["round"]), list(meta.get("history", []))


def finish_outputs(out: Path, model: nn.Module, state: Mapping[str, torch.Tensor],
                   history: Sequence[Mapping], meta: Mapping | None = None,
                   title: str = "") -> None:
    """Final model (``final.safetensors``), history files and the accuracy-vs-round plot."""
    from basinmerge.plots import fl_round_curves

    write_history(out, history)
    net = copy.deepcopy(model)
    net.load_state_dict(dict(state))
    last = history[-1]
    io.save(net, out / "final.safetensors",
            {**dict(meta or {}), "test_accuracy": last.get("test_accuracy"),
             "round": last.get("round")})
    curve = {title or "global model": [[r["test_accuracy"] for r in history]]}
    io.save_figure(fl_round_curves({"": curve}, "test accuracy"), out / "accuracy.png")


# --------------------------------------------------------------------------- the loop


def evaluate_state(net: nn.Module, state: Mapping[str, torch.Tensor], test: Dataset) -> dict:
    """Load `state` into `net` (a scratch model) and score it: test loss and accuracy."""
    net.load_state_dict(dict(state))
    m = evaluate(net, test)
    return {"test_loss": m["loss"], "test_accuracy": m["accuracy"]}


def simulate(model: nn.Module, train: Dataset, test: Dataset, partitions: Sequence[torch.Tensor],
             strategy: Strategy, training: LocalTraining, *, rounds: int, seed: int,
             out: str | Path | None = None, resume: bool = False, config: Mapping | None = None,
             client_timeout: float | None = None, update_fn: UpdateFn = client_update,
             device: str | torch.device | None = None, progress: bool = True,
             description: str = "federated") -> SimulationResult:
    """Run `rounds` federated rounds in this process; see the module docstring.

    `model` holds the initial global weights and is not modified. `config` (a JSON-able dict
    naming the run) is stored in every checkpoint and must match on `resume`. `update_fn` has
    the signature of `client_update` (tests inject failing clients through it)."""
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    if client_timeout is not None and not (client_timeout > 0 and math.isfinite(client_timeout)):
        raise ConfigError(f"the client timeout must be > 0 seconds, got {client_timeout}")
    if resume and out is None:
        raise ConfigError("resume needs the output folder of the run to continue")
    num_clients = len(partitions)
    if num_clients < 1:
        raise ConfigError("no clients: the partition is empty")
    config = dict(config or {})
    out_path = Path(out) if out is not None else None
    client_data = [train.subset(p) for p in partitions]
    eval_net = copy.deepcopy(model)
    if device is not None:
        eval_net = eval_net.to(device)
        test = test.to(device)

    resumed_from = None
    if resume:
        state, done, history = read_checkpoint(out_path, config, strategy)
        resumed_from = done
        log.info("resuming from round %d of %s", done, out_path)
    else:
        state = clone_state(model.state_dict())
        t0 = time.perf_counter()
        history = [{"round": 0, **evaluate_state(eval_net, state, test), "clients": [],
                    "accepted": [], "dropped": {}, "rejected": {}, "train_loss": None,
                    "scope_divergence": None, "train_seconds": 0.0,
                    "eval_seconds": time.perf_counter() - t0, "other_seconds": 0.0}]
        done = 0
        if out_path is not None:
            out_path.mkdir(parents=True, exist_ok=True)
            write_checkpoint(out_path, state, 0, config, strategy, history)
            write_history(out_path, history)

    with progress_task(description, max(0, rounds - done), enabled=progress) as advance:
        for r in range(done + 1, rounds + 1):
            t_round = time.perf_counter()
            clients = strategy.sample(r, num_clients)
            instr = strategy.instructions(r, state)
            updates: list[ClientUpdate] = []
            dropped: dict[int, str] = {}
            t_train = 0.0
            for c in clients:
                t0 = time.perf_counter()
                deadline = t0 + client_timeout if client_timeout is not None else None
                try:
                    updates.append(update_fn(model, state, client_data[c], training, instr,
                                             client=c, seed=seed, deadline=deadline,
                                             device=device))
                except ClientTimeout as e:
                    dropped[c] = f"timeout: {e}"
                except Exception as e:  # noqa: BLE001 - a failing client must not stop the run
                    dropped[c] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                t_train += time.perf_counter() - t0
                if c in dropped:
                    log.warning("round %d: dropped client %d (%s)", r, c, dropped[c])
            outcome = strategy.aggregate(r, state, updates)
            state = outcome.state
            t0 = time.perf_counter()
            metrics = evaluate_state(eval_net, state, test)
            t_eval = time.perf_counter() - t0
            record = {"round": r, **metrics, "clients": clients, "accepted": outcome.accepted,
                      "dropped": dropped, "rejected": outcome.rejected,
                      "train_loss": finite_or_none(outcome.train_loss),
                      "scope_divergence": finite_or_none(outcome.scope_divergence),
                      "train_seconds": t_train, "eval_seconds": t_eval}
            warnings = strategy.round_warnings(r)
            if warnings:
                record["warnings"] = warnings
            history.append(record)
            if out_path is not None:
                write_checkpoint(out_path, state, r, config, strategy, history)
                write_history(out_path, history)
            record["other_seconds"] = time.perf_counter() - t_round - t_train - t_eval
            advance(1, round=r, acc=metrics["test_accuracy"])

    if out_path is not None:
        write_history(out_path, history)  # with the last round's other_seconds
    return SimulationResult(state=state, history=history, resumed_from=resumed_from,
                            timings=total_timings(history))
