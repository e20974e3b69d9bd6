"""Checks that keep a result from being silently wrong, in one place, run before any long work.

- Bad values: `load_model` / `load_state` read a checkpoint and refuse NaN or Inf in any tensor
  (`NonFiniteError` naming the file and the first key, through `state.check_finite`);
  ``allow_nonfinite=True`` skips the check for a caller that wants to inspect a broken file.
  Training stops on a non-finite loss (`basinmerge.train.Trainer`, same error class).
- Data that does not fit the model: `check_data_fits(model or meta, data)` (any data form, a
  data spec's data included) raises `DataMismatchError` naming the data and the model: a
  project dataset's input shape and class count against the checkpoint's record (or, for a
  model built elsewhere, its first and last layers, naming the dataset it was trained on);
  then two examples run through the model, token ids against its vocabulary and positions,
  labels against its outputs. Every command and engine that takes data runs it first.

Output paths are checked by `basinmerge.io.check_output` (files are io's business).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from basinmerge import adapter, io
from basinmerge.data import Dataset
from basinmerge.errors import DataMismatchError
from basinmerge.state import check_finite, module_mode


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


def _record_fits(model: nn.Module | Mapping[str, Any], dataset: Dataset,
                 meta: Mapping[str, Any] | None, source: str) -> None:
    """A project dataset against the checkpoint's architecture record (or, for a model built
    elsewhere, its first and last layers)."""
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
            raise DataMismatchError(f"{source}: the model takes inputs of shape {want_shape} and "
                                    f"predicts {want_k} classes, but {have}{hint}")
        return
    if not isinstance(model, nn.Module):
        return  # metadata without an architecture record: nothing to compare against
    takes, k = _layer_expectation(model)
    if takes is not None and not _input_fits(model, tuple(info.input_shape)):
        raise DataMismatchError(f"{source}: the model's first layer takes {takes}, but {have}{hint}")
    if k is not None and k != info.num_classes:
        raise DataMismatchError(f"{source}: the model predicts {k} classes, but {have}{hint}")


def _input_embedding(model: nn.Module) -> nn.Embedding | None:
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Embedding):
            return emb
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def _token_ids(inputs: adapter.Inputs) -> torch.Tensor | None:
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else inputs
    return ids if isinstance(ids, torch.Tensor) and not ids.is_floating_point() else None


def _tokens_fit(model: nn.Module, d: adapter.Data, label: str, path: str) -> None:
    """Token ids inside the vocabulary and sequences no longer than the positions."""
    ids = _token_ids(d.inputs)
    emb = _input_embedding(model)
    if ids is None or emb is None or not ids.numel():
        return
    top, low = int(ids.max()), int(ids.min())
    if top >= emb.num_embeddings or low < 0:
        bad = top if top >= emb.num_embeddings else low
        raise DataMismatchError(f"{label} has token id {bad}, but the model in {path} has a "
                                f"vocabulary of {emb.num_embeddings} (ids 0..{emb.num_embeddings - 1}); "
                                "tokenize it with the model's tokenizer")
    cfg = getattr(model, "config", None)
    positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if isinstance(positions, int) and ids.dim() == 2 and ids.shape[1] > positions:
        raise DataMismatchError(f"{label} has sequences of {ids.shape[1]} tokens, but the model "
                                f"in {path} takes at most {positions}; give a shorter seq_len")


def _runs_through(model: nn.Module, d: adapter.Data, label: str, path: str) -> None:
    """A forward pass on two examples, and every label one of the model's outputs."""
    first = d.head(2).inputs
    shape = (tuple(first.shape[1:]) if isinstance(first, torch.Tensor)
             else {k: tuple(v.shape[1:]) for k, v in first.items()})
    try:
        with torch.no_grad(), module_mode(model, False):
            out = adapter.forward(model, first)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise DataMismatchError(f"{label} does not fit the model in {path}: inputs of shape "
                                f"{shape} ({str(e).splitlines()[0]})") from e
    y = d.labels
    if y is None or not y.numel() or y.is_floating_point() or out.dim() < 2:
        return
    y = y[y != adapter.IGNORE_INDEX]
    if y.numel() and int(y.max()) >= out.shape[-1]:
        raise DataMismatchError(f"{label} has label {int(y.max())}, but the model in {path} has "
                                f"{out.shape[-1]} outputs")


def check_data_fits(model: nn.Module | Mapping[str, Any], data: Any, *,
                    meta: Mapping[str, Any] | None = None, source: str | os.PathLike = "the model",
                    what: str = "data") -> None:
    """Raise one `DataMismatchError` before any work if `data` cannot be fed to `model`: the
    inputs do not run through it (shape), a token id is past its vocabulary (or a sequence
    past its positions), or a label is not one of its outputs (for a project dataset: its
    class count differs from the checkpoint's record).

    `model`: an `nn.Module`, or a checkpoint's metadata (as `io.read_meta` returns it, so a
    merge can check before loading any tensor: only a project dataset's record is compared
    then); `data`: any form `basinmerge.datasource.resolve` gives (a list: each one); `meta`:
    the checkpoint's metadata when `model` is a module (for the dataset it was trained on);
    `source`: the model's file, `what`: the role of the data, both named in the message with
    the data's spec."""
    if data is None:
        return
    if isinstance(data, list):
        for d in data:
            check_data_fits(model, d, meta=meta, source=source, what=what)
        return
    from basinmerge.datasource import describe

    source = str(source)
    if isinstance(data, Dataset):
        _record_fits(model, data, meta, source)
    if not isinstance(model, nn.Module):
        return
    name = describe(data)
    label = what + (f" ({name})" if name else "")
    d = adapter.as_data(data, label)
    _tokens_fit(model, d, label, source)
    _runs_through(model, d, label, source)
