"""SLERP: spherical linear interpolation of two models, tensor by tensor (Shoemake 1985; the
form model-merging tools such as mergekit use).

For one tensor of each model, flattened to vectors a and b, with
Omega = arccos(<a, b> / (|a| |b|)):

    slerp(a, b; t) = sin((1 - t) Omega) / sin(Omega) * a + sin(t Omega) / sin(Omega) * b

The angle comes from the normalized vectors; the interpolation is of the vectors themselves
(their norms are not changed to one). When a and b are (nearly) parallel, |cos Omega| >
`PARALLEL` (0.9995, as in mergekit), or either is zero, the formula is ill-conditioned and the
plain linear interpolation (1 - t) a + t b is used.

More than two models: the pairwise chain theta <- slerp(theta, theta_k; 1/k) for k = 2..K
(theta starts at theta_1), which reduces to the uniform average when every pair is parallel.
The chain depends on the order of the models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from basinmerge.errors import ConfigError
from basinmerge.merge._common import (
    Kernel,
    ModelLike,
    StateSource,
    TensorSource,
    prepare,
    run_kernel,
    work_dtype,
)
from basinmerge.merge.registry import merge_method
from basinmerge.state import StateDict

PARALLEL = 0.9995


def slerp_tensors(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """slerp(a, b; t) of two tensors of one shape, in the work dtype (linear interpolation
    when they are nearly parallel or one is zero)."""
    dt = work_dtype(a.dtype)
    a, b = a.to(dt), b.to(dt)
    va, vb = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = float(va.norm()), float(vb.norm())
    cos = float(va @ vb) / (na * nb) if na > 0 and nb > 0 else 1.0
    if abs(cos) > PARALLEL or not math.isfinite(cos):
        return (1.0 - t) * a + t * b
    omega = math.acos(max(-1.0, min(1.0, cos)))
    s = math.sin(omega)
    return (math.sin((1.0 - t) * omega) / s) * a + (math.sin(t * omega) / s) * b


def _check_t(t: float | None, k: int) -> float | None:
    if t is None:
        return None
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise ConfigError(f"merge method 'slerp': option 't' must be in [0, 1], got {t}")
    if k > 2:
        raise ConfigError(f"merge method 'slerp': option 't' applies to two models; {k} models are "
                          "chained with t = 1/k (leave 't' out)")
    return t


def slerp_kernel(source: TensorSource, t: float | None = None) -> Kernel:
    """Per key: slerp of two tensors, or the pairwise chain for more (see the module)."""
    t = _check_t(t, source.num_models)

    def kernel(key: str, tensors: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
        if len(tensors) == 1:
            return tensors[0].to(work_dtype(tensors[0].dtype))
        if len(tensors) == 2:
            return slerp_tensors(tensors[0], tensors[1], 0.5 if t is None else t)
        out = tensors[0]
        for k in range(1, len(tensors)):
            out = slerp_tensors(out, tensors[k], 1.0 / (k + 1))
        return out

    return kernel


@merge_method("slerp", summary="spherical interpolation per tensor (two models; a pairwise "
              "chain for more)", min_models=2, kernel=slerp_kernel)
def slerp(models: Sequence[ModelLike], t: float | None = None, *,
          names: Sequence[str] | None = None) -> StateDict:
    """Spherical linear interpolation of the models, tensor by tensor.

    Options:
        t: with two models, the fraction of the way from the first to the second (default
            0.5); more models are chained with t = 1/k and take no t
    """
    states, _, names = prepare(models, "slerp", min_models=2, names=names)
    src = StateSource(states, names=names)
    return run_kernel(src, slerp_kernel(src, t))
