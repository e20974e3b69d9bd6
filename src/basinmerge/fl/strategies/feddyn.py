"""FedDyn (Acar et al. 2021): dynamic regularization with a client dual state and a server h.

Client i, holding ``g_i = ∇L_i(θ_i^{t−1})`` (zeros before its first round), trains on

    L_i(θ) − ⟨g_i, θ⟩ + α/2 ‖θ − θ^{t−1}‖²

from the global model θ^{t−1}, then updates its state ``g_i ← g_i − α (θ_i^t − θ^{t−1})`` (extra
``grad``). The server keeps ``h ← h − α (1/N) Σ_{i∈P} (θ_i^t − θ^{t−1})`` over the N clients and
sets ``θ^t = (1/|P|) Σ_{i∈P} θ_i^t − h/α`` (an unweighted mean, as in the paper; buffers are
averaged). The terms cover the floating-point parameters. The server keeps each g_i (it can
compute it from the uploads) and sends it back in the client's instructions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from basinmerge.fl.client import ClientUpdate, Instructions, LocalTraining
from basinmerge.fl.strategies._state import ClientStates
from basinmerge.fl.strategies.scaffold import LinearTerm
from basinmerge.fl.strategy import Strategy, positive, register, with_arrays
from basinmerge.penalties import ProximalPenalty
from basinmerge.state import StateDict, param_keys


@register
class FedDyn(Strategy):
    name = "feddyn"
    summary = "dynamic regularization: linear dual term + quadratic term, server h-state"
    options = (positive("alpha", 0.01, "regularization weight α"),)

    def configure(self, **options: Any) -> None:
        self.alpha = float(options["alpha"])
        self.store = ClientStates("grad", "h")
        self.num_clients = 0

    def sample(self, server_round: int, num_clients: int) -> list[int]:
        self.num_clients = num_clients
        return super().sample(server_round, num_clients)

    def instructions(self, server_round: int,
                     global_state: Mapping[str, torch.Tensor]) -> Instructions:
        return Instructions(round=server_round, strategy=self.name, options={"alpha": self.alpha})

    def client_instructions(self, instructions: Instructions, client: int) -> Instructions:
        return with_arrays(instructions, grad=self.store.clients.get(client, {}))

    def weights(self, updates: Sequence[ClientUpdate]) -> list[float]:
        return [1.0] * len(updates)

    def after_aggregate(self, server_round: int, state: StateDict,
                        updates: Sequence[ClientUpdate],
                        global_state: Mapping[str, torch.Tensor]) -> StateDict:
        h = self.store.groups["h"]
        n = max(self.num_clients, len(updates))
        for u in updates:
            self.store.clients[u.client] = u.extras["grad"]
            for k in u.extras["grad"]:
                step = (u.state[k] - global_state[k]) * (self.alpha / n)
                h[k] = h.get(k, torch.zeros_like(step)) - step
        out = dict(state)
        for k, v in h.items():
            out[k] = state[k] - v / self.alpha
        return out

    @classmethod
    def client_penalties(cls, model: nn.Module, global_state: Mapping[str, torch.Tensor],
                         instructions: Instructions) -> list:
        alpha = float(instructions.options["alpha"])
        keys = param_keys(model)
        out: list = [ProximalPenalty({k: global_state[k] for k in keys}, alpha)]
        grad = instructions.arrays.get("grad", {})
        if grad:
            out.append(LinearTerm({k: -grad[k] for k in keys}))
        return out

    @classmethod
    def client_extras(cls, model: nn.Module, global_state: Mapping[str, torch.Tensor],
                      instructions: Instructions, training: LocalTraining,
                      steps: int) -> dict[str, StateDict]:
        alpha = float(instructions.options["alpha"])
        grad = instructions.arrays.get("grad", {})
        named = dict(model.named_parameters())
        out = {}
        for k in param_keys(model):
            theta = named[k].detach().cpu()
            prev = grad.get(k, torch.zeros_like(theta))
            out[k] = prev - alpha * (theta - global_state[k].to(theta.dtype))
        return {"grad": out}

    def state_tensors(self) -> StateDict:
        return self.store.pack()

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.store.load(tensors)
