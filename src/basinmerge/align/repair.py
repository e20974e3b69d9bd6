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
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from basinmerge import adapter
from basinmerge.adapter import forward_hooks
from basinmerge.align.spec import trace_units
from basinmerge.errors import ConfigError
from basinmerge.models import ChannelLayerNorm
from basinmerge.state import as_state_dict, check_compatible
from basinmerge.train import batched_outputs, has_batchnorm, reset_bn_stats

__all__ = ["Repair", "RepairPoint", "repair", "repair_points", "reset_bn_stats"]

EPS = 1e-5


@dataclass(frozen=True)
class RepairPoint:
    """Where a hidden unit's statistics are measured and where its correction is folded.

    ``module``: the module whose output is corrected (a Linear/Conv, or the LayerNorm right
    after one); ``kind``: ``"layer"`` (fold into its weight and bias) or ``"norm"`` (fold into
    the LayerNorm's affine); ``channel_axis``: the axis of the output holding the units."""

    module: str
    kind: str
    channel_axis: int


def repair_points(model: nn.Module, example_input: adapter.Inputs) -> tuple[list[RepairPoint], bool]:
    """The REPAIR points of `model` (hidden layers in graph order) and whether it has hidden
    layers followed by BatchNorm (which are handled by resetting BN statistics instead)."""
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


def _per_unit(t: torch.Tensor, axis: int) -> torch.Tensor:
    """(samples, units) view of an output: every other axis counts as samples."""
    return t.movedim(axis, -1).reshape(-1, t.shape[axis])


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
    hooks = [(modules[p.module], lambda m, a, out, p=p: stats[p.module].add(_per_unit(out, p.channel_axis)))
             for p in points]
    with forward_hooks(hooks):
        for _ in batched_outputs(model, x, batch_size):
            pass
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
    (when the caller has already done it)."""

    def __init__(self, endpoints: Sequence[nn.Module], data, *, num_examples: int | None = 2000,
                 batch_size: int = 500, bn_reset: bool = True):
        if len(endpoints) < 2:
            raise ConfigError("repair needs at least two endpoint models")
        states = [as_state_dict(m) for m in endpoints]
        check_compatible(states, [f"model {chr(65 + i)}" for i in range(len(states))])
        self.x = adapter.as_data(data, "REPAIR data", limit=num_examples).with_labels(None)
        self.batch_size = batch_size
        self.bn_reset = bn_reset
        self.points, self.has_bn = repair_points(endpoints[0], self.x.head(2).inputs)
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

        def correct(point: RepairPoint):
            def hook(m, args, out):
                z = _per_unit(out, point.channel_axis)
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
            for _ in batched_outputs(net, self.x, self.batch_size):
                pass
        for p in self.points:
            mean, std = running[p.module].mean_std()
            g_mean, g_std = goal[p.module]
            scale = g_std / (std * std + EPS).sqrt()
            shift = g_mean - scale * mean
            module = modules[p.module]
            w = module.weight
            view = [-1] + [1] * (w.dim() - 1)
            # out' = scale · out + shift, with out = W x + b (layer) or γ x̂ + β (norm).
            w.mul_(scale.to(w.dtype).view(view))
            module.bias.mul_(scale.to(w.dtype)).add_(shift.to(w.dtype))


def repair(model_a: nn.Module, model_b: nn.Module, merged: nn.Module, data, alpha: float = 0.5,
           *, num_examples: int | None = 2000, batch_size: int = 500,
           bn_reset: bool = True) -> nn.Module:
    """A repaired copy of `merged` = ``(1 − α) θ_A + α θ_B`` (B aligned to A): every hidden unit
    gets the interpolated mean and std of its units in A and B, folded into the weights (see
    the module docstring). `data`: a Dataset, (x, y) or input tensor (training data)."""
    return Repair([model_a, model_b], data, num_examples=num_examples, batch_size=batch_size,
                  bn_reset=bn_reset)(merged, alpha)
