"""Matching on transformer specs: head-structured and derived permutations (REFERENCE §8).

A spec with ``heads`` / ``derived`` (see `PermutationSpec`) cannot be matched with one LAP per
permutation: an attention module's ``qk`` and ``vo`` permutations must move whole heads, the
same way. Both matchers here solve that sub-problem exactly, in two levels: for every pair
(head h of A, head g of B) one LAP per permutation on the d x d block of its cost matrix
matches the dims inside the heads; the heads are then matched by one LAP on the summed optima.
Given the other permutations, this is the exact optimum of ``Σ ⟨·,·⟩`` (weight matching) or of
the summed correlations (activation matching) over head-structured permutations.

- `structured_weight_matching`: coordinate ascent as in `weight_matching` (it is what
  `weight_matching` runs for such specs): fused tensors are split into one virtual key per
  segment of their derived axis, plain permutations take the usual LAP step, every attention
  module one two-level step. Optional random restarts or a start from activation matching
  (`init_perm`).
- `structured_activation_matching`: correlations of the units over data; the residual stream
  observed where layers read it, MLP and head hidden units at their layer's output (before
  the activation, so no unit is dead), Q/K and V units at the projections' outputs (the slices of a fused projection; computed from the input for
  ``nn.MultiheadAttention``). Padding positions (``attention_mask == 0``) are not samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from basinmerge.adapter import forward_hooks
from basinmerge.align.matching import (
    ACCEPT_TOL,
    ACTIVATION_METHODS,
    MatchingTrace,
    _lap,
    _matched_params,
    _Moments,
    _WeightMatcher,
    coordinate_ascent,
    objective,
)
from basinmerge.align.permute import (
    Perm,
    check_permutation,
    check_state,
    fill_derived,
    identity_permutation,
)
from basinmerge.align.spec import Axis, PermutationSpec
from basinmerge.align.transformer import forward, is_conv1d, move_batch, no_fastpath
from basinmerge.errors import ConfigError
from basinmerge.state import as_state_dict, check_compatible, module_mode

# --------------------------------------------------------------------------- two-level LAP



def _lsa(cost, maximize: bool = True):
    """scipy's LAP, imported on first use (importing scipy costs `basinmerge --help` time)."""
    from scipy.optimize import linear_sum_assignment

    return linear_sum_assignment(cost, maximize=maximize)

def two_level_assignment(costs: Sequence[torch.Tensor], d: int
                         ) -> tuple[list[torch.Tensor], float, float]:
    """Head-structured assignment maximizing ``Σ_c Σ_i costs[c][i, σ_c(i)]`` where every σ_c
    moves whole heads of d units, all the same way.

    Returns the σ_c (index vectors: unit i of the result is unit σ_c[i] of the current order),
    the total gain over the identity, and the sum of the magnitudes involved (a rounding
    scale)."""
    mats = [c.detach().to("cpu", torch.float64).numpy() for c in costs]
    n = mats[0].shape[0]
    h = n // d
    score = np.zeros((h, h))
    inner: list[dict[tuple[int, int], np.ndarray]] = []
    for m in mats:
        blocks = m.reshape(h, d, h, d).transpose(0, 2, 1, 3)
        found = {}
        for i in range(h):
            for j in range(h):
                _, cols = _lsa(blocks[i, j], maximize=True)
                score[i, j] += blocks[i, j][np.arange(d), cols].sum()
                found[(i, j)] = cols
        inner.append(found)
    _, heads = _lsa(score, maximize=True)
    sigmas = []
    for found in inner:
        sigmas.append(torch.as_tensor(np.concatenate([heads[i] * d + found[(i, heads[i])]
                                                      for i in range(h)]), dtype=torch.long))
    gain = float(score[np.arange(h), heads].sum() - sum(np.trace(m) for m in mats))
    scale = float(sum(np.abs(np.diag(m)).sum() + np.abs(m[np.arange(n), s.numpy()]).sum()
                      for m, s in zip(mats, sigmas, strict=True)))
    return sigmas, gain, scale


def head_groups(spec: PermutationSpec, perms: Sequence[str]) -> dict[str, list[str]]:
    """{attention group: its head-structured permutations among `perms`}."""
    groups: dict[str, list[str]] = {}
    for p in perms:
        if p in spec.heads:
            groups.setdefault(spec.heads[p][0], []).append(p)
    return groups


# --------------------------------------------------------------------------- derived axes


@dataclass(frozen=True)
class SplitView:
    """A spec without derived permutations: every key whose axis carries a derived permutation
    is split along it into one virtual key per source (``key@i``)."""

    spec: PermutationSpec
    pieces: dict[str, tuple[int, list[tuple[str, int, int]]]]  # key -> (axis, [(key@i, lo, hi)])

    def split(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in params.items():
            if k not in self.pieces:
                out[k] = v
                continue
            axis, segments = self.pieces[k]
            for name, lo, hi in segments:
                out[name] = v.narrow(axis, lo, hi - lo)
        return out


def split_view(spec: PermutationSpec) -> SplitView:
    if not spec.derived:
        return SplitView(spec, {})
    pieces: dict[str, tuple[int, list[tuple[str, int, int]]]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    axes_to_perm: dict[str, tuple[str | None, ...]] = {}
    rename: dict[str, list[str]] = {}
    for k, s in spec.shapes.items():
        tags = spec.axes_to_perm[k]
        hits = [a for a, p in enumerate(tags) if p in spec.derived]
        if len(hits) > 1:
            raise ConfigError(f"key '{k}' has derived permutations on two axes (unsupported)")
        if not hits:
            shapes[k], axes_to_perm[k], rename[k] = s, tags, [k]
            continue
        a = hits[0]
        lo, segs = 0, []
        derived = tags[a]
        assert derived is not None  # hits only holds axes tagged with a derived permutation
        for i, q in enumerate(spec.derived[derived]):
            name, hi = f"{k}@{i}", lo + spec.sizes[q]
            segs.append((name, lo, hi))
            shapes[name] = s[:a] + (spec.sizes[q],) + s[a + 1:]
            axes_to_perm[name] = tags[:a] + (q,) + tags[a + 1:]
            lo = hi
        pieces[k] = (a, segs)
        rename[k] = [n for n, _, _ in segs]
    perm_to_axes: dict[str, list[Axis]] = {p: [] for p in spec.free_perms}
    blocks: dict[Axis, int] = {}
    for k, names in rename.items():
        for name in names:
            for a, p in enumerate(axes_to_perm[name]):
                if p is not None:
                    perm_to_axes[p].append((name, a))
                    if spec.block(k, a) != 1:
                        blocks[(name, a)] = spec.block(k, a)
    plain = PermutationSpec(perm_to_axes, axes_to_perm, {p: spec.sizes[p] for p in perm_to_axes},
                            blocks, shapes, dict(spec.heads), {})
    return SplitView(plain, pieces)


# --------------------------------------------------------------------------- weight matching


def _head_step(matcher: _WeightMatcher, perms: list[str], d: int, trace: MatchingTrace
               ) -> float | None:
    """One two-level step for the head-structured permutations of one attention module."""
    if not any(p in matcher.dirty for p in perms):
        trace.skipped += 1
        return None
    if any(p in matcher.coupled for p in perms):
        raise ConfigError(f"permutation '{perms[0]}' acts on two axes of one key (unsupported)")
    t0 = time.perf_counter()
    costs = [matcher.cost(p) for p in perms]
    t1 = time.perf_counter()
    sigmas, gain, scale = two_level_assignment(costs, d)
    t2 = time.perf_counter()
    trace.cost_seconds += t1 - t0
    trace.lap_seconds += t2 - t1
    trace.laps += len(perms)
    trace.cost_flops += sum(2.0 * c.shape[0] ** 2 * matcher.columns(p)
                            for p, c in zip(perms, costs, strict=True))
    for p in perms:
        matcher.dirty.discard(p)
    if gain <= max(ACCEPT_TOL, 1e-6 * scale):
        return None
    t_cost = 0.0
    for p, sigma in zip(perms, sigmas, strict=True):
        rows = torch.nonzero(sigma != torch.arange(len(sigma))).reshape(-1)
        if not len(rows):
            continue
        device = costs[0].device
        # Only the moved units' slices are rewritten; cached cost matrices follow.
        t_cost += matcher.accept(p, sigma.to(device), rows.to(device))
    trace.cost_seconds += t_cost
    trace.update_seconds += time.perf_counter() - t2 - t_cost
    return gain


def _run(spec: PermutationSpec, view: SplitView, pa, pb, keys, perm: Perm, max_iter: int,
         seed: int, dtype, overlap: bool | None) -> tuple[Perm, MatchingTrace]:
    t_start = time.perf_counter()
    trace = MatchingTrace()
    free = {p: perm[p] for p in view.spec.sizes}
    with torch.no_grad():
        matcher = _WeightMatcher(view.spec, pa, pb, keys, free, dtype)
        fixed = [k for k in keys if k not in matcher.by_key]
        total = objective(pa, pb, fixed) + matcher.objective()
        trace.objective.append(total)
        trace.setup_seconds = time.perf_counter() - t_start
        groups = head_groups(view.spec, matcher.active)
        plain = [p for p in matcher.active if p not in view.spec.heads]
        steps: list[Callable[[MatchingTrace], float | None]] = [
            partial(matcher.step, p) for p in plain]
        steps += [partial(_head_step, matcher, ps, view.spec.heads[ps[0]][1])
                  for ps in groups.values()]
        step_perms = [[p] for p in plain] + list(groups.values())
        coordinate_ascent(steps, total, trace, max_iter, seed,
                          matcher.prefetcher(step_perms, overlap))
    out = {p: perm[p] for p in spec.free_perms}
    out.update(matcher.perm)
    trace.seconds = time.perf_counter() - t_start
    return fill_derived(spec, out), trace


def structured_weight_matching(spec: PermutationSpec, params_a: Mapping[str, torch.Tensor],
                               params_b: Mapping[str, torch.Tensor], max_iter: int = 100,
                               seed: int = 0, init_perm: Mapping[str, torch.Tensor] | None = None,
                               dtype: torch.dtype = torch.float32, overlap: bool | None = None
                               ) -> tuple[Perm, MatchingTrace]:
    """Weight matching on a transformer spec (see the module docstring); same contract as
    `weight_matching`, which calls it for such specs."""
    keys = _matched_params(spec, params_a, params_b)
    start = check_permutation(spec, init_perm) if init_perm is not None else identity_permutation(spec)
    view = split_view(spec)
    pa, pb = view.split({k: params_a[k] for k in keys}), view.split({k: params_b[k] for k in keys})
    return _run(spec, view, pa, pb, list(pa), start, max_iter, seed, dtype, overlap)


# --------------------------------------------------------------------------- activation matching


def batches(data: Any, num_examples: int | None, batch_size: int) -> Iterator[Any]:
    """Model inputs from `data` (an input tensor, a dict of named input tensors, an (x, y)
    pair or a Dataset) in batches, at most `num_examples` rows."""
    if isinstance(data, Mapping):
        n = len(next(iter(data.values())))
        n = n if num_examples is None else min(n, num_examples)
        for i in range(0, n, batch_size):
            yield {k: v[i:min(i + batch_size, n)] for k, v in data.items()}
        return
    from basinmerge.align.matching import model_inputs

    x = model_inputs(data, num_examples)
    if isinstance(x, Mapping):
        yield from batches(x, None, batch_size)
        return
    for i in range(0, x.shape[0], batch_size):
        yield x[i:i + batch_size]


Slices = dict[str, list[tuple[int, int]]]


def _readers_writers(modules: Mapping[str, nn.Module], spec: PermutationSpec, p: str
                     ) -> tuple[list[str], list[str]]:
    """The linear layers (``nn.Linear`` or HF ``Conv1D``) that read / write the units of `p`."""
    readers: list[str] = []
    writers: list[str] = []
    for key, axis in spec.perm_to_axes[p]:
        mod, _, leaf = key.rpartition(".")
        m = modules.get(mod)
        if leaf != "weight" or m is None or not (isinstance(m, nn.Linear) or is_conv1d(m)):
            continue
        in_axis = 0 if is_conv1d(m) else 1
        (readers if axis == in_axis else writers).append(mod)
    return readers, writers


def _free_points(modules: Mapping[str, nn.Module], spec: PermutationSpec
                 ) -> dict[tuple[str, str], Slices]:
    """Observation points of the free permutations: units written by one layer (MLP hidden
    units, Q/K/V) at its output (pre-activation: no dead units), the residual stream where
    layers read it."""
    points: dict[tuple[str, str], Slices] = {}
    for p in spec.free_perms:
        readers, writers = _readers_writers(modules, spec, p)
        if p in spec.heads or len(writers) == 1 or not readers:
            if not writers and p not in spec.heads:
                raise ConfigError(f"activation matching: no linear layer reads or writes the "
                                  f"units of permutation '{p}'")
            where, layers = "output", writers
        else:
            where, layers = "input", readers
        for layer in layers:
            points.setdefault((layer, where), {})[p] = [(0, spec.sizes[p])]
    return points


def _fused_points(modules: Mapping[str, nn.Module], spec: PermutationSpec
                  ) -> dict[tuple[str, str], Slices]:
    """Observation points of fused projections (a derived permutation's output axis): each
    source permutation observed on its slices of the output (Q and K both observe ``qk``)."""
    points: dict[tuple[str, str], Slices] = {}
    for q, sources in spec.derived.items():
        found: Slices = {}
        lo = 0
        for src in sources:
            found.setdefault(src, []).append((lo, lo + spec.sizes[src]))
            lo += spec.sizes[src]
        for key, _axis in spec.perm_to_axes[q]:
            mod, _, leaf = key.rpartition(".")
            if leaf not in ("weight", "in_proj_weight"):
                continue
            where = "mha" if isinstance(modules.get(mod), nn.MultiheadAttention) else "output"
            points.setdefault((mod, where), {}).update(found)
    return points


def _points(model: nn.Module, spec: PermutationSpec) -> list[tuple[str, str, Slices]]:
    """Where to observe every free permutation: (module, "input" | "output" | "mha",
    {perm: [(lo, hi) slices of the observed features]}); a fused projection's Q and K slices
    both observe the ``qk`` permutation (their samples are pooled)."""
    modules = dict(model.named_modules())
    points = _free_points(modules, spec)
    for where, found in _fused_points(modules, spec).items():
        points.setdefault(where, {}).update(found)
    missing = [p for p in spec.free_perms if not any(p in f for f in points.values())]
    if missing:
        raise ConfigError(f"activation matching: permutation '{missing[0]}' cannot be observed")
    return [(m, w, f) for (m, w), f in points.items()]


class _Capture:
    """Hooks (`hooks`, for `adapter.forward_hooks`) collecting (samples, units) activations
    per permutation in one forward pass."""

    def __init__(self, model: nn.Module, points) -> None:
        self.data: dict[str, list[torch.Tensor]] = {}
        self.mask: torch.Tensor | None = None
        self.seen: list[torch.Tensor] = []
        self.hooks: list[tuple[nn.Module, Any, str]] = []
        modules = dict(model.named_modules())
        for name, where, found in points:
            m = modules[name]
            if where == "input":
                self.hooks.append((m, lambda mod, args, f=found: self._grab(args[0], f, dedup=True),
                                   "pre"))
            elif where == "output":
                self.hooks.append((m, lambda mod, args, out, f=found: self._grab(out, f), "post"))
            else:
                self.hooks.append((m, lambda mod, args, kwargs, f=found: self._grab(
                    F.linear(args[0] if args else kwargs["query"], mod.in_proj_weight,
                             mod.in_proj_bias), f), "pre-kwargs"))

    def _grab(self, t: torch.Tensor, found: Slices, dedup: bool = False) -> None:
        if dedup:  # a tensor read by several layers (Q, K and V) counts once
            if any(t is s for s in self.seen):
                return
            self.seen.append(t)
        t = t.detach()
        if self.mask is not None and t.dim() >= 3 and tuple(t.shape[:2]) == tuple(self.mask.shape):
            t = t[self.mask]
        t = t.reshape(-1, t.shape[-1])
        for p, slices in found.items():
            self.data.setdefault(p, []).extend(t[:, lo:hi] for lo, hi in slices)

    def run(self, model: nn.Module, batch: Any) -> dict[str, list[torch.Tensor]]:
        self.data, self.seen = {}, []
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        self.mask = mask.bool() if mask is not None else None
        forward(model, batch)
        self.seen = []
        return self.data


@torch.no_grad()
def unit_correlations(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec, data,
                      method: str = "corr", num_examples: int | None = 2000,
                      batch_size: int = 64) -> dict[str, torch.Tensor]:
    """{free permutation: (n, n) similarity of A's units (rows) and B's (columns)} over
    `data` (both models in eval mode)."""
    points = _points(model_a, spec)
    cap_a, cap_b = _Capture(model_a, points), _Capture(model_b, points)
    device = next(iter(model_a.parameters())).device
    moments = {p: _Moments(spec.sizes[p], device) for p in spec.free_perms}
    with module_mode(model_a, False), module_mode(model_b, False), no_fastpath(), \
            forward_hooks(cap_a.hooks + cap_b.hooks):
        for batch in batches(data, num_examples, batch_size):
            batch = move_batch(batch, device)
            got_a = cap_a.run(model_a, batch)
            got_b = cap_b.run(model_b, batch)
            for p, acts in got_a.items():
                for a, b in zip(acts, got_b[p], strict=True):
                    moments[p].add(a, b)
    return {p: moments[p].cost(method) for p in spec.free_perms}


def transformer_spec_from_data(model: nn.Module, data) -> PermutationSpec:
    """`transformer_spec` with the first two examples of `data` as the example input."""
    from basinmerge.align.transformer import transformer_spec

    return transformer_spec(model, next(batches(data, 2, 2)))


def assign(spec: PermutationSpec, costs: Mapping[str, torch.Tensor]) -> Perm:
    """The permutation maximizing each cost matrix: one LAP per plain permutation, one
    two-level assignment per attention module; derived permutations filled in."""
    perm: Perm = {}
    groups = head_groups(spec, spec.free_perms)
    for p in spec.free_perms:
        if p not in spec.heads:
            perm[p] = torch.as_tensor(_lap(costs[p]), dtype=torch.long)
    for members in groups.values():
        sigmas, _, _ = two_level_assignment([costs[p] for p in members], spec.heads[members[0]][1])
        perm.update(zip(members, sigmas, strict=True))
    return fill_derived(spec, perm)


def structured_activation_matching(model_a: nn.Module, model_b: nn.Module, data,
                                   method: str = "corr", *, spec: PermutationSpec,
                                   num_examples: int | None = 2000, batch_size: int = 64) -> Perm:
    """Activation matching on a transformer spec (see the module docstring): one pass over
    `data` collects the statistics of every permutation (B permuted by a spec's permutation
    computes the same function, so the order of matching does not change them)."""
    if method not in ACTIVATION_METHODS:
        raise ConfigError(f"unknown activation matching method '{method}'; choose one of "
                          f"{', '.join(ACTIVATION_METHODS)}")
    state_a, state_b = as_state_dict(model_a), as_state_dict(model_b)
    check_compatible([state_a, state_b], ["model A", "model B"])
    check_state(spec, state_a, "model A")
    return assign(spec, unit_correlations(model_a, model_b, spec, data, method, num_examples,
                                          batch_size))


__all__ = ["SplitView", "assign", "batches", "head_groups", "split_view", "transformer_spec_from_data",
           "structured_activation_matching", "structured_weight_matching", "two_level_assignment",
           "unit_correlations"]
