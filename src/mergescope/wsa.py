"""The Weight Scope Alignment regularizer.

``WSARegularizer(target, lam)`` is a training penalty (a callable ``model -> scalar``, usable in
`mergescope.train.fit(..., penalties=[...])`):

    λ · reduce_l D(N(μ_l, σ_l²) ‖ N(μ*_l, σ*_l²))

over the model's scoped layers (Linear/Conv weights), with D the KL divergence (default),
the reverse KL or the squared 2-Wasserstein distance, and reduce the mean (default) or the sum
over layers. The target statistics are constants. Each layer costs one fused pass
(`torch.var_mean`); the divergence is evaluated for all layers at once.

Targets: a reference model's scope, `fuse` of several scopes, the model's own initialization
(`WSARegularizer.from_init`), or a `refresh(step, model) -> Scope` function called every
`refresh_every` optimizer steps (e.g. `fused_refresh(models)`: the fused scope of runs trained
side by side).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from mergescope.errors import ConfigError
from mergescope.scope import (
    DIVERGENCES,
    Scope,
    divergence_terms,
    fuse,
    layer_stats,
    scope_keys,
    weight_scope,
)

REDUCTIONS = ("mean", "sum")
Refresh = Callable[[int, nn.Module], Scope]


class WSARegularizer:
    """λ · Σ/mean over layers of D(model scope ‖ target scope); see the module docstring."""

    def __init__(self, target: Scope, lam: float, divergence: str = "kl", reduce: str = "mean",
                 refresh: Refresh | None = None, refresh_every: int = 1):
        if divergence not in DIVERGENCES:
            raise ConfigError(f"unknown divergence '{divergence}'; choose one of {', '.join(DIVERGENCES)}")
        if reduce not in REDUCTIONS:
            raise ConfigError(f"unknown reduce '{reduce}'; choose one of {', '.join(REDUCTIONS)}")
        if not lam >= 0:
            raise ConfigError(f"WSA lambda must be >= 0, got {lam}")
        if refresh_every < 1:
            raise ConfigError(f"refresh_every must be >= 1, got {refresh_every}")
        self.lam = float(lam)
        self.kind = divergence
        self.reduce = reduce
        self.refresh = refresh
        self.refresh_every = int(refresh_every)
        self._params: list[tuple[str, torch.Tensor]] | None = None
        self._bound_to: int | None = None
        self.set_target(target)

    # ------------------------------------------------------------------ target
    def set_target(self, target: Scope) -> None:
        if not isinstance(target, Scope):
            raise ConfigError(f"a WSA target must be a Scope, got {type(target).__name__}")
        target.validate("WSA target")
        self.target = target
        self._mu_t, self._sd_t = target.tensors(torch.float64)
        self._params = None  # re-bind on the next call (layer order may have changed)

    @classmethod
    def from_init(cls, model: nn.Module, lam: float, **kw) -> WSARegularizer:
        """Target = the model's current (initialization) scope."""
        return cls(weight_scope(model), lam, **kw)

    # ------------------------------------------------------------------ binding
    def _bind(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        named = dict(model.named_parameters())
        keys = set(scope_keys(model, include_bias=True))
        params = []
        for k, ls in self.target.items():
            if k not in named:
                raise ConfigError(f"WSA target layer '{k}' is not a parameter of the model")
            if k not in keys:
                raise ConfigError(f"WSA target layer '{k}' is not a Linear/Conv weight or bias")
            if named[k].numel() != ls.count:
                raise ConfigError(f"WSA target layer '{k}' has {ls.count} weights, the model's has "
                                  f"{named[k].numel()} (a target from another architecture?)")
            params.append((k, named[k]))
        missing = [k for k in scope_keys(model) if k not in self.target]
        if missing:
            raise ConfigError(f"WSA target lacks layer '{missing[0]}' of the model")
        self._bound_to = id(model)
        return params

    # ------------------------------------------------------------------ value
    def model_stats(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, σ) of the model's target layers as differentiable 1-D tensors."""
        if self._params is None or self._bound_to != id(model):
            self._params = self._bind(model)
        stats = [layer_stats(p) for _, p in self._params]
        return torch.stack([m for m, _ in stats]), torch.stack([s for _, s in stats])

    def per_layer(self, model: nn.Module) -> torch.Tensor:
        """The unweighted divergence of each target layer (differentiable)."""
        mu, sd = self.model_stats(model)
        mu_t = self._mu_t.to(device=mu.device, dtype=mu.dtype)
        sd_t = self._sd_t.to(device=mu.device, dtype=mu.dtype)
        return divergence_terms(mu, sd.clamp_min(torch.finfo(sd.dtype).tiny), mu_t, sd_t, self.kind)

    def __call__(self, model: nn.Module) -> torch.Tensor:
        d = self.per_layer(model)
        red = d.mean() if self.reduce == "mean" else d.sum()
        return self.lam * red

    def on_step(self, step: int, model: nn.Module) -> None:
        """Called by the trainer after each optimizer step: refresh the target if due."""
        if self.refresh is not None and step % self.refresh_every == 0:
            self.set_target(self.refresh(step, model))

    def __repr__(self) -> str:
        return (f"WSARegularizer(lam={self.lam}, divergence={self.kind!r}, reduce={self.reduce!r}, "
                f"layers={len(self.target)}, refresh={'yes' if self.refresh else 'no'})")


def fused_refresh(models: Sequence[nn.Module], weights: Sequence[float] | None = None,
                  method: str = "moment") -> Refresh:
    """A refresh function returning the fused current scope of `models` (runs trained side by
    side; pass the same list to each run's regularizer)."""
    models = list(models)

    def refresh(step: int, model: nn.Module) -> Scope:
        return fuse([weight_scope(m) for m in models], weights, method)

    return refresh
