"""The one place that knows how to feed data to a model and read its predictions and a loss.

Every method that runs a network (training and evaluation, interpolation, BatchNorm reset,
REPAIR, activation and STE matching, Fisher, RegMean, AdaMerging, soft merging, greedy soup,
the FL client) goes through this module, so a model only has to work here to work everywhere.

**Data** (`as_data`): every form below becomes one `Data` (inputs, optional labels, in memory):

- the project's `basinmerge.data.Dataset`;
- an ``(x, y)`` pair (``x`` a tensor or a dict of tensors, ``y`` a tensor);
- bare inputs: a tensor, or a dict batch of tensors (``input_ids``, ``attention_mask``,
  ``pixel_values``, ...), whose ``labels`` (or ``label``) entry, if any, holds the labels;
- a ``torch.utils.data.DataLoader`` (or any iterable of such batches), read once up to the
  number of examples the method uses;
- a Hugging Face ``datasets.Dataset`` (duck-typed: nothing imports ``datasets``), its columns
  mapped by `basinmerge.datasource.from_hf_dataset` (``input_ids``, ``pixel_values``, ``x``
  ... as inputs, ``labels``/``label`` as labels, token rows of different lengths padded);
  text columns must be tokenized first (or read through a data spec with a tokenizer).

Data named by a **spec** (a dataset name, a datasets folder, a tensor file, a text corpus)
is read by `basinmerge.datasource`; everything it gives comes here.

**Models**: a dict batch is passed as keyword arguments (``model(**inputs)``), a tensor
positionally; the output may be a tensor, a tuple or list (the first element is the logits),
a mapping or an object with ``.logits`` (HF ``ModelOutput``).

**Tasks** (`infer_task`): ``classification`` (cross-entropy of logits ``(B, C)`` against
labels ``(B,)``, or per position for ``(B, T, C)`` against ``(B, T)``) and ``causal_lm``
(next-token loss: the logits at position t predict the token at t + 1; the labels are the
given ``labels`` or else the ``input_ids``; positions whose attention mask is 0 and labels of
-100 are ignored). Unless `task` is given, logits with three dimensions mean ``causal_lm`` and
two mean ``classification``: pass ``task="classification"`` for per-token classification.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from basinmerge.errors import ConfigError

TASKS = ("classification", "causal_lm")
LABEL_KEYS = ("labels", "label")
IGNORE_INDEX = -100

Inputs = torch.Tensor | dict[str, torch.Tensor]
Index = int | slice | torch.Tensor


# --------------------------------------------------------------------------- data


def num_rows(inputs: Inputs) -> int:
    """The number of examples (rows) of a tensor or of a dict batch."""
    t = inputs if isinstance(inputs, torch.Tensor) else next(iter(inputs.values()))
    return int(t.shape[0]) if t.dim() > 0 else 0


def take_inputs(inputs: Inputs, idx: Index) -> Inputs:
    """Rows `idx` (an index, a slice or an index tensor) of a tensor or of every tensor of a
    dict batch."""
    if isinstance(inputs, torch.Tensor):
        return inputs[idx]
    return {k: v[idx] for k, v in inputs.items()}


def to_device(inputs: Inputs, device: torch.device | str | None) -> Inputs:
    if device is None:
        return inputs
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    return {k: v.to(device) for k, v in inputs.items()}


@dataclass(frozen=True)
class Data:
    """Inputs (a tensor or a dict of tensors with the same number of rows) and optional labels,
    in memory. Build one with `as_data`. `source`: where it came from (a data spec such as
    ``corpus.txt``), named in errors about it."""

    inputs: Inputs
    labels: torch.Tensor | None = None
    source: str | None = None

    def __len__(self) -> int:
        return num_rows(self.inputs)

    @property
    def n(self) -> int:
        return len(self)

    def take(self, idx: Index) -> Data:
        return replace(self, inputs=take_inputs(self.inputs, idx),
                       labels=None if self.labels is None else self.labels[idx])

    def head(self, n: int | None) -> Data:
        """The first `n` examples (all when None)."""
        return self if n is None or n >= len(self) else self.take(slice(0, int(n)))

    def batches(self, batch_size: int) -> Iterator[tuple[int, Data]]:
        """Consecutive ``(start, batch)`` pairs in order."""
        for i in range(0, len(self), max(1, int(batch_size))):
            yield i, self.take(slice(i, i + batch_size))

    def labeled(self, what: str = "data") -> Data:
        """Itself, or one clear error when there are no labels."""
        if self.labels is None:
            raise ConfigError(f"{what} needs labeled data (a Dataset or an (x, y) pair, or a "
                              "batch with 'labels')")
        return self

    def with_labels(self, labels: torch.Tensor | None) -> Data:
        return replace(self, labels=labels)

    @staticmethod
    def concat(parts: Iterable[Data]) -> Data:
        parts = list(parts)
        if not parts:
            raise ConfigError("no data to concatenate")
        first = parts[0].inputs
        if isinstance(first, torch.Tensor):
            inputs: Inputs = torch.cat([p.inputs for p in parts])  # type: ignore[misc]
        else:
            keys = list(first)
            for p in parts[1:]:
                if not isinstance(p.inputs, Mapping) or list(p.inputs) != keys:
                    raise ConfigError("batches do not share the same input keys "
                                      f"({', '.join(keys)})")
            inputs = {k: torch.cat([p.inputs[k] for p in parts]) for k in keys}  # type: ignore[index]
        has = [p.labels is not None for p in parts]
        if any(has) and not all(has):
            raise ConfigError("some batches have labels and others do not")
        labels = torch.cat([p.labels for p in parts]) if all(has) else None  # type: ignore[misc]
        return Data(inputs, labels)


def _check(data: Data, what: str) -> Data:
    inputs = data.inputs
    if isinstance(inputs, Mapping):
        if not inputs:
            raise ConfigError(f"{what}: the batch has no input tensors")
        for k, v in inputs.items():
            if not isinstance(v, torch.Tensor):
                raise ConfigError(f"{what}: input '{k}' is a {type(v).__name__}, not a tensor "
                                  "(tokenize text first)")
        sizes = {k: int(v.shape[0]) if v.dim() else 0 for k, v in inputs.items()}
        if len(set(sizes.values())) > 1:
            raise ConfigError(f"{what}: inputs have different numbers of rows "
                              f"({', '.join(f'{k}: {n}' for k, n in sizes.items())})")
    elif not isinstance(inputs, torch.Tensor):
        raise ConfigError(f"{what}: inputs must be a tensor or a dict of tensors, got "
                          f"{type(inputs).__name__}")
    n = len(data)
    if n == 0:
        raise ConfigError(f"{what} is empty")
    if data.labels is not None:
        if not isinstance(data.labels, torch.Tensor):
            raise ConfigError(f"{what}: labels must be a tensor, got {type(data.labels).__name__}")
        if int(data.labels.shape[0]) != n:
            raise ConfigError(f"{what}: x has {n} rows but y has {int(data.labels.shape[0])}")
    return data


def _as_tensor(v: Any) -> Any:
    """Numbers (lists of token ids, numpy arrays) as a tensor; anything else (text) as it is,
    for `_check` to name."""
    if isinstance(v, torch.Tensor):
        return v
    try:
        t = torch.as_tensor(v)
    except (TypeError, ValueError, RuntimeError):
        return v
    return t


def _split_labels(batch: Mapping[str, Any]) -> Data:
    """A dict batch (or an HF tokenizer's `BatchEncoding`): its ``labels``/``label`` entry as
    the labels, the rest as inputs."""
    labels = None
    inputs = {}
    for k, v in batch.items():
        if k in LABEL_KEYS and labels is None:
            labels = _as_tensor(v)
        else:
            inputs[k] = _as_tensor(v)
    return Data(inputs, labels)


def _from_hf_dataset(ds: Any, limit: int | None, what: str) -> Data:
    """A ``datasets.Dataset`` by the column rules of `basinmerge.datasource` (one place)."""
    from basinmerge.datasource import from_hf_dataset

    return from_hf_dataset(ds, n=limit, seed=None, source=what)


def _from_batches(batches: Iterable[Any], limit: int | None, what: str) -> Data:
    parts: list[Data] = []
    seen = 0
    for batch in batches:
        part = _one(batch, what)
        parts.append(part)
        seen += len(part)
        if limit is not None and seen >= limit:
            break
    if not parts:
        raise ConfigError(f"{what} is empty (the loader gave no batch)")
    return Data.concat(parts).head(limit)


def _one(data: Any, what: str) -> Data:
    """One in-memory batch or dataset (no loaders)."""
    from basinmerge.data import Dataset

    if isinstance(data, Data):
        return data
    if isinstance(data, Dataset):
        return Data(data.x, data.y)
    if isinstance(data, torch.Tensor):
        return Data(data, None)
    if isinstance(data, Mapping):
        return _split_labels(data)
    if isinstance(data, tuple | list) and len(data) == 2:
        x, y = data
        if isinstance(x, Mapping) and all(isinstance(v, torch.Tensor) for v in x.values()):
            x = dict(x)
        if isinstance(x, torch.Tensor | dict) and isinstance(y, torch.Tensor):
            return Data(x, y)
    raise ConfigError(f"{what} must be a Dataset, an (x, y) pair, a tensor or dict of input "
                      f"tensors, a DataLoader or a datasets.Dataset; got {type(data).__name__}")


def as_data(data: Any, what: str = "data", *, limit: int | None = None) -> Data:
    """Any accepted data form (see the module docstring) as one in-memory `Data`, checked
    (same number of rows everywhere, not empty); `limit` keeps the first examples (a loader is
    read only that far). Errors name `what`."""
    if data is None:
        raise ConfigError(f"{what}: no data given")
    from basinmerge.data import Dataset
    from basinmerge.datasource import is_hf_dataset

    if isinstance(data, Data | Dataset | torch.Tensor | Mapping | tuple | list):
        out = _one(data, what)
    elif is_hf_dataset(data):
        out = _from_hf_dataset(data, limit, what)
    elif isinstance(data, Iterable):  # a DataLoader or any iterable of batches
        out = _from_batches(data, limit, what)
    else:
        out = _one(data, what)
    return _check(out, what).head(limit)


# --------------------------------------------------------------------------- running models


def device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def is_conv1d(module: nn.Module) -> bool:
    """An HF ``Conv1D`` (GPT-2's layers): a Linear whose weight is stored transposed, (in, out).
    Recognized by name and shape, so ``transformers`` need not be imported."""
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
            and getattr(module, "nf", None) == w.shape[1])


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output: a tensor, the first element of a tuple or list, a
    mapping's or an object's ``logits``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ConfigError(f"cannot read logits from a model output of type {type(output).__name__} "
                      "(expected a tensor, a tuple or an object with .logits)")


def forward(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """The logits of `model` on one batch (moved to the model's device)."""
    inputs = to_device(inputs, device_of(model))
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return logits_of(out)


def call(model: nn.Module, params: Mapping[str, torch.Tensor], inputs: Inputs) -> torch.Tensor:
    """The logits of `model` run with `params` (`torch.func.functional_call`: the module is not
    modified); tied parameters must appear once (see `state.module_params`)."""
    from torch.func import functional_call

    if isinstance(inputs, dict):
        return logits_of(functional_call(model, dict(params), (), inputs))
    return logits_of(functional_call(model, dict(params), (inputs,)))


@contextmanager
def forward_hooks(hooks: Iterable[tuple[nn.Module, Callable] | tuple[nn.Module, Callable, bool | str]],
                  *, pre: bool = False) -> Iterator[None]:
    """Register forward hooks ``(module, fn)`` (``pre=True``: forward pre-hooks; an item
    ``(module, fn, kind)`` chooses for itself: True or ``"pre"`` a pre-hook, False or
    ``"post"`` a hook, ``"pre-kwargs"`` a pre-hook that also gets the keyword arguments) for
    the block and remove them afterwards, also on error: the one capture loop behind BatchNorm
    reset, REPAIR, RegMean's Gram matrices, live-unit masks and activation matching (plain and
    transformer)."""
    handles = []
    try:
        for module, fn, *kind in hooks:
            how = kind[0] if kind else pre
            if how == "pre-kwargs":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            elif how is True or how == "pre":
                handles.append(module.register_forward_pre_hook(fn))
            else:
                handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def batched_logits(model: nn.Module, data: Any, batch_size: int = 1000) -> Iterator[tuple[int, Data, torch.Tensor]]:
    """``(start, batch, logits)`` for consecutive batches of `data` (any accepted form), in the
    model's current mode and gradient setting."""
    d = as_data(data)
    for i, batch in d.batches(batch_size):
        yield i, batch, forward(model, batch.inputs)


# --------------------------------------------------------------------------- tasks and losses


def check_task(task: str | None) -> str | None:
    """`task` itself (None: inferred later), or one error for an unknown one."""
    if task is not None and task not in TASKS:
        raise ConfigError(f"unknown task '{task}'; choose one of {', '.join(TASKS)}")
    return task


def infer_task(logits: torch.Tensor, task: str | None = None) -> str:
    """`task` if given (checked), else ``causal_lm`` for 3-D logits and ``classification``
    otherwise."""
    if check_task(task) is not None:
        return task  # type: ignore[return-value]
    return "causal_lm" if logits.dim() == 3 else "classification"


def _attention_mask(inputs: Inputs) -> torch.Tensor | None:
    return inputs.get("attention_mask") if isinstance(inputs, dict) else None


def targets(logits: torch.Tensor, labels: torch.Tensor | None, inputs: Inputs,
            task: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows (N, C), targets (N,))`` that the loss compares: for classification the logits
    and labels flattened over every position; for causal LM the logits at positions 0..T-2
    against the tokens at 1..T-1. Ignored targets are -100."""
    task = infer_task(logits, task)
    if task == "causal_lm":
        if labels is None:
            ids = inputs.get("input_ids") if isinstance(inputs, dict) else inputs
            if ids is None or ids.is_floating_point():
                raise ConfigError("causal LM loss needs labels or integer 'input_ids'")
            labels = ids
        labels = labels.to(logits.device)
        if labels.shape != logits.shape[:2]:
            raise ConfigError(f"causal LM labels have shape {tuple(labels.shape)}, the logits "
                              f"{tuple(logits.shape)}: expected (batch, sequence)")
        mask = _attention_mask(inputs)
        if mask is not None:
            labels = labels.masked_fill(mask.to(labels.device) == 0, IGNORE_INDEX)
        rows = logits[:, :-1].reshape(-1, logits.shape[-1])
        return rows, labels[:, 1:].reshape(-1)
    if labels is None:
        raise ConfigError("classification loss needs labels")
    labels = labels.to(logits.device)
    if labels.shape != logits.shape[:-1]:
        raise ConfigError(f"labels have shape {tuple(labels.shape)} but the logits "
                          f"{tuple(logits.shape)}: expected {tuple(logits.shape[:-1])}")
    return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)


def check_labels(model: nn.Module, data: Data, what: str, task: str | None = None) -> str | None:
    """One clear error before any long work when `data` has no labels and the task (given,
    or inferred by running `model` on one example) is classification; returns the task
    (None: inferred per batch)."""
    if data.labels is not None:
        return check_task(task)
    if check_task(task) is None:
        with torch.no_grad():
            task = infer_task(forward(model, data.head(1).inputs))
    if task == "classification":
        data.labeled(what)
    return task


def loss_terms(logits: torch.Tensor, labels: torch.Tensor | None, inputs: Inputs,
               task: str | None = None, reduction: str = "sum") -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(loss, number correct, number of targets)`` of one batch, the loss summed over the
    counted targets (``reduction="sum"``) or their mean (``"mean"``, 0 when none counts);
    ignored targets are not counted. For classification, ``"mean"`` is the very
    ``F.cross_entropy(logits, labels)`` a plain training loop computes (bit for bit)."""
    rows, t = targets(logits, labels, inputs, task)
    keep = t != IGNORE_INDEX
    count = int(keep.sum())
    if count == 0 and reduction == "mean":
        value = rows.sum() * 0.0
    else:
        value = F.cross_entropy(rows, t, ignore_index=IGNORE_INDEX, reduction=reduction)
    correct = ((rows.detach().argmax(-1) == t) & keep).sum()
    return value, correct, count


def loss(logits: torch.Tensor, labels: torch.Tensor | None, inputs: Inputs,
         task: str | None = None) -> torch.Tensor:
    """The mean loss over the counted targets of a batch (differentiable)."""
    return loss_terms(logits, labels, inputs, task, "mean")[0]


def prediction_rows(logits: torch.Tensor, inputs: Inputs, task: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The predictive distributions a label-free method looks at, as ``(rows (B, R, C),
    weights (B, R))``: one row per example for classification, the next-token predictions at
    positions 0..T-2 for causal LM, weighted 0 where the position or the next one is masked."""
    task = infer_task(logits, task)
    if task == "causal_lm":
        rows = logits[:, :-1]
        mask = _attention_mask(inputs)
        if mask is None:
            w = torch.ones(rows.shape[:2], dtype=rows.dtype, device=rows.device)
        else:
            m = mask.to(rows.device) != 0
            w = (m[:, :-1] & m[:, 1:]).to(rows.dtype)
        return rows, w
    rows = logits.reshape(logits.shape[0], -1, logits.shape[-1])
    return rows, torch.ones(rows.shape[:2], dtype=rows.dtype, device=rows.device)


def prediction_entropy(logits: torch.Tensor, inputs: Inputs | None = None,
                       task: str | None = None) -> torch.Tensor:
    """Mean Shannon entropy of the model's predictive distributions (see `prediction_rows`)."""
    rows, w = prediction_rows(logits, inputs if inputs is not None else logits, task)
    logp = torch.log_softmax(rows, dim=-1)
    ent = -(logp.exp() * logp).sum(dim=-1)
    return (ent * w).sum() / w.sum().clamp_min(1)


@torch.no_grad()
def evaluate_data(model: nn.Module, data: Any, batch_size: int = 1000,
                  task: str | None = None) -> dict[str, float]:
    """Mean loss and accuracy over every counted target of `data` in the model's current mode
    (per example for classification, per token for causal LM)."""
    d = as_data(data, "evaluation data")
    loss_sum, correct, count = 0.0, 0, 0
    for _, batch, logits in batched_logits(model, d, batch_size):
        if batch.labels is None and infer_task(logits, task) == "classification":
            batch.labeled("evaluation data")
        s, c, n = loss_terms(logits, batch.labels, batch.inputs, task)
        loss_sum += float(s)
        correct += int(c)
        count += n
    if count == 0:
        raise ConfigError("evaluation data has no target to score (every label ignored)")
    return {"loss": loss_sum / count, "accuracy": correct / count}
