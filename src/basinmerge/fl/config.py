"""One federated run as a plain, JSON-able configuration, and everything built from it.

`FLConfig` names a run completely (dataset, model, partition, local training, strategy, seed):
the embedded simulator stores it in its checkpoints and refuses to resume under another one,
and the Flower apps rebuild the same data, partitions, model and strategy from it on every
node. `load_data`, `build_partitions` and `build_model` build those pieces from it, and
`simulate_config` runs it in the embedded simulator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from basinmerge import data as data_mod
from basinmerge import models
from basinmerge.data import Dataset
from basinmerge.errors import ConfigError
from basinmerge.fl.client import LocalTraining
from basinmerge.fl.partition import SCHEMES, partition
from basinmerge.fl.simulator import SimulationResult, simulate
from basinmerge.fl.strategy import Strategy, check_fraction, make_strategy, strategy_class

# Flat options of earlier releases, read into `strategy_options` when the strategy has them.
LEGACY_OPTIONS = {"mu": "mu", "wsa_lambda": "lambda", "wsa_target": "target",
                  "divergence": "divergence", "fusion": "fusion"}


_LOCAL = LocalTraining()

# How an unset (None) optional field is written where None cannot be (Flower's run config):
# read back as None (`flower_app.config_from_run_config`).
UNSET = {"train_limit": 0, "test_limit": 0, "data_root": "", "test_data": ""}


@dataclass(frozen=True)
class FLConfig:
    dataset: str = "fashion-mnist"
    model: str = "mlp"
    model_options: dict = field(default_factory=dict)
    clients: int = 20
    scheme: str = "dirichlet"
    alpha: float = 0.5
    classes_per_client: int = 2
    min_size: int = 10
    rounds: int = 50
    local_epochs: int = _LOCAL.epochs  # local training: LocalTraining's defaults
    batch_size: int = _LOCAL.batch_size
    lr: float = _LOCAL.lr
    optimizer: str = _LOCAL.optimizer
    momentum: float = _LOCAL.momentum
    weight_decay: float = _LOCAL.weight_decay
    fraction: float = 0.5
    strategy: str = "fedavg"
    strategy_options: dict = field(default_factory=dict)
    aggregate: str = "mean"
    trim: float = 0.1
    seed: int = 0
    train_limit: int | None = None
    test_limit: int | None = None
    data_root: str | None = None
    # Held-out data (a data spec) when `dataset` is a data spec without a test split.
    test_data: str | None = None

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ConfigError(f"clients must be >= 1, got {self.clients}")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"alpha must be > 0, got {self.alpha}")
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown scheme '{self.scheme}'; choose one of {', '.join(SCHEMES)}")
        try:
            check_fraction(self.fraction)
        except ConfigError as e:
            raise ConfigError(f"fraction: {e}") from None
        for name in ("train_limit", "test_limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1, got {v}")
        if not isinstance(self.strategy_options, dict):
            raise ConfigError(f"strategy_options must be a mapping, got {self.strategy_options!r}")
        strategy_class(self.strategy).check_training(self.local_training())  # validates both
        self.make_strategy()  # validates the strategy's options and the aggregation rule

    # ------------------------------------------------------------------ conversions
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FLConfig:
        d = dict(d)
        legacy = {k: d.pop(k) for k in list(d) if k in LEGACY_OPTIONS}
        if legacy:
            declared = {o.name for o in strategy_class(d.get("strategy", "fedavg")).options}
            opts = dict(d.get("strategy_options") or {})
            for k, v in legacy.items():
                if LEGACY_OPTIONS[k] in declared:
                    opts.setdefault(LEGACY_OPTIONS[k], v)
            d["strategy_options"] = opts
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown federated option '{unknown[0]}'")
        return cls(**d)

    def identity(self) -> dict:
        """The fields that define the computation (all but where the data files live)."""
        d = self.to_dict()
        d.pop("data_root")
        if d["test_data"] is None:  # runs recorded before the field existed still resume
            d.pop("test_data")
        return d

    def local_training(self) -> LocalTraining:
        return LocalTraining(epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr,
                             optimizer=self.optimizer, momentum=self.momentum,
                             weight_decay=self.weight_decay)

    def make_strategy(self) -> Strategy:
        return make_strategy(self.strategy, self.strategy_options, fraction=self.fraction,
                             seed=self.seed, aggregator=self.aggregate, trim=self.trim)


def load_data(cfg: FLConfig) -> tuple[Dataset, Dataset]:
    """Train and test splits; the optional subsets are fixed (seed 0), the same for every run
    seed, so seeds differ only in initialization, partition and sampling.

    `cfg.dataset` is a project dataset name, or a data spec of labelled examples with tensor
    inputs (`basinmerge.datasource`: a tensor file, a datasets folder); the test data is then
    `cfg.test_data`, or the folder's test split. Both share one class count."""
    from basinmerge import datasource

    spec = datasource.parse(cfg.dataset)
    if spec.kind == "dataset" and spec.split is None and cfg.test_data is None:
        train = data_mod.load(cfg.dataset, "train", cfg.data_root)
        test = data_mod.load(cfg.dataset, "test", cfg.data_root)
    else:
        test_spec = cfg.test_data
        if test_spec is None:
            if spec.kind != "hf" or spec.split is not None:
                raise ConfigError(f"data '{cfg.dataset}' has no test split to score the global "
                                  "model on: give held-out data as test_data (--test-data)")
            test_spec = cfg.dataset
        train = datasource.as_dataset(datasource.load(cfg.dataset, split="train",
                                                      root=cfg.data_root),
                                      f"training data {cfg.dataset}")
        test = datasource.as_dataset(datasource.load(test_spec, split="test", root=cfg.data_root),
                                     f"test data {test_spec}", split="test")
        if train.input_shape != test.input_shape:
            raise ConfigError(f"test data {test_spec}: inputs of shape {test.input_shape}, but the "
                              f"training data {cfg.dataset} has {train.input_shape}")
        k = max(train.num_classes, test.num_classes)
        train, test = (replace(d, info=replace(d.info, num_classes=k)) for d in (train, test))
    if cfg.train_limit is not None and cfg.train_limit < len(train):
        train = train.subset(cfg.train_limit, seed=0)
    if cfg.test_limit is not None and cfg.test_limit < len(test):
        test = test.subset(cfg.test_limit, seed=0)
    return train, test


def build_model(cfg: FLConfig, train: Dataset) -> nn.Module:
    return models.build(cfg.model, train.input_shape, train.num_classes, seed=cfg.seed,
                        **cfg.model_options)


def build_partitions(cfg: FLConfig, train: Dataset) -> list:
    return partition(train.y, cfg.clients, cfg.scheme, alpha=cfg.alpha,
                     classes_per_client=cfg.classes_per_client, min_size=cfg.min_size,
                     seed=cfg.seed)


def simulate_config(cfg: FLConfig, model: nn.Module, train: Dataset, test: Dataset,
                    partitions: Sequence[torch.Tensor], **options: Any) -> SimulationResult:
    """`simulate` the run `cfg` names (its strategy, local training, rounds and seed) from
    `model`'s weights; `options` are simulate's others (out, resume, device, progress, ...)."""
    return simulate(model, train, test, partitions, cfg.make_strategy(), cfg.local_training(),
                    rounds=cfg.rounds, seed=cfg.seed, **options)
