"""Server strategies: thin policy objects over the pure functions of `basinmerge.fl.aggregate`.

A strategy decides, each round, which clients take part (`sample`), what they are told
(`instructions`: proximal μ, WSA λ and target scope) and how their replies become the next
global model (`aggregate`). Both backends (the embedded simulator and the Flower app) drive the
same objects, so they compute the same thing.

- `FedAvg`: sample-count weighted average (or a robust rule: ``aggregator="median"`` /
  ``"trimmed-mean"``).
- `FedProx`: FedAvg plus the clients' proximal term μ/2‖w − w_global‖².
- `WSA`: FedAvg plus the clients' scope penalty toward a target. ``target="fused"`` (default):
  the next round's target is `fuse` of the participating clients' scopes weighted by their
  sample counts (the first round uses the initial global model's scope); ``target="global"``:
  the current global model's scope each round. A target whose σ of some layer falls below
  ``collapse_ratio`` (default 0.25) times its first-round value is reported once (logged, and
  in the round record via `round_warnings`): a shrinking target ratchets the clients' scopes
  down until SGD diverges, which the study measured for the global target under label skew.

Client sampling draws ``max(1, round(fraction · N))`` clients without replacement from a
generator seeded with ``derive_seed(seed, round, SAMPLE_STREAM)``: the same clients for the
same (seed, round), whatever happened before. The only state carried across rounds is the WSA
target (`state_dict` / `load_state_dict`, for checkpoints).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from basinmerge.errors import ConfigError
from basinmerge.fl.aggregate import (
    AGGREGATORS,
    aggregate,
    scope_spread,
    screen_updates,
)
from basinmerge.fl.client import ClientUpdate, Instructions, derive_seed
from basinmerge.merge.basic import trim_count
from basinmerge.scope import DIVERGENCES, FUSIONS, Scope, fuse, std_ratios, weight_scope
from basinmerge.state import StateDict, clone_state
from basinmerge.wsa import REDUCTIONS

log = logging.getLogger("basinmerge.fl")

SAMPLE_STREAM = 0xFFFF_FFFF  # the derive_seed key of the sampling stream (no client has this id)
STRATEGIES = ("fedavg", "fedprox", "wsa")
WSA_TARGETS = ("fused", "global")
# λ for the mean-over-layers KL penalty. Calibrated on Fashion-MNIST MLPs (docs/methods.md):
# 1 barely acts, 100 makes the classifier layer's scope oscillate under SGD lr 0.05 momentum 0.9.
DEFAULT_WSA_LAMBDA = 10.0


def check_fraction(fraction: float) -> float:
    if not (isinstance(fraction, int | float) and math.isfinite(fraction) and 0 < fraction <= 1):
        raise ConfigError(f"the client fraction must be in (0, 1], got {fraction}")
    return float(fraction)


@dataclass
class RoundOutcome:
    """What `Strategy.aggregate` made of one round's replies."""

    state: StateDict
    accepted: list[int]
    rejected: dict[int, str] = field(default_factory=dict)
    train_loss: float = float("nan")
    scope_divergence: float = float("nan")


class Strategy:
    """FedAvg-style policy; subclasses change the instructions or the target bookkeeping."""

    name = "fedavg"

    def __init__(self, *, fraction: float = 1.0, seed: int = 0, aggregator: str = "mean",
                 trim: float = 0.1):
        self.fraction = check_fraction(fraction)
        if aggregator not in AGGREGATORS:
            raise ConfigError(f"unknown aggregation '{aggregator}'; choose one of "
                              f"{', '.join(AGGREGATORS)}")
        if aggregator == "trimmed-mean":
            trim_count(1, trim)  # validates the fraction
        self.aggregator = aggregator
        self.trim = float(trim)
        self.seed = int(seed)

    # ------------------------------------------------------------------ sampling
    def num_sampled(self, num_clients: int) -> int:
        return min(num_clients, max(1, int(round(self.fraction * num_clients))))

    def sample(self, server_round: int, num_clients: int) -> list[int]:
        """The sorted client ids taking part in `server_round` (deterministic in seed, round)."""
        if num_clients < 1:
            raise ConfigError(f"the number of clients must be >= 1, got {num_clients}")
        k = self.num_sampled(num_clients)
        rng = np.random.default_rng(derive_seed(self.seed, server_round, SAMPLE_STREAM))
        return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))

    # ------------------------------------------------------------------ round
    def instructions(self, server_round: int, global_state: Mapping[str, torch.Tensor]) -> Instructions:
        return Instructions(round=server_round)

    def aggregate(self, server_round: int, global_state: Mapping[str, torch.Tensor],
                  updates: Sequence[ClientUpdate]) -> RoundOutcome:
        """Screen the updates (NaN/Inf or mismatched ones are rejected and logged, never
        averaged in), aggregate the rest in client-id order, update the strategy's state.
        With no usable update the global model is kept."""
        by_client = {u.client: u for u in sorted(updates, key=lambda u: u.client)}
        accepted, rejected = screen_updates(global_state, {c: u.state for c, u in by_client.items()})
        for cid, reason in rejected.items():
            log.warning("round %d: rejected the update of client %d: %s", server_round, cid, reason)
        ups = [by_client[c] for c in accepted]
        if not ups:
            log.warning("round %d: no usable client update; the global model is kept", server_round)
            return RoundOutcome(clone_state(global_state), [], rejected)
        counts = [u.num_examples for u in ups]
        state = aggregate(self.aggregator, [u.state for u in ups], counts, self.trim)
        self.after_aggregate(server_round, state, ups)
        losses = [u.metrics.get("train_loss", float("nan")) for u in ups]
        train_loss = float(np.average(losses, weights=counts))
        return RoundOutcome(state, accepted, rejected, train_loss,
                            scope_spread([u.scope for u in ups], counts))

    def after_aggregate(self, server_round: int, state: StateDict,
                        updates: Sequence[ClientUpdate]) -> None:
        """Hook for state carried to the next round (the WSA target)."""

    def round_warnings(self, server_round: int) -> list[str]:
        """Warnings the strategy raised about `server_round` (for the round record)."""
        return []

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        if state:
            raise ConfigError(f"strategy '{self.name}' carries no state, got keys {sorted(state)}")

    def describe(self) -> dict:
        return {"strategy": self.name, "fraction": self.fraction, "aggregator": self.aggregator,
                "trim": self.trim, "seed": self.seed}


class FedAvg(Strategy):
    name = "fedavg"


class FedProx(Strategy):
    name = "fedprox"

    def __init__(self, *, mu: float = 0.01, **kw):
        super().__init__(**kw)
        if not (math.isfinite(mu) and mu > 0):
            raise ConfigError(f"FedProx needs mu > 0, got {mu}")
        self.mu = float(mu)

    def instructions(self, server_round: int, global_state: Mapping[str, torch.Tensor]) -> Instructions:
        return Instructions(round=server_round, mu=self.mu)

    def describe(self) -> dict:
        return {**super().describe(), "mu": self.mu}


class WSA(Strategy):
    name = "wsa"

    def __init__(self, *, lam: float = DEFAULT_WSA_LAMBDA, target: str = "fused", divergence: str = "kl",
                 reduce: str = "mean", fusion: str = "moment", collapse_ratio: float = 0.25, **kw):
        super().__init__(**kw)
        if not (math.isfinite(collapse_ratio) and 0 <= collapse_ratio < 1):
            raise ConfigError(f"WSA collapse_ratio must be in [0, 1), got {collapse_ratio}")
        self.collapse_ratio = float(collapse_ratio)
        self.first_target: Scope | None = None
        self.collapse: dict | None = None
        if not (math.isfinite(lam) and lam > 0):
            raise ConfigError(f"WSA needs lambda > 0, got {lam}")
        if target not in WSA_TARGETS:
            raise ConfigError(f"unknown WSA target '{target}'; choose one of {', '.join(WSA_TARGETS)}")
        if divergence not in DIVERGENCES:
            raise ConfigError(f"unknown divergence '{divergence}'; choose one of {', '.join(DIVERGENCES)}")
        if reduce not in REDUCTIONS:
            raise ConfigError(f"unknown reduce '{reduce}'; choose one of {', '.join(REDUCTIONS)}")
        if fusion not in FUSIONS:
            raise ConfigError(f"unknown fusion '{fusion}'; choose one of {', '.join(FUSIONS)}")
        self.lam, self.target_kind = float(lam), target
        self.divergence, self.reduce, self.fusion = divergence, reduce, fusion
        self.target: Scope | None = None

    def instructions(self, server_round: int, global_state: Mapping[str, torch.Tensor]) -> Instructions:
        if self.target_kind == "global" or self.target is None:
            target = weight_scope(global_state)
        else:
            target = self.target
        self._watch(server_round, target)
        return Instructions(round=server_round, wsa_lambda=self.lam, divergence=self.divergence,
                            reduce=self.reduce, target=target)

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
        c = self.collapse
        return (f"round {c['round']}: the WSA target's std of layer '{c['layer']}' fell to "
                f"{c['ratio']:.3g} of its first-round value; a shrinking target ratchets the "
                f"clients' scopes down until training diverges (target='{self.target_kind}'; "
                "the fused target avoids this under label skew, docs/results.md)")

    def round_warnings(self, server_round: int) -> list[str]:
        if self.collapse is not None and self.collapse["round"] == server_round:
            return [self._collapse_message()]
        return []

    def after_aggregate(self, server_round: int, state: StateDict,
                        updates: Sequence[ClientUpdate]) -> None:
        if self.target_kind == "fused":
            self.target = fuse([u.scope for u in updates], [u.num_examples for u in updates],
                               self.fusion)

    def state_dict(self) -> dict:
        return {"target": self.target.to_dict() if self.target is not None else None,
                "first_target": self.first_target.to_dict() if self.first_target is not None else None,
                "collapse": self.collapse}

    def load_state_dict(self, state: Mapping) -> None:
        t, f = state.get("target"), state.get("first_target")
        self.target = Scope.from_dict(t) if t is not None else None
        self.first_target = Scope.from_dict(f) if f is not None else None
        self.collapse = state.get("collapse")

    def describe(self) -> dict:
        return {**super().describe(), "lambda": self.lam, "target": self.target_kind,
                "divergence": self.divergence, "reduce": self.reduce, "fusion": self.fusion,
                "collapse_ratio": self.collapse_ratio}


def make_strategy(name: str, *, fraction: float = 1.0, seed: int = 0, aggregator: str = "mean",
                  trim: float = 0.1, mu: float = 0.01, wsa_lambda: float = DEFAULT_WSA_LAMBDA,
                  wsa_target: str = "fused", divergence: str = "kl", reduce: str = "mean",
                  fusion: str = "moment") -> Strategy:
    """Build a strategy by name with the options that apply to it."""
    common = dict(fraction=fraction, seed=seed, aggregator=aggregator, trim=trim)
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(mu=mu, **common)
    if name == "wsa":
        return WSA(lam=wsa_lambda, target=wsa_target, divergence=divergence, reduce=reduce,
                   fusion=fusion, **common)
    raise ConfigError(f"unknown strategy '{name}'; choose one of {', '.join(STRATEGIES)}")
