"""Model Breadcrumbs (Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging
with Sparse Masks", ECCV 2024, arXiv 2312.06795).

Each task vector tau_k = theta_k - theta_0 is trimmed at both ends, per layer (each float
tensor): of its n entries ranked by magnitude, the floor(beta * n) largest (outliers) and the
floor(gamma * n) smallest (noise) are set to zero (ties broken by position). The merge is task
arithmetic on the trimmed vectors: theta_0 + scale * sum_k mask_k * tau_k.

The paper sweeps the two percentiles; its best settings drop about the top 1% and the bottom
85-90%, hence the defaults beta = 0.01, gamma = 0.85 (mergekit's ``breadcrumbs`` names the kept
fraction ``density`` and the top fraction ``gamma``).
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
    prepare,
    run_kernel,
)
from basinmerge.merge.registry import merge_method
from basinmerge.merge.task import DeltaFn, task_arithmetic_kernel
from basinmerge.state import StateDict


def check_fractions(beta: float, gamma: float) -> tuple[float, float]:
    beta, gamma = float(beta), float(gamma)
    if beta < 0 or gamma < 0 or beta + gamma >= 1:
        raise ConfigError(f"merge method 'breadcrumbs': options 'beta' and 'gamma' must be >= 0 with "
                          f"beta + gamma < 1 (got beta={beta}, gamma={gamma})")
    return beta, gamma


def breadcrumbs_mask(tau: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Which entries of one task-vector tensor survive: not among the floor(beta * n) largest
    nor the floor(gamma * n) smallest magnitudes."""
    flat = tau.reshape(-1)
    n = flat.numel()
    n_top, n_bottom = int(beta * n), int(gamma * n)
    order = torch.argsort(flat.abs(), stable=True)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[n_bottom:n - n_top]] = True
    return keep.reshape(tau.shape)


def breadcrumbs_delta_fn(beta: float, gamma: float) -> DeltaFn:
    beta, gamma = check_fractions(beta, gamma)

    def fn(key: str, k: int, tau: torch.Tensor) -> torch.Tensor:
        return torch.where(breadcrumbs_mask(tau, beta, gamma), tau, torch.zeros_like(tau))

    return fn


def breadcrumbs_kernel(source: TensorSource, beta: float = 0.01, gamma: float = 0.85,
                       scale: float = 1.0) -> Kernel:
    return task_arithmetic_kernel(source, scale, breadcrumbs_delta_fn(beta, gamma))


@merge_method("breadcrumbs", summary="Model Breadcrumbs: drop each task vector's largest and "
              "smallest entries per layer, then task arithmetic", needs_base=True,
              kernel=breadcrumbs_kernel)
def breadcrumbs(base: ModelLike, models: Sequence[ModelLike], beta: float = 0.01,
                gamma: float = 0.85, scale: float = 1.0, *,
                names: Sequence[str] | None = None) -> StateDict:
    """Model Breadcrumbs merge of fine-tunes of `base` (see the module).

    Options:
        beta: fraction of each layer's task-vector entries dropped from the top (largest
            magnitudes)
        gamma: fraction dropped from the bottom (smallest magnitudes)
        scale: factor on the summed trimmed task vectors
    """
    states, b, names = prepare(models, "breadcrumbs", base=base, needs_base=True, names=names)
    src = StateSource(states, b, names)
    return run_kernel(src, breadcrumbs_kernel(src, beta, gamma, scale))
