"""REPAIR (Jordan et al., ICLR 2023, arXiv 2211.08403) and BatchNorm reset for merged models.

Interpolating two aligned networks shrinks the variance of their hidden units ("variance
collapse"), and the loss barrier follows. REPAIR gives every hidden unit of the merged network
the interpolated statistics of the corresponding units of the endpoints,

    μ_goal = (1 − α) μ_A + α μ_B,    σ_goal = (1 − α) σ_A + α σ_B,

and folds the per-unit affine correction ``σ_goal (z − μ) / σ + μ_goal`` into the weights:

- a hidden Linear/Conv with no norm after it: into its weight rows and bias;
- followed by a LayerNorm (or the library's ChannelLayerNorm): into the norm's affine weight and
  bias (LayerNorm output is per unit affine in them, so the fold is exact);
- followed by a BatchNorm: recomputing the BN running statistics (`reset_bn_stats`) is the
  equivalent (the BN then outputs exactly its interpolated affine), as in the paper.

The merged network's own statistics are measured in one calibration pass in which every
correction is already active (like BatchNorm in train mode: each batch is normalized with its
own statistics while running averages are collected); the running averages are then folded.
`Repair` measures the endpoints once and can repair many merged models (an interpolation
curve); `repair` is the one-shot function.

Transformers (shared/REFERENCE.md §8; torch.fx cannot trace them) have their own points,
chosen by ``mode``:

- ``"layernorm"``: the output of every LayerNorm, per channel of the residual stream, folded
  into the norm's affine (exact, as above). This is the LayerNorm counterpart of REPAIR: a
  LayerNorm renormalizes each token across channels, so interpolation does not shrink the
  per-token scale, but the per-channel statistics that the next layers read still drift; the
  LayerNorm's input is the residual stream, a sum no single layer owns, so its output (which
  every attention/MLP branch and the head read) is where a per-channel correction can be folded;
- ``"mlp"``: the MLP hidden units (the first MLP projection's outputs, before the
  nonlinearity; found from the transformer permutation spec), folded into that projection's
  output rows and bias (HF ``Conv1D`` columns);
- ``"both"``: the two together; ``"units"``: the traced hidden layers above (plain networks);
  ``"auto"`` (``repair=True``): ``"both"`` for a transformer, ``"units"`` otherwise.

Tokens whose ``attention_mask`` is 0 (padding) are left out of every statistic: of the
endpoints', of the merged model's, and of the calibration batches' own.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from basinmerge import adapter
from basinmerge.adapter import forward_hooks, is_conv1d
from basinmerge.align.spec import trace_units
from basinmerge.errors import ConfigError
from basinmerge.models import ChannelLayerNorm
from basinmerge.state import as_state_dict, check_compatible, module_mode
from basinmerge.train import has_batchnorm, reset_bn_stats

__all__ = ["REPAIR_MODES", "Repair", "RepairPoint", "check_mode", "repair", "repair_points",
           "reset_bn_stats"]

EPS = 1e-5
REPAIR_MODES = ("auto", "units", "layernorm", "mlp", "both")


def check_mode(mode: bool | str) -> str:
    """The REPAIR mode named by `mode` (True: ``"auto"``), or one clear error."""
    if mode is True:
        return "auto"
    if not isinstance(mode, str) or mode not in REPAIR_MODES:
        raise ConfigError(f"unknown REPAIR mode {mode!r}; choose one of {', '.join(REPAIR_MODES)}")
    return mode


@dataclass(frozen=True)
class RepairPoint:
    """Where a hidden unit's statistics are measured and where its correction is folded.

    ``module``: the module whose output is corrected (a Linear/Conv, or the LayerNorm right
    after one); ``kind``: ``"layer"`` (fold into its weight and bias) or ``"norm"`` (fold into
    the LayerNorm's affine); ``channel_axis``: the axis of the output holding the units."""

    module: str
    kind: str
    channel_axis: int


def repair_points(model: nn.Module, example_input: adapter.Inputs,
                  mode: bool | str = "auto") -> tuple[list[RepairPoint], bool]:
    """The REPAIR points of `model` for `mode` (see the module docstring; ``"units"``: hidden
    layers in graph order) and whether it has hidden layers followed by BatchNorm (which are
    handled by resetting BN statistics instead)."""
    from basinmerge.align.transformer import is_transformer

    mode = check_mode(mode)
    if mode == "auto":
        mode = "both" if is_transformer(model) else "units"
    if mode == "units":
        return _unit_points(model, example_input)
    points = []
    if mode in ("layernorm", "both"):
        points += _layernorm_points(model)
    if mode in ("mlp", "both"):
        points += _mlp_points(model, example_input)
    return points, has_batchnorm(model)


def _layernorm_points(model: nn.Module) -> list[RepairPoint]:
    points = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.LayerNorm | ChannelLayerNorm):
            continue
        if not m.elementwise_affine or getattr(m, "bias", None) is None:
            raise ConfigError(f"repair: LayerNorm '{name}' has no affine weight and bias to fold "
                              "the correction into")
        points.append(RepairPoint(name, "norm", 1 if isinstance(m, ChannelLayerNorm) else -1))
    if not points:
        raise ConfigError(f"repair mode 'layernorm': {type(model).__name__} has no LayerNorm "
                          "(use mode 'units' or 'mlp')")
    return points


def _mlp_points(model: nn.Module, example_input: adapter.Inputs) -> list[RepairPoint]:
    """The first MLP projection of every transformer block: the linear layers whose output
    units form their own permutation group ``P_<layer>`` in the transformer spec."""
    from basinmerge.align.transformer import is_transformer, transformer_spec

    if not is_transformer(model):
        raise ConfigError(f"repair mode 'mlp': {type(model).__name__} is not a transformer "
                          "(use mode 'units')")
    spec = transformer_spec(model, example_input)
    modules = dict(model.named_modules())
    points = []
    for perm in spec.perm_to_axes:
        name = perm[2:]
        layer = modules.get(name)
        if layer is None or not (isinstance(layer, nn.Linear) or is_conv1d(layer)):
            continue
        if layer.bias is None:
            raise ConfigError(f"repair: layer '{name}' has no bias to fold the correction into")
        points.append(RepairPoint(name, "layer", -1))
    if not points:
        raise ConfigError(f"repair mode 'mlp': found no MLP hidden layer in {type(model).__name__}")
    return points


def _unit_points(model: nn.Module, example_input: adapter.Inputs) -> tuple[list[RepairPoint], bool]:
    units = trace_units(model, example_input)
    modules = dict(model.named_modules())
    points, has_bn = [], False
    for name in units.producers:
        follow = units.following_norm.get(name)
        if follow is not None and isinstance(modules[follow], nn.modules.batchnorm._BatchNorm):
            has_bn = True
            continue
        if follow is not None:
            norm = modules[follow]
            if not norm.elementwise_affine:
                raise ConfigError(f"repair: LayerNorm '{follow}' has no affine parameters to fold "
                                  "the correction into")
            axis = 1 if isinstance(norm, ChannelLayerNorm) else -1
            points.append(RepairPoint(follow, "norm", axis))
            continue
        layer = modules[name]
        if layer.bias is None:
            raise ConfigError(f"repair: layer '{name}' has no bias to fold the correction into")
        points.append(RepairPoint(name, "layer", 1 if isinstance(layer, nn.Conv1d | nn.Conv2d) else -1))
    return points, has_bn


def _per_unit(t: torch.Tensor, axis: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(samples, units) view of an output: every other axis counts as samples. With a token
    `mask` (batch, length) and a (batch, length, units) output, only the tokens the mask keeps
    (attention_mask != 0) count."""
    if (mask is not None and t.dim() == 3 and axis in (-1, 2)
            and tuple(t.shape[:2]) == tuple(mask.shape)):
        return t[mask]
    return t.movedim(axis, -1).reshape(-1, t.shape[axis])


class _Tokens:
    """The token mask of the batch being run (None: every token counts)."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None


def _run(model: nn.Module, x: adapter.Data, batch_size: int, tokens: _Tokens) -> None:
    """Run `x` through `model` in eval mode, batch by batch, keeping `tokens.mask` set to the
    current batch's ``attention_mask != 0`` (the statistics hooks read it)."""
    with module_mode(model, False):
        for _, batch in x.batches(batch_size):
            mask = adapter._attention_mask(batch.inputs)
            tokens.mask = None if mask is None else (mask != 0).to(adapter.device_of(model))
            adapter.forward(model, batch.inputs)
    tokens.mask = None


class _Stats:
    def __init__(self) -> None:
        self.n = 0
        self.s: torch.Tensor | None = None
        self.ss: torch.Tensor | None = None

    def add(self, z: torch.Tensor) -> None:
        z = z.double()
        self.n += z.shape[0]
        self.s = z.sum(0) if self.s is None else self.s + z.sum(0)
        self.ss = (z * z).sum(0) if self.ss is None else self.ss + (z * z).sum(0)

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.s is None or self.ss is None:
            raise ConfigError("repair: no activations were recorded (empty data)")
        mean = self.s / max(self.n, 1)
        var = (self.ss / max(self.n, 1) - mean * mean).clamp_min(0)
        return mean, var.sqrt()


@torch.no_grad()
def unit_statistics(model: nn.Module, points: Sequence[RepairPoint], x,
                    batch_size: int = 500) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-unit mean and std (float64) of each point's output over the inputs `x` (any form
    `adapter.as_data` accepts), in eval mode."""
    modules = dict(model.named_modules())
    stats = {p.module: _Stats() for p in points}
    tokens = _Tokens()
    hooks = [(modules[p.module],
              lambda m, a, out, p=p: stats[p.module].add(_per_unit(out, p.channel_axis, tokens.mask)))
             for p in points]
    with forward_hooks(hooks):
        _run(model, adapter.as_data(x).with_labels(None), batch_size, tokens)
    return {k: s.mean_std() for k, s in stats.items()}


def _mix(weights: Sequence[float], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``Σ w_i t_i`` (a tensor even for one term)."""
    terms = [w * t for w, t in zip(weights, tensors, strict=True)]
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


class Repair:
    """REPAIR for models merged from `endpoints` (B already aligned to A).

    The endpoints' unit statistics are measured once on `data`; calling the object with a merged
    model and interpolation weights returns a repaired copy. For two endpoints,
    ``Repair([a, b], data)(merged, alpha)`` targets ``(1 − α)·stats(A) + α·stats(B)``; for more
    (MergeMany), pass ``weights`` summing to 1. ``bn_reset=False`` skips the BatchNorm reset
    (when the caller has already done it). `mode`: which units (see the module docstring)."""

    def __init__(self, endpoints: Sequence[nn.Module], data, *, num_examples: int | None = 2000,
                 batch_size: int = 500, bn_reset: bool = True, mode: bool | str = "auto"):
        self.mode = check_mode(mode)
        if len(endpoints) < 2:
            raise ConfigError("repair needs at least two endpoint models")
        states = [as_state_dict(m) for m in endpoints]
        check_compatible(states, [f"model {chr(65 + i)}" for i in range(len(states))])
        self.x = adapter.as_data(data, "REPAIR data", limit=num_examples).with_labels(None)
        self.batch_size = batch_size
        self.bn_reset = bn_reset
        self.points, self.has_bn = repair_points(endpoints[0], self.x.head(2).inputs, self.mode)
        self.stats = ([unit_statistics(m, self.points, self.x, batch_size) for m in endpoints]
                      if self.points else [{} for _ in endpoints])

    def goal(self, weights: Sequence[float]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Interpolated per-unit (mean, std) for each point."""
        if len(weights) != len(self.stats):
            raise ConfigError(f"repair: {len(weights)} weights for {len(self.stats)} endpoints")
        return {p.module: (_mix(weights, [s[p.module][0] for s in self.stats]),
                           _mix(weights, [s[p.module][1] for s in self.stats]))
                for p in self.points}

    def __call__(self, merged: nn.Module, alpha: float | None = None,
                 weights: Sequence[float] | None = None) -> nn.Module:
        if weights is None:
            if alpha is None or len(self.stats) != 2:
                raise ConfigError("repair: give alpha for two endpoints, or weights for more")
            weights = (1.0 - float(alpha), float(alpha))
        net = copy.deepcopy(merged)
        if self.bn_reset and has_batchnorm(net):
            reset_bn_stats(net, self.x, batch_size=self.batch_size)
        if self.points:
            self._fold(net, self.goal(weights))
        return net

    @torch.no_grad()
    def _fold(self, net: nn.Module, goal: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        modules = dict(net.named_modules())
        running = {p.module: _Stats() for p in self.points}
        tokens = _Tokens()

        def correct(point: RepairPoint):
            def hook(m, args, out):
                z = _per_unit(out, point.channel_axis, tokens.mask)
                running[point.module].add(z)
                mean = z.mean(0)
                std = (z.var(0, unbiased=False) + EPS).sqrt()
                g_mean, g_std = (t.to(out.dtype) for t in goal[point.module])
                shape = [1] * out.dim()
                shape[point.channel_axis] = -1
                return ((out - mean.view(shape)) / std.view(shape) * g_std.view(shape)
                        + g_mean.view(shape))
            return hook

        with forward_hooks([(modules[p.module], correct(p)) for p in self.points]):
            _run(net, self.x, self.batch_size, tokens)
        for p in self.points:
            mean, std = running[p.module].mean_std()
            g_mean, g_std = goal[p.module]
            scale = g_std / (std * std + EPS).sqrt()
            shift = g_mean - scale * mean
            module = modules[p.module]
            w = module.weight
            view = [-1] + [1] * (w.dim() - 1)
            if is_conv1d(module):  # weight stored (in, out)
                view = [1, -1]
            # out' = scale · out + shift, with out = W x + b (layer) or γ x̂ + β (norm).
            w.mul_(scale.to(w.dtype).view(view))
            module.bias.mul_(scale.to(w.dtype)).add_(shift.to(w.dtype))


def repair(model_a: nn.Module, model_b: nn.Module, merged: nn.Module, data, alpha: float = 0.5,
           *, num_examples: int | None = 2000, batch_size: int = 500,
           bn_reset: bool = True, mode: bool | str = "auto") -> nn.Module:
    """A repaired copy of `merged` = ``(1 − α) θ_A + α θ_B`` (B aligned to A): every hidden unit
    gets the interpolated mean and std of its units in A and B, folded into the weights (see
    the module docstring; `mode` picks the units). `data`: a Dataset, (x, y), an input tensor
    or a dict batch (training data)."""
    return Repair([model_a, model_b], data, num_examples=num_examples, batch_size=batch_size,
                  bn_reset=bn_reset, mode=mode)(merged, alpha)
