"""Server-side aggregation as pure functions over state_dicts (no strategy state, no I/O).

- `fedavg`: the sample-count weighted average (FedAvg, McMahan et al. 2017).
- `coordinate_median`: the coordinate-wise median (Yin et al. 2018); with an even number of
  clients, the mean of the two middle values.
- `trimmed_mean`: the coordinate-wise β-trimmed mean: drop the ⌊β·K⌋ largest and smallest
  values of every coordinate, average the rest (Yin et al. 2018).
- `screen_updates`: split client states into accepted ones and rejected ones (NaN/Inf weights,
  keys/shapes/dtypes that do not match the global model), with the reason for each rejection.
- `scope_spread`: how far the clients' weight scopes are from their fused scope (the
  "client scope divergence" tracked per round).

The robust rules are unweighted (a client's sample count does not buy it influence). Integer
buffers (BatchNorm's ``num_batches_tracked``) are taken from the first state. These functions
could be shared with `basinmerge.merge` (median / trimmed-mean merging of full models).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from basinmerge.errors import ConfigError, IncompatibleModelsError
from basinmerge.merge.basic import median as merge_median
from basinmerge.merge.basic import trimmed_mean as merge_trimmed_mean
from basinmerge.scope import Scope, divergence, fuse
from basinmerge.state import StateDict, check_compatible, check_finite, weighted_average

AGGREGATORS = ("mean", "median", "trimmed-mean")


def fedavg(states: Sequence[Mapping[str, torch.Tensor]],
           num_examples: Sequence[float] | None = None) -> StateDict:
    """Average of the client states weighted by their sample counts (uniform when None)."""
    return weighted_average(states, num_examples)


def coordinate_median(states: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """The coordinate-wise median of the client states (`basinmerge.merge.median`)."""
    return merge_median(states)


def trimmed_mean(states: Sequence[Mapping[str, torch.Tensor]], trim: float = 0.1) -> StateDict:
    """The coordinate-wise mean after dropping the ⌊trim·K⌋ smallest and largest values
    (`basinmerge.merge.trimmed_mean`)."""
    return merge_trimmed_mean(states, trim)


def aggregate(method: str, states: Sequence[Mapping[str, torch.Tensor]],
              num_examples: Sequence[float] | None = None, trim: float = 0.1) -> StateDict:
    """Dispatch to `fedavg` (``mean``), `coordinate_median` or `trimmed_mean`."""
    if method == "mean":
        return fedavg(states, num_examples)
    if method == "median":
        return coordinate_median(states)
    if method == "trimmed-mean":
        return trimmed_mean(states, trim)
    raise ConfigError(f"unknown aggregation '{method}'; choose one of {', '.join(AGGREGATORS)}")


def screen_updates(reference: Mapping[str, torch.Tensor],
                   states: Mapping[int, Mapping[str, torch.Tensor]]) -> tuple[list[int], dict[int, str]]:
    """Check each client's state against the global model: same keys, shapes and dtypes, and
    only finite values. Returns (accepted client ids, {rejected client id: reason})."""
    accepted: list[int] = []
    rejected: dict[int, str] = {}
    for cid, st in states.items():
        name = f"client {cid}"
        try:
            check_compatible([reference, st], ["the global model", name])
            check_finite(st, name)
        except IncompatibleModelsError as e:
            rejected[cid] = str(e)
        else:
            accepted.append(cid)
    return accepted, rejected


def scope_spread(scopes: Sequence[Scope], weights: Sequence[float] | None = None,
                 kind: str = "kl") -> float:
    """Mean over clients of the layer-averaged divergence between each client's scope and the
    clients' fused (moment-matched) scope; 0 when all clients share one scope."""
    if not scopes:
        return float("nan")
    target = fuse(scopes, weights, "moment")
    return float(sum(divergence(s, target, kind).mean for s in scopes) / len(scopes))
