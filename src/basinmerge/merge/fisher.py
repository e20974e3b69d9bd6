"""Fisher merging (Matena & Raffel 2021).

theta* = sum_k lambda_k F_k theta_k / sum_k lambda_k F_k per coordinate, with the diagonal Fisher

    F = E_x sum_y p(y|x) (d log p(y|x) / d theta)^2

computed exactly from per-example gradients (torch.func: functional_call + vmap + jacrev over
the class log-probabilities), weighted by the model's own predictive distribution: no labels are
needed. Each F is floored at 1e-6 so a coordinate no model cares about falls back to the
(lambda-weighted) average. FusionBench's batched variant squares a gradient summed over a batch
and is only an approximation of this.

Buffers (BatchNorm statistics) get no gradient: they are averaged, then recomputed on the data
when ``reset_bn`` is set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import jacrev, vmap

from basinmerge.adapter import (
    as_data,
    call,
    device_of,
    num_rows,
    prediction_rows,
    take_inputs,
    to_device,
)
from basinmerge.errors import ConfigError
from basinmerge.merge._common import (
    ModelLike,
    finish_bn,
    module_state,
    per_model_data,
    prepare,
    template_of,
    weights_vector,
)
from basinmerge.merge.registry import merge_method
from basinmerge.state import (
    StateDict,
    is_float,
    module_mode,
    param_keys,
    retie,
    tied_groups,
    weighted_average,
)

JACOBIAN_BUDGET = 2 ** 24  # floats held by one chunk of per-example Jacobians (64 MB)


def diagonal_fisher(template: nn.Module, state: StateDict, data: Any, *,
                    num_examples: int | None = None, chunk: int | None = None,
                    task: str | None = None) -> StateDict:
    """The diagonal Fisher of every parameter of `state` (run through `template`; tied
    parameters once, under their canonical name), averaged over the examples of `data`
    (labels, if any, are ignored). For a causal LM every predicted position counts as one
    prediction of its sequence (`adapter.prediction_rows`): the Fisher of a sequence is the
    sum over its masked-in positions."""
    d = as_data(data, "Fisher data", limit=num_examples)
    full = module_state(template, state)
    keys = param_keys(template)
    params = {k: full[k].detach() for k in keys}
    rest = {k: v for k, v in full.items() if k not in params}
    device = device_of(template)
    with module_mode(template, False):
        def log_probs(p: dict[str, torch.Tensor], xi: Any) -> torch.Tensor:
            xb = xi.unsqueeze(0) if isinstance(xi, torch.Tensor) else {k: v.unsqueeze(0) for k, v in xi.items()}
            rows, _ = prediction_rows(call(template, {**rest, **p}, xb), xb, task)
            return torch.log_softmax(rows, dim=-1).squeeze(0)  # (R, C)

        batched = vmap(jacrev(log_probs), in_dims=(None, 0))
        one = jacrev(log_probs)
        use_vmap = True

        def per_example(p: dict[str, torch.Tensor], xb: Any) -> dict[str, torch.Tensor]:
            """Per-example Jacobians (B, R, C, *shape): vmapped, or one example at a time for
            models whose forward branches on data (HF attention masks), which vmap refuses."""
            nonlocal use_vmap
            if use_vmap:
                try:
                    return batched(p, xb)
                except RuntimeError as e:
                    if "vmap" not in str(e):
                        raise
                    use_vmap = False
            n = num_rows(xb)
            jacs = [one(p, take_inputs(xb, i)) for i in range(n)]
            return {k: torch.stack([j[k] for j in jacs]) for k in jacs[0]}
        n_params = sum(p.numel() for p in params.values())
        with torch.no_grad():
            first = to_device(d.head(1).inputs, device)
            n_out = int(prediction_rows(call(template, full, first), first, task)[0][0].numel())
        step = chunk or max(1, JACOBIAN_BUDGET // max(1, n_params * n_out))
        fisher = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
        for _, batch in d.batches(step):
            xb = to_device(batch.inputs, device)
            with torch.no_grad():
                rows, w = prediction_rows(call(template, full, xb), xb, task)
                probs = torch.softmax(rows, dim=-1) * w.unsqueeze(-1)  # (B, R, C)
            jac = per_example(params, xb)  # key -> (B, R, C, *shape)
            wv = probs.reshape(1, -1)
            for k, j in jac.items():
                sq = j.detach().reshape(wv.shape[1], -1) ** 2  # (B*R*C, numel)
                fisher[k] += (wv @ sq).reshape(fisher[k].shape).to(torch.float64)
    return {k: (v / len(d)).to("cpu") for k, v in fisher.items()}


@merge_method("fisher", summary="Fisher-weighted average (diagonal Fisher from per-example "
              "gradients)", needs_data="unlabeled")
def fisher(models: Sequence[ModelLike], data: Any, *, weights: Sequence[float] | None = None,
           model: nn.Module | None = None, num_examples: int | None = 1000,
           floor: float = 1e-6, fishers: Sequence[StateDict] | None = None,
           reset_bn: bool = True, names: Sequence[str] | None = None,
           task: str | None = None) -> StateDict:
    """Fisher-weighted average of the models (tied parameters merged once and re-tied).

    `data` is one dataset for every model or a list with one per model (each model's own
    training data, as in the paper); `weights` are the lambda_k (uniform by default);
    precomputed `fishers` (key -> diagonal Fisher, per model) skip the gradient pass.

    Options:
        weights: the lambda_k, one per model (uniform when not given)
        model: the nn.Module template to run the states in (default: the first module given)
        num_examples: examples per model for its Fisher (all when None)
        floor: lower bound on every Fisher entry
        fishers: precomputed diagonal Fishers, one state_dict per model
        reset_bn: recompute BatchNorm statistics of the merge on the data
    """
    states, _, names = prepare(models, "fisher", names=names)
    lam = weights_vector(weights, len(states), "fisher weights")
    lam_list = [1.0 / len(states)] * len(states) if lam is None else (lam / lam.sum()).tolist()
    if floor <= 0:
        raise ConfigError(f"fisher floor must be positive, got {floor}")
    template = None
    if fishers is None:
        template = template_of(models, model, "fisher")
        if data is None:
            raise ConfigError("merge method 'fisher' needs data (or precomputed fishers=...)")
        datas = per_model_data(data, len(states), "fisher")
        fishers = [diagonal_fisher(template, s, d, num_examples=num_examples, task=task)
                   for s, d in zip(states, datas, strict=True)]
    elif len(fishers) != len(states):
        raise ConfigError(f"fisher: got {len(fishers)} Fisher estimates for {len(states)} models")
    elif data is not None and (model is not None or any(isinstance(m, nn.Module) for m in models)):
        template = template_of(models, model, "fisher")
    avg = weighted_average(states, lam_list)
    out: StateDict = {}
    for key, v in states[0].items():
        if not is_float(v) or key not in fishers[0]:
            out[key] = avg[key]
            continue
        num = torch.zeros_like(v, dtype=torch.float64)
        den = torch.zeros_like(v, dtype=torch.float64)
        for lk, s, f in zip(lam_list, states, fishers, strict=True):
            fk = lk * f[key].to(torch.float64).clamp(min=floor)
            num += fk * s[key].to(torch.float64)
            den += fk
        out[key] = (num / den).to(v.dtype)
    if template is None:
        return retie(out, tied_groups(states[0]), prefer=set(fishers[0]))
    out = retie(out, tied_groups(template), prefer=set(fishers[0]))
    return finish_bn(template, out, data, reset_bn)
