"""Data-free coordinate-wise merges: uniform / weighted average, median, trimmed mean.

Each method is a kernel factory (see `basinmerge.merge._common`) so the in-memory and the
streaming merge share one implementation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from basinmerge.errors import ConfigError
from basinmerge.merge._common import (
    Kernel,
    ModelLike,
    StateSource,
    TensorSource,
    coordinate_median,
    elementwise,
    prepare,
    run_kernel,
    stack_work,
    weights_vector,
)
from basinmerge.merge.registry import merge_method
from basinmerge.state import StateDict, weighted_average


def average_kernel(source: TensorSource, weights: Sequence[float] | None = None) -> Kernel:
    """sum_k w_k theta_k with w normalized (uniform when None), via `state.weighted_average`."""
    w = weights_vector(weights, source.num_models)
    wl = None if w is None else w.tolist()

    def kernel(key: str, tensors: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
        return weighted_average([{key: t} for t in tensors], wl)[key]

    return elementwise(kernel)


def median_kernel(source: TensorSource) -> Kernel:
    """Coordinate-wise median; for an even K the mean of the two middle values."""

    def kernel(key: str, tensors: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
        return coordinate_median(tensors)

    return elementwise(kernel)


def trim_count(k: int, trim: float) -> int:
    """How many values a trimmed mean drops at each end: floor(trim * K)."""
    if not 0.0 <= trim < 0.5:
        raise ConfigError(f"trim must be a fraction in [0, 0.5), got {trim}")
    return int(trim * k)  # < K/2, so at least one value is left


def trimmed_mean_kernel(source: TensorSource, trim: float = 0.25) -> Kernel:
    """Coordinate-wise mean after dropping the floor(trim*K) smallest and largest values."""
    t = trim_count(source.num_models, trim)

    def kernel(key: str, tensors: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
        s = stack_work(tensors).sort(dim=0).values
        return s[t:s.shape[0] - t].mean(dim=0)

    return elementwise(kernel)


@merge_method("average", summary="uniform (or weighted) average: a model soup",
              kernel=average_kernel)
def average(models: Sequence[ModelLike], weights: Sequence[float] | None = None, *,
            names: Sequence[str] | None = None) -> StateDict:
    """Uniform (or weighted) average of the models: a model soup.

    Options:
        weights: one non-negative number per model (normalized; uniform when not given)
    """
    states, _, names = prepare(models, "average", names=names)
    src = StateSource(states, names=names)
    return run_kernel(src, average_kernel(src, weights))


@merge_method("weighted", summary="weighted average with weights=[...] (e.g. data sizes)",
              kernel=average_kernel)
def weighted(models: Sequence[ModelLike], weights: Sequence[float], *,
             names: Sequence[str] | None = None) -> StateDict:
    """Weighted average sum_k w_k theta_k / sum_k w_k (e.g. weights = data sizes).

    Options:
        weights: one non-negative number per model, e.g. its number of training examples
    """
    states, _, names = prepare(models, "weighted", names=names)
    if weights is None:
        raise ConfigError("merge method 'weighted' needs option 'weights' (one number per model)")
    src = StateSource(states, names=names)
    return run_kernel(src, average_kernel(src, weights))


@merge_method("median", summary="coordinate-wise median (robust to a minority of bad models)",
              kernel=median_kernel)
def median(models: Sequence[ModelLike], *, names: Sequence[str] | None = None) -> StateDict:
    """Coordinate-wise median (robust to a minority of bad models)."""
    states, _, names = prepare(models, "median", names=names)
    src = StateSource(states, names=names)
    return run_kernel(src, median_kernel(src))


@merge_method("trimmed_mean", summary="coordinate-wise mean without the floor(trim*K) extremes "
              "at each end", kernel=trimmed_mean_kernel)
def trimmed_mean(models: Sequence[ModelLike], trim: float = 0.25, *,
                 names: Sequence[str] | None = None) -> StateDict:
    """Coordinate-wise trimmed mean: drop floor(trim*K) values at each end, average the rest.

    Options:
        trim: fraction of the models dropped at each end, in [0, 0.5)
    """
    states, _, names = prepare(models, "trimmed_mean", names=names)
    src = StateSource(states, names=names)
    return run_kernel(src, trimmed_mean_kernel(src, trim))
