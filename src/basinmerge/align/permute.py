"""Applying permutations to state_dicts.

A permutation assignment ``perm`` maps each permutation name of a spec to an index vector (a
``LongTensor`` of its size). Applying it takes ``index_select(w, axis, perm[p])`` on every axis
tagged with ``p``: unit ``i`` of the result is unit ``perm[p][i]`` of the input, as in the
official Git Re-Basin code. Model A is never changed; B is permuted toward A.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from basinmerge.align.spec import PermutationSpec
from basinmerge.errors import ConfigError, IncompatibleModelsError
from basinmerge.state import StateDict

Perm = dict[str, torch.Tensor]


def identity_permutation(spec: PermutationSpec) -> Perm:
    return {p: torch.arange(n) for p, n in spec.sizes.items()}


def random_permutation(spec: PermutationSpec, seed: int = 0) -> Perm:
    """A uniformly random permutation for every permutation of the spec (deterministic in seed).

    Head-structured permutations (``spec.heads``) get one random order of the heads per group
    and a random order of the units inside every head; derived ones follow their sources."""
    g = torch.Generator().manual_seed(int(seed))
    if not spec.structured:
        return {p: torch.randperm(n, generator=g) for p, n in spec.sizes.items()}
    head_orders: dict[str, torch.Tensor] = {}
    out: Perm = {}
    for p in spec.free_perms:
        n = spec.sizes[p]
        if p not in spec.heads:
            out[p] = torch.randperm(n, generator=g)
            continue
        group, d = spec.heads[p]
        if group not in head_orders:
            head_orders[group] = torch.randperm(n // d, generator=g)
        out[p] = head_structured(head_orders[group],
                                 [torch.randperm(d, generator=g) for _ in range(n // d)])
    fill_derived(spec, out)
    return out


def head_structured(head_order: torch.Tensor, within: list[torch.Tensor]) -> torch.Tensor:
    """The index vector that puts head ``head_order[h]`` in head slot h, its units in the order
    ``within[h]`` (d units per head)."""
    d = len(within[0]) if within else 1
    return torch.cat([int(g) * d + w for g, w in zip(head_order, within, strict=True)])


def head_order_of(v: torch.Tensor, d: int) -> torch.Tensor | None:
    """Which head each head slot of index vector `v` takes, or None if `v` splits a head."""
    rows = v.reshape(-1, d) // d
    heads = rows[:, 0]
    return heads if bool((rows == heads[:, None]).all()) else None


def fill_derived(spec: PermutationSpec, perm: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Set every derived permutation of `perm` from its sources (in place; returned)."""
    for p, sources in spec.derived.items():
        parts, offset = [], 0
        for q in sources:
            parts.append(perm[q] + offset)
            offset += spec.sizes[q]
        perm[p] = torch.cat(parts)
    return perm


def inverse_permutation(perm: Mapping[str, torch.Tensor]) -> Perm:
    """The permutation that undoes `perm`: applying both (in either order) changes nothing."""
    return {p: torch.argsort(v) for p, v in perm.items()}


def compose(first: Mapping[str, torch.Tensor], then: Mapping[str, torch.Tensor]) -> Perm:
    """The permutation equal to applying `first`, then `then`."""
    return {p: first[p][then[p]] for p in first}


def is_identity(perm: Mapping[str, torch.Tensor]) -> bool:
    return all(bool((v == torch.arange(len(v))).all()) for v in perm.values())


def check_permutation(spec: PermutationSpec, perm: Mapping[str, torch.Tensor]) -> Perm:
    """Validate `perm` against `spec` (names, sizes, bijectivity; whole heads moving together
    for head-structured permutations); returns it as LongTensors, derived permutations filled
    in (a given one must agree with its sources)."""
    missing = [p for p in spec.sizes if p not in perm and p not in spec.derived]
    extra = [p for p in perm if p not in spec.sizes]
    if missing or extra:
        what = f"lacks '{missing[0]}'" if missing else f"has unknown '{extra[0]}'"
        raise ConfigError(f"permutation does not fit the spec: it {what}")
    out: Perm = {}
    for p in spec.free_perms:
        n = spec.sizes[p]
        v = torch.as_tensor(perm[p], dtype=torch.long).reshape(-1).cpu()
        if v.numel() != n or not bool((torch.sort(v).values == torch.arange(n)).all()):
            raise ConfigError(f"permutation '{p}' is not a permutation of {n} units")
        out[p] = v
    groups: dict[str, tuple[str, torch.Tensor]] = {}
    for p, (group, d) in spec.heads.items():
        order = head_order_of(out[p], d)
        if order is None:
            raise ConfigError(f"permutation '{p}' splits an attention head (heads of {d} units "
                              "must move whole)")
        if group in groups and not torch.equal(groups[group][1], order):
            raise ConfigError(f"permutations '{groups[group][0]}' and '{p}' move the heads of "
                              f"'{group}' differently")
        groups.setdefault(group, (p, order))
    fill_derived(spec, out)
    for p in spec.derived:
        if p in perm and not torch.equal(torch.as_tensor(perm[p], dtype=torch.long).reshape(-1).cpu(),
                                         out[p]):
            raise ConfigError(f"permutation '{p}' disagrees with its sources "
                              f"{', '.join(spec.derived[p])}")
    return out


def axis_index(perm_p: torch.Tensor, block: int) -> torch.Tensor:
    """The index along an axis of ``len(perm_p) * block`` entries (contiguous blocks per unit)."""
    if block == 1:
        return perm_p
    return (perm_p[:, None] * block + torch.arange(block)).reshape(-1)


def permute_tensor(spec: PermutationSpec, perm: Mapping[str, torch.Tensor], key: str,
                   w: torch.Tensor, except_axis: int | None = None) -> torch.Tensor:
    """`w` (the tensor stored under `key`) with every permuted axis except `except_axis`
    gathered."""
    for axis, p in enumerate(spec.axes_to_perm.get(key, ())):
        if p is None or axis == except_axis:
            continue
        w = torch.index_select(w, axis, axis_index(perm[p], spec.block(key, axis)).to(w.device))
    return w


def check_state(spec: PermutationSpec, state: Mapping[str, torch.Tensor], name: str = "model",
                complete: bool = True) -> None:
    """Raise one clear error when `state` does not have the keys and shapes `spec` was built for
    (with ``complete=False`` a subset of the keys, e.g. the parameters only, is fine)."""
    problems = [f"lacks key '{k}'" for k in spec.shapes if k not in state] if complete else []
    problems += [f"has key '{k}', which the spec does not know" for k in state if k not in spec.shapes]
    problems += [f"key '{k}' has shape {tuple(state[k].shape)}, the spec expects {s}"
                 for k, s in spec.shapes.items() if k in state and tuple(state[k].shape) != s]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise IncompatibleModelsError(f"{name} does not fit the permutation spec: "
                                      + "; ".join(problems[:3]) + more)


def apply_permutation(spec: PermutationSpec, perm: Mapping[str, torch.Tensor],
                      state: Mapping[str, torch.Tensor]) -> StateDict:
    """A new state_dict: `state` with `perm` applied to every axis the spec tags.

    `state` may hold a subset of the spec's keys (e.g. only the parameters); a key the spec
    does not know is an error (the spec belongs to another model). Permuted tensors are new tensors, the
    others are shared with `state`."""
    check_state(spec, state, complete=False)
    perm = check_permutation(spec, perm)
    return {k: (permute_tensor(spec, perm, k, v) if any(spec.axes_to_perm.get(k, ())) else v)
            for k, v in state.items()}
