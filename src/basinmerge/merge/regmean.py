"""RegMean (Jin et al., ICLR 2023): merge each linear layer by regression on its inputs.

For a Linear layer with weights W_k (out x in) and the Gram matrix G_k = X_k^T X_k / n_k of the
inputs it sees in model k (collected with forward hooks on each model's own data):

    W*^T = (sum_k G~_k)^-1 sum_k G~_k W_k^T,   G~ = G with its off-diagonal entries times alpha

(a linear solve, never an explicit inverse). alpha = 1 is the least-squares fit of the stacked
inputs to the stacked outputs of all models; alpha = 0 is a per-input-unit weighted average.
The paper merges the weight only and averages the bias (``bias="average"``, the default);
``bias="regress"`` appends a constant 1 to the inputs and fits weight and bias jointly.
Input units that no model ever activates (zero Gram rows) take the plain average.
Everything that is not a Linear weight is averaged. HF ``Conv1D`` layers (GPT-2; a Linear
whose weight is stored transposed, (in, out)) are merged as the Linear layers they are, and so
is the packed ``in_proj_weight`` of an ``nn.MultiheadAttention`` used as self-attention (its
query, key and value all read the same input; cross-attention is averaged). A tied
weight (GPT-2's ``lm_head`` and token embedding) is merged once by its Linear role and re-tied.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from basinmerge.adapter import as_data, call, device_of, forward_hooks, is_conv1d, to_device
from basinmerge.errors import ConfigError
from basinmerge.merge._common import (
    ModelLike,
    child_key,
    finish_bn,
    module_state,
    per_model_data,
    prepare,
    template_of,
)
from basinmerge.merge.registry import merge_method
from basinmerge.state import StateDict, module_mode, retie, tied_groups, weighted_average

BIAS_MODES = ("average", "regress")


def linear_layers(template: nn.Module) -> dict[str, nn.Module]:
    """The Linear layers of `template` by module name: ``nn.Linear``, HF ``Conv1D`` and the
    packed input projection of a ``nn.MultiheadAttention``."""
    return {name: m for name, m in template.named_modules()
            if isinstance(m, nn.Linear) or is_conv1d(m)
            or (isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None)}


def weight_layout(layer: nn.Module) -> tuple[str, str | None, bool]:
    """(weight attribute, bias attribute or None, stored transposed) of a `linear_layers` entry."""
    if isinstance(layer, nn.MultiheadAttention):
        return "in_proj_weight", ("in_proj_bias" if layer.in_proj_bias is not None else None), False
    return "weight", ("bias" if layer.bias is not None else None), is_conv1d(layer)


@torch.no_grad()
def linear_grams(template: nn.Module, state: StateDict, data: Any, *,
                 num_examples: int | None = None, with_bias: bool = False,
                 batch_size: int = 500) -> dict[str, torch.Tensor]:
    """Per Linear module name: the mean Gram matrix X^T X / n (float64) of its inputs when
    `state` runs through `template` on the inputs of `data` (eval mode); with `with_bias`, the
    inputs get a constant 1 column appended."""
    d = as_data(data, "RegMean data", limit=num_examples)
    layers = linear_layers(template)
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            if not inputs or not isinstance(inputs[0], torch.Tensor):
                return  # called with keyword arguments only: not observed
            if isinstance(module, nn.MultiheadAttention) and not (
                    len(inputs) >= 3 and inputs[1] is inputs[0] and inputs[2] is inputs[0]):
                return  # cross-attention: K and V read another input; the layer is averaged
            a = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            if with_bias:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], 1)
            g = a.T @ a
            grams[name] = grams[name] + g if name in grams else g
            counts[name] = counts.get(name, 0) + a.shape[0]
        return hook

    full = module_state(template, state)
    device = device_of(template)
    with forward_hooks([(m, make_hook(n)) for n, m in layers.items()], pre=True), \
            module_mode(template, False):
        for _, batch in d.batches(batch_size):
            call(template, full, to_device(batch.inputs, device))
    return {n: (g / counts[n]).cpu() for n, g in grams.items()}


def scale_off_diagonal(g: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * G off the diagonal, G on it."""
    diag = torch.diagonal(g).clone()
    out = g * alpha
    out.diagonal().copy_(diag)
    return out


def regmean_solve(grams: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                  alpha: float = 1.0) -> torch.Tensor:
    """W* = ((sum G~_k)^-1 sum G~_k W_k^T)^T for weights W_k of shape (out, in) and Grams
    (in, in). Zero input rows take the average of the W_k; a singular system (alpha = 1 with
    fewer examples than inputs) falls back to the minimum-norm least-squares solution."""
    gs = [scale_off_diagonal(g.to(torch.float64), alpha) for g in grams]
    ws = [w.to(torch.float64) for w in weights]
    zero = torch.zeros((), dtype=torch.float64)  # a start that keeps the sums typed as tensors
    a = sum(gs, zero)
    b = sum((g @ w.T for g, w in zip(gs, ws, strict=True)), zero)
    dead = torch.diagonal(a) == 0
    if dead.any():
        a = a.clone()
        a[dead, dead] = float(len(gs))
        b = b.clone()
        b[dead] = sum(w.T[dead] for w in ws)
    try:
        sol = torch.linalg.solve(a, b)
    except RuntimeError:  # singular: torch raises torch.linalg.LinAlgError (a RuntimeError)
        sol = torch.linalg.lstsq(a, b, driver="gelsd").solution
    return sol.T


@merge_method("regmean", summary="RegMean: per-Linear regression on input Gram matrices",
              needs_data="unlabeled")
def regmean(models: Sequence[ModelLike], data: Any, alpha: float = 0.9, *,
            model: nn.Module | None = None, bias: str = "average",
            num_examples: int | None = 1000, reset_bn: bool = True,
            names: Sequence[str] | None = None) -> StateDict:
    """RegMean merge. `data`: one dataset for every model, or a list with one per model (its
    own training data, as in the paper); labels are not used.

    Options:
        alpha: scale of the Gram matrices' off-diagonal entries, in [0, 1]
        model: the nn.Module template to run the states in (default: the first module given)
        bias: average (as in the paper) or regress (fit weight and bias jointly)
        num_examples: examples per model for its Gram matrices (all when None)
        reset_bn: recompute BatchNorm statistics of the merge on the data
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"regmean alpha must be in [0, 1], got {alpha}")
    if bias not in BIAS_MODES:
        raise ConfigError(f"regmean bias must be one of {', '.join(BIAS_MODES)}, got '{bias}'")
    states, _, names = prepare(models, "regmean", names=names)
    template = template_of(models, model, "regmean")
    datas = per_model_data(data, len(states), "regmean")
    regress = bias == "regress"
    grams = [linear_grams(template, s, d, num_examples=num_examples, with_bias=regress)
             for s, d in zip(states, datas, strict=True)]
    out = weighted_average(states)
    merged_keys: set[str] = set()
    for name, layer in linear_layers(template).items():
        if any(name not in g for g in grams):
            continue  # the layer never ran (or was not observed) on this data
        w_attr, b_attr, t = weight_layout(layer)  # t: weight stored (in, out): merge its transpose
        wkey = child_key(name, w_attr)
        bkey = child_key(name, b_attr) if b_attr is not None else ""
        has_bias = regress and b_attr is not None
        ws = [s[wkey].T if t else s[wkey] for s in states]
        ws = [torch.cat([w, s[bkey].unsqueeze(1)], 1) if has_bias else w for w, s in zip(ws, states, strict=True)]
        gs = [g[name] if (has_bias or not regress) else g[name][:-1, :-1] for g in grams]
        merged = regmean_solve(gs, ws, alpha)
        dtype = states[0][wkey].dtype
        w = merged[:, :-1] if has_bias else merged
        out[wkey] = (w.T if t else w).to(dtype).contiguous()
        merged_keys.add(wkey)
        if has_bias:
            out[bkey] = merged[:, -1].to(dtype).contiguous()
    out = retie(out, tied_groups(template), prefer=merged_keys)
    return finish_bn(template, out, data, reset_bn)
