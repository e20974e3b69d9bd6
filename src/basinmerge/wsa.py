"""The Weight Scope Alignment regularizer.

``WSARegularizer(target, lam)`` is a training penalty (a callable ``model -> scalar``, usable in
`basinmerge.train.fit(..., penalties=[...])`):

    λ · reduce_l D(N(μ_l, σ_l²) ‖ N(μ*_l, σ*_l²))

over the model's scoped layers (Linear/Conv weights, biases if the target has them), with D the
KL divergence (default), the reverse KL or the squared 2-Wasserstein distance, and reduce the
mean (default) or the sum over layers. The target statistics are constants.

Cost: forward, each layer takes Σw (a sum) and Σw² (one `torch._foreach_norm` call for all
layers), both vectorized single passes (``torch.var_mean`` was ~40x slower on the CPU);
backward, the gradient of a layer's (μ, σ²) is closed-form,
``∂L/∂w = (g_μ − 2 g_σ² μ)/n + (2 g_σ²/n) w``, so `LayerMoments` writes it as one multiply-add
per layer (two foreach calls for all layers) instead of autograd's chain of elementwise ops.
The divergence itself is evaluated for all layers at once on two short vectors.
σ² = Σw²/n − μ² loses relative precision only when |μ| ≫ σ, which trained weights never show
(|μ| ≪ σ).

Targets from a text spec (`parse_target`, `from_spec`; what `train --wsa-target` takes):
``REF.safetensors`` (a reference checkpoint's scope), ``SCOPE.json`` (a saved `Scope`), ``init``
(the model's own initialization) or ``fused:A.safetensors,B.safetensors``.

Targets (constructors): a reference model's, state_dict's or `Scope`'s scope
(`from_reference`), `fuse` of several (`from_fused`), the model's own initialization
(`from_init`), or a target that follows the fused scope of runs trained side by side and is
refreshed every k optimizer steps (`following`, built on `fused_refresh`); any
``refresh(step, model) -> Scope`` function works.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import cast

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from basinmerge.errors import ConfigError
from basinmerge.scope import (
    DIVERGENCES,
    FUSIONS,
    Scope,
    divergence_terms,
    fuse,
    scope_keys,
    weight_scope,
)
from basinmerge.state import tied_aliases

# The one default λ (KL, mean over layers) of every WSA entry point (train, demo, federated):
# docs/results.md chose it for training (λ = 1 aligns live units twice as well as 0.1 at no cost
# in accuracy), and in federated rounds λ = 1 and 10 gave the same accuracy (0.697 / 0.693 vs
# FedAvg 0.696 at α = 0.1); 100 destabilizes the classifier layer.
DEFAULT_LAMBDA = 1.0

REDUCTIONS = ("mean", "sum")
Refresh = Callable[[int, nn.Module], Scope]
Reference = nn.Module | Mapping[str, torch.Tensor] | Scope


class LayerMoments(torch.autograd.Function):
    """``(μ, σ²)`` (population) of each input tensor, as two 1-D tensors, from Σw and Σw²;
    backward is the closed form ``g_μ/n + g_σ² · 2(w − μ)/n`` = ``c + b·w``, one multiply-add
    per tensor with b and c computed for all tensors at once."""

    @staticmethod
    def forward(ctx, *params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ref = params[0]
        n = torch.tensor([p.numel() for p in params], dtype=ref.dtype, device=ref.device)
        mean = torch.stack([p.sum() for p in params]) / n
        # One foreach call for all Σw² (the per-tensor loop runs in C++, not Python).
        sq = torch.stack(torch._foreach_norm(list(params), 2)).to(ref.dtype) ** 2
        var = (sq / n - mean * mean).clamp_min(0)
        ctx.save_for_backward(mean, n, *params)
        return mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, g_mean: torch.Tensor, g_var: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        mean, n, *params = ctx.saved_tensors
        b = g_var * 2.0 / n  # ∂L/∂w = c + b·w for every layer at once
        c = g_mean / n - b * mean
        need = [i for i in range(len(params)) if ctx.needs_input_grad[i]]
        bs, cs = b.unbind(), c.unbind()
        out = torch._foreach_mul([params[i] for i in need], [bs[i] for i in need])
        torch._foreach_add_(out, [cs[i] for i in need])
        grads: list[torch.Tensor | None] = [None] * len(params)
        for i, g in zip(need, out, strict=True):
            grads[i] = g
        return tuple(grads)


def wsa_penalty(params: Sequence[torch.Tensor], mu_t: torch.Tensor, sd_t: torch.Tensor,
                lam: float = 1.0, kind: str = "kl", reduce: str = "mean") -> torch.Tensor:
    """The functional core of `WSARegularizer`: ``lam · reduce_l D(N(μ_l, σ_l²) ‖ N(μ*_l, σ*_l²))``
    for tensors `params` (one per layer) and target vectors `mu_t`, `sd_t` (same order)."""
    if kind not in DIVERGENCES:
        raise ConfigError(f"unknown divergence '{kind}'; choose one of {', '.join(DIVERGENCES)}")
    if reduce not in REDUCTIONS:
        raise ConfigError(f"unknown reduce '{reduce}'; choose one of {', '.join(REDUCTIONS)}")
    mu, var = LayerMoments.apply(*params)
    sd = var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()
    d = divergence_terms(mu, sd, mu_t.to(device=mu.device, dtype=mu.dtype),
                         sd_t.to(device=mu.device, dtype=mu.dtype), kind)
    return lam * (d.mean() if reduce == "mean" else d.sum())


def _as_scope(ref: Reference, include_bias: bool, name: str) -> Scope:
    if isinstance(ref, Scope):
        return ref
    if not isinstance(ref, nn.Module | Mapping):
        raise ConfigError(f"{name} must be a model, a state_dict or a Scope, got {type(ref).__name__}")
    # (mypy's isinstance narrowing to Mapping brings Scope back into the type; it was ruled out above)
    return weight_scope(cast("nn.Module | Mapping[str, torch.Tensor]", ref), include_bias=include_bias)


class WSARegularizer:
    """λ · Σ/mean over layers of D(model scope ‖ target scope); see the module docstring."""

    target: Scope

    def __init__(self, target: Scope, lam: float, divergence: str = "kl", reduce: str = "mean",
                 refresh: Refresh | None = None, refresh_every: int = 1, every: int = 1):
        if divergence not in DIVERGENCES:
            raise ConfigError(f"unknown divergence '{divergence}'; choose one of {', '.join(DIVERGENCES)}")
        if reduce not in REDUCTIONS:
            raise ConfigError(f"unknown reduce '{reduce}'; choose one of {', '.join(REDUCTIONS)}")
        if not (lam >= 0 and math.isfinite(lam)):
            raise ConfigError(f"WSA lambda must be a finite number >= 0, got {lam}")
        if int(refresh_every) < 1:
            raise ConfigError(f"refresh_every must be >= 1, got {refresh_every}")
        if int(every) < 1:
            raise ConfigError(f"WSA every must be >= 1, got {every}")
        self.every = int(every)
        self._calls = 0
        self.lam = float(lam)
        self.kind = divergence
        self.reduce = reduce
        self.refresh = refresh
        self.refresh_every = int(refresh_every)
        self.refreshes = 0
        self._params: list[torch.Tensor] | None = None
        self._bound_to: weakref.ref | None = None
        self.set_target(target)

    # ------------------------------------------------------------------ targets
    def set_target(self, target: Scope) -> None:
        """Replace the target (validated: finite statistics, σ > 0)."""
        if not isinstance(target, Scope):
            raise ConfigError(f"a WSA target must be a Scope, got {type(target).__name__}")
        target.validate("WSA target")
        if self._params is not None and list(target) != list(self.target):
            self._params = None  # other layers: bind again on the next call
        self.target = target
        self._mu_t, self._sd_t = target.tensors(torch.float64)
        self._cast: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_init(cls, model: nn.Module, lam: float, include_bias: bool = False,
                  **kw) -> WSARegularizer:
        """Target = the model's current (initialization) scope."""
        return cls(weight_scope(model, include_bias=include_bias), lam, **kw)

    @classmethod
    def from_reference(cls, reference: Reference, lam: float, include_bias: bool = False,
                       **kw) -> WSARegularizer:
        """Target = the scope of a reference model or state_dict (e.g. a loaded checkpoint), or a
        `Scope` given directly."""
        return cls(_as_scope(reference, include_bias, "the WSA reference"), lam, **kw)

    @classmethod
    def from_fused(cls, references: Sequence[Reference], lam: float,
                   weights: Sequence[float] | None = None, method: str = "moment",
                   include_bias: bool = False, **kw) -> WSARegularizer:
        """Target = `fuse` of the scopes of several models / state_dicts / scopes."""
        scopes = [_as_scope(r, include_bias, f"WSA reference {i}") for i, r in enumerate(references)]
        return cls(fuse(scopes, weights, method), lam, **kw)

    @classmethod
    def following(cls, models: Sequence[nn.Module], lam: float, every: int = 1,
                  weights: Sequence[float] | None = None, method: str = "moment",
                  include_bias: bool = False, **kw) -> WSARegularizer:
        """Target = the fused current scope of `models` (runs trained side by side, this run's
        model among them), refreshed every `every` optimizer steps."""
        refresh = fused_refresh(models, weights, method, include_bias)
        return cls(refresh(0, models[0]), lam, refresh=refresh, refresh_every=every, **kw)

    # ------------------------------------------------------------------ binding
    def _bind(self, model: nn.Module) -> list[torch.Tensor]:
        # every name of a tied parameter (its canonical name is the scope's key)
        named = dict(model.named_parameters(remove_duplicate=False))
        keys = set(scope_keys(model, include_bias=True))
        params: list[torch.Tensor] = []
        for k, ls in self.target.items():
            if k not in named:
                raise ConfigError(f"WSA target layer '{k}' is not a parameter of the model "
                                  "(a target from another architecture?)")
            if k not in keys:
                tied = tied_aliases(model).get(k)
                raise ConfigError(f"WSA target layer '{k}' is not a Linear/Conv weight or bias"
                                  + (f" (it is tied to '{tied}': use that name)" if tied else ""))
            if named[k].numel() != ls.count:
                raise ConfigError(f"WSA target layer '{k}' has {ls.count} weights, the model's has "
                                  f"{named[k].numel()} (a target from another architecture?)")
            params.append(named[k])
        # embeddings are optional in a target (scope option include_embeddings=False)
        missing = [k for k in scope_keys(model, include_embeddings=False) if k not in self.target]
        if missing:
            raise ConfigError(f"WSA target lacks layer '{missing[0]}' of the model")
        if len({p.dtype for p in params}) > 1:
            raise ConfigError("WSA: the target layers of the model have different dtypes")
        self._bound_to = weakref.ref(model)
        return params

    def bound_params(self, model: nn.Module) -> list[torch.Tensor]:
        """The model's parameters in target order (checked once per model and target)."""
        if self._params is None or self._bound_to is None or self._bound_to() is not model:
            self._params = self._bind(model)
        return self._params

    def check(self, model: nn.Module) -> WSARegularizer:
        """Raise the clear error now (not at the first training step) if the target does not
        fit `model`."""
        self.bound_params(model)
        return self

    # ------------------------------------------------------------------ value
    def _target_on(self, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cast = self._cast
        if cast is None or cast[0].device != ref.device or cast[0].dtype != ref.dtype:
            cast = (self._mu_t.to(device=ref.device, dtype=ref.dtype),
                    self._sd_t.to(device=ref.device, dtype=ref.dtype))
            self._cast = cast
        return cast

    def model_stats(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, σ) of the model's target layers as differentiable 1-D tensors."""
        mu, var = LayerMoments.apply(*self.bound_params(model))
        return mu, var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()

    def per_layer(self, model: nn.Module) -> torch.Tensor:
        """The unweighted divergence of each target layer (differentiable)."""
        mu, sd = self.model_stats(model)
        mu_t, sd_t = self._target_on(mu)
        return divergence_terms(mu, sd, mu_t, sd_t, self.kind)

    def __call__(self, model: nn.Module) -> torch.Tensor:
        """The penalty. With ``every = k > 1`` ("lazy regularization", as in StyleGAN2) it is
        evaluated on one call in k, scaled by k, and is a constant 0 otherwise: the same
        gradient on average at 1/k of the cost."""
        params = self.bound_params(model)
        self._calls += 1
        if (self._calls - 1) % self.every:
            return params[0].new_zeros(())
        mu_t, sd_t = self._target_on(params[0])
        return wsa_penalty(params, mu_t, sd_t, self.lam * self.every, self.kind, self.reduce)

    def on_step(self, step: int, model: nn.Module) -> None:
        """Called by the trainer after each optimizer step: refresh the target if due."""
        if self.refresh is not None and step % self.refresh_every == 0:
            self.set_target(self.refresh(step, model))
            self.refreshes += 1

    def config(self) -> dict:
        """A JSON-able description (for checkpoint metadata)."""
        return {"lambda": self.lam, "divergence": self.kind, "reduce": self.reduce, "every": self.every,
                "layers": list(self.target), "refresh_every": self.refresh_every if self.refresh else None}

    def __repr__(self) -> str:
        return (f"WSARegularizer(lam={self.lam}, divergence={self.kind!r}, reduce={self.reduce!r}, "
                f"layers={len(self.target)}, refresh={'yes' if self.refresh else 'no'})")


def fused_refresh(models: Sequence[nn.Module], weights: Sequence[float] | None = None,
                  method: str = "moment", include_bias: bool = False) -> Refresh:
    """A refresh function returning the fused current scope of `models` (runs trained side by
    side; pass the same list to each run's regularizer)."""
    models = list(models)
    if not models:
        raise ConfigError("fused_refresh needs at least one model")
    if method not in FUSIONS:
        raise ConfigError(f"unknown fusion '{method}'; choose one of {', '.join(FUSIONS)}")

    def refresh(step: int, model: nn.Module) -> Scope:
        return fuse([weight_scope(m, include_bias=include_bias) for m in models], weights, method)

    return refresh


# --------------------------------------------------------------------------- targets from text

TARGET_SPECS = ("REF.safetensors (a reference checkpoint's scope), SCOPE.json (a saved Scope), "
                "init (the model's initialization) or fused:A.safetensors,B.safetensors "
                "(moment-matched fusion of their scopes)")


def _reference_scope(path: Path, model: nn.Module, include_bias: bool) -> Scope:
    """The scope of a checkpoint (or a Scope JSON file) over the layers of `model`."""
    from basinmerge import checks, io

    if path.suffix == ".json":
        return Scope.from_dict(io.read_json(path)).validate(str(path))
    state, _ = checks.load_state(path)
    own = model.state_dict()
    keys = scope_keys(model, include_bias)
    for k in keys:
        if k not in state:
            raise ConfigError(f"{path}: lacks layer '{k}' of the model (a checkpoint of another "
                              "architecture?)")
        if state[k].numel() != own[k].numel():
            raise ConfigError(f"{path}: layer '{k}' has {state[k].numel()} weights, the model's "
                              f"has {own[k].numel()} (a checkpoint of another architecture?)")
    return weight_scope(state, keys=keys).validate(str(path))


def parse_target(spec: str, model: nn.Module, include_bias: bool = False) -> Scope:
    """The target scope a text spec names (see `TARGET_SPECS`), over the layers of `model`,
    the model about to be trained."""
    spec = spec.strip()
    if spec == "init":
        return weight_scope(model, include_bias=include_bias)
    if spec.startswith("fused:"):
        paths = [p.strip() for p in spec[len("fused:"):].split(",") if p.strip()]
        if not paths:
            raise ConfigError("WSA target 'fused:' needs at least one checkpoint, e.g. "
                              "fused:A.safetensors,B.safetensors")
        return fuse([_reference_scope(Path(p), model, include_bias) for p in paths])
    if not spec:
        raise ConfigError("the WSA target is empty; give " + TARGET_SPECS)
    return _reference_scope(Path(spec), model, include_bias)


def from_spec(spec: str, model: nn.Module, lam: float, divergence: str = "kl",
              reduce: str = "mean", include_bias: bool = False, every: int = 1) -> WSARegularizer:
    """A WSA regularizer for `model` toward the target `spec` names, checked against the model
    now (before any training)."""
    reg = WSARegularizer(parse_target(spec, model, include_bias), lam, divergence=divergence,
                         reduce=reduce, every=every)
    return reg.check(model)
