"""What every merge method shares: input checking, the per-key kernel runner, data helpers.

The data-free methods (average, median, TIES, ...) are written as *kernels*: a function
``kernel(key, tensors, base) -> tensor`` that merges the K tensors of one key. The same kernel
runs over an in-memory `StateSource` (a list of state_dicts) or over the files of a streaming
merge (`basinmerge.merge.stream.FileSource`), so both paths compute the very same bits.
Float tensors go through the kernel; integer buffers (``num_batches_tracked``) are taken from
the first model.

A kernel that is *elementwise* (each output coordinate depends only on the K input values at
that coordinate, as for averaging, the median or TIES with precomputed thresholds) is marked
with `elementwise`; a streaming merge then feeds it row blocks of each tensor (`row_blocks`)
instead of whole tensors, so its memory does not grow with the largest tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from basinmerge.adapter import Data, as_data, check_labels, device_of
from basinmerge.errors import ConfigError, IncompatibleModelsError
from basinmerge.state import (
    StateDict,
    as_state_dict,
    check_compatible,
    check_finite,
    is_float,
    module_mode,
    module_params,
)

ModelLike = nn.Module | Mapping[str, torch.Tensor]
Kernel = Callable[[str, list[torch.Tensor], torch.Tensor | None], torch.Tensor]


def elementwise(kernel: Kernel) -> Kernel:
    """Mark `kernel` as coordinate-wise: merging row blocks one by one gives the same bits as
    merging the whole tensor."""
    kernel.elementwise = True  # type: ignore[attr-defined]
    return kernel


def is_elementwise(kernel: Kernel) -> bool:
    return bool(getattr(kernel, "elementwise", False))


def row_blocks(shape: Sequence[int], element_size: int, budget: int | None) -> list[slice | None]:
    """Consecutive slices along the first axis whose K-model input fits in `budget` bytes per
    model (at least one row each); ``[None]`` (the whole tensor) when `budget` is None, the
    tensor is 0-d, or it fits at once."""
    if budget is None or len(shape) == 0 or shape[0] == 0:
        return [None]
    row = element_size
    for d in shape[1:]:
        row *= int(d)
    rows = max(1, int(budget) // max(row, 1))
    if rows >= shape[0]:
        return [None]
    return [slice(a, min(a + rows, shape[0])) for a in range(0, shape[0], rows)]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype merges compute in: float64 stays float64, everything else uses float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def model_names(k: int, names: Sequence[str] | None) -> list[str]:
    if names is None:
        return [f"model {i}" for i in range(k)]
    names = [str(n) for n in names]
    if len(names) != k:
        raise ConfigError(f"got {len(names)} model names for {k} models")
    return names


def needs_base_message(method: str) -> str:
    return f"merge method '{method}' needs a base model (option 'base')"


def check_count(method: str, k: int, min_models: int) -> None:
    """One clear error when a method gets fewer models than it needs."""
    if k < min_models:
        need = "at least 1 model" if min_models == 1 else f"at least {min_models} models"
        raise ConfigError(f"merge method '{method}' needs {need}, got {k}")


def prepare(models: Sequence[ModelLike], method: str, *, min_models: int = 1,
            base: ModelLike | None = None, needs_base: bool = False,
            names: Sequence[str] | None = None) -> tuple[list[StateDict], StateDict | None, list[str]]:
    """State_dicts of `models` (and `base`) after checking count, keys, shapes, dtypes and
    finiteness; every error names the model and key at fault."""
    if isinstance(models, (nn.Module, Mapping)):
        raise ConfigError(f"merge method '{method}' takes a list of models, got a single model")
    models = list(models)
    check_count(method, len(models), min_models)
    names = model_names(len(models), names)
    states = [as_state_dict(m) for m in models]
    if needs_base and base is None:
        raise ConfigError(needs_base_message(method))
    base_state = as_state_dict(base) if base is not None else None
    all_states = states + ([base_state] if base_state is not None else [])
    all_names = names + (["base"] if base_state is not None else [])
    check_compatible(all_states, all_names)
    for s, n in zip(all_states, all_names, strict=True):
        check_finite(s, n)
    return states, base_state, names


def weights_vector(weights: Sequence[float] | None, k: int, what: str = "weights") -> torch.Tensor | None:
    """Validate per-model weights (None stays None: uniform)."""
    if weights is None:
        return None
    w = torch.as_tensor([float(x) for x in weights], dtype=torch.float64)
    if w.shape != (k,):
        raise ConfigError(f"{what}: expected {k} numbers (one per model), got {w.numel()}")
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"{what} must be finite, non-negative and have a positive sum, got {w.tolist()}")
    return w


# --------------------------------------------------------------------------- sources and kernels


class TensorSource(Protocol):
    """K models (and an optional base) that can be read one key at a time."""

    names: list[str]

    def keys(self) -> list[str]: ...

    def is_float(self, key: str) -> bool: ...

    def numel(self, key: str) -> int: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def element_size(self, key: str) -> int: ...

    def model_tensor(self, k: int, key: str, rows: slice | None = None) -> torch.Tensor: ...

    def base_tensor(self, key: str, rows: slice | None = None) -> torch.Tensor | None: ...

    @property
    def num_models(self) -> int: ...

    @property
    def has_base(self) -> bool: ...


class StateSource:
    """In-memory state_dicts as a `TensorSource`."""

    def __init__(self, states: Sequence[Mapping[str, torch.Tensor]],
                 base: Mapping[str, torch.Tensor] | None = None,
                 names: Sequence[str] | None = None):
        self.states = list(states)
        self.base = base
        self.names = model_names(len(self.states), names)

    def keys(self) -> list[str]:
        return list(self.states[0].keys())

    def is_float(self, key: str) -> bool:
        return is_float(self.states[0][key])

    def numel(self, key: str) -> int:
        return self.states[0][key].numel()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.states[0][key].shape)

    def element_size(self, key: str) -> int:
        return self.states[0][key].element_size()

    def model_tensor(self, k: int, key: str, rows: slice | None = None) -> torch.Tensor:
        t = self.states[k][key]
        return t if rows is None else t[rows]

    def base_tensor(self, key: str, rows: slice | None = None) -> torch.Tensor | None:
        if self.base is None:
            return None
        return self.base[key] if rows is None else self.base[key][rows]

    @property
    def num_models(self) -> int:
        return len(self.states)

    @property
    def has_base(self) -> bool:
        return self.base is not None


BN_STATISTICS = ("running_mean", "running_var")


def is_bn_statistic(key: str) -> bool:
    """True for a BatchNorm running statistic (``*.running_mean``, ``*.running_var``): a
    buffer, not a learned weight."""
    return key.rsplit(".", 1)[-1] in BN_STATISTICS


def bn_keys(keys: Iterable[str]) -> list[str]:
    return [k for k in keys if is_bn_statistic(k)]


def mean_kernel(key: str, tensors: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    """The plain mean of the K tensors (in the work dtype)."""
    return stack_work(tensors).mean(dim=0)


# A sorting network beats a sort along the stacked axis for the few members a merge has:
# each compare-exchange is one elementwise minimum and maximum over whole tensors.
NETWORK_MAX_K = 16


def sorting_network(k: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort for `k` inputs (any k, not only powers of two): the
    compare-exchange pairs (i, j), i < j, in order; afterwards position i holds the i-th
    smallest value."""
    pairs = []
    p = 1
    while p < k:
        step = p
        while step >= 1:
            for j in range(step % p, k - step, 2 * step):
                for i in range(min(step, k - j - step)):
                    if (i + j) // (2 * p) == (i + j + step) // (2 * p):
                        pairs.append((i + j, i + j + step))
            step //= 2
        p *= 2
    return pairs


def median_network(k: int) -> list[tuple[int, int]]:
    """The compare-exchanges of `sorting_network(k)` that the middle position(s) depend on
    (the others are dropped, walking backwards from the middle)."""
    needed = {(k - 1) // 2, k // 2}
    kept = []
    for i, j in reversed(sorting_network(k)):
        if i in needed or j in needed:
            kept.append((i, j))
            needed |= {i, j}
    return kept[::-1]


def coordinate_median(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None,
                      overwrite: bool = False) -> torch.Tensor:
    """The coordinate-wise median of K same-shaped tensors, in `dtype` (default: the work dtype,
    `work_dtype`); for an even K the mean of the two middle values (the project's convention;
    ``torch.median`` would give the lower one). Up to `NETWORK_MAX_K` tensors it runs a sorting
    network (`median_network`: elementwise minimum/maximum, no stacked copy, no sort); beyond,
    a sort along the stacked axis. The inputs are not modified, unless `overwrite` (inputs
    already in `dtype`: the network then runs in place on them, allocating one spare tensor,
    not two per compare-exchange)."""
    k = len(tensors)
    dt = dtype or work_dtype(tensors[0].dtype)
    if k > NETWORK_MAX_K:
        s = torch.stack([t.to(dt) for t in tensors]).sort(dim=0).values
        return s[k // 2] if k % 2 else (s[k // 2 - 1] + s[k // 2]) / 2
    v = [t.to(dt) for t in tensors]
    if overwrite and all(t.dtype == dt for t in tensors):
        spare = torch.empty_like(v[0])
        for i, j in median_network(k):
            torch.maximum(v[i], v[j], out=spare)
            torch.minimum(v[i], v[j], out=v[i])
            v[j], spare = spare, v[j]
    else:
        for i, j in median_network(k):
            v[i], v[j] = torch.minimum(v[i], v[j]), torch.maximum(v[i], v[j])
    return v[k // 2] if k % 2 else (v[k // 2 - 1] + v[k // 2]) / 2


Observer = Callable[[str, slice | None, list[torch.Tensor]], None]


def merged_items(source: TensorSource, kernel: Kernel, block_bytes: int | None = None,
                 observe: Observer | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, merged tensor)`` for every key of `source`, in its key order: float keys
    through `kernel`, the rest copied from the first model. With `block_bytes`, an elementwise
    kernel gets row blocks of at most that many bytes per model, and a key is yielded as
    consecutive row blocks (the same key several times, in order). `observe(key, rows,
    tensors)` is shown the members' tensors of every float block as they are read (the member
    guard's `GuardStats.observe`: one read serves the merge and the guard).

    BatchNorm running statistics are never task vectors: when the source has a base (the
    task-vector methods), they are the plain mean of the members' statistics, whatever the
    method (task arithmetic at scale 1 over four members would otherwise give running_var =
    sum of four variances minus three base variances, which can be negative). Base-free
    methods combine them with their own rule (mean, median, ...), which keeps a variance
    non-negative."""
    for key in source.keys():
        if not source.is_float(key):
            yield key, source.model_tensor(0, key).clone()
            continue
        k_fn = mean_kernel if source.has_base and is_bn_statistic(key) else kernel
        budget = block_bytes if k_fn is mean_kernel or is_elementwise(kernel) else None
        for rows in row_blocks(source.shape(key), source.element_size(key), budget):
            tensors = [source.model_tensor(k, key, rows) for k in range(source.num_models)]
            if observe is not None:
                observe(key, rows, tensors)
            dtype = tensors[0].dtype
            out = k_fn(key, tensors, source.base_tensor(key, rows))
            del tensors  # let go of the inputs (memory-mapped pages when streaming) first
            yield key, out.to(dtype)


def run_kernel(source: TensorSource, kernel: Kernel) -> StateDict:
    """The merged state_dict of an in-memory source."""
    return dict(merged_items(source, kernel))


def stack_work(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The K tensors of one key stacked along a new first axis, in the work dtype."""
    dt = work_dtype(tensors[0].dtype)
    return torch.stack([t.to(dt) for t in tensors])


def require_base(base: torch.Tensor | None) -> torch.Tensor:
    """The base tensor of a method that needs one (the engine checks `needs_base` up front)."""
    if base is None:
        raise ConfigError("this merge method needs a base model")
    return base


def delta_stack(tensors: Sequence[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    """The task vectors tau_k = theta_k - theta_0 of one key, stacked, in the work dtype."""
    return stack_work(tensors).sub_(require_base(base).to(work_dtype(tensors[0].dtype)))


def bcast(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a length-K vector to broadcast against a stacked (K, ...) tensor."""
    return w.reshape((-1,) + (1,) * (like.dim() - 1)).to(like.dtype)


# --------------------------------------------------------------------------- models and data


def template_of(models: Sequence[ModelLike], model: nn.Module | None, method: str,
                base: ModelLike | None = None) -> nn.Module:
    """The module whose forward a data-using merge runs: `model=`, else the first nn.Module
    among `models` (or `base`)."""
    if model is not None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"merge method '{method}': model= must be an nn.Module template")
        return model
    for m in list(models) + ([base] if base is not None else []):
        if isinstance(m, nn.Module):
            return m
    raise ConfigError(f"merge method '{method}' runs the network: pass nn.Module models or a "
                      "template with model=...")


def labeled(data: Any, method: str, template: nn.Module | None = None,
            task: str | None = None) -> Data:
    """`data` (any form `adapter.as_data` accepts) with what the method's loss needs: labels,
    unless `template` is a causal LM (given `task`, or as its output on one example says),
    whose labels are its inputs; else one error naming the method."""
    if data is None:
        raise ConfigError(f"merge method '{method}' needs labeled data (a Dataset or an (x, y) pair)")
    d = as_data(data, f"{method} data")
    if template is None:
        return d.labeled(f"merge method '{method}'")
    with module_mode(template, False):
        check_labels(template, d, f"merge method '{method}'", task)
    return d


def is_data_list(data: Any) -> bool:
    """True for a *list* (one dataset per model: Datasets, (x, y) pairs or input tensors);
    a Dataset, an (x, y) tuple or a tensor is one dataset for every model."""
    return isinstance(data, list)


def per_model_data(data: Any, k: int, method: str) -> list[Any]:
    """One dataset for every model, or a list with one dataset per model."""
    if is_data_list(data):
        if len(data) != k:
            raise ConfigError(f"merge method '{method}': got {len(data)} datasets for {k} models")
        return list(data)
    return [data] * k


def module_state(template: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` restricted to the template's parameters and buffers (each tied group once), on
    the template's device, for `torch.func.functional_call` (no module is modified)."""
    device = device_of(template)
    try:
        params = module_params(template, state)
    except IncompatibleModelsError as e:
        raise IncompatibleModelsError(f"{e} (wrong architecture for model=?)") from None
    return {k: v.to(device) for k, v in params.items()}


def child_key(module_name: str, attr: str) -> str:
    """The state_dict key of attribute `attr` of the submodule `module_name` ('' = the root)."""
    return f"{module_name}.{attr}" if module_name else attr


def finish_bn(template: nn.Module, state: StateDict, data: Any, reset_bn: bool) -> StateDict:
    """Recompute BatchNorm running statistics of a merged state on `data` (a data-using merge
    has data at hand; averaged BN statistics are wrong for the merged weights)."""
    from basinmerge.state import with_state
    from basinmerge.train import has_batchnorm, reset_bn_stats

    if not reset_bn or not has_batchnorm(template):
        return state
    if is_data_list(data):  # one dataset per model: use all of them
        x = Data.concat([as_data(d, "BN reset data").with_labels(None) for d in data])
    else:
        x = as_data(data, "BN reset data")
    model = with_state(template, state)
    reset_bn_stats(model, x)
    return {k: v.detach() for k, v in model.state_dict().items()}


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless random mini-batch indices (a fresh permutation per epoch)."""
    batch_size = max(1, min(batch_size, n))
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i:i + batch_size]
