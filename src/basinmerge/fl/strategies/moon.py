"""MOON (Li, He and Song 2021): model-contrastive federated learning.

Client i trains on ``CE + μ · ℓ_con`` with, for each example,

    ℓ_con = −log( e^{sim(z, z_glob)/τ} / (e^{sim(z, z_glob)/τ} + e^{sim(z, z_prev)/τ}) ),

where sim is the cosine similarity and z, z_glob, z_prev are the representations of the same
input under the local model being trained, the round's global model and the client's previous
local model (its model from its last round; the global model before its first round, where the
term is the constant log 2 and pulls nowhere). The representation is the input of the model's
last ``nn.Linear`` (the classifier's features: ``head`` of the MLP and VGG, ``fc`` of
ResNet-20), captured by forward hooks during the ordinary forward pass; the global and previous
models run in eval mode without gradients. The server aggregates as FedAvg and keeps each
client's last model (what it uploaded) to send back as ``prev``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from basinmerge.errors import ConfigError
from basinmerge.fl.client import ClientUpdate, Instructions
from basinmerge.fl.strategies._state import ClientStates
from basinmerge.fl.strategy import Option, Strategy, nonnegative, register, with_arrays
from basinmerge.state import StateDict


def representation_layer(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` (its classifier); its input is the representation."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"MOON needs a model with a final nn.Linear classifier; "
                          f"{type(model).__name__} has none")
    return linears[-1]


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The representation of `x` under `model` (the input of its last Linear)."""
    out: list[torch.Tensor] = []
    handle = representation_layer(model).register_forward_pre_hook(
        lambda _m, args: out.append(args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return out[-1].flatten(1)


def contrastive_loss(z: torch.Tensor, z_glob: torch.Tensor, z_prev: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """The batch mean of ℓ_con (see the module docstring)."""
    pos = F.cosine_similarity(z, z_glob, dim=1) / temperature
    neg = F.cosine_similarity(z, z_prev, dim=1) / temperature
    logits = torch.stack([pos, neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(z.shape[0], dtype=torch.long, device=z.device))


class ContrastiveTerm:
    """μ · ℓ_con of the batch the model just saw (hooks capture its input and features)."""

    def __init__(self, model: nn.Module, global_net: nn.Module, prev_net: nn.Module, mu: float,
                 temperature: float):
        self.global_net, self.prev_net = global_net.eval(), prev_net.eval()
        self.mu, self.temperature = mu, temperature
        self._x: torch.Tensor | None = None
        self._z: torch.Tensor | None = None
        self._handles = [
            model.register_forward_pre_hook(self._take_input),
            representation_layer(model).register_forward_pre_hook(self._take_features),
        ]

    def _take_input(self, _m: nn.Module, args: tuple) -> None:
        self._x = args[0]

    def _take_features(self, _m: nn.Module, args: tuple) -> None:
        self._z = args[0]

    def __call__(self, model: nn.Module) -> torch.Tensor:
        if self._x is None or self._z is None:
            raise ConfigError("MOON's contrastive term was asked before any forward pass")
        with torch.no_grad():
            z_glob = features(self.global_net, self._x)
            z_prev = features(self.prev_net, self._x)
        return self.mu * contrastive_loss(self._z.flatten(1), z_glob, z_prev, self.temperature)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@register
class Moon(Strategy):
    name = "moon"
    summary = "model-contrastive loss between local, global and previous local representations"
    options = (
        nonnegative("mu", 1.0, "weight μ of the contrastive term"),
        Option("temperature", float, 0.5, "temperature τ", check=lambda v: v > 0,
               requirement="> 0"),
    )

    def configure(self, **options: Any) -> None:
        self.mu, self.temperature = float(options["mu"]), float(options["temperature"])
        self.store = ClientStates("prev")

    def instructions(self, server_round: int,
                     global_state: Mapping[str, torch.Tensor]) -> Instructions:
        return Instructions(round=server_round, strategy=self.name,
                            options={"mu": self.mu, "temperature": self.temperature})

    def client_instructions(self, instructions: Instructions, client: int) -> Instructions:
        prev = self.store.clients.get(client)
        return with_arrays(instructions, prev=prev) if prev is not None else instructions

    def after_aggregate(self, server_round: int, state: StateDict,
                        updates: Sequence[ClientUpdate],
                        global_state: Mapping[str, torch.Tensor]) -> StateDict:
        for u in updates:
            self.store.clients[u.client] = dict(u.state)
        return state

    @classmethod
    def client_penalties(cls, model: nn.Module, global_state: Mapping[str, torch.Tensor],
                         instructions: Instructions) -> list:
        mu = float(instructions.options["mu"])
        if mu == 0:
            return []
        global_net = copy.deepcopy(model)
        global_net.load_state_dict(dict(global_state))
        prev_net = global_net
        if "prev" in instructions.arrays:
            prev_net = copy.deepcopy(model)
            prev_net.load_state_dict(dict(instructions.arrays["prev"]))
        return [ContrastiveTerm(model, global_net, prev_net, mu,
                                float(instructions.options["temperature"]))]

    def state_tensors(self) -> StateDict:
        return self.store.pack()

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.store.load(tensors)
