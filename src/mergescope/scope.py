"""Weight scopes: the per-layer distribution of a model's weights, summarized as a Gaussian.

A layer's *scope* is (mean μ, population std σ, count n) of one weight tensor of a Linear or
Conv layer (biases optional; norm parameters and buffers are never included). Weight Scope
Alignment (WSA, Xu et al. 2024) observes that models trained under different conditions end with
mismatched scopes, and that the mismatch goes with poor merging.

- `weight_scope(model_or_state_dict)` -> `Scope` (a mapping layer -> `LayerScope`).
- `divergence(a, b, kind)`: per-layer closed forms between Gaussians — ``kl`` = KL(a ‖ b),
  ``reverse_kl`` = KL(b ‖ a), ``w2`` = squared 2-Wasserstein ``(μa−μb)² + (σa−σb)²``.
- `fuse(scopes, weights, method)`: one target scope from several (``moment``: moment matching of
  the mixture; ``mean``: average of μ and of σ²).
- `divergence_terms`: the same closed forms on tensors (differentiable), used by the WSA
  regularizer; one implementation serves both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mergescope.errors import ConfigError

DIVERGENCES = ("kl", "reverse_kl", "w2")
FUSIONS = ("moment", "mean")
_SCOPED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
           nn.ConvTranspose3d)


@dataclass(frozen=True)
class LayerScope:
    mean: float
    std: float
    count: int

    @property
    def var(self) -> float:
        return self.std ** 2


class Scope(Mapping[str, LayerScope]):
    """An ordered, immutable mapping from parameter name to `LayerScope`."""

    def __init__(self, layers: Mapping[str, LayerScope]):
        self._layers = dict(layers)

    def __getitem__(self, key: str) -> LayerScope:
        return self._layers[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}: μ={v.mean:.3g} σ={v.std:.3g}" for k, v in self._layers.items())
        return f"Scope({inner})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Scope) and self._layers == other._layers

    def __hash__(self) -> int:  # pragma: no cover - immutable value object
        return hash(tuple(self._layers.items()))

    def to_dict(self) -> dict:
        return {k: {"mean": v.mean, "std": v.std, "count": v.count} for k, v in self._layers.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Mapping]) -> Scope:
        try:
            return cls({k: LayerScope(float(v["mean"]), float(v["std"]), int(v["count"]))
                        for k, v in d.items()})
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"invalid scope record: {e}") from e

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Scope:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ConfigError(f"invalid scope JSON: {e.msg}") from e

    def rows(self) -> list[list]:
        """Table rows: layer, count, mean, std."""
        return [[k, v.count, v.mean, v.std] for k, v in self._layers.items()]

    def tensors(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """(means, stds) as 1-D tensors in layer order."""
        means = torch.tensor([v.mean for v in self._layers.values()], dtype=dtype)
        stds = torch.tensor([v.std for v in self._layers.values()], dtype=dtype)
        return means, stds

    def validate(self, name: str = "scope") -> Scope:
        """Raise one clear error for a σ <= 0 or a NaN/Inf statistic, naming the layer."""
        for k, v in self._layers.items():
            if not (math.isfinite(v.mean) and math.isfinite(v.std)):
                raise ConfigError(f"{name}: layer '{k}' has a non-finite statistic (μ={v.mean}, σ={v.std})")
            if v.std <= 0:
                raise ConfigError(f"{name}: layer '{k}' has σ = {v.std} (must be > 0)")
            if v.count < 1:
                raise ConfigError(f"{name}: layer '{k}' has count {v.count}")
        return self


def scope_keys(model_or_state: nn.Module | Mapping[str, torch.Tensor],
               include_bias: bool = False) -> list[str]:
    """The parameter names that have a scope: each Linear/Conv weight (and bias, optionally).

    For a model this is decided by module type; for a bare state_dict, a ``*.weight`` of two or
    more dimensions is a Linear/Conv weight (norm weights are 1-D), and its sibling ``*.bias``."""
    keys: list[str] = []
    if isinstance(model_or_state, nn.Module):
        for name, mod in model_or_state.named_modules():
            if isinstance(mod, _SCOPED):
                prefix = f"{name}." if name else ""
                keys.append(prefix + "weight")
                if include_bias and mod.bias is not None:
                    keys.append(prefix + "bias")
        return keys
    for k, v in model_or_state.items():
        if k.endswith(".weight") and v.ndim >= 2:
            keys.append(k)
            b = k[: -len("weight")] + "bias"
            if include_bias and b in model_or_state:
                keys.append(b)
    return keys


def layer_stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, population std) of all entries of `t` in one fused pass; differentiable."""
    var, mean = torch.var_mean(t.reshape(-1), correction=0)
    return mean, var.sqrt()


def _params_of(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state, nn.Module):
        return dict(model_or_state.state_dict())
    return dict(model_or_state)


def _masked(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The entries of a weight whose input feature (axis 1) is live."""
    if mask is None or t.ndim < 2:
        return t
    return t[:, mask.to(t.device)]


def weight_scope(model_or_state: nn.Module | Mapping[str, torch.Tensor],
                 include_bias: bool = False, keys: Sequence[str] | None = None,
                 input_masks: Mapping[str, torch.Tensor] | None = None) -> Scope:
    """Per-layer mean, population std and count of the Linear/Conv weights (see `scope_keys`).

    `input_masks` (from `live_input_masks`) restricts each weight to the columns of its live
    inputs: the scope of live units only (dead ReLU units' outgoing weights get no task
    gradient, and an optimizer can inflate them to satisfy a scope penalty cosmetically)."""
    params = _params_of(model_or_state)
    keys = list(keys) if keys is not None else scope_keys(model_or_state, include_bias)
    if not keys:
        raise ConfigError("the model has no Linear/Conv weight to take a scope of")
    layers = {}
    for k in keys:
        if k not in params:
            raise ConfigError(f"layer '{k}' is not in the model")
        t = _masked(params[k].detach().to(torch.float64), (input_masks or {}).get(k))
        mean, std = layer_stats(t)
        layers[k] = LayerScope(float(mean), float(std), int(t.numel()))
    return Scope(layers)


def divergence_terms(mu: torch.Tensor, sigma: torch.Tensor, mu_t: torch.Tensor,
                     sigma_t: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """Elementwise divergence between N(mu, sigma²) (the model) and N(mu_t, sigma_t²) (the
    target), closed forms; differentiable in all arguments."""
    if kind == "kl":
        return torch.log(sigma_t / sigma) + (sigma**2 + (mu - mu_t) ** 2) / (2 * sigma_t**2) - 0.5
    if kind == "reverse_kl":
        return torch.log(sigma / sigma_t) + (sigma_t**2 + (mu - mu_t) ** 2) / (2 * sigma**2) - 0.5
    if kind == "w2":
        return (mu - mu_t) ** 2 + (sigma - sigma_t) ** 2
    raise ConfigError(f"unknown divergence '{kind}'; choose one of {', '.join(DIVERGENCES)}")


@dataclass(frozen=True)
class Divergence:
    kind: str
    per_layer: dict[str, float]

    @property
    def total(self) -> float:
        return float(sum(self.per_layer.values()))

    @property
    def mean(self) -> float:
        return self.total / max(1, len(self.per_layer))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "per_layer": self.per_layer, "total": self.total, "mean": self.mean}


def check_same_layers(a: Scope, b: Scope, names: tuple[str, str] = ("first scope", "second scope")) -> None:
    """Raise one clear error if two scopes do not cover the same layers of the same size."""
    for k in a:
        if k not in b:
            raise ConfigError(f"{names[1]} lacks layer '{k}'")
        if a[k].count != b[k].count:
            raise ConfigError(f"layer '{k}': {names[0]} has {a[k].count} weights, {names[1]} has "
                              f"{b[k].count} (another architecture?)")
    for k in b:
        if k not in a:
            raise ConfigError(f"{names[0]} lacks layer '{k}'")


def divergence(a: Scope, b: Scope, kind: str = "kl") -> Divergence:
    """Per-layer divergence of scope `a` (the model) from `b` (the target), and their total."""
    check_same_layers(a, b)
    a.validate("first scope")
    b.validate("second scope")
    mu, sd = a.tensors()
    mu_b, sd_b = torch.tensor([b[k].mean for k in a], dtype=torch.float64), \
        torch.tensor([b[k].std for k in a], dtype=torch.float64)
    vals = divergence_terms(mu, sd, mu_b, sd_b, kind)
    return Divergence(kind, {k: float(v) for k, v in zip(a, vals.tolist(), strict=True)})


def fuse(scopes: Sequence[Scope], weights: Sequence[float] | None = None,
         method: str = "moment") -> Scope:
    """Fuse several scopes into one target.

    ``moment``: the Gaussian matching the first two moments of the mixture Σ p_k N(μ_k, σ_k²):
    μ* = Σ p_k μ_k, σ*² = Σ p_k (σ_k² + μ_k²) − μ*². ``mean``: μ* = Σ p_k μ_k, σ*² = Σ p_k σ_k².
    Weights (data sizes, say) are normalized; uniform by default."""
    if not scopes:
        raise ConfigError("fuse needs at least one scope")
    if method not in FUSIONS:
        raise ConfigError(f"unknown fusion '{method}'; choose one of {', '.join(FUSIONS)}")
    for i, s in enumerate(scopes[1:], start=1):
        check_same_layers(scopes[0], s, ("scope 0", f"scope {i}"))
    for i, s in enumerate(scopes):
        s.validate(f"scope {i}")
    p = torch.full((len(scopes),), 1.0 / len(scopes), dtype=torch.float64) if weights is None else \
        torch.as_tensor(list(weights), dtype=torch.float64)
    if p.shape != (len(scopes),) or (p < 0).any() or p.sum() <= 0:
        raise ConfigError(f"fuse weights must be {len(scopes)} non-negative numbers with a positive sum")
    p = p / p.sum()
    keys = list(scopes[0])
    mu = torch.stack([torch.tensor([s[k].mean for k in keys], dtype=torch.float64) for s in scopes])
    sd = torch.stack([torch.tensor([s[k].std for k in keys], dtype=torch.float64) for s in scopes])
    mu_f = (p[:, None] * mu).sum(0)
    if method == "moment":
        var_f = (p[:, None] * (sd**2 + mu**2)).sum(0) - mu_f**2
    else:
        var_f = (p[:, None] * sd**2).sum(0)
    std_f = var_f.clamp_min(0).sqrt()
    return Scope({k: LayerScope(float(m), float(s), scopes[0][k].count)
                  for k, m, s in zip(keys, mu_f.tolist(), std_f.tolist(), strict=True)})


@torch.no_grad()
def live_input_masks(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> dict[str, torch.Tensor]:
    """For each Linear/Conv weight, a boolean mask over its input features (axis 1) that is
    False where that input is exactly zero for every example (and position): the outputs of
    dead ReLU units. Evaluated in eval mode on `x`."""
    mods = {f"{n}.weight" if n else "weight": m for n, m in model.named_modules() if isinstance(m, _SCOPED)}
    alive: dict[str, torch.Tensor] = {}
    hooks = []

    def hook_for(key: str):
        def pre_hook(_mod, args):
            a = args[0]
            nz = (a != 0).transpose(0, 1).reshape(a.shape[1], -1).any(1)
            alive[key] = nz if key not in alive else alive[key] | nz
        return pre_hook

    for key, m in mods.items():
        hooks.append(m.register_forward_pre_hook(hook_for(key)))
    was_training = model.training
    model.eval()
    try:
        device = next(iter(model.parameters())).device
        for i in range(0, x.shape[0], batch_size):
            model(x[i:i + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {k: v.cpu() for k, v in alive.items()}


def excess_kurtosis(model_or_state: nn.Module | Mapping[str, torch.Tensor],
                    include_bias: bool = False) -> dict[str, float]:
    """Per-layer excess kurtosis E[(w−μ)⁴]/σ⁴ − 3 (0 for a Gaussian, −1.2 for a uniform)."""
    params = _params_of(model_or_state)
    out = {}
    for k in scope_keys(model_or_state, include_bias):
        t = params[k].detach().to(torch.float64).reshape(-1)
        c = t - t.mean()
        var = (c * c).mean()
        out[k] = float((c**4).mean() / var**2 - 3.0) if var > 0 else float("nan")
    return out
