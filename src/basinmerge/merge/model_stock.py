"""Model Stock (Jang, Yun, Han, "Model Stock: All we need is just a few fine-tuned models",
ECCV 2024, arXiv 2403.19522).

Per layer (each float tensor), with the base theta_0 and k >= 2 fine-tuned models theta_i,
task vectors tau_i = theta_i - theta_0 and cos(theta) the mean pairwise cosine between them:

    t = k cos(theta) / (1 + (k - 1) cos(theta)),   theta_H = t * mean_i(theta_i) + (1 - t) * theta_0

so the merge moves from the average of the fine-tunes toward the base the more their task
vectors disagree (t = 1 when they are parallel, t = 0 when they are orthogonal). The paper
states the ratio for one angle; with more than two models the angle's cosine is the mean over
all pairs (as mergekit does). Reconstructed detail: a negative mean cosine (task vectors that
point apart, where the paper's geometry does not hold and the ratio can blow up at
cos = -1/(k-1)) is clamped to 0, i.e. the base is kept; a zero task vector counts as
orthogonal to every other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from basinmerge.merge._common import (
    Kernel,
    ModelLike,
    StateSource,
    TensorSource,
    delta_stack,
    prepare,
    run_kernel,
)
from basinmerge.merge.registry import merge_method
from basinmerge.state import StateDict


def mean_pairwise_cosine(tau: torch.Tensor) -> float:
    """The mean cosine over all pairs of the K stacked task vectors (K >= 2), in float64; a
    pair with a zero vector counts 0."""
    flat = tau.reshape(tau.shape[0], -1).to(torch.float64)
    norms = flat.norm(dim=1)
    gram = flat @ flat.T
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, gram / denom.clamp(min=torch.finfo(torch.float64).tiny),
                      torch.zeros_like(gram))
    k = tau.shape[0]
    iu = torch.triu_indices(k, k, offset=1)
    return float(cos[iu[0], iu[1]].mean().clamp(-1.0, 1.0))


def stock_ratio(cos: float, k: int) -> float:
    """t = k cos / (1 + (k - 1) cos), with cos clamped to [0, 1]."""
    cos = min(1.0, max(0.0, float(cos)))
    return k * cos / (1.0 + (k - 1) * cos)


def model_stock_kernel(source: TensorSource) -> Kernel:
    def kernel(key: str, tensors: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
        tau = delta_stack(tensors, base)  # raises without a base
        assert base is not None
        t = stock_ratio(mean_pairwise_cosine(tau), tau.shape[0])
        # theta_0 + t * mean(tau) = t * mean(theta_i) + (1 - t) * theta_0
        return base.to(tau.dtype) + t * tau.mean(dim=0)

    return kernel


@merge_method("model_stock", summary="Model Stock: average pulled toward the base by the "
              "task vectors' angle, per layer", needs_base=True, min_models=2,
              kernel=model_stock_kernel)
def model_stock(base: ModelLike, models: Sequence[ModelLike], *,
                names: Sequence[str] | None = None) -> StateDict:
    """Model Stock merge of k >= 2 fine-tunes of `base` (no options: the ratio comes from the
    geometry)."""
    states, b, names = prepare(models, "model_stock", min_models=2, base=base, needs_base=True,
                               names=names)
    src = StateSource(states, b, names)
    return run_kernel(src, model_stock_kernel(src))
