"""Merges of task vectors tau_k = theta_k - theta_0 around a shared base theta_0.

- `task_arithmetic` (Ilharco et al. 2023): theta_0 + scale * sum_k tau_k.
- `ties` (Yadav et al. 2023): trim each tau_k to its top-`density` fraction by magnitude
  (globally over the whole model as in the paper, or per tensor), elect a sign per coordinate
  by total mass sgn(sum_k tau_k), average only the values that agree with it (disjoint mean),
  theta_0 + scale * tau_m. A coordinate whose trimmed values sum to exactly 0 gets tau_m = 0.
- `dare` (Yu et al. 2024): drop each delta entry with probability `drop`, rescale the survivors
  by 1 / (1 - drop), then task arithmetic or TIES. The masks depend only on (seed, model index,
  key), so the same merge is reproduced in memory and when streaming.

The global TIES threshold of model k is the kth smallest |tau_k| over all float tensors. It is
found exactly, without holding the model, by radix selection on the IEEE-754 bit patterns of
|tau_k| (non-negative floats order like their bits read as integers): each pass reads the model
once, tensor by tensor (or row block by row block), and histograms the next 16 bits of the
values that share the bits fixed so far; two passes for float32, four when float64 is involved.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from basinmerge.errors import ConfigError
from basinmerge.merge._common import (
    Kernel,
    ModelLike,
    StateSource,
    TensorSource,
    delta_stack,
    elementwise,
    is_bn_statistic,
    prepare,
    require_base,
    row_blocks,
    run_kernel,
    work_dtype,
)
from basinmerge.merge.registry import merge_method
from basinmerge.state import StateDict

TRIM_MODES = ("global", "tensor")
THEN = ("task_arithmetic", "ties")
# (key, model index, tau_k) -> transformed tau_k; applied to every task vector before merging.
DeltaFn = Callable[[str, int, torch.Tensor], torch.Tensor]


def _identity(key: str, k: int, tau: torch.Tensor) -> torch.Tensor:
    return tau


def check_density(density: float) -> float:
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}")
    return density


def check_scale(scale: float) -> float:
    scale = float(scale)
    if not np.isfinite(scale):
        raise ConfigError(f"scale must be a finite number, got {scale}")
    return scale


def kth_rank(n: int, density: float) -> int:
    """1-based ascending rank of the magnitude threshold that keeps the top
    max(1, int(n * density)) of n values (those >= the threshold; ties at the threshold are all
    kept). The TIES reference code keeps one value more (it thresholds at rank n - int(n * d))."""
    return n - max(1, int(n * density)) + 1


def all_deltas(key: str, tensors: Sequence[torch.Tensor], base: torch.Tensor | None,
               delta_fn: DeltaFn) -> torch.Tensor:
    tau = delta_stack(tensors, base)
    if delta_fn is _identity:
        return tau
    return torch.stack([delta_fn(key, k, tau[k]) for k in range(tau.shape[0])])


# --------------------------------------------------------------------------- task arithmetic


def task_arithmetic_kernel(source: TensorSource, scale: float = 1.0,
                           delta_fn: DeltaFn = _identity) -> Kernel:
    scale = check_scale(scale)

    def kernel(key: str, tensors: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
        tau = all_deltas(key, tensors, base, delta_fn)
        return require_base(base).to(tau.dtype) + scale * tau.sum(dim=0)

    return elementwise(kernel) if delta_fn is _identity else kernel


# --------------------------------------------------------------------------- TIES


def kth_smallest(chunks: Callable[[], Iterable[torch.Tensor]], rank: int, wide: bool) -> float:
    """The `rank`-th smallest (1-based) of all values of the non-negative, finite float tensors
    that `chunks()` yields (it is called once per pass), found exactly by 16-bit radix selection
    on their bit patterns. `wide`: compare in float64 (4 passes), else float32 (2 passes)."""
    fdt, idt, nbits = (torch.float64, torch.int64, 64) if wide else (torch.float32, torch.int32, 32)
    prefix, remaining = 0, int(rank)
    for shift in range(nbits - 16, -1, -16):
        hist = torch.zeros(1 << 16, dtype=torch.int64)
        for t in chunks():
            bits = t.to(fdt).reshape(-1).view(idt)
            if shift + 16 < nbits:
                bits = bits[(bits >> (shift + 16)) == prefix]
            counts = torch.bincount(((bits >> shift) & 0xFFFF).long(), minlength=1 << 16)
            hist = hist.to(counts.device).add_(counts)  # counted where the chunks are (GPU too)
        cum = hist.cpu().cumsum(0)
        if int(cum[-1]) < remaining:
            raise ValueError(f"rank {rank} exceeds the number of values")
        digit = int(torch.searchsorted(cum, torch.tensor([remaining]))[0])
        remaining -= int(cum[digit - 1]) if digit else 0
        prefix = (prefix << 16) | digit
    return float(torch.tensor(prefix, dtype=idt).view(fdt))


def global_thresholds(source: TensorSource, density: float, delta_fn: DeltaFn = _identity,
                      block_bytes: int | None = None) -> list[float | None]:
    """Per model: the magnitude threshold that keeps its top `density` fraction of |tau_k|
    over all float tensors but BatchNorm statistics (None: keep everything). Holds one tensor (or one row block of at
    most `block_bytes`, when `delta_fn` is the identity) at a time."""
    keys = [k for k in source.keys() if source.is_float(k) and not is_bn_statistic(k)]
    total = sum(source.numel(k) for k in keys)
    if total == 0 or density == 1.0:
        return [None] * source.num_models
    rank = kth_rank(total, density)
    wide = any(source.element_size(k) == 8 for k in keys)  # a float64 tensor (from the header)
    budget = block_bytes if delta_fn is _identity else None

    def magnitudes(m: int) -> Iterable[torch.Tensor]:
        for key in keys:
            for rows in row_blocks(source.shape(key), source.element_size(key), budget):
                t = source.model_tensor(m, key, rows)
                dt = work_dtype(t.dtype)
                tau = t.to(dt) - require_base(source.base_tensor(key, rows)).to(dt)
                yield delta_fn(key, m, tau).abs_()

    return [kth_smallest(functools.partial(magnitudes, m), rank, wide) for m in range(source.num_models)]


def _trim_mask(key: str, tau: torch.Tensor, density: float,
               thresholds: list[float | None] | None) -> torch.Tensor:
    """Which entries of each task vector survive trimming."""
    if thresholds is not None:  # global per model
        keep = torch.ones_like(tau, dtype=torch.bool)
        for k, thr in enumerate(thresholds):
            if thr is not None:
                mag = tau[k].abs()
                if float(torch.tensor(thr, dtype=mag.dtype)) != thr:  # compare exactly
                    mag = mag.to(torch.float64)
                keep[k] = mag >= thr
        return keep
    flat = tau.abs().reshape(tau.shape[0], -1)
    if flat.shape[1] == 0 or density == 1.0:
        return torch.ones_like(tau, dtype=torch.bool)
    rank = kth_rank(flat.shape[1], density)
    cut = flat.kthvalue(rank, dim=1, keepdim=True).values
    return (flat >= cut).reshape(tau.shape)


def ties_merge_deltas(tau: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Elect a sign by total mass and average the agreeing trimmed values (disjoint mean).
    A coordinate whose trimmed values sum to exactly zero elects +, as mergekit does
    (``sign = (sum >= 0) * 2 - 1``). `tau` (a temporary) is overwritten."""
    trimmed = tau.masked_fill_(~keep, 0.0)
    del keep
    total_mass = trimmed.sum(dim=0)
    elected = torch.where(total_mass >= 0, 1.0, -1.0).to(trimmed.dtype)
    del total_mass
    agree = (trimmed * elected) > 0  # same sign as elected, and non-zero
    count = agree.sum(dim=0).clamp(min=1).to(tau.dtype)
    total = trimmed.masked_fill_(~agree, 0.0).sum(dim=0)
    return total / count


def ties_kernel(source: TensorSource, density: float = 0.2, scale: float = 1.0,
                trim_mode: str = "global", delta_fn: DeltaFn = _identity,
                block_bytes: int | None = None) -> Kernel:
    density, scale = check_density(density), check_scale(scale)
    if trim_mode not in TRIM_MODES:
        raise ConfigError(f"unknown TIES trim mode '{trim_mode}'; choose one of {', '.join(TRIM_MODES)}")
    thresholds = (global_thresholds(source, density, delta_fn, block_bytes)
                  if trim_mode == "global" else None)

    def kernel(key: str, tensors: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
        tau = all_deltas(key, tensors, base, delta_fn)
        return require_base(base).to(tau.dtype) + scale * ties_merge_deltas(tau, _trim_mask(key, tau, density, thresholds))

    coordinatewise = delta_fn is _identity and (trim_mode == "global" or density == 1.0)
    return elementwise(kernel) if coordinatewise else kernel


# --------------------------------------------------------------------------- DARE


def dare_delta_fn(drop: float, seed: int = 0) -> DeltaFn:
    """Drop each entry with probability `drop` and rescale the rest by 1/(1 - drop); the mask
    of (model k, key) comes from a generator seeded by (seed, k, key)."""
    drop = float(drop)
    if not 0.0 <= drop < 1.0:
        raise ConfigError(f"DARE drop probability must be in [0, 1), got {drop}")
    if drop == 0.0:
        return _identity

    def fn(key: str, k: int, tau: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(f"{int(seed)}/{k}/{key}".encode()))
        keep = (torch.rand(tau.shape, generator=g) >= drop).to(tau.device)  # same mask on any device
        return torch.where(keep, tau / (1.0 - drop), torch.zeros_like(tau))

    return fn


def dare_kernel(source: TensorSource, drop: float = 0.9, scale: float = 1.0,
                then: str = "task_arithmetic", seed: int = 0, density: float = 0.2,
                trim_mode: str = "global") -> Kernel:
    fn = dare_delta_fn(drop, seed)
    if then == "task_arithmetic":
        return task_arithmetic_kernel(source, scale, fn)
    if then == "ties":
        return ties_kernel(source, density, scale, trim_mode, fn)
    raise ConfigError(f"DARE: unknown then='{then}'; choose one of {', '.join(THEN)}")


# --------------------------------------------------------------------------- public functions


@merge_method("task_arithmetic", summary="base + scale * sum of task vectors", needs_base=True,
              kernel=task_arithmetic_kernel)
def task_arithmetic(base: ModelLike, models: Sequence[ModelLike], scale: float = 1.0, *,
                    names: Sequence[str] | None = None) -> StateDict:
    """theta_0 + scale * sum_k (theta_k - theta_0).

    Options:
        scale: factor on the summed task vectors
    """
    states, b, names = prepare(models, "task_arithmetic", base=base, needs_base=True, names=names)
    src = StateSource(states, b, names)
    return run_kernel(src, task_arithmetic_kernel(src, scale))


@merge_method("ties", summary="TIES: trim, elect sign, disjoint mean", needs_base=True,
              kernel=ties_kernel)
def ties(base: ModelLike, models: Sequence[ModelLike], density: float = 0.2, scale: float = 1.0,
         *, trim_mode: str = "global", names: Sequence[str] | None = None) -> StateDict:
    """TIES-merging: trim to the top `density` of |tau| (trim_mode="global": per model as in the
    paper, or "tensor"), elect signs by mass, disjoint mean, theta_0 + scale * tau_m.

    Options:
        density: fraction of each task vector kept (largest magnitudes), in (0, 1]
        scale: factor on the merged task vector
        trim_mode: global (one threshold per model, as in the paper) or tensor
    """
    states, b, names = prepare(models, "ties", base=base, needs_base=True, names=names)
    src = StateSource(states, b, names)
    return run_kernel(src, ties_kernel(src, density, scale, trim_mode))


@merge_method("dare", summary="DARE: random drop and rescale, then task arithmetic or TIES",
              needs_base=True, kernel=dare_kernel)
def dare(base: ModelLike, models: Sequence[ModelLike], drop: float = 0.9, scale: float = 1.0, *,
         then: str = "task_arithmetic", seed: int = 0, density: float = 0.2,
         trim_mode: str = "global", names: Sequence[str] | None = None) -> StateDict:
    """DARE: random drop of delta entries with rescaling, then task arithmetic or TIES.

    Options:
        drop: probability of dropping each task-vector entry, in [0, 1)
        scale: factor on the merged task vector
        then: task_arithmetic or ties, applied to the rescaled task vectors
        seed: seed of the drop masks (the same masks in memory and when streaming)
        density: with then=ties: fraction kept by TIES trimming
        trim_mode: with then=ties: global or tensor
    """
    states, b, names = prepare(models, "dare", base=base, needs_base=True, names=names)
    src = StateSource(states, b, names)
    return run_kernel(src, dare_kernel(src, drop, scale, then, seed, density, trim_mode))
