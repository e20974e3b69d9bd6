"""Orthogonal alignment of a transformer's residual stream (after Theus et al. 2025).

A permutation of the residual stream is a symmetry of a transformer because LayerNorm commutes
with it once its weight and bias are permuted too. A general orthogonal map R is not: LayerNorm
subtracts the mean of the features (the direction of the all-ones vector, which R moves) and
multiplies by a per-feature weight (a diagonal matrix, which does not commute with R). The way
out (SliceGPT, Ashkboos et al. 2024), implemented by `fold_layernorms` for pre-LN transformers:

1. fold every LayerNorm's weight γ and bias β into the layers that read its output
   (``W ← W diag(γ)``, ``b ← b + W β``; a tied output embedding is untied first, a reader
   without a bias gets one);
2. make everything that writes the residual stream write mean-free vectors (embeddings, class
   token, position embeddings, patch projection, attention-output and second-MLP projections:
   subtract the mean over the stream's features), so the stream is always mean-free and
   LayerNorm's centering does nothing;
3. replace each LayerNorm by an RMSNorm without weight (``x / sqrt(mean(x²) + eps)``), which
   equals the LayerNorm on mean-free inputs and satisfies ``RMSNorm(x R) = RMSNorm(x) R``.

The folded model computes the same function (checked on an example; a post-LN model such as
BERT, whose LayerNorm output is the stream itself, fails that check with a clear error). Then
every tensor axis that carries the residual stream (``P_res`` in the transformer spec)
is multiplied by R (`rotate_stream`), which leaves the function unchanged.

`orthogonal_align` aligns B to A: permutations for heads and MLP units by activation matching,
then both models folded, then R by orthogonal Procrustes on the residual-stream activations
(collected at the inputs of every norm: ``R = U Vᵀ`` for ``X_Bᵀ X_A = U S Vᵀ``). It returns the
folded A and the folded, rotated B (interpolate between these two).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from basinmerge.align.permute import apply_permutation
from basinmerge.align.spec import PermutationSpec
from basinmerge.align.transformer import (
    _record,
    attention_modules,
    example_input,
    forward,
    is_conv1d,
    move_batch,
    no_fastpath,
    outputs,
    transformer_spec,
)
from basinmerge.align.transformer_matching import (
    batches,
    structured_activation_matching,
    transformer_spec_from_data,
)
from basinmerge.errors import ConfigError
from basinmerge.state import module_mode


def _in_axis(m: nn.Module) -> int:
    return 0 if is_conv1d(m) else 1


def _weight(m: nn.Module) -> torch.Tensor:
    """The weight of a layer that reads the stream (``in_proj_weight`` for attention)."""
    w = m.in_proj_weight if isinstance(m, nn.MultiheadAttention) else m.weight
    if not isinstance(w, torch.Tensor):
        raise ConfigError(f"{type(m).__name__} has no weight tensor")
    return w


def _layer_norm(model: nn.Module, name: str) -> nn.LayerNorm:
    ln = model.get_submodule(name)
    if not isinstance(ln, nn.LayerNorm):  # _stream_layers only lists nn.LayerNorm modules
        raise ConfigError(f"'{name}' is a {type(ln).__name__}, not a LayerNorm")
    return ln


def _stream_layers(model: nn.Module, spec: PermutationSpec, example: Any):
    """(LayerNorms on the residual stream in call order, {norm: the layers that read its
    output}, the (key, axis) pairs that read the stream, layers that read the raw stream)."""
    events = _record(model, example, attention_modules(model))
    res = set(spec.perm_to_axes.get("P_res", []))
    norms: list[str] = []
    readers: dict[str, list[str]] = {}
    reading: set[tuple[str, int]] = set()
    raw: list[str] = []
    current: str | None = None
    for ev in events:
        if ev.kind == "ln" and (f"{ev.name}.weight", 0) in res:
            current = ev.name
            norms.append(current)
            readers[current] = []
            continue
        if ev.kind == "linear":
            in_key = (f"{ev.name}.weight", _in_axis(ev.module))
            out_key = (f"{ev.name}.weight", 1 - _in_axis(ev.module))
        elif ev.kind == "mha":
            in_key = (f"{ev.name}.in_proj_weight", 1)
            out_key = (f"{ev.name}.out_proj.weight", 0)
        else:
            continue
        if in_key in res:
            reading.add(in_key)
            (readers[current] if current is not None else raw).append(ev.name)
        if out_key in res:  # a write to the stream: what follows reads the raw stream again
            current = None
    return norms, readers, reading, raw


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


@torch.no_grad()
def _fold_reader(m: nn.Module, gamma: torch.Tensor, beta: torch.Tensor) -> None:
    """``W ← W diag(γ)``, ``b ← b + W β`` for a layer reading a LayerNorm's output."""
    w = _weight(m)
    if isinstance(m, nn.MultiheadAttention):
        b_name, axis = "in_proj_bias", 1
    else:
        b_name, axis = "bias", _in_axis(m)
    shift = torch.tensordot(w, beta, dims=([axis], [0]))
    bias = getattr(m, b_name)
    if bias is None:
        setattr(m, b_name, nn.Parameter(shift.clone()))
    else:
        bias.add_(shift)
    shape = [1] * w.dim()
    shape[axis] = -1
    w.mul_(gamma.reshape(shape))


def _untie(model: nn.Module, names: list[str]) -> None:
    """Give each named module's weight its own storage (tied output embeddings)."""
    pointers: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        pointers[p.data_ptr()] = pointers.get(p.data_ptr(), 0) + 1
    untied = False
    for name in names:
        m = model.get_submodule(name)
        w = _weight(m)
        if pointers.get(w.data_ptr(), 0) > 1:
            m.weight = nn.Parameter(w.detach().clone())
            untied = True
    cfg = getattr(model, "config", None)
    if untied and cfg is not None and hasattr(cfg, "tie_word_embeddings"):
        cfg.tie_word_embeddings = False


def fold_layernorms(model: nn.Module, example: Any = None,
                    spec: PermutationSpec | None = None) -> nn.Module:
    """A copy of a pre-LN transformer in RMSNorm form (see the module docstring): the same
    function, every LayerNorm replaced by a weightless RMSNorm, the stream mean-free. Raises
    `ConfigError` when the model is not one (e.g. post-LN)."""
    example = example if example is not None else example_input(model)
    if example is None:
        raise ConfigError(f"{type(model).__name__}: pass an example input to fold its LayerNorms")
    spec = spec or transformer_spec(model, example)
    out = copy.deepcopy(model).eval()
    device = next(iter(out.parameters())).device
    example = move_batch(example, device)
    norms, readers, reading, raw = _stream_layers(out, spec, example)
    if not norms:
        raise ConfigError(f"{type(model).__name__} has no LayerNorm on the residual stream")
    if raw:
        raise ConfigError(f"{type(model).__name__}: layer '{raw[0]}' reads the residual stream "
                          "without a LayerNorm before it, so the LayerNorms cannot be folded "
                          "(orthogonal alignment needs a pre-LN transformer such as GPT-2 or ViT)")
    _untie(out, [r for n in norms for r in readers[n]])
    with torch.no_grad():
        for n in norms:
            ln = _layer_norm(out, n)
            gamma = ln.weight if ln.weight is not None else torch.ones(ln.normalized_shape, device=device)
            beta = ln.bias if ln.bias is not None else torch.zeros(ln.normalized_shape, device=device)
            for r in readers[n]:
                _fold_reader(out.get_submodule(r), gamma.detach(), beta.detach())
        norm_keys = {f"{n}.{leaf}" for n in norms for leaf in ("weight", "bias")}
        state = dict(out.named_parameters())
        for key, axis in spec.perm_to_axes["P_res"]:
            if key in norm_keys or (key, axis) in reading or key not in state:
                continue
            t = state[key]
            t.sub_(t.mean(dim=axis, keepdim=True))
        for n in norms:
            ln = _layer_norm(out, n)
            _set_module(out, n, nn.RMSNorm(ln.normalized_shape, eps=ln.eps,
                                           elementwise_affine=False).to(device))
    before, after = outputs(model, example), outputs(out, example)
    err = float((before - after).abs().max())
    if not err <= 1e-4 * (float(before.abs().max()) + 1e-6) + 1e-5:
        raise ConfigError(f"{type(model).__name__}: folding its LayerNorms changed its outputs "
                          f"(max difference {err:.3g}); orthogonal alignment needs a pre-LN "
                          "transformer (GPT-2, ViT), not a post-LN one (BERT)")
    return out


def rotate_stream(model: nn.Module, spec: PermutationSpec, rotation: torch.Tensor) -> nn.Module:
    """A copy of a folded model (`fold_layernorms`) with its residual stream mapped by the
    orthogonal `rotation` (x -> x R): every axis tagged ``P_res`` in `spec` is multiplied
    by R."""
    out = copy.deepcopy(model)
    state = out.state_dict()
    r = rotation.to(next(iter(out.parameters())).device, torch.float64)
    new = dict(state)
    for key, axis in spec.perm_to_axes["P_res"]:
        t = state[key]
        new[key] = (t.double().movedim(axis, -1) @ r).movedim(-1, axis).to(t.dtype)
    out.load_state_dict(new)
    return out


@torch.no_grad()
def stream_cross_moment(model_a: nn.Module, model_b: nn.Module, data, num_examples: int | None,
                        batch_size: int = 64) -> torch.Tensor:
    """``X_Bᵀ X_A`` (D x D, float64) over the residual stream at the input of every RMSNorm of
    two folded models (padding positions excluded)."""
    norms = [n for n, m in model_a.named_modules() if isinstance(m, nn.RMSNorm)]
    grabbed: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    mask: list[torch.Tensor | None] = [None]

    def hook(side):
        def pre(mod, args):
            t = args[0]
            if mask[0] is not None and t.dim() >= 3 and tuple(t.shape[:2]) == tuple(mask[0].shape):
                t = t[mask[0]]
            grabbed[side].append(t.reshape(-1, t.shape[-1]).double())
        return pre

    handles = [model_a.get_submodule(n).register_forward_pre_hook(hook("a")) for n in norms]
    handles += [model_b.get_submodule(n).register_forward_pre_hook(hook("b")) for n in norms]
    device = next(iter(model_a.parameters())).device
    total = None
    try:
        with module_mode(model_a, False), module_mode(model_b, False), no_fastpath():
            for batch in batches(data, num_examples, batch_size):
                batch = move_batch(batch, device)
                m = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                mask[0] = m.bool() if m is not None else None
                grabbed["a"], grabbed["b"] = [], []
                forward(model_a, batch)
                forward(model_b, batch)
                for xa, xb in zip(grabbed["a"], grabbed["b"], strict=True):
                    term = xb.T @ xa
                    total = term if total is None else total + term
    finally:
        for h in handles:
            h.remove()
    if total is None:
        raise ConfigError(f"stream_cross_moment: no residual-stream activations of "
                          f"{type(model_a).__name__} were observed (no data, or no RMSNorm)")
    return total


def procrustes(cross: torch.Tensor) -> torch.Tensor:
    """The orthogonal R maximizing ``tr(Rᵀ M)`` for ``M = X_Bᵀ X_A``, i.e. minimizing
    ``‖X_B R − X_A‖``: ``U Vᵀ`` from the SVD of M."""
    u, _, vh = torch.linalg.svd(cross)
    return u @ vh


def is_folded(model: nn.Module) -> bool:
    """True for a model in RMSNorm form (no LayerNorm, some weightless RMSNorm)."""
    mods = list(model.modules())
    return (not any(isinstance(m, nn.LayerNorm) for m in mods)
            and any(isinstance(m, nn.RMSNorm) for m in mods))


def _fold_if_needed(model: nn.Module, example: Any, spec: PermutationSpec) -> nn.Module:
    return model if is_folded(model) else fold_layernorms(model, example, spec)


def orthogonal_align(model_a: nn.Module, model_b: nn.Module, data, *,
                     num_examples: int | None = 2000, permute: bool = True
                     ) -> tuple[nn.Module, nn.Module]:
    """(A folded, B folded and aligned): B's heads and MLP units permuted to A's by activation
    matching (``permute``), then B's residual stream mapped by the orthogonal R from
    Procrustes on the stream's activations. Both are in RMSNorm form (`fold_layernorms`) and
    compute the same functions as A and B (models already in that form are used as they
    are). The result B carries ``alignment`` (the stream
    correlation before and after R)."""
    spec = transformer_spec_from_data(model_a, data)
    example = next(batches(data, 2, 2))
    b = model_b
    if permute:
        perm = structured_activation_matching(model_a, model_b, data, spec=spec,
                                              num_examples=num_examples)
        b = copy.deepcopy(model_b)
        b.load_state_dict(apply_permutation(spec, perm, model_b.state_dict()))
    fa = _fold_if_needed(model_a, example, spec)
    fb = _fold_if_needed(b, example, spec)
    folded_spec = transformer_spec(fa, example)
    cross = stream_cross_moment(fa, fb, data, num_examples)
    rotation = procrustes(cross)
    out = rotate_stream(fb, folded_spec, rotation)
    eye = torch.eye(rotation.shape[0], dtype=rotation.dtype, device=rotation.device)
    # nn.Module's stubs type attributes as Tensor | Module; any value can be set.
    out.alignment = {"method": "orthogonal",  # type: ignore[assignment]
                     "trace_before": float(torch.trace(cross @ eye)),
                     "trace_after": float(torch.trace(rotation.T @ cross))}
    return fa, out


__all__ = ["fold_layernorms", "is_folded", "orthogonal_align", "procrustes", "rotate_stream",
           "stream_cross_moment"]
