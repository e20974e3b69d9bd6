"""SCAFFOLD (Karimireddy et al. 2020): control variates correct the clients' drift.

Client i starts from the global model x and trains on ``loss + ⟨c − c_i, w⟩`` (the linear term's
gradient is exactly SCAFFOLD's correction ``−c_i + c``, added to every step's gradient). After K
steps it sets its control variate by the paper's option II,

    c_i⁺ = c_i − c + (x − y_i) / (K·η),

and sends ``Δc_i = c_i⁺ − c_i`` (extra ``delta_c``) with its model y_i. With heavy-ball momentum
β (restarted every round) K·η becomes the displacement of K steps under a constant gradient,
``η·(K − β(1 − β^K)/(1 − β))/(1 − β)``, so that c_i⁺ is still the client's mean corrected
gradient (β = 0 gives K·η). The server sets ``x ← x + (1/|S|) Σ_{i∈S} (y_i − x)`` (global step
size 1, an unweighted mean as in the paper, consistent with c's) and ``c ← c + (1/N) Σ_{i∈S} Δc_i``
over the N clients. c and c_i cover the floating-point
parameters (zeros before a client's first round); the server keeps each c_i (it equals the sum
of that client's Δc_i) and sends it back with c in the client's instructions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from basinmerge.errors import ConfigError
from basinmerge.fl.client import ClientUpdate, Instructions, LocalTraining
from basinmerge.fl.strategies._state import ClientStates
from basinmerge.fl.strategy import Strategy, register, with_arrays
from basinmerge.state import StateDict, param_keys


def effective_steps(steps: int, momentum: float) -> float:
    """The displacement of `steps` heavy-ball steps under a constant unit gradient and lr 1."""
    b = float(momentum)
    if b == 0:
        return float(steps)
    return (steps - b * (1 - b ** steps) / (1 - b)) / (1 - b)


class LinearTerm:
    """``Σ_k ⟨d_k, w_k⟩`` over the model's parameters named in `direction` (d is constant)."""

    def __init__(self, direction: Mapping[str, torch.Tensor]):
        self.direction = dict(direction)

    def __call__(self, model: nn.Module) -> torch.Tensor:
        named = dict(model.named_parameters())
        terms = [(named[k] * d.to(named[k].device, named[k].dtype)).sum()
                 for k, d in self.direction.items()]
        return torch.stack(terms).sum()


@register
class Scaffold(Strategy):
    name = "scaffold"
    summary = "control variates c, c_i correct client drift"

    def configure(self, **options: Any) -> None:
        self.store = ClientStates("ci", "c")
        self.num_clients = 0

    @classmethod
    def check_training(cls, training: LocalTraining) -> None:
        if training.optimizer != "sgd" or not training.momentum < 1:
            raise ConfigError("strategy 'scaffold' needs optimizer 'sgd' with momentum < 1 (its "
                              f"control variates assume SGD steps), got '{training.optimizer}'")

    def sample(self, server_round: int, num_clients: int) -> list[int]:
        self.num_clients = num_clients
        return super().sample(server_round, num_clients)

    def weights(self, updates: Sequence[ClientUpdate]) -> list[float]:
        return [1.0] * len(updates)  # the paper's x + (1/|S|) Σ Δy_i, to match c's mean

    def client_instructions(self, instructions: Instructions, client: int) -> Instructions:
        return with_arrays(instructions, c=self.store.groups["c"],
                           c_i=self.store.clients.get(client, {}))

    def after_aggregate(self, server_round: int, state: StateDict,
                        updates: Sequence[ClientUpdate],
                        global_state: Mapping[str, torch.Tensor]) -> StateDict:
        c = self.store.groups["c"]
        n = max(self.num_clients, len(updates))
        for u in updates:
            dc = u.extras["delta_c"]
            ci = self.store.clients.get(u.client, {})
            self.store.clients[u.client] = {k: ci.get(k, torch.zeros_like(v)) + v
                                            for k, v in dc.items()}
            for k, v in dc.items():
                c[k] = c.get(k, torch.zeros_like(v)) + v / n
        return state

    @classmethod
    def client_penalties(cls, model: nn.Module, global_state: Mapping[str, torch.Tensor],
                         instructions: Instructions) -> list:
        c, ci = instructions.arrays.get("c", {}), instructions.arrays.get("c_i", {})
        if not c and not ci:
            return []
        keys = param_keys(model)
        zero = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
        return [LinearTerm({k: c.get(k, zero[k]) - ci.get(k, zero[k]) for k in keys})]

    @classmethod
    def client_extras(cls, model: nn.Module, global_state: Mapping[str, torch.Tensor],
                      instructions: Instructions, training: LocalTraining,
                      steps: int) -> dict[str, StateDict]:
        c = instructions.arrays.get("c", {})
        scale = 1.0 / (training.lr * effective_steps(steps, training.momentum))
        named = dict(model.named_parameters())
        delta = {}
        for k in param_keys(model):
            y = named[k].detach().cpu()
            zero = torch.zeros_like(y)
            x = global_state[k].to(y.dtype)
            # Δc_i = c_i⁺ − c_i = −c + (x − y)/(K η)
            delta[k] = -c.get(k, zero) + (x - y) * scale
        return {"delta_c": delta}

    def state_tensors(self) -> StateDict:
        return self.store.pack()

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.store.load(tensors)
