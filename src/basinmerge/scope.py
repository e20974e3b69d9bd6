"""Weight scopes: the per-layer distribution of a model's weights, summarized as a Gaussian.

A layer's *scope* is (mean μ, population std σ, count n) of one weight tensor of a Linear or
Conv layer (biases optional; norm parameters and buffers are never included). HF ``Conv1D``
(GPT-2) counts as a Linear, the packed ``in_proj_weight`` of ``nn.MultiheadAttention`` as one
layer (as stored; so does GPT-2's fused ``c_attn``), and ``nn.Embedding`` weights by default
(``include_embeddings``; a state_dict cannot tell an embedding from a Linear weight, so this
default keeps a model's scope and its file's scope the same). A tied tensor (GPT-2's
``lm_head.weight`` = ``transformer.wte.weight``) is one layer, under its canonical name. Weight Scope
Alignment (WSA, Xu et al. 2024) observes that models trained under different conditions end with
mismatched scopes, and that the mismatch goes with poor merging.

- `weight_scope(model_or_state_dict)` -> `Scope` (a mapping layer -> `LayerScope`); with
  `input_masks=live_input_masks(model, x)` the scope of the weights of live inputs only.
- `divergence(a, b, kind)`: per-layer closed forms between Gaussians — ``kl`` = KL(a ‖ b),
  ``reverse_kl`` = KL(b ‖ a), ``w2`` = squared 2-Wasserstein ``(μa−μb)² + (σa−σb)²``;
  `pairwise_mismatch` for every pair of several scopes.
- `fuse(scopes, weights, method)`: one target scope from several (``moment``: moment matching of
  the mixture; ``mean``: average of μ and of σ²).
- `fit_quality(model)`: how Gaussian each layer really is (skewness, excess kurtosis, the
  Kolmogorov–Smirnov distance to the fitted Gaussian): the method rests on that assumption.
- `divergence_terms`: the same closed forms on tensors (differentiable), used by the WSA
  regularizer; one implementation serves both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Any

import torch
from torch import nn

from basinmerge.adapter import forward_hooks, is_conv1d
from basinmerge.errors import ConfigError
from basinmerge.state import tied_aliases
from basinmerge.train import batched_outputs

DIVERGENCES = ("kl", "reverse_kl", "w2")
FUSIONS = ("moment", "mean")
_SCOPED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
           nn.ConvTranspose3d)

ModelOrState = nn.Module | Mapping[str, torch.Tensor]


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
        if not isinstance(d, Mapping):
            raise ConfigError("invalid scope record: expected a mapping layer -> {mean, std, count}")
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

    def table(self, title: str = "weight scope"):
        """A rich table of the layers (layer, n, μ, σ)."""
        from basinmerge.console import table

        return table(title, ["layer", "n", "μ", "σ"], self.rows())

    def tensors(self, dtype: torch.dtype = torch.float64,
                keys: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(means, stds) as 1-D tensors in layer order (or in the order of `keys`)."""
        layers = [self._layers[k] for k in (self._layers if keys is None else keys)]
        means = torch.tensor([v.mean for v in layers], dtype=dtype)
        stds = torch.tensor([v.std for v in layers], dtype=dtype)
        return means, stds

    def validate(self, name: str = "scope") -> Scope:
        """Raise one clear error for a σ <= 0 or a NaN/Inf statistic, naming the layer."""
        if not self._layers:
            raise ConfigError(f"{name} has no layers")
        for k, v in self._layers.items():
            if not (math.isfinite(v.mean) and math.isfinite(v.std)):
                raise ConfigError(f"{name}: layer '{k}' has a non-finite statistic (μ={v.mean}, σ={v.std})")
            if v.std <= 0:
                raise ConfigError(f"{name}: layer '{k}' has σ = {v.std} (must be > 0)")
            if v.count < 1:
                raise ConfigError(f"{name}: layer '{k}' has count {v.count}")
        return self


def scope_rows(scopes: Mapping[str, Scope]) -> tuple[list[str], list[list]]:
    """A long table of several named scopes over the same layers: (columns, rows) with one row
    per (layer, scope), grouped by layer, for `basinmerge.console.table`. Counts may differ
    (scopes of live units)."""
    if not scopes:
        raise ConfigError("scope_rows needs at least one scope")
    names = list(scopes)
    first = scopes[names[0]]
    for n in names[1:]:
        for k in list(first) + list(scopes[n]):
            if k not in first or k not in scopes[n]:
                raise ConfigError(f"{names[0] if k not in first else n} lacks layer '{k}'")
    rows = [[k, n, scopes[n][k].count, scopes[n][k].mean, scopes[n][k].std]
            for k in first for n in names]
    return ["layer", "scope", "n", "μ", "σ"], rows


# --------------------------------------------------------------------------- layers


def _module_keys(mod: nn.Module, include_bias: bool,
                 include_embeddings: bool) -> list[tuple[str, str | None]]:
    """(weight attribute, bias attribute or None) of the scoped tensors of one module."""
    if isinstance(mod, _SCOPED) or is_conv1d(mod):
        return [("weight", "bias" if include_bias and mod.bias is not None else None)]
    if include_embeddings and isinstance(mod, nn.Embedding):
        return [("weight", None)]
    if isinstance(mod, nn.MultiheadAttention):
        bias = "in_proj_bias" if include_bias and mod.in_proj_bias is not None else None
        if mod.in_proj_weight is not None:
            return [("in_proj_weight", bias)]
        return [("q_proj_weight", None), ("k_proj_weight", None), ("v_proj_weight", bias)]
    return []


def scoped_modules(model: nn.Module, include_embeddings: bool = True) -> dict[str, nn.Module]:
    """weight key -> the module that holds it, for every scoped weight of `model` (a tied
    weight under its canonical name, held by the first module that scopes it)."""
    aliases = tied_aliases(model)
    out: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        for w, _ in _module_keys(mod, False, include_embeddings):
            out.setdefault(aliases.get(prefix + w, prefix + w), mod)
    return out


def scope_keys(model_or_state: ModelOrState, include_bias: bool = False,
               include_embeddings: bool = True) -> list[str]:
    """The parameter names that have a scope: each Linear/Conv weight (HF ``Conv1D``, a
    ``MultiheadAttention``'s packed input projection and, with `include_embeddings`, every
    ``nn.Embedding`` included) and its bias, optionally; each tied tensor once, under its
    canonical name (`basinmerge.state.tied_groups`).

    For a model this is decided by module type; for a bare state_dict, a ``*.weight`` (or
    ``*in_proj_weight``) of two or more dimensions is such a weight (norm weights are 1-D),
    with its sibling bias; tensors sharing storage count once."""
    keys: list[str] = []
    aliases = tied_aliases(model_or_state) if isinstance(model_or_state, nn.Module | Mapping) else {}
    if isinstance(model_or_state, nn.Module):
        for name, mod in model_or_state.named_modules():
            prefix = f"{name}." if name else ""
            for w, b in _module_keys(mod, include_bias, include_embeddings):
                keys.append(prefix + w)
                if b is not None:
                    keys.append(prefix + b)
    else:
        for k, v in model_or_state.items():
            packed = k == "in_proj_weight" or k.endswith(".in_proj_weight")
            if (packed or k == "weight" or k.endswith(".weight")) and v.ndim >= 2:
                keys.append(k)
                b = k[: -len("weight")] + "bias"
                if include_bias and b in model_or_state:
                    keys.append(b)
    return list(dict.fromkeys(aliases.get(k, k) for k in keys))


def layer_stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, population std) of all entries of `t` in one fused pass; differentiable."""
    var, mean = torch.var_mean(t.reshape(-1), correction=0)
    return mean, var.sqrt()


def _params_of(model_or_state: ModelOrState) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state, nn.Module):
        return dict(model_or_state.state_dict())
    if isinstance(model_or_state, Mapping):
        return dict(model_or_state)
    raise ConfigError(f"expected a model or a state_dict, got {type(model_or_state).__name__}")


def _masked(key: str, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The entries of weight `t` that `mask` keeps, flattened.

    `mask` is boolean and either broadcastable to `t` (as `live_input_masks` returns) or a 1-D
    mask over the input axis (axis 1) of a Linear/Conv weight."""
    if mask is None:
        return t.reshape(-1)
    mask = mask.to(device=t.device, dtype=torch.bool)
    if mask.ndim == 1 and t.ndim >= 2 and mask.shape[0] == t.shape[1]:
        mask = mask.reshape(1, -1, *([1] * (t.ndim - 2)))
    try:
        kept = t[mask.expand_as(t)]
    except RuntimeError as e:
        raise ConfigError(f"layer '{key}': input mask of shape {tuple(mask.shape)} does not fit "
                          f"the weight's shape {tuple(t.shape)}") from e
    if kept.numel() == 0:
        raise ConfigError(f"layer '{key}': the input mask keeps no weight (every input is dead)")
    return kept


def layer_values(model_or_state: ModelOrState, include_bias: bool = False,
                 keys: Sequence[str] | None = None,
                 input_masks: Mapping[str, torch.Tensor] | None = None,
                 include_embeddings: bool = True) -> dict[str, torch.Tensor]:
    """The flattened, detached float64 values of each scoped layer (see `scope_keys`), restricted
    to live inputs where `input_masks` has the layer. The one loop over layers that
    `weight_scope`, `fit_quality` and the histogram figure share."""
    params = _params_of(model_or_state)
    keys = list(keys) if keys is not None else scope_keys(model_or_state, include_bias,
                                                          include_embeddings)
    if not keys:
        raise ConfigError("the model has no Linear/Conv weight to take a scope of")
    masks = input_masks or {}
    out = {}
    for k in keys:
        if k not in params:
            raise ConfigError(f"layer '{k}' is not in the model")
        out[k] = _masked(k, params[k].detach().to(torch.float64), masks.get(k))
    return out


def weight_scope(model_or_state: ModelOrState, include_bias: bool = False,
                 keys: Sequence[str] | None = None,
                 input_masks: Mapping[str, torch.Tensor] | None = None,
                 include_embeddings: bool = True) -> Scope:
    """Per-layer mean, population std and count of the Linear/Conv weights (see `scope_keys`).

    `input_masks` (from `live_input_masks`) restricts each weight to the entries of its live
    inputs: the scope of live units only (dead ReLU units' outgoing weights get no task
    gradient, and an optimizer can inflate them to satisfy a scope penalty cosmetically).
    `include_embeddings=False` leaves ``nn.Embedding`` weights out (a tied one stays, as the
    output layer it also is)."""
    layers = {}
    for k, t in layer_values(model_or_state, include_bias, keys, input_masks,
                             include_embeddings).items():
        mean, std = layer_stats(t)
        layers[k] = LayerScope(float(mean), float(std), int(t.numel()))
    return Scope(layers)


# --------------------------------------------------------------------------- divergences


def divergence_terms(mu: torch.Tensor, sigma: torch.Tensor, mu_t: torch.Tensor,
                     sigma_t: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """Elementwise divergence between N(mu, sigma²) (the model) and N(mu_t, sigma_t²) (the
    target), closed forms; differentiable in all arguments.

    kl:         log(σ*/σ) + (σ² + (μ − μ*)²) / (2σ*²) − 1/2      = KL(model ‖ target)
    reverse_kl: log(σ/σ*) + (σ*² + (μ − μ*)²) / (2σ²) − 1/2      = KL(target ‖ model)
    w2:         (μ − μ*)² + (σ − σ*)²                             = squared 2-Wasserstein

    The KL forms are evaluated as ½(x − log1p(x)) + (μ − μ*)²/(2σ*²) with
    x = (σ − σ*)(σ + σ*)/σ*² = σ²/σ*² − 1 (the same number): the textbook form cancels
    catastrophically near σ = σ* and can come out negative; this one stays >= 0 and is exactly
    0 for equal scopes."""
    if kind == "kl":
        x = (sigma - sigma_t) * (sigma + sigma_t) / sigma_t**2
        return 0.5 * (x - torch.log1p(x)) + (mu - mu_t) ** 2 / (2 * sigma_t**2)
    if kind == "reverse_kl":
        x = (sigma_t - sigma) * (sigma_t + sigma) / sigma**2
        return 0.5 * (x - torch.log1p(x)) + (mu - mu_t) ** 2 / (2 * sigma**2)
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


def check_same_layers(a: Scope, b: Scope, names: tuple[str, str] = ("first scope", "second scope"),
                      same_counts: bool = True) -> None:
    """Raise one clear error if two scopes do not cover the same layers (of the same size,
    unless `same_counts` is False: scopes of live units keep different numbers of weights)."""
    for k in a:
        if k not in b:
            raise ConfigError(f"{names[1]} lacks layer '{k}'")
        if same_counts and a[k].count != b[k].count:
            raise ConfigError(f"layer '{k}': {names[0]} has {a[k].count} weights, {names[1]} has "
                              f"{b[k].count} (another architecture?)")
    for k in b:
        if k not in a:
            raise ConfigError(f"{names[0]} lacks layer '{k}'")


def divergence(a: Scope, b: Scope, kind: str = "kl", same_counts: bool = True) -> Divergence:
    """Per-layer divergence of scope `a` (the model) from `b` (the target), and their total.
    `same_counts=False` allows layers of different sizes (live-unit scopes of two models)."""
    if kind not in DIVERGENCES:
        raise ConfigError(f"unknown divergence '{kind}'; choose one of {', '.join(DIVERGENCES)}")
    check_same_layers(a, b, same_counts=same_counts)
    a.validate("first scope")
    b.validate("second scope")
    mu, sd = a.tensors()
    mu_b, sd_b = b.tensors(keys=list(a))
    vals = divergence_terms(mu, sd, mu_b, sd_b, kind)
    return Divergence(kind, {k: float(v) for k, v in zip(a, vals.tolist(), strict=True)})


def symmetric_kl(a: Scope, b: Scope, same_counts: bool = True) -> float:
    """Mean over layers of ½[KL(a‖b) + KL(b‖a)]: a symmetric scope mismatch of two models
    (`same_counts=False` for live-unit scopes, whose layers hold different numbers of weights)."""
    return 0.5 * (divergence(a, b, "kl", same_counts).mean + divergence(b, a, "kl", same_counts).mean)


def std_ratios(scope: Scope, reference: Scope) -> dict[str, float]:
    """σ of each layer of `scope` over its σ in `reference` (a reference σ of 0 gives inf)."""
    check_same_layers(scope, reference, ("scope", "reference scope"), same_counts=False)
    return {k: (scope[k].std / reference[k].std if reference[k].std > 0 else math.inf)
            for k in scope}


def pairwise_mismatch(scopes: Mapping[str, Scope], kinds: Sequence[str] = DIVERGENCES,
                      same_counts: bool = True) -> list[dict]:
    """The scope mismatch of every pair (a, b), a before b in `scopes`' order, for each
    divergence kind: records ``{"a", "b", "kind", "total", "mean", "per_layer"}``. KL is
    asymmetric: ``kl`` is KL(a ‖ b) and ``reverse_kl`` is KL(b ‖ a)."""
    out = []
    for (na, sa), (nb, sb) in combinations(scopes.items(), 2):
        check_same_layers(sa, sb, (na, nb), same_counts)
        for kind in kinds:
            d = divergence(sa, sb, kind, same_counts)
            out.append({"a": na, "b": nb, **d.to_dict()})
    return out


def fuse(scopes: Sequence[Scope], weights: Sequence[float] | None = None,
         method: str = "moment") -> Scope:
    """Fuse several scopes into one target.

    ``moment``: the Gaussian matching the first two moments of the mixture Σ p_k N(μ_k, σ_k²):
    μ* = Σ p_k μ_k, σ*² = Σ p_k (σ_k² + μ_k²) − μ*² (computed as Σ p_k σ_k² + Σ p_k (μ_k − μ*)²,
    which is the same number without the cancellation). ``mean``: μ* = Σ p_k μ_k,
    σ*² = Σ p_k σ_k². Weights (data sizes, say) are normalized; uniform by default."""
    scopes = list(scopes)
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
    if p.shape != (len(scopes),) or not torch.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ConfigError(f"fuse weights must be {len(scopes)} finite non-negative numbers with a "
                          "positive sum")
    p = p / p.sum()
    keys = list(scopes[0])
    mu = torch.stack([s.tensors(keys=keys)[0] for s in scopes])
    sd = torch.stack([s.tensors(keys=keys)[1] for s in scopes])
    mu_f = (p[:, None] * mu).sum(0)
    var_f = (p[:, None] * sd**2).sum(0)
    if method == "moment":
        var_f = var_f + (p[:, None] * (mu - mu_f) ** 2).sum(0)
    std_f = var_f.sqrt()
    return Scope({k: LayerScope(float(m), float(s), scopes[0][k].count)
                  for k, m, s in zip(keys, mu_f.tolist(), std_f.tolist(), strict=True)})


# --------------------------------------------------------------------------- live units


def _input_mask(mod: nn.Module, alive: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-input-feature mask to the layout of `mod.weight`."""
    if is_conv1d(mod):  # weight (in, out)
        return alive.reshape(-1, 1)
    if isinstance(mod, nn.Linear | nn.MultiheadAttention):
        return alive.reshape(1, -1)
    w = mod.weight
    assert isinstance(w, torch.Tensor)
    tail = [1] * (w.ndim - 2)
    if isinstance(mod, nn.modules.conv._ConvTransposeNd):  # weight (in, out/groups, *k)
        return alive.reshape(-1, 1, *tail)
    groups = mod.groups  # weight (out, in/groups, *k): output o reads group o // (out/groups)
    assert isinstance(groups, int)
    if groups == 1:
        return alive.reshape(1, -1, *tail)
    per_in, per_out = w.shape[1], w.shape[0] // groups
    full = alive.reshape(groups, 1, per_in).expand(groups, per_out, per_in).reshape(w.shape[0], per_in)
    return full.reshape(w.shape[0], per_in, *tail)


@torch.no_grad()
def live_input_masks(model: nn.Module, x: Any, batch_size: int = 1000) -> dict[str, torch.Tensor]:
    """For each Linear/Conv weight, a boolean mask broadcastable to the weight that is False
    on the entries reading an input that is exactly zero for every example (and position) of
    `x`: the outputs of dead ReLU units. Evaluated in eval mode. Pass the result to
    `weight_scope(..., input_masks=...)` for the scope of live units. `x`: inputs in any form
    `basinmerge.adapter.as_data` accepts. Embeddings (which read token ids) get no mask;
    a ``MultiheadAttention``'s input projection is masked by its query input."""
    mods = scoped_modules(model, include_embeddings=False)  # a tied one: by its Linear role
    alive: dict[str, torch.Tensor] = {}

    def hook_for(key: str, mod: nn.Module):
        def pre_hook(_mod, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return  # called with keyword arguments only: nothing to observe
            a = args[0]
            if isinstance(mod, nn.Linear | nn.MultiheadAttention) or is_conv1d(mod):
                nz = (a != 0).reshape(-1, a.shape[-1]).any(0)
            else:
                nz = (a != 0).transpose(0, 1).reshape(a.shape[1], -1).any(1)
            alive[key] = nz if key not in alive else alive[key] | nz
        return pre_hook

    with forward_hooks([(m, hook_for(k, m)) for k, m in mods.items()], pre=True):
        for _ in batched_outputs(model, x, batch_size):
            pass
    return {k: _input_mask(mods[k], v.cpu()) for k, v in alive.items()}


# --------------------------------------------------------------------------- Gaussian fit


@dataclass(frozen=True)
class LayerFit:
    """How Gaussian one layer's weights are. Skewness and excess kurtosis are 0 for a Gaussian
    (a uniform has excess kurtosis −1.2); ``ks`` is the Kolmogorov–Smirnov distance between the
    empirical distribution and N(μ, σ²) fitted by moments, on ``ks_samples`` values."""

    count: int
    mean: float
    std: float
    skewness: float
    excess_kurtosis: float
    ks: float
    ks_samples: int

    def to_dict(self) -> dict:
        return asdict(self)


def ks_gaussian(values: torch.Tensor, mean: float | None = None, std: float | None = None) -> float:
    """The Kolmogorov–Smirnov statistic sup |F_n − Φ((x − μ)/σ)| of `values` against a
    Gaussian (by default the one fitted by moments); vectorized (one sort)."""
    x = values.reshape(-1).to(torch.float64).sort().values
    n = x.numel()
    if n == 0:
        raise ConfigError("ks_gaussian needs at least one value")
    mu = float(x.mean()) if mean is None else mean
    sd = float(x.std(correction=0)) if std is None else std
    if not sd > 0:
        return float("nan")
    cdf = torch.special.ndtr((x - mu) / sd)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - cdf, cdf - (i - 1) / n).max())


def fit_quality(model_or_state: ModelOrState, include_bias: bool = False,
                max_samples: int | None = 100_000, seed: int = 0,
                input_masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, LayerFit]:
    """Per layer: count, μ, σ, skewness, excess kurtosis (all entries) and the KS distance to
    the fitted Gaussian (on a random subsample of `max_samples` entries for big layers; None:
    all). WSA summarizes a layer by (μ, σ), which is only the whole story for a Gaussian."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in layer_values(model_or_state, include_bias, None, input_masks).items():
        mean, std, skew, kurt = _moments(t)
        sample = t
        if max_samples is not None and t.numel() > max_samples:
            sample = t[torch.randperm(t.numel(), generator=gen)[:max_samples]]
        out[k] = LayerFit(int(t.numel()), mean, std, skew, kurt, ks_gaussian(sample, mean, std),
                          int(sample.numel()))
    return out


def _moments(t: torch.Tensor) -> tuple[float, float, float, float]:
    """(mean, population std, skewness, excess kurtosis) of a 1-D tensor."""
    mean = t.mean()
    c = t - mean
    var = (c * c).mean()
    if not var > 0:
        return float(mean), 0.0, float("nan"), float("nan")
    return (float(mean), float(var.sqrt()), float((c**3).mean() / var**1.5),
            float((c**4).mean() / var**2 - 3.0))


def excess_kurtosis(model_or_state: ModelOrState, include_bias: bool = False,
                    input_masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Per-layer excess kurtosis E[(w−μ)⁴]/σ⁴ − 3 (0 for a Gaussian, −1.2 for a uniform)."""
    return {k: _moments(t)[3]
            for k, t in layer_values(model_or_state, include_bias, None, input_masks).items()}
