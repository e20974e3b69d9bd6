"""Federated learning with weight scope alignment.

- `partition`: IID, Dirichlet label-skew and shard splits of a dataset among clients.
- `client_update`: local training with nothing (FedAvg), a proximal term (FedProx), weight
  decay, or WSA toward the round's target scope; reports the client's weight scope.
- `aggregate` functions (FedAvg, coordinate median, trimmed mean) and the strategies over them,
  one registered class per file in `basinmerge.fl.strategies` (`FedAvg`, `FedProx`, `WSA`,
  `Scaffold`, `FedDyn`, `Moon`, `FedBN`), built by name with `make_strategy`.
- `simulate`: the embedded in-process simulator (checkpoints, resume, dropped clients);
  `basinmerge.fl.outputs`: the round records and files both backends write.
- `basinmerge.fl.flower_app`: the same client update and strategies as a Flower app (needs the
  ``flower`` extra; imported on demand).
"""

from basinmerge.fl.aggregate import (
    AGGREGATORS,
    aggregate,
    coordinate_median,
    fedavg,
    scope_spread,
    screen_updates,
    trimmed_mean,
)
from basinmerge.fl.client import (
    ClientTimeout,
    ClientUpdate,
    Instructions,
    LocalTraining,
    client_update,
    derive_seed,
)
from basinmerge.fl.config import (
    FLConfig,
    build_model,
    build_partitions,
    load_data,
    simulate_config,
)
from basinmerge.fl.partition import SCHEMES, class_histogram, partition, summarize
from basinmerge.fl.simulator import SimulationResult, simulate
from basinmerge.fl.strategies import WSA, FedAvg, FedBN, FedDyn, FedProx, Moon, Scaffold
from basinmerge.fl.strategy import (
    Option,
    RoundOutcome,
    Strategy,
    make_strategy,
    register,
    strategy_class,
    strategy_names,
)

STRATEGIES = strategy_names()

__all__ = [
    "AGGREGATORS", "SCHEMES", "STRATEGIES", "ClientTimeout", "ClientUpdate", "FLConfig", "FedAvg",
    "FedBN", "FedDyn", "FedProx", "Instructions", "LocalTraining", "Moon", "Option",
    "RoundOutcome", "Scaffold", "register", "strategy_class", "strategy_names",
    "SimulationResult", "Strategy", "WSA", "aggregate", "build_model", "build_partitions",
    "class_histogram", "client_update", "coordinate_median", "derive_seed", "fedavg",
    "load_data", "make_strategy", "partition", "scope_spread", "screen_updates", "simulate",
    "simulate_config",
    "summarize", "trimmed_mean",
]
