"""AdaMerging (Yang et al., ICLR 2024): learn the task-arithmetic coefficients without labels.

theta(lambda) = theta_0 + sum_k lambda_k tau_k (``granularity="task"``) or, per float tensor l,
theta_0,l + sum_k lambda_{k,l} tau_{k,l} (``"layer"``). The lambdas start at 0.3, are trained
with Adam (lr 1e-3) to minimize the mean entropy of the merged model's predictions on unlabeled
batches, and are clamped to [0, 1] after every step. The network runs through
`torch.func.functional_call`: no model is modified.

Only parameters are task vectors (tied parameters once). Buffers are not: during the search
every BatchNorm normalizes with its batch statistics (the merged weights have no running
statistics of their own yet, and interpolated running statistics are neither differentiable
nor right for them), the rest of the network runs in eval mode; afterwards the running
statistics are recomputed on the data (``reset_bn``), or, without it, averaged over the
members. For a causal LM the entropy is that of the next-token predictions at the
masked-in positions (`basinmerge.adapter.prediction_entropy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from basinmerge import adapter
from basinmerge.console import progress_task
from basinmerge.errors import ConfigError
from basinmerge.merge._common import (
    ModelLike,
    batches,
    bcast,
    finish_bn,
    module_state,
    prepare,
    template_of,
)
from basinmerge.merge.registry import merge_method
from basinmerge.state import (
    StateDict,
    batch_statistics,
    is_float,
    param_keys,
    retie,
    tied_groups,
    weighted_average,
)

GRANULARITIES = ("task", "layer")


prediction_entropy = adapter.prediction_entropy


@merge_method("adamerging", summary="AdaMerging: coefficients by entropy minimization on "
              "unlabeled data", needs_base=True, needs_data="unlabeled", returns_info=True)
def adamerging_info(base: ModelLike, models: Sequence[ModelLike], unlabeled_data: Any,
                    granularity: str = "task", *, model: nn.Module | None = None,
                    steps: int = 200, lr: float = 1e-3, init: float = 0.3, batch_size: int = 64,
                    seed: int = 0, reset_bn: bool = True, progress: bool = True,
                    names: Sequence[str] | None = None,
                    task: str | None = None) -> tuple[StateDict, dict]:
    """AdaMerging; returns the merged state and a record with the learned lambdas and the
    entropy before and after.

    Options:
        granularity: task (one lambda per model) or layer (one per model and tensor)
        model: the nn.Module template to run the states in (default: the first module given)
        steps: Adam steps
        lr: Adam learning rate
        init: initial lambda, in [0, 1]
        batch_size: unlabeled examples per step
        seed: seed of the batch order
        reset_bn: recompute BatchNorm statistics of the merge on the data
        progress: show a progress bar
        task: classification or causal_lm (default: inferred from the logits' shape)
    """
    if granularity not in GRANULARITIES:
        raise ConfigError(f"adamerging granularity must be one of {', '.join(GRANULARITIES)}, "
                          f"got '{granularity}'")
    if steps < 0 or lr <= 0 or not 0.0 <= init <= 1.0:
        raise ConfigError(f"adamerging needs steps >= 0, lr > 0 and init in [0, 1] "
                          f"(got steps={steps}, lr={lr}, init={init})")
    states, b, names = prepare(models, "adamerging", base=base, needs_base=True, names=names)
    assert b is not None  # needs_base=True
    template = template_of(models, model, "adamerging", base)
    x = adapter.as_data(unlabeled_data, "adamerging data")
    base_full = module_state(template, b)
    device = adapter.device_of(template)
    params = set(param_keys(template))
    keys = [k for k in base_full if k in params and is_float(base_full[k])]
    taus = {k: torch.stack([s[k].to(device) for s in states]) - base_full[k] for k in keys}
    avg = weighted_average(states)
    # buffers (cloned: BatchNorm in train mode updates them in place, and they are discarded)
    fixed = {k: avg[k].to(device).clone() for k in base_full if k not in taus}
    k_models = len(states)
    shape = (k_models,) if granularity == "task" else (k_models, len(keys))
    lam = torch.full(shape, float(init), device=device, requires_grad=True)

    def merged(coef: torch.Tensor) -> dict[str, torch.Tensor]:
        out = dict(fixed)
        for i, k in enumerate(keys):
            c = coef if granularity == "task" else coef[:, i]
            out[k] = base_full[k] + (bcast(c, taus[k]) * taus[k]).sum(dim=0)
        return out

    opt = torch.optim.Adam([lam], lr=lr)
    gen = torch.Generator().manual_seed(int(seed))
    it = batches(len(x), batch_size, gen)
    entropies: list[float] = []
    with batch_statistics(template):
        with progress_task("adamerging", steps, enabled=progress) as advance:
            for _ in range(steps):
                xb = adapter.to_device(x.take(next(it)).inputs, device)
                loss = prediction_entropy(adapter.call(template, merged(lam), xb), xb, task)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    lam.clamp_(0.0, 1.0)
                entropies.append(float(loss.detach()))
                advance(1, entropy=entropies[-1])
    with torch.no_grad():
        final = {k: v.detach().cpu() for k, v in merged(lam.detach()).items()}
    out = {k: final[k].to(states[0][k].dtype) if k in taus else avg[k].clone() for k in states[0]}
    out = retie(out, tied_groups(template))
    out = finish_bn(template, out, x, reset_bn)
    lam_out = lam.detach().cpu()
    info = {"granularity": granularity,
            "lambdas": ({n: float(v) for n, v in zip(names, lam_out.tolist(), strict=True)}
                        if granularity == "task" else
                        {n: dict(zip(keys, row, strict=True)) for n, row in zip(names, lam_out.tolist(), strict=True)}),
            "entropy_first": entropies[0] if entropies else None,
            "entropy_last": entropies[-1] if entropies else None}
    return out, info


def adamerging(base: ModelLike, models: Sequence[ModelLike], unlabeled_data: Any,
               granularity: str = "task", **options: Any) -> StateDict:
    """AdaMerging: task arithmetic with coefficients learned by entropy minimization on
    unlabeled data (options: model, steps, lr, init, batch_size, seed, reset_bn)."""
    return adamerging_info(base, models, unlabeled_data, granularity, **options)[0]
