"""The client update: local training from the global model, one function for both backends.

`client_update(model, global_state, data, training, instructions, client=, seed=)` copies the
model, loads the global weights and trains on the client's data with `basinmerge.train.Trainer`
plus, as the server instructs:

- nothing (FedAvg),
- the proximal term ``μ/2 ‖w − w_global‖²`` (FedProx; the anchor is a detached *list* copy of
  the global parameters: a generator would be exhausted after the first batch),
- weight decay (an optimizer option of `LocalTraining`),
- WSA: ``λ · D(scope(w) ‖ target)`` toward the round's target scope (`basinmerge.wsa`).

It returns the new state with the client's sample count and its weight scope (the server fuses
the scopes into the next WSA target). All randomness (the batch order) comes from
``derive_seed(seed, round, client)``, so a round can be recomputed bit for bit (resume, and the
Flower backend running the same update elsewhere).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from basinmerge.errors import BasinmergeError, ConfigError
from basinmerge.penalties import ProximalPenalty
from basinmerge.scope import DIVERGENCES, Scope, weight_scope
from basinmerge.state import StateDict, clone_state, with_state
from basinmerge.train import Trainer
from basinmerge.wsa import REDUCTIONS, WSARegularizer


class ClientTimeout(BasinmergeError):
    """A client did not finish its local training before the round's deadline."""


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from (seed, *keys) with NumPy's SeedSequence: independent streams
    per round and client, reproducible in any order and on any machine."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *[int(k) & 0xFFFFFFFF for k in keys]])
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class LocalTraining:
    """How each client trains locally (the same for every client and round)."""

    epochs: int = 2
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"local epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight decay must be >= 0, got {self.weight_decay}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Instructions:
    """What the server sends with the global model for one round."""

    round: int
    mu: float = 0.0
    wsa_lambda: float = 0.0
    divergence: str = "kl"
    reduce: str = "mean"
    target: Scope | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mu) and self.mu >= 0):
            raise ConfigError(f"the proximal mu must be >= 0, got {self.mu}")
        if not (math.isfinite(self.wsa_lambda) and self.wsa_lambda >= 0):
            raise ConfigError(f"the WSA lambda must be >= 0, got {self.wsa_lambda}")
        if self.divergence not in DIVERGENCES:
            raise ConfigError(f"unknown divergence '{self.divergence}'; choose one of "
                              f"{', '.join(DIVERGENCES)}")
        if self.reduce not in REDUCTIONS:
            raise ConfigError(f"unknown reduce '{self.reduce}'; choose one of {', '.join(REDUCTIONS)}")
        if self.wsa_lambda > 0 and self.target is None:
            raise ConfigError("a WSA lambda > 0 needs a target scope")


@dataclass
class ClientUpdate:
    """A client's reply: its trained state, sample count, weight scope and training metrics."""

    client: int
    state: StateDict
    num_examples: int
    scope: Scope
    metrics: dict = field(default_factory=dict)


def penalties_for(model: nn.Module, instructions: Instructions) -> list:
    """The training penalties a round's instructions ask for (proximal term, WSA)."""
    out: list = []
    if instructions.mu > 0:
        out.append(ProximalPenalty(model, instructions.mu))
    if instructions.wsa_lambda > 0 and instructions.target is not None:
        out.append(WSARegularizer(instructions.target, instructions.wsa_lambda,
                                  divergence=instructions.divergence, reduce=instructions.reduce))
    return out


def client_update(model: nn.Module, global_state: Mapping[str, torch.Tensor], data,
                  training: LocalTraining, instructions: Instructions, *, client: int,
                  seed: int, deadline: float | None = None,
                  device: str | torch.device | None = None) -> ClientUpdate:
    """Train a copy of `model` holding `global_state` on the client's `data`.

    `deadline` is a `time.perf_counter()` value: passing it raises `ClientTimeout` (checked
    after every optimizer step). `model` itself is not modified."""
    net = with_state(model, global_state)
    if device is not None:
        net = net.to(device)
    trainer = Trainer(net, data, optimizer=training.optimizer, lr=training.lr,
                      momentum=training.momentum, weight_decay=training.weight_decay,
                      batch_size=training.batch_size, epochs=training.epochs,
                      seed=derive_seed(seed, instructions.round, client),
                      penalties=penalties_for(net, instructions), device=device)
    t0 = time.perf_counter()
    while trainer.step_count < trainer.total_steps:
        trainer.step()
        if deadline is not None and time.perf_counter() > deadline:
            raise ClientTimeout(f"client {client} passed the round deadline after "
                                f"{trainer.step_count}/{trainer.total_steps} steps")
    last = trainer.history.final
    metrics = {"train_loss": float(last.get("loss", float("nan"))),
               "train_accuracy": float(last.get("accuracy", float("nan"))),
               "seconds": time.perf_counter() - t0}
    if "penalty" in last:
        metrics["penalty"] = float(last["penalty"])
    state = {k: v.detach().to("cpu") for k, v in clone_state(net.state_dict()).items()}
    return ClientUpdate(client=int(client), state=state, num_examples=trainer.n,
                        scope=weight_scope(net), metrics=metrics)
