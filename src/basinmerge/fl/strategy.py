"""Server strategies: the base class, the declared options and the one registry.

A strategy decides, each round, which clients take part (`sample`), what they are told
(`instructions`, then `client_instructions` per client) and how their replies become the next
global model (`aggregate`). It also declares what runs on the client (`client_state`,
`client_penalties`, `client_extras`): `basinmerge.fl.client.client_update` looks the strategy
up by the name carried in the `Instructions`, so the embedded simulator and the Flower app run
the same code on both sides, and the Flower codec (`basinmerge.fl.codec`) encodes the generic
`Instructions` / `ClientUpdate` fields once for every strategy.

Each strategy is one class in its own file under `basinmerge.fl.strategies`, registered with
`@register`, declaring its options as `Option`s (typed, with defaults and help). `make_strategy`
builds one by name from a dict of options (checked against the declaration: an unknown option
or a bad value is one `ConfigError` naming the strategy and the option); `strategy_help` lists
them for the CLI. The options every strategy shares (client fraction, seed, aggregation rule,
trim) are constructor arguments of the base class.

Client sampling draws ``max(1, round(fraction · N))`` clients without replacement from a
generator seeded with ``derive_seed(seed, round, SAMPLE_STREAM)``: the same clients for the
same (seed, round), whatever happened before. State carried across rounds (the WSA target,
SCAFFOLD's control variates, ...) goes to checkpoints through `state_dict` (JSON) and
`state_tensors` (tensors).

Per-client state (SCAFFOLD's c_i, FedDyn's gradient state, MOON's previous local model,
FedBN's local BatchNorm layers) is kept by the server strategy and sent back to its client with
the round's instructions. The server could compute all of it from what the clients upload
anyway, so this reveals nothing new; it makes checkpoints, resume and the two backends agree
without a per-node store.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from basinmerge.errors import ConfigError
from basinmerge.fl.aggregate import AGGREGATORS, aggregate, scope_spread, screen_updates
from basinmerge.fl.client import ClientUpdate, Instructions, LocalTraining, derive_seed
from basinmerge.merge.basic import trim_count
from basinmerge.state import StateDict, check_finite, clone_state
from basinmerge.wsa import DEFAULT_LAMBDA as DEFAULT_WSA_LAMBDA

log = logging.getLogger("basinmerge.fl")

SAMPLE_STREAM = 0xFFFF_FFFF  # the derive_seed key of the sampling stream (no client has this id)
SEP = "::"  # separates group names from state_dict keys in packed tensor dicts

__all__ = ["DEFAULT_WSA_LAMBDA", "Option", "RoundOutcome", "Strategy", "check_fraction",
           "make_strategy", "pack", "register", "registry", "strategy_class", "strategy_help",
           "strategy_names", "unpack"]


def check_fraction(fraction: float) -> float:
    if not (isinstance(fraction, int | float) and math.isfinite(fraction) and 0 < fraction <= 1):
        raise ConfigError(f"the client fraction must be in (0, 1], got {fraction}")
    return float(fraction)


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Option:
    """One declared strategy option: its type, default, help, and allowed values or check."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], bool] | None = None  # True when the value is allowed
    requirement: str = ""  # how the check reads in an error ("> 0")

    def parse(self, value: Any, strategy: str) -> Any:
        where = f"strategy '{strategy}' option '{self.name}'"
        try:
            if self.type is bool and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                v: Any = value.lower() in ("true", "1")
            elif self.type is float and isinstance(value, bool) or \
                    self.type is int and isinstance(value, bool | float):
                raise ValueError(value)
            else:
                v = self.type(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be {self.type.__name__}, got {value!r}") from None
        if self.type is float and not math.isfinite(v):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        if self.choices is not None and v not in self.choices:
            raise ConfigError(f"{where} must be one of {', '.join(self.choices)}, got {v!r}")
        if self.check is not None and not self.check(v):
            raise ConfigError(f"{where} must be {self.requirement}, got {v!r}")
        return v


def positive(name: str, default: float, help: str) -> Option:
    return Option(name, float, default, help, check=lambda v: v > 0, requirement="> 0")


def nonnegative(name: str, default: float, help: str) -> Option:
    return Option(name, float, default, help, check=lambda v: v >= 0, requirement=">= 0")


# --------------------------------------------------------------------------- packing


def pack(groups: Mapping[str, Mapping[str, torch.Tensor]]) -> StateDict:
    """``{"c": {"w": t}}`` -> ``{"c::w": t}``: named tensor groups as one flat state_dict (for
    checkpoints and Flower's ArrayRecords)."""
    return {f"{name}{SEP}{k}": v for name, sd in groups.items() for k, v in sd.items()}


def unpack(flat: Mapping[str, torch.Tensor]) -> dict[str, StateDict]:
    """The inverse of `pack` (group names may contain ``::``; state_dict keys do not)."""
    out: dict[str, StateDict] = {}
    for key, v in flat.items():
        name, _, k = key.rpartition(SEP)
        if not name:
            raise ConfigError(f"packed tensor '{key}' has no group name")
        out.setdefault(name, {})[k] = v
    return out


def per_client(groups: Mapping[str, StateDict], prefix: str) -> dict[int, StateDict]:
    """``{"ci::3": sd}`` -> ``{3: sd}`` for the groups named ``prefix::CLIENT``."""
    return {int(name.rpartition(SEP)[2]): sd for name, sd in groups.items()
            if name.rpartition(SEP)[0] == prefix}


def float_keys(state: Mapping[str, torch.Tensor], keys: Sequence[str] | None = None) -> list[str]:
    return [k for k in (keys if keys is not None else state) if state[k].is_floating_point()]


# --------------------------------------------------------------------------- base class


@dataclass
class RoundOutcome:
    """What `Strategy.aggregate` made of one round's replies."""

    state: StateDict
    accepted: list[int]
    rejected: dict[int, str] = field(default_factory=dict)
    train_loss: float = float("nan")
    scope_divergence: float = float("nan")


class Strategy:
    """FedAvg-style policy; subclasses change the instructions, the client side or the
    bookkeeping after aggregation. Options are declared in `options` and arrive as keyword
    arguments (already parsed) in `configure`."""

    name = "fedavg"
    summary = "sample-count weighted average"
    options: tuple[Option, ...] = ()

    def __init__(self, *, fraction: float = 1.0, seed: int = 0, aggregator: str = "mean",
                 trim: float = 0.1, **options: Any):
        self.fraction = check_fraction(fraction)
        if aggregator not in AGGREGATORS:
            raise ConfigError(f"unknown aggregation '{aggregator}'; choose one of "
                              f"{', '.join(AGGREGATORS)}")
        if aggregator == "trimmed-mean":
            trim_count(1, trim)  # validates the fraction
        self.aggregator = aggregator
        self.trim = float(trim)
        self.seed = int(seed)
        self.settings = self.parse_options(options)
        self.configure(**self.settings)

    @classmethod
    def parse_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        """The declared options with `given` values parsed and checked, defaults elsewhere."""
        known = {o.name: o for o in cls.options}
        unknown = sorted(set(given) - set(known))
        if unknown:
            names = ", ".join(known) or "none"
            raise ConfigError(f"strategy '{cls.name}' has no option '{unknown[0]}' (its options: "
                              f"{names})")
        return {n: (o.parse(given[n], cls.name) if n in given else o.default)
                for n, o in known.items()}

    def configure(self, **options: Any) -> None:
        """Take the parsed options (subclasses store them)."""

    @classmethod
    def check_training(cls, training: LocalTraining) -> None:
        """Refuse local training the strategy cannot work with (one `ConfigError`)."""

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

    # ------------------------------------------------------------------ server side of a round
    def instructions(self, server_round: int,
                     global_state: Mapping[str, torch.Tensor]) -> Instructions:
        """What every client of the round is told."""
        return Instructions(round=server_round, strategy=self.name)

    def client_instructions(self, instructions: Instructions, client: int) -> Instructions:
        """The round's instructions for one client (per-client state goes in here)."""
        return instructions

    def aggregate(self, server_round: int, global_state: Mapping[str, torch.Tensor],
                  updates: Sequence[ClientUpdate]) -> RoundOutcome:
        """Screen the updates (NaN/Inf or mismatched ones are rejected and logged, never
        averaged in), aggregate the rest in client-id order, update the strategy's state.
        With no usable update the global model is kept (the round loop decides whether that
        is an error)."""
        by_client = {u.client: u for u in sorted(updates, key=lambda u: u.client)}
        accepted, rejected = screen_updates(global_state, {c: u.state for c, u in by_client.items()})
        for cid in list(accepted):
            try:
                for name, extra in by_client[cid].extras.items():
                    check_finite(extra, f"client {cid}'s '{name}'")
            except Exception as e:  # noqa: BLE001 - any bad extra rejects the update
                accepted.remove(cid)
                rejected[cid] = str(e)
        for cid, reason in rejected.items():
            log.warning("round %d: rejected the update of client %d: %s", server_round, cid, reason)
        ups = [by_client[c] for c in accepted]
        if not ups:
            return RoundOutcome(clone_state(global_state), [], rejected)
        counts = [u.num_examples for u in ups]
        state = aggregate(self.aggregator, [u.state for u in ups], self.weights(ups), self.trim)
        state = self.after_aggregate(server_round, state, ups, global_state)
        losses = [u.metrics.get("train_loss", float("nan")) for u in ups]
        train_loss = float(np.average(losses, weights=counts))
        return RoundOutcome(state, accepted, rejected, train_loss,
                            scope_spread([u.scope for u in ups], counts))

    def weights(self, updates: Sequence[ClientUpdate]) -> list[float]:
        """The aggregation weights of the accepted updates (default: their sample counts)."""
        return [float(u.num_examples) for u in updates]

    def after_aggregate(self, server_round: int, state: StateDict,
                        updates: Sequence[ClientUpdate],
                        global_state: Mapping[str, torch.Tensor]) -> StateDict:
        """Update the state carried to the next round; may change the new global model."""
        return state

    def round_warnings(self, server_round: int) -> list[str]:
        """Warnings the strategy raised about `server_round` (for the round record)."""
        return []

    # ------------------------------------------------------------------ client side
    @classmethod
    def client_state(cls, global_state: Mapping[str, torch.Tensor],
                     instructions: Instructions) -> Mapping[str, torch.Tensor]:
        """The weights local training starts from (default: the global model)."""
        return global_state

    @classmethod
    def client_penalties(cls, model: nn.Module, global_state: Mapping[str, torch.Tensor],
                         instructions: Instructions) -> list:
        """Extra training penalties (callables ``model -> scalar``; one with ``close()`` is
        closed after training)."""
        return []

    @classmethod
    def client_extras(cls, model: nn.Module, global_state: Mapping[str, torch.Tensor],
                      instructions: Instructions, training: LocalTraining,
                      steps: int) -> dict[str, StateDict]:
        """Extra tensors the client sends back after `steps` optimizer steps."""
        return {}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        if state:
            raise ConfigError(f"strategy '{self.name}' carries no state, got keys {sorted(state)}")

    def state_tensors(self) -> StateDict:
        """Tensor state carried across rounds (saved in the server checkpoint)."""
        return {}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if tensors:
            raise ConfigError(f"strategy '{self.name}' carries no tensor state, got "
                              f"{len(tensors)} tensors")

    def describe(self) -> dict:
        return {"strategy": self.name, "fraction": self.fraction, "aggregator": self.aggregator,
                "trim": self.trim, "seed": self.seed, **self.settings}


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: add a strategy to the registry under its `name`."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ConfigError(f"strategy '{cls.name}' is registered twice")
    names = [o.name for o in cls.options]
    if len(set(names)) != len(names):
        raise ConfigError(f"strategy '{cls.name}' declares an option twice")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Strategy]]:
    """Every registered strategy by name (importing `basinmerge.fl.strategies` fills it)."""
    importlib.import_module("basinmerge.fl.strategies")
    return dict(_REGISTRY)


def strategy_names() -> tuple[str, ...]:
    return tuple(registry())


def strategy_class(name: str) -> type[Strategy]:
    reg = registry()
    if name not in reg:
        raise ConfigError(f"unknown strategy '{name}'; choose one of {', '.join(reg)}")
    return reg[name]


def make_strategy(name: str, options: Mapping[str, Any] | None = None, *, fraction: float = 1.0,
                  seed: int = 0, aggregator: str = "mean", trim: float = 0.1) -> Strategy:
    """Build a registered strategy by name with its own `options` (checked)."""
    return strategy_class(name)(fraction=fraction, seed=seed, aggregator=aggregator, trim=trim,
                                **dict(options or {}))


def strategy_help() -> str:
    """Every strategy with its options, defaults and help (for ``basinmerge fl --help``)."""
    lines = []
    for name, cls in registry().items():
        opts = "; ".join(f"{o.name}={o.default!r}: {o.help}" for o in cls.options)
        lines.append(f"{name} ({cls.summary})" + (f" - {opts}" if opts else ""))
    return "\n".join(lines)


def with_arrays(instructions: Instructions, **arrays: StateDict) -> Instructions:
    """`instructions` with more named tensor groups."""
    return replace(instructions, arrays={**instructions.arrays, **arrays})


def __getattr__(name: str) -> Any:  # the strategy classes, as before the registry
    legacy = {"FedAvg": "fedavg", "FedProx": "fedprox", "WSA": "wsa", "Scaffold": "scaffold",
              "FedDyn": "feddyn", "Moon": "moon", "FedBN": "fedbn"}
    if name in legacy:
        return strategy_class(legacy[name])
    if name == "STRATEGIES":
        return strategy_names()
    raise AttributeError(name)
