"""The embedded federated simulator: every client in this process, one after the other, no Ray.

`simulate(model, train, test, partitions, strategy, training, rounds=..., seed=...)` runs the
rounds: sample clients, send each the global model and its instructions, train
(`client_update`), screen and aggregate the replies (`Strategy.aggregate`), evaluate the new
global model on the test set. Robustness:

- a client that raises, or passes ``client_timeout`` seconds, is dropped for that round
  (logged, and listed in the round record); the run goes on;
- an update with NaN/Inf weights (or the wrong keys/shapes) is rejected by the strategy;
- a round in which no update could be used (every client dropped or rejected) is an error
  (`FederatedError`, naming the round and each client's reason), not a model: the last good
  round stays checkpointed;
- with ``out``, the server state (global model, strategy state, history) is checkpointed
  atomically after every round, and ``resume=True`` continues from the last checkpoint to the
  same final model as an uninterrupted run: every random choice derives from
  (seed, round, client), never from what ran before. A checkpoint written under another
  configuration is refused.

What is written (round records, checkpoints, final model, plot) lives in
`basinmerge.fl.outputs`, shared with the Flower backend.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from basinmerge.console import console, is_quiet, progress_task
from basinmerge.data import Dataset
from basinmerge.errors import ConfigError, FederatedError
from basinmerge.fl.client import ClientTimeout, ClientUpdate, LocalTraining, client_update
from basinmerge.fl.outputs import (
    read_checkpoint,
    round_record,
    total_timings,
    write_checkpoint,
    write_history,
)
from basinmerge.fl.strategy import Instructions, Strategy
from basinmerge.state import StateDict, clone_state
from basinmerge.train import evaluate

log = logging.getLogger("basinmerge.fl")

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


def evaluate_state(net: nn.Module, state: Mapping[str, torch.Tensor], test: Dataset) -> dict:
    """Load `state` into `net` (a scratch model) and score it: test loss and accuracy."""
    net.load_state_dict(dict(state))
    m = evaluate(net, test)
    return {"test_loss": m["loss"], "test_accuracy": m["accuracy"]}


def check_round(server_round: int, outcome, dropped: Mapping[int, str], out: Path | None) -> None:
    """A round with no usable update is an error naming every client's reason."""
    if outcome.accepted:
        return
    reasons = {**dropped, **outcome.rejected}
    listed = "; ".join(f"client {c}: {r}" for c, r in sorted(reasons.items())[:3])
    more = f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else ""
    saved = (f"; the model of round {server_round - 1} is checkpointed in {out}"
             if out is not None else "")
    raise FederatedError(f"round {server_round}: every client failed, nothing to aggregate "
                         f"({listed}{more}){saved}")


def round_line(record: Mapping, rounds: int) -> str:
    """The plain progress line of one round (when stdout is not a terminal)."""
    return (f"round {record['round']}/{rounds}: test accuracy {record['test_accuracy']:.4f}, "
            f"{len(record['accepted'])}/{len(record['clients'])} clients accepted")


def _train_clients(r: int, clients: Sequence[int],
                   update: Callable[[int, float | None], ClientUpdate],
                   client_timeout: float | None
                   ) -> tuple[list[ClientUpdate], dict[int, str], float]:
    """One round's local training: `update(client, deadline)` for each client; a client that
    fails or times out is dropped (named with its reason), never stopping the round. Returns the
    updates, the dropped clients and the training seconds."""
    updates: list[ClientUpdate] = []
    dropped: dict[int, str] = {}
    t_train = 0.0
    for c in clients:
        t0 = time.perf_counter()
        deadline = t0 + client_timeout if client_timeout is not None else None
        try:
            updates.append(update(c, deadline))
        except ClientTimeout as e:
            dropped[c] = f"timeout: {e}"
        except Exception as e:  # noqa: BLE001 - a failing client must not stop the run
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            dropped[c] = f"{type(e).__name__}: {text}"
        t_train += time.perf_counter() - t0
        if c in dropped:
            log.warning("round %d: dropped client %d (%s)", r, c, dropped[c])
    return updates, dropped, t_train


def _check_run(rounds: int, client_timeout: float | None, resume: bool,
               out: str | Path | None, num_clients: int) -> None:
    """The run's options, checked before any work."""
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    if client_timeout is not None and not (client_timeout > 0 and math.isfinite(client_timeout)):
        raise ConfigError(f"the client timeout must be > 0 seconds, got {client_timeout}")
    if resume and out is None:
        raise ConfigError("resume needs the output folder of the run to continue")
    if num_clients < 1:
        raise ConfigError("no clients: the partition is empty")


def simulate(model: nn.Module, train: Dataset | Any, test: Dataset | Any, partitions: Sequence[torch.Tensor],
             strategy: Strategy, training: LocalTraining, *, rounds: int, seed: int,
             out: str | Path | None = None, resume: bool = False, config: Mapping | None = None,
             client_timeout: float | None = None, update_fn: UpdateFn = client_update,
             device: str | torch.device | None = None, progress: bool = True,
             description: str = "federated") -> SimulationResult:
    """Run `rounds` federated rounds in this process; see the module docstring.

    `train` and `test`: the project's `Dataset`s, or any labelled data with tensor inputs
    (``(x, y)``, a DataLoader, ...: `datasource.as_dataset`); `partitions` index `train`.
    `model` holds the initial global weights and is not modified. `config` (a JSON-able dict
    naming the run) is stored in every checkpoint and must match on `resume`. `update_fn` has
    the signature of `client_update` (tests inject failing clients through it). With
    `progress`, a bar on a terminal, else one plain line per round."""
    from basinmerge.datasource import as_dataset

    train, test = as_dataset(train, "training data"), as_dataset(test, "test data", split="test")
    num_clients = len(partitions)
    _check_run(rounds, client_timeout, resume, out, num_clients)
    strategy.check_training(training)
    config = dict(config or {})
    out_path = Path(out) if out is not None else None
    client_data = [train.subset(p) for p in partitions]
    eval_net = copy.deepcopy(model)
    if device is not None:
        eval_net = eval_net.to(device)
        test = test.to(device)

    resumed_from = None
    if resume and out_path is not None:
        state, done, history = read_checkpoint(out_path, config, strategy)
        resumed_from = done
        log.info("resuming from round %d of %s", done, out_path)
    else:
        state = clone_state(model.state_dict())
        t0 = time.perf_counter()
        metrics = evaluate_state(eval_net, state, test)
        history = [round_record(0, metrics, eval_seconds=time.perf_counter() - t0)]
        history[0]["other_seconds"] = 0.0
        done = 0
        if out_path is not None:
            out_path.mkdir(parents=True, exist_ok=True)
            write_checkpoint(out_path, state, 0, config, strategy, history)
            write_history(out_path, history)

    lines = progress and not is_quiet() and not console.is_terminal
    with progress_task(description, max(0, rounds - done), enabled=progress and not lines) as advance:
        for r in range(done + 1, rounds + 1):
            t_round = time.perf_counter()
            clients = strategy.sample(r, num_clients)
            instr = strategy.instructions(r, state)

            def update(c: int, deadline: float | None, state: StateDict = state,
                       instr: Instructions = instr) -> ClientUpdate:
                return update_fn(model, state, client_data[c], training,
                                 strategy.client_instructions(instr, c),
                                 client=c, seed=seed, deadline=deadline, device=device)

            updates, dropped, t_train = _train_clients(r, clients, update, client_timeout)
            outcome = strategy.aggregate(r, state, updates)
            check_round(r, outcome, dropped, out_path)
            state = outcome.state
            t0 = time.perf_counter()
            metrics = evaluate_state(eval_net, state, test)
            record = round_record(r, metrics, clients=clients, outcome=outcome, dropped=dropped,
                                  train_seconds=t_train, eval_seconds=time.perf_counter() - t0,
                                  warnings=strategy.round_warnings(r))
            history.append(record)
            if out_path is not None:
                write_checkpoint(out_path, state, r, config, strategy, history)
                write_history(out_path, history)
            record["other_seconds"] = (time.perf_counter() - t_round - t_train
                                       - record["eval_seconds"])
            if lines:
                console.print(round_line(record, rounds), highlight=False)
            advance(1, round=r, acc=metrics["test_accuracy"])

    if out_path is not None:
        write_history(out_path, history)  # with the last round's other_seconds
    return SimulationResult(state=state, history=history, resumed_from=resumed_from,
                            timings=total_timings(history))
