"""DELLA (Deep, Bhardwaj, Ghosh, Poria, "DELLA-Merging: Reducing Interference in Model Merging
through Magnitude-Based Sampling", 2024, arXiv 2406.11617).

Three steps on the task vectors tau_k = theta_k - theta_0:

1. **Drop (MAGPRUNE)**: within each row of a task-vector tensor (the first axis; a 0-/1-D
   tensor is one row) the entries are ranked by magnitude, r_i = 0 for the smallest and n - 1
   for the largest, and entry i is dropped with probability

       p_i = p + epsilon * (1/2 - r_i / (n - 1))          (a row of one entry: p_i = p)

   so larger entries are dropped less often, the drop probabilities span
   [p - epsilon/2, p + epsilon/2] and average p over the row. The survivors are rescaled by
   1 / (1 - p_i), so that every entry is unchanged in expectation.
2. **Elect**: a sign per coordinate by total mass, sgn(sum_k tau_k), as in TIES.
3. **Fuse**: the disjoint mean of the entries that agree with the elected sign; the merge is
   theta_0 + scale * tau_m.

The masks depend only on (seed, model index, key), so the same merge is reproduced in memory
and when streaming. Reconstructed details: the paper's rank direction and the +-epsilon/2 span
are as above (mergekit's ``della`` uses keep probabilities density +- epsilon and rescales to
the tensor's norm instead); defaults drop = 0.7, epsilon = 0.1.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

from basinmerge.errors import ConfigError
from basinmerge.merge._common import (
    Kernel,
    ModelLike,
    StateSource,
    TensorSource,
    prepare,
    run_kernel,
)
from basinmerge.merge.registry import merge_method
from basinmerge.merge.task import DeltaFn, check_scale, ties_kernel
from basinmerge.state import StateDict


def rows_of(tau: torch.Tensor) -> torch.Tensor:
    """`tau` as a 2-D (rows, entries) view: the first axis are the rows."""
    return tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)


def magnitude_ranks(tau: torch.Tensor) -> torch.Tensor:
    """Per row of `tau` (see `rows_of`): each entry's ascending rank by magnitude (0 = the
    smallest; ties broken by position), shaped like `tau`."""
    flat = rows_of(tau).abs()
    order = torch.argsort(flat, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1]).expand_as(order).contiguous())
    return ranks.reshape(tau.shape)


def della_drop_probabilities(tau: torch.Tensor, drop: float, epsilon: float) -> torch.Tensor:
    """p_i = drop + epsilon * (1/2 - r_i / (n - 1)) per row (see the module), shaped like `tau`,
    in float64."""
    n = rows_of(tau).shape[1]
    ranks = magnitude_ranks(tau).to(torch.float64)
    rel = ranks / (n - 1) if n > 1 else torch.full_like(ranks, 0.5)
    return drop + epsilon * (0.5 - rel)


def check_della(drop: float, epsilon: float) -> tuple[float, float]:
    drop, epsilon = float(drop), float(epsilon)
    if epsilon < 0 or drop - epsilon / 2 < 0 or drop + epsilon / 2 >= 1:
        raise ConfigError(f"merge method 'della': options 'drop' and 'epsilon' must keep every drop "
                          f"probability drop +- epsilon/2 in [0, 1) (got drop={drop}, epsilon={epsilon})")
    return drop, epsilon


def della_delta_fn(drop: float, epsilon: float, seed: int = 0) -> DeltaFn:
    """MAGPRUNE: drop entries with magnitude-ranked probabilities, rescale by 1 / (1 - p_i);
    the mask of (model k, key) comes from a generator seeded by (seed, k, key)."""
    drop, epsilon = check_della(drop, epsilon)

    def fn(key: str, k: int, tau: torch.Tensor) -> torch.Tensor:
        p = della_drop_probabilities(tau, drop, epsilon)
        g = torch.Generator().manual_seed(zlib.crc32(f"della/{int(seed)}/{k}/{key}".encode()))
        keep = torch.rand(tau.shape, generator=g, dtype=torch.float64) >= p
        return torch.where(keep, (tau.to(torch.float64) / (1.0 - p)).to(tau.dtype), torch.zeros_like(tau))

    return fn


def della_kernel(source: TensorSource, drop: float = 0.7, epsilon: float = 0.1,
                 scale: float = 1.0, seed: int = 0) -> Kernel:
    # TIES without trimming (density 1) on the pruned, rescaled task vectors: elect + fuse
    return ties_kernel(source, 1.0, check_scale(scale), "tensor", della_delta_fn(drop, epsilon, seed))


@merge_method("della", summary="DELLA: magnitude-ranked random drop and rescale, then TIES sign "
              "election and disjoint mean", needs_base=True, kernel=della_kernel)
def della(base: ModelLike, models: Sequence[ModelLike], drop: float = 0.7, epsilon: float = 0.1,
          scale: float = 1.0, *, seed: int = 0, names: Sequence[str] | None = None) -> StateDict:
    """DELLA merge of fine-tunes of `base` (see the module).

    Options:
        drop: mean drop probability p of a task-vector entry
        epsilon: spread of the drop probabilities: from p + epsilon/2 (smallest entry of a row)
            to p - epsilon/2 (largest)
        scale: factor on the merged task vector
        seed: seed of the drop masks (the same masks in memory and when streaming)
    """
    states, b, names = prepare(models, "della", base=base, needs_base=True, names=names)
    src = StateSource(states, b, names)
    return run_kernel(src, della_kernel(src, drop, epsilon, scale, seed))
