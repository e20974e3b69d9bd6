"""WSA: FedAvg plus the clients' weight-scope penalty λ · D(scope(w) ‖ target).

``target="fused"`` (default): the next round's target is `fuse` of the participating clients'
scopes weighted by their sample counts (the first round uses the initial global model's scope);
``target="global"``: the current global model's scope each round. A target whose σ of some
layer falls below ``collapse_ratio`` (default 0.25) times its first-round value is reported
once (logged, and in the round record via `round_warnings`): a shrinking target ratchets the
clients' scopes down until SGD diverges, which the study measured for the global target under
label skew. λ defaults to `basinmerge.wsa.DEFAULT_LAMBDA`, the one default of every WSA entry.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from basinmerge.fl.client import ClientUpdate, Instructions
from basinmerge.fl.strategy import (
    DEFAULT_WSA_LAMBDA,
    Option,
    Strategy,
    positive,
    register,
)
from basinmerge.scope import DIVERGENCES, FUSIONS, Scope, fuse, std_ratios, weight_scope
from basinmerge.state import StateDict
from basinmerge.wsa import REDUCTIONS

log = logging.getLogger("basinmerge.fl")

WSA_TARGETS = ("fused", "global")


@register
class WSA(Strategy):
    name = "wsa"
    summary = "FedAvg + weight scope alignment toward a target scope"
    options = (
        positive("lambda", DEFAULT_WSA_LAMBDA, "penalty weight λ"),
        Option("target", str, "fused", "fused (the clients' scopes) or global (the global "
               "model's; ratchets down and diverges under label skew, warned when its std "
               "collapses)", choices=WSA_TARGETS),
        Option("divergence", str, "kl", "kl, reverse_kl or w2", choices=tuple(DIVERGENCES)),
        Option("reduce", str, "mean", "mean or sum over layers", choices=tuple(REDUCTIONS)),
        Option("fusion", str, "moment", "how clients' scopes are fused: moment or mean",
               choices=tuple(FUSIONS)),
        Option("collapse_ratio", float, 0.25, "warn when a layer's target std falls below this "
               "fraction of its first-round value (0: never)", check=lambda v: 0 <= v < 1,
               requirement="in [0, 1)"),
    )

    def configure(self, **o: Any) -> None:
        self.lam, self.target_kind = o["lambda"], o["target"]
        self.divergence, self.reduce, self.fusion = o["divergence"], o["reduce"], o["fusion"]
        self.collapse_ratio = o["collapse_ratio"]
        self.target: Scope | None = None
        self.first_target: Scope | None = None
        self.collapse: dict | None = None

    def instructions(self, server_round: int,
                     global_state: Mapping[str, torch.Tensor]) -> Instructions:
        if self.target_kind == "global" or self.target is None:
            target = weight_scope(global_state)
        else:
            target = self.target
        self._watch(server_round, target)
        return Instructions(round=server_round, strategy=self.name, wsa_lambda=self.lam,
                            divergence=self.divergence, reduce=self.reduce, target=target)

    def _watch(self, server_round: int, target: Scope) -> None:
        """Remember the first target; report (once) a layer whose target σ has collapsed."""
        if self.first_target is None:
            self.first_target = target
            return
        if self.collapse is not None or self.collapse_ratio == 0:
            return
        ratios = std_ratios(target, self.first_target)
        layer = min(ratios, key=ratios.__getitem__)
        if ratios[layer] < self.collapse_ratio:
            self.collapse = {"round": server_round, "layer": layer, "ratio": ratios[layer]}
            log.warning("%s", self._collapse_message())

    def _collapse_message(self) -> str:
        c = self.collapse or {}
        return (f"round {c['round']}: the WSA target's std of layer '{c['layer']}' fell to "
                f"{c['ratio']:.3g} of its first-round value; a shrinking target ratchets the "
                f"clients' scopes down until training diverges (target='{self.target_kind}'; "
                "the fused target avoids this under label skew, docs/results.md)")

    def round_warnings(self, server_round: int) -> list[str]:
        if self.collapse is not None and self.collapse["round"] == server_round:
            return [self._collapse_message()]
        return []

    def after_aggregate(self, server_round: int, state: StateDict,
                        updates: Sequence[ClientUpdate],
                        global_state: Mapping[str, torch.Tensor]) -> StateDict:
        if self.target_kind == "fused":
            self.target = fuse([u.scope for u in updates], [u.num_examples for u in updates],
                               self.fusion)
        return state

    def state_dict(self) -> dict:
        return {"target": self.target.to_dict() if self.target is not None else None,
                "first_target": self.first_target.to_dict() if self.first_target is not None else None,
                "collapse": self.collapse}

    def load_state_dict(self, state: Mapping) -> None:
        t, f = state.get("target"), state.get("first_target")
        self.target = Scope.from_dict(t) if t is not None else None
        self.first_target = Scope.from_dict(f) if f is not None else None
        self.collapse = state.get("collapse")
