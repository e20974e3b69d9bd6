"""FedProx (Li et al. 2020): FedAvg plus the clients' proximal term μ/2‖w − w_global‖²."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from basinmerge.fl.client import Instructions
from basinmerge.fl.strategy import Strategy, positive, register


@register
class FedProx(Strategy):
    name = "fedprox"
    summary = "FedAvg + proximal term toward the global model"
    options = (positive("mu", 0.01, "proximal weight μ"),)

    def configure(self, **options: Any) -> None:
        self.mu = float(options["mu"])

    def instructions(self, server_round: int,
                     global_state: Mapping[str, torch.Tensor]) -> Instructions:
        return Instructions(round=server_round, strategy=self.name, mu=self.mu)
