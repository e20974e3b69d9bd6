"""Permutation alignment (Git Re-Basin): specs, matching, MergeMany and REPAIR.

Models trained from different initializations hold their hidden units in arbitrary orders;
averaging them without putting the units in the same order first destroys both. This package
finds the permutation of model B's units that best matches model A and applies it (B's function
is unchanged; only the order of its units moves).

>>> from basinmerge.align import align, repair
>>> b_aligned = align(model_a, model_b, method="weight")              # data-free
>>> b_aligned = align(model_a, model_b, method="activation", data=train)
>>> merged = with_state(model_a, lerp(model_a.state_dict(), b_aligned.state_dict(), 0.5))
>>> merged = repair(model_a, b_aligned, merged, train, alpha=0.5)      # REPAIR / BN reset

Building blocks: `PermutationSpec` (`builtin_spec`, `spec_for`), `apply_permutation`,
`weight_matching`, `activation_matching`, `ste_matching`, `merge_many`, `Repair` / `repair`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from basinmerge.align.matching import (
    ACTIVATION_METHODS,
    MatchingTrace,
    STETrace,
    activation_matching,
    merge_many,
    midpoint_loss,
    model_inputs,
    objective,
    ste_matching,
    weight_matching,
    weight_matching_reference,
)
from basinmerge.align.permute import (
    Perm,
    apply_permutation,
    check_permutation,
    compose,
    identity_permutation,
    inverse_permutation,
    is_identity,
    random_permutation,
)
from basinmerge.align.repair import Repair, RepairPoint, repair, repair_points, reset_bn_stats
from basinmerge.align.spec import (
    PermutationSpec,
    builtin_spec,
    has_builtin_spec,
    parameter_keys,
    resolve_spec,
    spec_for,
    trace_units,
)
from basinmerge.align.transformer import (
    check_same_structure,
    is_transformer,
    transformer_spec,
)
from basinmerge.align.transformer_matching import two_level_assignment
from basinmerge.errors import ConfigError
from basinmerge.state import as_state_dict, check_compatible

INITS = ("identity", "activation")

__all__ = [
    "METHODS", "ACTIVATION_METHODS", "PermutationSpec", "Perm", "MatchingTrace", "STETrace",
    "Repair", "RepairPoint", "align", "find_permutation", "apply_permutation",
    "activation_matching", "builtin_spec", "check_permutation", "compose", "has_builtin_spec",
    "identity_permutation", "inverse_permutation", "is_identity", "merge_many", "midpoint_loss",
    "model_inputs", "objective", "parameter_keys", "random_permutation", "repair",
    "repair_points", "reset_bn_stats", "resolve_spec", "spec_for", "ste_matching", "trace_units",
    "weight_matching", "weight_matching_reference", "INITS", "check_same_structure",
    "is_transformer", "transformer_spec", "two_level_assignment",
]


@dataclass(frozen=True)
class _Options:
    """The matching options of `find_permutation` (those a method does not use are ignored)."""

    seed: int = 0
    max_iter: int = 100
    activation_method: str = "corr"
    num_examples: int | None = 2000
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 128
    init: str = "identity"
    restarts: int = 0


def find_permutation(model_a: nn.Module, model_b: nn.Module, method: str = "weight", data=None, *,
                     spec: PermutationSpec | None = None, seed: int = 0, max_iter: int = 100,
                     activation_method: str = "corr", num_examples: int | None = 2000,
                     steps: int = 100, lr: float = 1e-3, batch_size: int = 128,
                     init: str = "identity", restarts: int = 0
                     ) -> tuple[Perm, PermutationSpec, dict]:
    """The permutation of B's units that aligns B to A, its spec, and what the method reported.

    method ``weight`` needs no data; ``activation`` needs inputs, ``ste`` labelled data
    (a Dataset or (x, y)). The spec is the hand-written one for library models, the
    transformer spec for transformers (checked to have the same heads in B), else traced
    (which needs `data` for an example input), unless given. Data for transformers may be a
    dict of named input tensors (``input_ids``, ``attention_mask``).

    Weight matching options: ``init="activation"`` starts it from activation matching (needs
    `data`); ``restarts=r`` also runs it from r random permutations and keeps the run with the
    highest objective (the report lists every run's final objective)."""
    options = _Options(seed=seed, max_iter=max_iter, activation_method=activation_method,
                       num_examples=num_examples, steps=steps, lr=lr, batch_size=batch_size,
                       init=init, restarts=restarts)
    _check_request(model_a, model_b, method, data, options)
    spec = _pair_spec(model_a, model_b, _example(data), spec)
    perm, info = _MATCHERS[method](model_a, model_b, data, spec, options)
    return perm, spec, info


def _check_request(model_a: nn.Module, model_b: nn.Module, method: str, data,
                   o: _Options) -> None:
    """Every check of `find_permutation` that needs no spec, in the order the errors come."""
    if method not in METHODS:
        raise ConfigError(f"unknown alignment method '{method}'; choose one of {', '.join(METHODS)}")
    if o.init not in INITS:
        raise ConfigError(f"unknown weight matching init '{o.init}'; choose one of {', '.join(INITS)}")
    if o.restarts < 0:
        raise ConfigError(f"restarts must be >= 0, got {o.restarts}")
    check_compatible([as_state_dict(model_a), as_state_dict(model_b)], ["model A", "model B"])
    if (method != "weight" or o.init == "activation") and data is None:
        what = f"alignment method '{method}'" if method != "weight" else "init='activation'"
        raise ConfigError(f"{what} needs data (e.g. the training split)")


def _pair_spec(model_a: nn.Module, model_b: nn.Module, example,
               spec: PermutationSpec | None) -> PermutationSpec:
    """The spec of A (`spec` if given); a structured (transformer) spec that was not given is
    checked against B's (the same heads)."""
    given = spec is not None
    spec = resolve_spec(model_a, example, spec)
    if spec.structured and not given:
        check_same_structure(spec, resolve_spec(model_b, example))
    return spec


def _weight(model_a: nn.Module, model_b: nn.Module, data, spec: PermutationSpec,
            o: _Options) -> tuple[Perm, dict]:
    """Weight matching (from the identity or activation matching), plus `o.restarts` runs from
    random permutations; the run with the highest objective wins."""
    pa = {k: v.detach() for k, v in model_a.named_parameters()}
    pb = {k: v.detach() for k, v in model_b.named_parameters()}
    init_perm = None
    if o.init == "activation":
        init_perm = activation_matching(model_a, model_b, data, o.activation_method, spec=spec,
                                        num_examples=o.num_examples)
    perm, trace = weight_matching(spec, pa, pb, max_iter=o.max_iter, seed=o.seed,
                                  init_perm=init_perm)
    finals = [trace.objective[-1]]
    for r in range(1, o.restarts + 1):
        p_r, t_r = weight_matching(spec, pa, pb, max_iter=o.max_iter, seed=o.seed + r,
                                   init_perm=random_permutation(spec, o.seed + r))
        finals.append(t_r.objective[-1])
        if t_r.objective[-1] > trace.objective[-1]:
            perm, trace = p_r, t_r
    info = {"method": "weight", "init": o.init, **trace.to_dict()}
    if o.restarts:
        info.update(restart_objectives=finals, restart=int(np.argmax(finals)))
    return perm, info


def _activation(model_a: nn.Module, model_b: nn.Module, data, spec: PermutationSpec,
                o: _Options) -> tuple[Perm, dict]:
    perm = activation_matching(model_a, model_b, data, o.activation_method, spec=spec,
                               num_examples=o.num_examples)
    return perm, {"method": "activation", "statistic": o.activation_method}


def _ste(model_a: nn.Module, model_b: nn.Module, data, spec: PermutationSpec,
         o: _Options) -> tuple[Perm, dict]:
    if spec.structured:
        raise ConfigError("alignment method 'ste' does not support transformers yet; use "
                          "'weight' or 'activation'")
    perm, trace = ste_matching(model_a, model_b, data, steps=o.steps, lr=o.lr, spec=spec,
                               batch_size=o.batch_size, seed=o.seed, max_iter=o.max_iter)
    return perm, {"method": "ste", **trace.to_dict()}


_Matcher = Callable[[nn.Module, nn.Module, Any, PermutationSpec, _Options], tuple[Perm, dict]]
_MATCHERS: dict[str, _Matcher] = {"weight": _weight, "activation": _activation, "ste": _ste}
METHODS = tuple(_MATCHERS)  # the alignment methods, in --help order


def _example(data):
    """Two examples of `data` (for building or tracing a spec), or None."""
    if data is None:
        return None
    if isinstance(data, Mapping):
        return {k: v[:2] for k, v in data.items()}
    return model_inputs(data, 2)


def permuted_copy(model: nn.Module, spec: PermutationSpec, perm: Perm) -> nn.Module:
    """A copy of `model` (config included) with `perm` applied to its state."""
    out = copy.deepcopy(model)
    out.load_state_dict(apply_permutation(spec, perm, as_state_dict(model)))
    return out


def align(model_a: nn.Module, model_b: nn.Module, method: str = "weight", data=None,
          **options) -> nn.Module:
    """An aligned copy of `model_b`: its hidden units permuted to match `model_a`'s (the same
    function as `model_b`; parameters and BatchNorm statistics all follow their units).

    method: ``weight`` (data-free), ``activation`` (needs `data`), ``ste`` (needs labelled
    `data`). `options` go to `find_permutation` (spec, seed, max_iter, activation_method,
    num_examples, steps, lr, batch_size). The result carries ``alignment`` (method, details)."""
    perm, spec, info = find_permutation(model_a, model_b, method, data, **options)
    out = permuted_copy(model_b, spec, perm)
    # nn.Module's stubs type attributes as Tensor | Module; any value can be set.
    out.alignment = {k: v for k, v in info.items()  # type: ignore[assignment]
                     if not isinstance(v, torch.Tensor)}
    return out


__all__ += ["permuted_copy"]
