"""Per-client tensor state kept by a server strategy (shared by SCAFFOLD, FedDyn, MOON, FedBN)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from basinmerge.fl.strategy import pack, per_client, unpack
from basinmerge.state import StateDict


class ClientStates:
    """``{client id: StateDict}`` plus named global groups, packed for checkpoints."""

    def __init__(self, prefix: str, *globals_: str):
        self.prefix = prefix
        self.clients: dict[int, StateDict] = {}
        self.groups: dict[str, StateDict] = {g: {} for g in globals_}

    def pack(self) -> StateDict:
        return pack({**self.groups,
                     **{f"{self.prefix}::{c}": sd for c, sd in sorted(self.clients.items())}})

    def load(self, flat: Mapping[str, torch.Tensor]) -> None:
        groups = unpack(flat)
        self.clients = per_client(groups, self.prefix)
        self.groups = {g: dict(groups.get(g, {})) for g in self.groups}
