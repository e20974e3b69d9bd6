"""Linear mode connectivity: interpolation curves and barriers.

`interpolate(a, b, data)` evaluates ``(1 - α) θ_A + α θ_B`` on a grid of α for each data split.
For models with BatchNorm the running statistics are recomputed at every α from the training
split (reset, cumulative momentum, one pass in train mode): interpolated weights with
interpolated statistics suffer variance collapse (``bn_reset=False`` shows it). Given a list of
models, the path is piecewise linear through them.

`barriers(curve)` gives, per split:

- ``loss_barrier``: Git Re-Basin's ``max_α L(α) − ½(L_A + L_B)``,
- ``linear_loss_barrier``: ``max_α [L(α) − ((1−α) L_A + α L_B)]``,
- ``acc_barrier``: mean endpoint accuracy − min accuracy on the path.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from basinmerge.adapter import Data, as_data
from basinmerge.console import progress_task
from basinmerge.data import Dataset
from basinmerge.errors import ConfigError
from basinmerge.state import as_state_dict, check_compatible, lerp
from basinmerge.train import evaluate, has_batchnorm, reset_bn_stats

# A hook applied to each interpolated model before evaluation: (model, segment, α) -> model.
Transform = Callable[[nn.Module, int, float], nn.Module]


@dataclass
class Curve:
    """Loss and accuracy along a (piecewise) linear path.

    ``t`` runs from 0 to ``num_models - 1``; node i sits at t = i. For two models t = α."""

    t: list[float]
    metrics: dict[str, dict[str, list[float]]]  # split -> {"loss": [...], "accuracy": [...]}
    num_models: int = 2
    label: str = ""
    info: dict = field(default_factory=dict)

    @property
    def splits(self) -> list[str]:
        return list(self.metrics)

    def node_indices(self) -> list[int]:
        return [int(np.argmin(np.abs(np.asarray(self.t) - i))) for i in range(self.num_models)]

    def segment(self, i: int) -> Curve:
        """The part of a piecewise path between node i and node i + 1, as a two-model curve
        (t runs from 0 to 1 again), e.g. to take the barrier of each segment."""
        if not 0 <= i < self.num_models - 1:
            raise ConfigError(f"segment {i} is outside 0..{self.num_models - 2}")
        t = np.asarray(self.t)
        sel = np.flatnonzero((t >= i - 1e-9) & (t <= i + 1 + 1e-9))
        return Curve([float(t[j] - i) for j in sel],
                     {s: {k: [v[j] for j in sel] for k, v in m.items()} for s, m in self.metrics.items()},
                     2, self.label, dict(self.info))

    def to_dict(self) -> dict:
        return {"t": self.t, "metrics": self.metrics, "num_models": self.num_models,
                "label": self.label, "info": self.info}

    @classmethod
    def from_dict(cls, d: Mapping) -> Curve:
        return cls(list(d["t"]), {s: {k: list(v) for k, v in m.items()} for s, m in d["metrics"].items()},
                   int(d.get("num_models", 2)), d.get("label", ""), dict(d.get("info", {})))


def _as_splits(data) -> dict[str, Data]:
    """Named splits, each as one in-memory `adapter.Data`: a mapping split -> data, a Dataset
    (named by its split), a (train, test) pair of Datasets, or any one form `adapter.as_data`
    accepts (a dict batch of tensors included), named "data"."""
    if isinstance(data, Mapping) and data and not all(isinstance(v, torch.Tensor) for v in data.values()):
        return {str(k): as_data(v, f"split '{k}'") for k, v in data.items()}
    if isinstance(data, Mapping) and not data:
        raise ConfigError("interpolate needs at least one data split")
    if isinstance(data, Dataset):
        return {data.info.split: as_data(data)}
    if isinstance(data, tuple | list) and len(data) == 2 and all(isinstance(d, Dataset) for d in data):
        return {"train": as_data(data[0], "train split"), "test": as_data(data[1], "test split")}
    return {"data": as_data(data, "interpolation data")}


def path_grid(num_models: int, num_points: int) -> list[tuple[int, float]]:
    """(segment, α) pairs of a piecewise path with `num_points` per segment, shared nodes once."""
    if num_points < 2:
        raise ConfigError(f"num_points must be >= 2, got {num_points}")
    alphas = np.linspace(0.0, 1.0, num_points)
    grid = [(0, float(a)) for a in alphas]
    for seg in range(1, num_models - 1):
        grid += [(seg, float(a)) for a in alphas[1:]]
    return grid


def _path_nodes(model_a: nn.Module | Sequence[nn.Module],
                model_b: nn.Module | None) -> list[nn.Module]:
    """The models a path runs through: a list of them, or two."""
    if isinstance(model_a, Sequence):
        if model_b is not None:
            raise ConfigError("interpolate: pass either a list of models or two models, not both")
        models = list(model_a)
    elif model_b is None:
        raise ConfigError("interpolate needs two models (or a list of at least two)")
    else:
        models = [model_a, model_b]
    if any(m is None for m in models) or len(models) < 2:
        raise ConfigError("interpolate needs two models (or a list of at least two)")
    return models


def interpolate(model_a: nn.Module | Sequence[nn.Module], model_b: nn.Module | None = None,
                data=None, *, num_points: int = 25, splits: Sequence[str] | None = None,
                bn_reset: bool = True, bn_data=None,
                bn_examples: int | None = None, reset_endpoints: bool | None = None,
                transform: Transform | None = None, label: str = "", progress: bool = True,
                repair: bool | str = False) -> Curve:
    """Evaluate the linear path between two models (or the piecewise path through a list).

    data: a mapping split -> data (a Dataset, (x, y), a dict batch, a DataLoader, ...: any form
    `basinmerge.adapter.as_data` accepts), a Dataset, a (train, test) pair of Datasets, or one
    data form (split "data"); `splits` picks which to evaluate (default: all). BatchNorm
    statistics are reset at each point from `bn_data` (default: the "train" split, else the
    first; `bn_examples` caps how many are used). `reset_endpoints` follows `bn_reset` by
    default: the models themselves (α = 0 and 1, the path's nodes) are reset from the same data
    as every interior point, so a barrier compares like with like (endpoints keeping their own
    training statistics lowered a VGG-BN barrier by about 0.013). Pass ``reset_endpoints=False``
    to keep the nodes' own statistics (then a curve's ends equal `evaluate` of the models).
    `transform` is applied to each interpolated model. ``repair=True`` applies REPAIR
    (`basinmerge.align.Repair`, statistics from `bn_data`) to every point between the nodes,
    before `transform`; for BatchNorm models it amounts to the BN reset. A string picks the
    REPAIR mode (``"layernorm"``, ``"mlp"``, ``"both"`` for transformers, ``"units"``; True is
    ``"auto"``: see `basinmerge.align.repair`)."""
    models = _path_nodes(model_a, model_b)
    mode = _repair_mode(repair)
    if data is None:
        raise ConfigError("interpolate needs data to evaluate on")
    all_splits = _as_splits(data)
    chosen = list(splits) if splits is not None else list(all_splits)
    for s in chosen:
        if s not in all_splits:
            raise ConfigError(f"split '{s}' not in the data given ({', '.join(all_splits)})")
    states = [as_state_dict(m) for m in models]
    check_compatible(states, [f"model {chr(65 + i)}" if i < 26 else f"model {i}" for i in range(len(states))])
    work = copy.deepcopy(models[0])
    needs_bn = bn_reset and has_batchnorm(work)
    reset_endpoints = needs_bn if reset_endpoints is None else bool(reset_endpoints)
    if bn_data is None:  # statistics for the BN reset and REPAIR
        bn_data = all_splits.get("train", next(iter(all_splits.values())))
    if mode is not None:
        transform = _repair_transform(models, bn_data, not needs_bn, reset_endpoints, transform,
                                      mode)
    grid = path_grid(len(models), num_points)
    metrics: dict[str, dict[str, list[float]]] = {s: {"loss": [], "accuracy": []} for s in chosen}
    t_values = []
    with progress_task(label or "interpolate", len(grid), enabled=progress) as advance:
        for seg, alpha in grid:
            work.load_state_dict(lerp(states[seg], states[seg + 1], alpha))
            net = work
            at_node = alpha in (0.0, 1.0)
            if needs_bn and (reset_endpoints or not at_node):
                reset_bn_stats(net, bn_data, num_examples=bn_examples)
            if transform is not None:
                net = transform(net, seg, alpha)
            for s in chosen:
                r = evaluate(net, all_splits[s])
                metrics[s]["loss"].append(r["loss"])
                metrics[s]["accuracy"].append(r["accuracy"])
            t_values.append(seg + alpha)
            advance(1, t=seg + alpha)
    return Curve(t_values, metrics, len(models), label,
                 {"bn_reset": bool(needs_bn), "reset_endpoints": reset_endpoints,
                  "num_points": num_points, "bn_examples": bn_examples,
                  "repair": mode is not None, "repair_mode": mode})


def _repair_mode(repair: bool | str) -> str | None:
    """None (no REPAIR) or the checked REPAIR mode."""
    from basinmerge.align.repair import check_mode

    return None if repair is False or repair is None else check_mode(repair)


def _repair_transform(models: Sequence[nn.Module], data, bn_reset: bool, at_nodes: bool,
                      then: Transform | None, mode: str = "auto") -> Transform:
    """REPAIR each point of a segment toward its two nodes (endpoint statistics measured once
    per segment), then apply `then`."""
    from basinmerge.align.repair import Repair

    repairers: dict[int, Repair] = {}

    def apply(net: nn.Module, seg: int, alpha: float) -> nn.Module:
        if at_nodes or alpha not in (0.0, 1.0):
            if seg not in repairers:
                repairers[seg] = Repair([models[seg], models[seg + 1]], data, bn_reset=bn_reset,
                                        mode=mode)
            net = repairers[seg](net, alpha)
        return then(net, seg, alpha) if then is not None else net

    return apply


def barriers(curve: Curve) -> dict[str, dict[str, float]]:
    """Barriers per split (see the module docstring); also the endpoint values and where the
    loss peaks."""
    out: dict[str, dict[str, float]] = {}
    t = np.asarray(curve.t, dtype=np.float64)
    nodes = curve.node_indices()
    for split, m in curve.metrics.items():
        loss = np.asarray(m["loss"], dtype=np.float64)
        acc = np.asarray(m["accuracy"], dtype=np.float64)
        node_loss, node_acc = loss[nodes], acc[nodes]
        linear = np.interp(t, np.arange(curve.num_models, dtype=np.float64), node_loss)
        i_max = int(np.argmax(loss))
        out[split] = {
            "loss_barrier": float(loss.max() - node_loss.mean()),
            "linear_loss_barrier": float((loss - linear).max()),
            "acc_barrier": float(node_acc.mean() - acc.min()),
            "loss_a": float(node_loss[0]), "loss_b": float(node_loss[-1]),
            "acc_a": float(node_acc[0]), "acc_b": float(node_acc[-1]),
            "mid_loss": float(np.interp(t[-1] / 2, t, loss)),
            "mid_acc": float(np.interp(t[-1] / 2, t, acc)),
            "max_loss_at": float(t[i_max]),
        }
    return out


BARRIER_COLUMNS = ["curve", "split", "loss A", "loss B", "loss barrier", "linear loss barrier",
                   "acc A", "acc B", "acc barrier", "mid acc"]


def barrier_rows(curves: Mapping[str, Curve]) -> list[list]:
    """One row per (curve, split) with the columns of `BARRIER_COLUMNS`, for tables."""
    rows = []
    for name, curve in curves.items():
        for split, b in barriers(curve).items():
            rows.append([name, split, b["loss_a"], b["loss_b"], b["loss_barrier"],
                         b["linear_loss_barrier"], b["acc_a"], b["acc_b"], b["acc_barrier"],
                         b["mid_acc"]])
    return rows
