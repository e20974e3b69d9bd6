"""Checks that keep a result from being silently wrong, in one place, run before any long work.

- Bad values: `load_model` / `load_state` read a checkpoint and refuse NaN or Inf in any tensor
  (`NonFiniteError` naming the file and the first key, through `state.check_finite`);
  ``allow_nonfinite=True`` skips the check for a caller that wants to inspect a broken file.
  Training stops on a non-finite loss (`basinmerge.train.Trainer`, same error class).
- Data that does not fit the model: `check_data_fits(model or meta, dataset)` compares the
  dataset's input shape and class count with the checkpoint's record (or, for a model built
  elsewhere, its first and last layers) and names the dataset the checkpoint was trained on.

Output paths are checked by `basinmerge.io.check_output` (files are io's business).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from basinmerge import io
from basinmerge.data import Dataset
from basinmerge.errors import ConfigError
from basinmerge.state import check_finite


def load_model(path: str | os.PathLike, *, like: str | os.PathLike | None = None,
               allow_nonfinite: bool = False,
               config: Mapping[str, Any] | None = None) -> tuple[nn.Module, dict]:
    """`io.load_model` (any checkpoint format; the architecture from the file, its HF config,
    `like`, or `config`) with the bad-value policy: every tensor finite, or `NonFiniteError`
    naming `path` and the first bad key."""
    model, meta = io.load(path, config=config) if config is not None else \
        io.load_model(path, like=like)
    if not allow_nonfinite:
        check_finite(model.state_dict(), str(path))
    return model, meta


def load_state(path: str | os.PathLike, *, allow_nonfinite: bool = False) -> tuple[dict, dict]:
    """`io.load_state` with the bad-value policy (see `load_model`)."""
    state, meta = io.load_state(path)
    if not allow_nonfinite:
        check_finite(state, str(path))
    return state, meta


# --------------------------------------------------------------------------- data vs model


def _config_of(obj: nn.Module | Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The architecture record (``in_shape``, ``num_classes``) of a model or checkpoint meta."""
    cfg = getattr(obj, "config", None) if isinstance(obj, nn.Module) else (
        obj.get("model", obj) if isinstance(obj, Mapping) else None)
    if isinstance(cfg, Mapping) and "in_shape" in cfg and "num_classes" in cfg:
        return cfg
    return None


def _layer_expectation(model: nn.Module) -> tuple[str | None, int | None]:
    """What the model's own layers say when it carries no record: a description of the input
    its first layer takes, and the number of outputs of its last linear layer."""
    first = next((m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)),
                 None)
    last = next((m for m in reversed(list(model.modules())) if isinstance(m, nn.Linear)), None)
    takes = None
    if isinstance(first, nn.Linear):
        takes = f"{first.in_features} input features"
    elif isinstance(first, nn.Conv1d | nn.Conv2d):
        takes = f"{first.in_channels} input channels"
    return takes, (last.out_features if last is not None else None)


def _input_fits(model: nn.Module, shape: tuple[int, ...]) -> bool:
    if any(isinstance(m, nn.Embedding) for m in model.modules()):
        return True  # token inputs: the first linear layer sees embeddings, not the data
    first = next((m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)),
                 None)
    if isinstance(first, nn.Linear):
        return first.in_features in (math.prod(shape), shape[-1])
    if isinstance(first, nn.Conv1d | nn.Conv2d):
        return len(shape) >= 2 and first.in_channels == shape[0]
    return True


def check_data_fits(model: nn.Module | Mapping[str, Any], dataset: Dataset, *,
                    meta: Mapping[str, Any] | None = None, source: str = "the model") -> None:
    """Raise one `ConfigError` before any work if `dataset` cannot be fed to `model` (input
    shape) or its labels are not the model's classes (class count).

    `model`: an `nn.Module` or a checkpoint's metadata (as `io.read_meta` returns it, so a
    merge can check before loading any tensor); `meta`: the checkpoint's metadata when `model`
    is a module (for the name of the dataset it was trained on); `source`: the file, named in
    the message."""
    info = dataset.info
    meta = meta if meta is not None else (model if isinstance(model, Mapping) else {})
    trained_on = meta.get("dataset") if isinstance(meta, Mapping) else None
    hint = (f"; it was trained on '{trained_on}'" if trained_on and trained_on != info.name
            else "")
    have = (f"dataset '{info.name}' has inputs of shape {tuple(info.input_shape)} and "
            f"{info.num_classes} classes")
    cfg = _config_of(model) or (_config_of(meta) if isinstance(meta, Mapping) else None)
    if cfg is not None:
        want_shape = tuple(int(d) for d in cfg["in_shape"])
        want_k = int(cfg["num_classes"])
        if want_shape != tuple(info.input_shape) or want_k != info.num_classes:
            raise ConfigError(f"{source}: the model takes inputs of shape {want_shape} and "
                              f"predicts {want_k} classes, but {have}{hint}")
        return
    if not isinstance(model, nn.Module):
        return  # metadata without an architecture record: nothing to compare against
    takes, k = _layer_expectation(model)
    if takes is not None and not _input_fits(model, tuple(info.input_shape)):
        raise ConfigError(f"{source}: the model's first layer takes {takes}, but {have}{hint}")
    if k is not None and k != info.num_classes:
        raise ConfigError(f"{source}: the model predicts {k} classes, but {have}{hint}")
