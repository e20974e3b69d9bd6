"""FedBN (Li et al. 2021): BatchNorm layers stay local.

Every client keeps its own BatchNorm parameters (weight, bias) and statistics (running mean,
variance, batch count): it starts each round from the global model with its own BatchNorm
entries put back (the global ones before its first round) and reports them (extra ``local``)
with its update. The server aggregates the other weights as FedAvg does; the BatchNorm entries
of the global model are the clients' average, used only to evaluate the global model centrally
(a FedBN client never receives them after its first round). The server keeps each client's
BatchNorm entries and sends them back in its instructions. On a model without BatchNorm FedBN
is FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from basinmerge.fl.client import ClientUpdate, Instructions, LocalTraining
from basinmerge.fl.strategies._state import ClientStates
from basinmerge.fl.strategy import Strategy, register, with_arrays
from basinmerge.state import StateDict


def batchnorm_keys(model: nn.Module) -> list[str]:
    """The state_dict keys of the model's BatchNorm layers (parameters and buffers)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            out += [f"{name}.{k}" if name else k for k in m.state_dict()]
    return out


@register
class FedBN(Strategy):
    name = "fedbn"
    summary = "FedAvg with BatchNorm parameters and statistics kept local"

    def configure(self, **options: Any) -> None:
        self.store = ClientStates("local")

    def client_instructions(self, instructions: Instructions, client: int) -> Instructions:
        local = self.store.clients.get(client)
        return with_arrays(instructions, local=local) if local else instructions

    def after_aggregate(self, server_round: int, state: StateDict,
                        updates: Sequence[ClientUpdate],
                        global_state: Mapping[str, torch.Tensor]) -> StateDict:
        for u in updates:
            if u.extras.get("local"):
                self.store.clients[u.client] = dict(u.extras["local"])
        return state

    @classmethod
    def client_state(cls, global_state: Mapping[str, torch.Tensor],
                     instructions: Instructions) -> Mapping[str, torch.Tensor]:
        local = instructions.arrays.get("local", {})
        return {**global_state, **local} if local else global_state

    @classmethod
    def client_extras(cls, model: nn.Module, global_state: Mapping[str, torch.Tensor],
                      instructions: Instructions, training: LocalTraining,
                      steps: int) -> dict[str, StateDict]:
        state = model.state_dict()
        return {"local": {k: state[k].detach().cpu().clone() for k in batchnorm_keys(model)}}

    def state_tensors(self) -> StateDict:
        return self.store.pack()

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.store.load(tensors)
