"""Finding the permutation that aligns model B to model A (Git Re-Basin, shared/REFERENCE.md §2).

- `weight_matching`: data-free coordinate ascent on ``Σ ⟨W_A, π(W_B)⟩`` with one linear
  assignment problem (LAP) per permutation and sweep.
- `activation_matching`: one LAP per permutation on the cross-correlation (or the raw second
  moment, ``ols``) of the two models' hidden units over data.
- `ste_matching`: the straight-through estimator: learn ``Θ̃_B`` so that the midpoint of A and
  the weight-matched projection of B has a low loss.
- `merge_many`: MergeMany for more than two models.

`weight_matching_reference` is the official loop written plainly (per-key gathering, float64
products); it is the benchmark's baseline and the tests' oracle.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from basinmerge import adapter
from basinmerge.align.permute import (
    Perm,
    apply_permutation,
    check_permutation,
    check_state,
    identity_permutation,
    permute_tensor,
)
from basinmerge.align.spec import Axis, PermutationSpec, parameter_keys, resolve_spec
from basinmerge.errors import ConfigError
from basinmerge.state import (
    StateDict,
    as_state_dict,
    check_compatible,
    lerp,
    module_mode,
    weighted_average,
)
from basinmerge.train import evaluate, has_batchnorm, reset_bn_stats

ACCEPT_TOL = 1e-12
_REFRESH = 32  # low-rank updates of a cached cost matrix before it is recomputed in full

# --------------------------------------------------------------------------- shared helpers


def model_inputs(data, num_examples: int | None = None) -> adapter.Inputs:
    """The inputs of `data` (any form `basinmerge.adapter.as_data` accepts: a tensor or a dict
    batch), optionally the first `num_examples` rows."""
    return adapter.as_data(data, "alignment data", limit=num_examples).inputs


def _matched_params(spec: PermutationSpec, params_a: Mapping[str, torch.Tensor],
                    params_b: Mapping[str, torch.Tensor]) -> list[str]:
    """Validate two parameter dicts against each other and the spec; the keys to match on."""
    check_compatible([params_a, params_b], ["model A", "model B"])
    check_state(spec, params_a, "model A", complete=False)
    return [k for k, v in params_a.items() if v.is_floating_point()]


def _expanded(shape: Sequence[int], spec: PermutationSpec, key: str
              ) -> tuple[list[int], dict[int, int]]:
    """`shape` with blocked axes (a flattened conv output) split into (units, block), and the
    dimension each axis's units occupy in it."""
    expanded: list[int] = []
    unit_pos: dict[int, int] = {}
    for a, d in enumerate(shape):
        b = spec.block(key, a)
        unit_pos[a] = len(expanded)
        expanded += [d // b, b] if b != 1 else [d]
    return expanded, unit_pos


def _unit_layout(shape: Sequence[int], spec: PermutationSpec, key: str, axis: int):
    """How to view a tensor of `shape` as a (units, rest) matrix for `axis`.

    Blocked axes (a flattened conv output) are split into (units, block) first. Returns the
    expanded shape, the position the units of `axis` have in it, and, for every tagged axis of
    the key, the dimension its units occupy after moving `axis`'s units to the front."""
    expanded, unit_pos = _expanded(shape, spec, key)
    src = unit_pos[axis]
    moved_dim = {a: 0 if j == src else (j + 1 if j < src else j) for a, j in unit_pos.items()}
    return expanded, src, moved_dim


def _unit_major(w: torch.Tensor, spec: PermutationSpec, key: str, axis: int) -> torch.Tensor:
    """`w` with the units of `axis` moved to the front (blocks kept with their unit): a view."""
    expanded, src, _ = _unit_layout(w.shape, spec, key, axis)
    return w.reshape(expanded).movedim(src, 0)


def unit_matrix(w: torch.Tensor, spec: PermutationSpec, key: str, axis: int) -> torch.Tensor:
    """`w` as a (units of `axis`, everything else) matrix (blocks kept with their unit)."""
    moved = _unit_major(w, spec, key, axis)
    return moved.reshape(moved.shape[0], -1)


def objective(params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor],
              keys: Sequence[str] | None = None) -> float:
    """``Σ_k ⟨A_k, B_k⟩`` in float64: the quantity weight matching maximizes over π(B)."""
    keys = list(params_a) if keys is None else keys
    return float(sum(dot64(params_a[k], params_b[k]) for k in keys
                     if params_a[k].is_floating_point()))


@dataclass
class MatchingTrace:
    """What a weight matching run did. ``objective[0]`` is the objective at the initial
    permutation (exact, float64), ``objective[i]`` after sweep i: the initial value plus the
    accepted gains as measured (each within a proven rounding bound of the exact change, which
    is itself above the 1e-12 tolerance); it never decreases."""

    objective: list[float] = field(default_factory=list)
    sweeps: int = 0
    accepted: int = 0
    skipped: int = 0  # LAPs skipped because their cost matrix had not changed
    converged: bool = False
    seconds: float = 0.0
    setup_seconds: float = 0.0
    cost_seconds: float = 0.0  # cost-matrix products on the loop's own thread
    # Products computed ahead by the prefetch thread while the previous step ran (its LAP,
    # mostly), and the time the loop then waited for them (`coordinate_ascent`).
    prefetch_seconds: float = 0.0
    wait_seconds: float = 0.0
    queued: int = 0  # work items (partial products) queued ahead of their step
    prefetched: int = 0  # of which the prefetch thread did (the loop's thread took the rest)
    lap_seconds: float = 0.0
    update_seconds: float = 0.0
    laps: int = 0  # LAPs solved
    # FLOPs of one full cost-matrix product (2 n² m) for every LAP solved: with the LAP time,
    # the floor of a loop that must build each cost matrix it solves.
    cost_flops: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _lap(cost: torch.Tensor) -> np.ndarray:
    """Column assignment maximizing the total of `cost` (rows are already 0..n-1). SciPy works
    in float64; handing it float64 saves its own (slower) conversion. SciPy is imported here,
    not at module level, so that importing basinmerge (and the CLI) does not pay for it."""
    from scipy.optimize import linear_sum_assignment

    _, cols = linear_sum_assignment(cost.detach().to("cpu", torch.float64).numpy(), maximize=True)
    return cols


# --------------------------------------------------------------------------- weight matching


def _units_of(t: torch.Tensor, dim: int) -> torch.Tensor:
    """`t` (a tensor in its expanded layout, `_expanded`) as a (units, rest) matrix with the
    units of dimension `dim` as rows: a view where the strides allow (a 2-D weight from either
    side: the matrix product reads the transposed view in place), else a copy."""
    return t.movedim(dim, 0).reshape(t.shape[dim], -1)


def _row_norms(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The norms of the units of dimension `dim` of `t` (the rows of `_units_of(t, dim)`),
    reduced in place (no copy of a transposed layout)."""
    others = [j for j in range(t.dim()) if j != dim]
    return torch.linalg.vector_norm(t, dim=others) if others else t.abs()


def dot64(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 18) -> float:
    """``Σ a·b`` with float64 products and sums, over chunks of about `chunk` elements (no
    float64 copy of whole tensors)."""
    if not a.numel():
        return 0.0
    a2 = a.reshape(a.shape[0], -1) if a.dim() else a.reshape(1, 1)
    b2 = b.reshape(b.shape[0], -1) if b.dim() else b.reshape(1, 1)
    rows = max(1, chunk // max(a2.shape[1], 1))
    total = 0.0
    for i in range(0, a2.shape[0], rows):
        x, y = a2[i:i + rows].double().reshape(-1), b2[i:i + rows].double().reshape(-1)
        total += float(torch.dot(x, y))
    return total


class _Group:
    """Members of one permutation whose tensors carry the same other permutations: their share
    of its cost matrix (a partial product) goes stale together."""

    __slots__ = ("others", "members", "columns", "partial", "updates", "pending")

    def __init__(self, others: tuple[str, ...]) -> None:
        self.others = frozenset(others)  # the other permutations its tensors carry
        self.members: list[Axis] = []
        self.columns = 0  # Σ numel / n over the members: the products' inner length
        self.partial: torch.Tensor | None = None
        self.updates = 0  # low-rank corrections since `partial` was last computed in full
        # Column order owed to `partial` by accepted σ of its own permutation (gathered only
        # if the partial is used again before it goes stale).
        self.pending: torch.Tensor | None = None

    def current(self) -> torch.Tensor | None:
        """The partial product in the current coordinates of B (None: stale)."""
        if self.partial is not None and self.pending is not None:
            self.partial = self.partial.index_select(1, self.pending)
        self.pending = None
        return self.partial


class _Order:
    """The visiting order of `coordinate_ascent`: a fresh random permutation of the steps per
    sweep (numpy ``default_rng(seed)``), drawn as far ahead as it is read."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.rng = n, np.random.default_rng(seed)
        self.drawn: list[int] = []

    def __getitem__(self, t: int) -> int:
        while len(self.drawn) <= t:
            self.drawn.extend(self.rng.permutation(self.n).tolist())
        return self.drawn[t]


@dataclass(frozen=True)
class Prefetch:
    """What `coordinate_ascent` may compute ahead on a second thread: ``plan(step, running)``
    lists the work items (e.g. partial products) that step `step` will need and that none of
    the steps `running` can change; ``work(item)`` computes one of them in place."""

    plan: Callable[[int, Sequence[int]], list]
    work: Callable[[Any], Any]
    lookahead: int = 3  # steps ahead whose work may be queued


class _Pipeline:
    """A second thread that works through queued items, each tagged with the position (in the
    visiting order) of the step that needs it; `ready(t)` makes sure that everything for step t
    is done, this thread taking what is still queued and then waiting for the rest."""

    def __init__(self, prefetch: Prefetch, order: _Order, last: int, trace: MatchingTrace
                 ) -> None:
        self.prefetch, self.order, self.last = prefetch, order, last
        self.work, self.trace = prefetch.work, trace
        self.queue: deque[tuple[int, Any]] = deque()
        self.busy: dict[int, int] = {}  # position -> items being worked on
        self.cond = threading.Condition()
        self.closed = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="basinmerge-prefetch", daemon=True)
        self.thread.start()

    def before(self, now: int) -> None:
        """Before step `now` (a position in the visiting order) runs: queue what the step
        `lookahead` positions on needs and steps `now`.. before it leave alone (at the start,
        every step up to there), then make sure everything for step `now` is done."""
        ahead = self.prefetch.lookahead
        for t in range(1 if now == 0 else now + ahead, min(now + ahead, self.last) + 1):
            items = self.prefetch.plan(self.order[t], [self.order[r] for r in range(now, t)])
            self.trace.queued += len(items)
            with self.cond:
                self.queue.extend((t, item) for item in items)
                self.cond.notify_all()
        self.ready(now)

    def _take(self, upto: int | None) -> tuple[int, Any] | None:
        """The next queued item (for a step at `upto` or before), marked busy (lock held)."""
        if not self.queue or (upto is not None and self.queue[0][0] > upto):
            return None
        position, item = self.queue.popleft()
        self.busy[position] = self.busy.get(position, 0) + 1
        return position, item

    def _done(self, position: int) -> None:
        with self.cond:
            self.busy[position] -= 1
            if not self.busy[position]:
                del self.busy[position]
            self.cond.notify_all()

    def _loop(self) -> None:
        with torch.no_grad():  # grad mode is per thread
            while True:
                with self.cond:
                    while not self.queue and not self.closed:
                        self.cond.wait()
                    if self.closed:
                        return
                    taken = self._take(None)
                assert taken is not None
                t0 = time.perf_counter()
                try:
                    self.work(taken[1])
                    self.trace.prefetched += 1
                except BaseException as e:  # handed to the loop's thread by `ready`
                    self.error = e
                finally:
                    self.trace.prefetch_seconds += time.perf_counter() - t0
                    self._done(taken[0])

    def ready(self, position: int) -> None:
        t0 = time.perf_counter()
        while True:
            with self.cond:
                taken = self._take(position)
                if taken is None:
                    while any(p <= position for p in self.busy):
                        self.cond.wait()
                    break
            try:
                self.work(taken[1])
            finally:
                self._done(taken[0])
        self.trace.wait_seconds += time.perf_counter() - t0
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Drop what is queued and wait for the item in hand: nothing runs after this."""
        with self.cond:
            self.closed = True
            self.queue.clear()
            self.cond.notify_all()
        self.thread.join()


class _WeightMatcher:
    """Coordinate ascent state: B's tensors under the current permutation, and every
    permutation's cost matrix cached as partial products per group of its tensors.

    Each tensor of B is kept once, in its own (expanded, `_expanded`) layout: a private copy,
    permuted along an axis when that axis's permutation changes. A's tensors are not copied.
    The cost matrix of p in the current coordinates of B is ``Σ_members unit(A_k) @ unit(B_k)ᵀ``
    with p's units as rows (`_units_of`: for a 2-D weight a plain or transposed view, which the
    matrix product reads in place).

    The members of p are grouped by the other permutations their tensors carry, and each
    group's partial product is cached: when q is accepted only the groups holding a tensor of q
    go stale (or take a low-rank correction when q moved few units), and only those are
    recomputed when p is next solved; p's own σ permutes the columns of its partials. A
    permutation whose cost matrix has not changed since it was last solved is skipped (see
    `step`)."""

    def __init__(self, spec: PermutationSpec, params_a, params_b, keys, perm: Perm,
                 dtype: torch.dtype):
        self.spec = spec
        self.perm = {p: v.clone() for p, v in perm.items()}
        keyset = set(keys)
        self.groups: dict[str, list[_Group]] = {}
        self.group_of: dict[Axis, _Group] = {}
        self.by_key: dict[str, list[tuple[str, int]]] = {}  # key -> [(perm, axis)]
        for p, axes in spec.perm_to_axes.items():
            axes = [(k, a) for k, a in axes if k in keyset]
            if axes:
                self.groups[p] = self._group(p, axes, params_a)
                for g in self.groups[p]:
                    self.group_of.update({m: g for m in g.members})
                for k, a in axes:
                    self.by_key.setdefault(k, []).append((p, a))
        self.active = list(self.groups)
        self.members = {p: [m for g in gs for m in g.members] for p, gs in self.groups.items()}
        self.dim: dict[Axis, int] = {}  # (key, axis) -> the dimension of its units, expanded
        start_identity = all(bool((v == torch.arange(len(v))).all()) for v in perm.values())
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        for k, tagged in self.by_key.items():
            expanded, pos = _expanded(params_a[k].shape, spec, k)
            self.dim.update({(k, a): pos[a] for _, a in tagged})
            b = params_b[k] if start_identity else permute_tensor(spec, self.perm, k, params_b[k])
            self.A[k] = params_a[k].to(dtype).reshape(expanded)
            self.B[k] = b.to(dtype).clone(memory_format=torch.contiguous_format).reshape(expanded)
        self._a_units: dict[Axis, torch.Tensor] = {}
        self.coupled = {p for p, mems in self.members.items()
                        if len({k for k, _ in mems}) < len(mems)}
        # p's cost matrix changes only when a permutation sharing a key with p is accepted.
        self.neighbours = {p: {q for k, _ in mems for q, _ in self.by_key[k]} - {p}
                           for p, mems in self.members.items()}
        self.dirty = set(self.active)
        self.M: dict[str, torch.Tensor | None] = {}
        # Row norms bound the rounding error of cost matrix entries (`_gain`); B's row norms only
        # move with p's own σ (neighbours permute entries within rows). Inflated by 0.1%.
        self.a_norm = {p: self._row_norms(p, self.A) for p in self.active}
        self.b_norm = {p: self._row_norms(p, self.B) for p in self.active}

    def _group(self, p: str, axes: list[Axis], params_a) -> list[_Group]:
        """p's members grouped by the other permutations their tensors carry. Members with no
        other permutation (biases, LayerNorms, embeddings) never go stale: they form a group of
        their own when that saves work (at least n columns), else join the first group."""
        found: dict[tuple[str, ...], _Group] = {}
        for k, a in axes:
            others = tuple(sorted({q for q in self.spec.axes_to_perm[k] if q} - {p}))
            g = found.setdefault(others, _Group(others))
            g.members.append((k, a))
            g.columns += params_a[k].numel() // self.spec.sizes[p]
        fixed = found.get(())
        if fixed is not None and len(found) > 1 and fixed.columns < self.spec.sizes[p]:
            del found[()]
            first = next(iter(found.values()))
            first.members += fixed.members
            first.columns += fixed.columns
        return list(found.values())

    def _row_norms(self, p: str, side: Mapping[str, torch.Tensor]) -> np.ndarray:
        sq = sum(_row_norms(side[k], self.dim[(k, a)]).double() ** 2 for k, a in self.members[p])
        return torch.as_tensor(sq).sqrt().cpu().numpy() * 1.001

    def objective(self, keys=None) -> float:
        """Σ ⟨A_k, π(B)_k⟩ over `keys` (default: every key that carries a permutation), with
        float64 products and sums."""
        return sum(dot64(self.A[k], self.B[k]) for k in (self.by_key if keys is None else keys))

    def columns(self, p: str) -> int:
        """The inner length of p's cost-matrix product (its FLOPs are 2 n² times this)."""
        return sum(g.columns for g in self.groups[p])

    # ---- cost matrices
    def _a_unit(self, key: str, axis: int) -> torch.Tensor:
        u = self._a_units.get((key, axis))
        if u is None:
            u = self._a_units[(key, axis)] = _units_of(self.A[key], self.dim[(key, axis)])
        return u

    def _partial(self, g: _Group) -> torch.Tensor:
        current = g.current()
        if current is not None:
            return current
        out: torch.Tensor | None = None
        for k, a in g.members:
            ua, ub = self._a_unit(k, a), _units_of(self.B[k], self.dim[(k, a)])
            out = ua @ ub.T if out is None else out.addmm_(ua, ub.T)
        assert out is not None  # a group has members
        g.partial, g.updates = out, 0
        return out

    def cost(self, p: str) -> torch.Tensor:
        """p's cost matrix in the current coordinates of B: the sum of its groups' partial
        products in a fixed order (cached; only stale partials are recomputed)."""
        m = self.M.get(p)
        if m is None:
            parts = [self._partial(g) for g in self.groups[p]]
            m = parts[0]
            if len(parts) > 1:
                m = m.clone()
                for part in parts[1:]:
                    m += part
            self.M[p] = m
        return m

    def prefetcher(self, step_perms: Sequence[Sequence[str]], overlap: bool | None
                   ) -> Prefetch | None:
        """`coordinate_ascent`'s prefetch for steps solving `step_perms` (None: no overlap).
        By default only on the CPU: on a GPU the products are queued asynchronously anyway,
        and the LAP's copy to the CPU would wait for the queued prefetch too."""
        if overlap is None:
            on_cpu = all(t.device.type == "cpu" for t in self.A.values())
            overlap = on_cpu and overlap_default()
        if not overlap:
            return None

        def plan(step: int, running: Sequence[int]) -> list[_Group]:
            return self.prefetch(step_perms[step], [p for r in running for p in step_perms[r]])

        return Prefetch(plan, self._partial)

    def prefetch(self, upcoming: Sequence[str], running: Sequence[str]) -> list[_Group]:
        """The groups of the permutations `upcoming` whose partial products are stale and that
        no step solving any of the permutations `running` can change: the groups of a
        permutation not running that carry none of the running ones (such a step moves only its
        own tensors and corrects only the partials of groups that carry it). A second thread
        computes them (`_partial`) while those steps run (`coordinate_ascent`); it writes only
        those groups' partials, so every result is the one the loop would compute itself, bit
        for bit."""
        busy = set(running)
        return [g for q in upcoming if q not in busy and q in self.groups
                for g in self.groups[q] if g.partial is None and not g.others & busy]

    # ---- moving B's units
    def _stale(self, q: str, g: _Group) -> None:
        g.partial = g.pending = None
        self.M[q] = None

    def _neighbour_update(self, k: str, axis: int, rows: torch.Tensor, old: torch.Tensor,
                          new: torch.Tensor) -> None:
        """Keep the partials that read `k` through another permutation current when the
        units `rows` of `axis` change from `old` to `new`: a low-rank correction over the
        moved units, or stale when that would not be cheaper than recomputing."""
        n_p = self.B[k].shape[self.dim[(k, axis)]]
        a_sub: torch.Tensor | None = None
        for q, a_q in self.by_key[k]:
            if a_q == axis:
                continue
            g = self.group_of[(k, a_q)]
            if g.partial is None:
                continue
            self.M[q] = None
            moved = self.B[k].numel() // self.spec.sizes[q] // n_p * len(rows)
            if g.updates >= _REFRESH or 2 * moved >= g.columns:
                self._stale(q, g)
                continue
            d, d_q = self.dim[(k, axis)], self.dim[(k, a_q)]
            if a_sub is None:
                a_sub = self.A[k].index_select(d, rows)
            partial = g.current()
            assert partial is not None
            partial.addmm_(_units_of(a_sub, d_q), _units_of(new - old, d_q).T)
            g.updates += 1

    def _move(self, p: str, sigma: torch.Tensor, rows: torch.Tensor | None) -> float:
        """Reorder p's units of B by σ in every tensor of p (`rows`: the units that move; None:
        all, and every partial reading those tensors goes stale). Returns the seconds spent
        keeping cost matrices current."""
        t_cost = 0.0
        for k, a in self.members[p]:
            d = self.dim[(k, a)]
            if rows is None:
                self.B[k] = self.B[k].index_select(d, sigma)
                for q, a_q in self.by_key[k]:
                    if a_q != a:
                        self._stale(q, self.group_of[(k, a_q)])
                continue
            new = self.B[k].index_select(d, sigma[rows])
            t0 = time.perf_counter()
            self._neighbour_update(k, a, rows, self.B[k].index_select(d, rows), new)
            t_cost += time.perf_counter() - t0
            self.B[k].index_copy_(d, rows, new)
        if p in self.coupled or rows is None:
            for g in self.groups[p]:
                self._stale(p, g)
        else:  # p's own partials: their columns move with σ (the same products, reordered)
            self.M[p] = None
            for g in self.groups[p]:
                if g.partial is not None:
                    g.pending = sigma if g.pending is None else g.pending[sigma]
        self.perm[p] = self.perm[p][sigma.cpu()]
        return t_cost

    def accept(self, p: str, sigma: torch.Tensor, rows: torch.Tensor) -> float:
        """Take σ for p (a non-coupled permutation; `rows`: the units that move): B, cached
        cost matrices, row norms and the neighbours' dirty flags follow. Returns the seconds
        spent keeping cost matrices current."""
        t_cost = self._move(p, sigma, rows)
        self.b_norm[p] = self.b_norm[p][sigma.cpu().numpy()]
        self.dirty |= self.neighbours[p]
        return t_cost

    def _exact_gain(self, p: str, sigma: torch.Tensor, rows: torch.Tensor) -> float | None:
        """The change of the objective under σ from the moved rows (float32 products summed
        in float64, each product within u of exact), or None unless it clears the tolerance
        by more than that bound."""
        value = slack = 0.0
        for k, a in self.members[p]:
            d = self.dim[(k, a)]
            a_rows = self.A[k].index_select(d, rows)
            prod = a_rows * (self.B[k].index_select(d, sigma[rows]) - self.B[k].index_select(d, rows))
            value += float(prod.sum(dtype=torch.float64))
            slack += float(prod.abs().sum(dtype=torch.float64)) * torch.finfo(prod.dtype).eps
        return value if value - slack > ACCEPT_TOL else None

    def _gain(self, p: str, cost: torch.Tensor, cols: np.ndarray, changed: np.ndarray,
              sigma: torch.Tensor) -> float | None:
        """The objective's change if p's units move by σ, or None if it is not provably above
        the tolerance.

        The change is Σ_rows (C[i, σ(i)] − C[i, i]) over the moved rows (only those entries
        are read). Each cost entry is the sum of G partial products, each of length K_g with up
        to n_upd low-rank corrections, so it is within (K + n_upd·(2K + 3) + G + 1)·u·‖a_i‖‖b_j‖
        of its exact value (K = Σ K_g); the decision is settled from the cost matrix whenever
        the change clears the tolerance by more than that bound either way; otherwise it is
        recomputed from the moved rows (`_exact_gain`). An accepted step therefore always raises
        the exact objective by more than the tolerance: the objective never decreases and the
        loop cannot cycle."""
        idx = torch.as_tensor(changed, device=cost.device)
        estimate = float(cost[idx, sigma[idx]].double().sum() - cost[idx, idx].double().sum())
        k = self.columns(p)
        upd = max(g.updates for g in self.groups[p])
        u = torch.finfo(cost.dtype).eps / 2
        factor = 1.01 * (k + upd * (2 * k + 3) + len(self.groups[p]) + 1) * u
        a_n, b_n = self.a_norm[p][changed], self.b_norm[p]
        bound = factor * float((a_n * (b_n[cols[changed]] + b_n[changed])).sum())
        if estimate - bound > ACCEPT_TOL:
            return estimate
        if estimate + bound <= ACCEPT_TOL:
            return None
        return self._exact_gain(p, sigma, idx)

    def step(self, p: str, trace: MatchingTrace) -> float | None:
        """One LAP for permutation p; returns the objective's gain if the new assignment was
        accepted, else None.

        Skipped when nothing p's cost matrix depends on has changed since p was last solved:
        the LAP would return the same optimum (the identity in the current coordinates), so the
        result is the same as the plain loop's."""
        if p not in self.dirty:
            trace.skipped += 1
            return None
        if p not in self.coupled:
            self.dirty.discard(p)
        t0 = time.perf_counter()
        cost = self.cost(p)
        t1 = time.perf_counter()
        cols = _lap(cost)
        t2 = time.perf_counter()
        trace.cost_seconds += t1 - t0
        trace.lap_seconds += t2 - t1
        trace.laps += 1
        trace.cost_flops += 2.0 * cost.shape[0] ** 2 * self.columns(p)
        changed = np.flatnonzero(cols != np.arange(cost.shape[0]))
        gain = None
        t_cost = 0.0
        if changed.size:
            sigma = torch.as_tensor(cols, dtype=torch.long, device=cost.device)
            if p in self.coupled:  # a key with p on two axes: the objective is not linear in σ
                keys = list(dict.fromkeys(k for k, _ in self.members[p]))
                before = self.objective(keys)
                self._move(p, sigma, None)
                gain = self.objective(keys) - before
                if gain <= ACCEPT_TOL:
                    self._move(p, torch.argsort(sigma), None)
                    gain = None
                else:
                    self.dirty |= self.neighbours[p]
            else:
                gain = self._gain(p, cost, cols, changed, sigma)
                if gain is not None:
                    t_cost = self.accept(p, sigma, torch.as_tensor(changed, device=cost.device))
        trace.cost_seconds += t_cost
        trace.update_seconds += time.perf_counter() - t2 - t_cost
        return gain


def overlap_default() -> bool:
    """Whether the sweep loop computes the next step's cost matrices on a second thread while
    a step runs (`coordinate_ascent`): when this process may use more than one CPU."""
    try:
        return len(os.sched_getaffinity(0)) > 1
    except AttributeError:  # not on Linux
        return (os.cpu_count() or 1) > 1


def coordinate_ascent(steps: Sequence[Callable[[MatchingTrace], float | None]], total: float,
                      trace: MatchingTrace, max_iter: int, seed: int,
                      prefetch: Prefetch | None = None) -> None:
    """The sweep loop of weight matching (one place for every matcher): each sweep runs the
    `steps` (one per permutation, or per group of permutations solved together) in a fresh
    random order (numpy ``default_rng(seed)``); a step returns the objective's gain if it
    changed something, else None. Stops after a sweep without a gain or `max_iter` sweeps.
    Records sweeps, accepted steps, the objective after each sweep (`total` plus the gains)
    and convergence in `trace`.

    With `prefetch`, a second thread computes ahead what the next `prefetch.lookahead` steps
    (in the visiting order, across sweeps) will need and no step before them can change, while
    the current step runs: the LAP (scipy releases the GIL) and the next cost-matrix products
    then run at the same time. Before a step, this thread takes what is still queued for it and
    waits for the rest. The order and every result are those of the plain loop."""
    order = _Order(len(steps), seed)
    pipe = (_Pipeline(prefetch, order, len(steps) * max_iter - 1, trace)
            if prefetch is not None and len(steps) > 1 else None)
    now = 0
    try:
        for _ in range(max_iter):
            trace.sweeps += 1
            progress = False
            for _ in range(len(steps)):
                if pipe is not None:
                    pipe.before(now)
                gain = steps[order[now]](trace)
                now += 1
                if gain is not None:
                    progress = True
                    trace.accepted += 1
                    total += gain
            trace.objective.append(total)
            if not progress:
                trace.converged = True
                return
    finally:
        if pipe is not None:
            pipe.close()


def weight_matching(spec: PermutationSpec, params_a: Mapping[str, torch.Tensor],
                    params_b: Mapping[str, torch.Tensor], max_iter: int = 100, seed: int = 0,
                    init_perm: Mapping[str, torch.Tensor] | None = None,
                    dtype: torch.dtype = torch.float32, overlap: bool | None = None
                    ) -> tuple[Perm, MatchingTrace]:
    """Weight matching: the permutation of B maximizing ``Σ_k ⟨A_k, π(B)_k⟩``.

    Coordinate ascent as in the paper: start from `init_perm` (identity by default); each sweep
    visits the permutations in a fresh random order (numpy ``default_rng(seed)``) and solves one
    LAP per permutation with the others fixed; a new assignment is kept only if it provably
    raises the objective by more than 1e-12 (the rounding of the check is bounded, see
    `_WeightMatcher._gain`); the loop stops after a sweep without progress or `max_iter`
    sweeps. Cost matrices are float32 (`dtype`) matrix products.

    overlap: compute the next step's cost matrices on a second thread while a LAP runs (same
    result; None: on the CPU when more than one CPU is available, `overlap_default`).

    params_a, params_b: the tensors to match on, with the spec's keys (pass parameters only:
    BatchNorm running statistics are data statistics). Returns the permutation (apply it to B
    with `apply_permutation`) and a `MatchingTrace`."""
    t_start = time.perf_counter()
    if max_iter < 1:
        raise ConfigError(f"max_iter must be >= 1, got {max_iter}")
    if spec.structured:  # transformer specs: head-structured / derived permutations
        from basinmerge.align.transformer_matching import structured_weight_matching

        return structured_weight_matching(spec, params_a, params_b, max_iter, seed, init_perm,
                                          dtype, overlap)
    keys = _matched_params(spec, params_a, params_b)
    perm = check_permutation(spec, init_perm) if init_perm is not None else identity_permutation(spec)
    trace = MatchingTrace()
    with torch.no_grad():
        matcher = _WeightMatcher(spec, params_a, params_b, keys, perm, dtype)
        fixed = [k for k in keys if k not in matcher.by_key]
        # The unpermuted tensors' share is constant; accepted gains are added as they come.
        total = objective(params_a, params_b, fixed) + matcher.objective()
        trace.objective.append(total)
        trace.setup_seconds = time.perf_counter() - t_start
        steps = [partial(matcher.step, p) for p in matcher.active]
        coordinate_ascent(steps, total, trace, max_iter, seed,
                          matcher.prefetcher([[p] for p in matcher.active], overlap))
    trace.seconds = time.perf_counter() - t_start
    return matcher.perm, trace


def weight_matching_reference(spec: PermutationSpec, params_a: Mapping[str, torch.Tensor],
                              params_b: Mapping[str, torch.Tensor], max_iter: int = 100,
                              seed: int = 0, init_perm: Mapping[str, torch.Tensor] | None = None
                              ) -> tuple[Perm, MatchingTrace]:
    """The official Git Re-Basin loop, written plainly: for every permutation, gather each
    member tensor of B with all other permutations applied, and sum float64 products. Same
    visiting order as `weight_matching` for the same seed. The benchmark's baseline."""
    t_start = time.perf_counter()
    keys = _matched_params(spec, params_a, params_b)
    pa = {k: params_a[k].double() for k in keys}
    pb = {k: params_b[k].double() for k in keys}
    perm = check_permutation(spec, init_perm) if init_perm is not None else identity_permutation(spec)
    names = [p for p, axes in spec.perm_to_axes.items() if any(k in pa for k, _ in axes)]
    trace = MatchingTrace()
    trace.objective.append(objective(pa, {k: permute_tensor(spec, perm, k, pb[k]) for k in keys}))
    trace.setup_seconds = time.perf_counter() - t_start
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for _ in range(max_iter):
            trace.sweeps += 1
            progress = False
            for i in rng.permutation(len(names)):
                p = names[i]
                t0 = time.perf_counter()
                n = spec.sizes[p]
                cost = torch.zeros(n, n, dtype=torch.float64, device=pa[keys[0]].device)
                for key, axis in spec.perm_to_axes[p]:
                    if key not in pa:
                        continue
                    wb = permute_tensor(spec, perm, key, pb[key], except_axis=axis)
                    cost += unit_matrix(pa[key], spec, key, axis) @ unit_matrix(wb, spec, key, axis).T
                t1 = time.perf_counter()
                cols = _lap(cost)
                t2 = time.perf_counter()
                trace.laps += 1
                trace.cost_flops += 2.0 * n * n * sum(pa[k].numel() // n for k, _ in spec.perm_to_axes[p]
                                                      if k in pa)
                old = float(cost[torch.arange(n), perm[p]].sum())
                new = float(cost[torch.arange(n), torch.as_tensor(cols)].sum())
                if new > old + ACCEPT_TOL:
                    progress = True
                    trace.accepted += 1
                perm[p] = torch.as_tensor(cols, dtype=torch.long)
                trace.cost_seconds += t1 - t0
                trace.lap_seconds += t2 - t1
            trace.objective.append(objective(pa, {k: permute_tensor(spec, perm, k, pb[k]) for k in keys}))
            if not progress:
                trace.converged = True
                break
    trace.seconds = time.perf_counter() - t_start
    return perm, trace


# --------------------------------------------------------------------------- activation matching

ACTIVATION_METHODS = ("corr", "ols")


def _is_transformer(model: nn.Module) -> bool:
    from basinmerge.align.transformer import is_transformer

    return is_transformer(model)


def _observation_points(model: nn.Module, spec: PermutationSpec, perms: Sequence[str]):
    """Where each permutation's units can be observed: the inputs of the layers that read them
    (weight axis 1), else the outputs of the layers that write them. Returns
    {perm: [(module name, "input"|"output", block)]}."""
    modules = dict(model.named_modules())
    points: dict[str, list[tuple[str, str, int]]] = {}
    for p in perms:
        readers: list[tuple[str, str, int]] = []
        writers: list[tuple[str, str, int]] = []
        for key, axis in spec.perm_to_axes[p]:
            mod, _, leaf = key.rpartition(".")
            if leaf != "weight" or not isinstance(modules.get(mod), nn.Linear | nn.Conv1d | nn.Conv2d):
                continue
            (readers if axis == 1 else writers).append((mod, "input" if axis == 1 else "output",
                                                         spec.block(key, axis)))
        pts = readers or writers
        if not pts:
            raise ConfigError(f"activation matching: no linear/conv layer reads or writes the units "
                              f"of permutation '{p}'")
        points[p] = pts
    return points


def _as_units(t: torch.Tensor, module: nn.Module, n: int, block: int) -> torch.Tensor:
    """Activations as a (samples, n) matrix: positions and flattened blocks become samples."""
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        return t.movedim(1, -1).reshape(-1, n)
    t = t.reshape(-1, n, block)
    return t.transpose(1, 2).reshape(-1, n)


class _Recorder:
    """Forward hooks (`hooks`, for `adapter.forward_hooks`) that collect each permutation's
    activations during one forward pass (a tensor read by several layers, e.g. a block's conv1
    and its shortcut, is taken once)."""

    def __init__(self, model: nn.Module, points, sizes: Mapping[str, int]):
        self.captured: dict[str, list[torch.Tensor]] = {p: [] for p in points}
        self._sources: dict[str, list[torch.Tensor]] = {p: [] for p in points}
        self.hooks = []
        modules = dict(model.named_modules())
        for p, pts in points.items():
            for mod_name, where, block in pts:
                self.hooks.append(self._hook(modules[mod_name], p, where, sizes[p], block))

    def _hook(self, module: nn.Module, p: str, where: str, n: int, block: int):
        def grab(t: torch.Tensor) -> None:
            if any(t is s for s in self._sources[p]):
                return
            self._sources[p].append(t)
            self.captured[p].append(_as_units(t.detach(), module, n, block))

        if where == "input":
            return module, lambda m, args: grab(args[0]), True
        return module, lambda m, args, out: grab(out), False

    def run(self, model: nn.Module, x: adapter.Inputs) -> dict[str, list[torch.Tensor]]:
        for p in self.captured:
            self.captured[p] = []
            self._sources[p] = []
        adapter.forward(model, x)
        for p in self._sources:
            self._sources[p] = []
        return self.captured


class _Moments:
    """Running sums for the cross-statistics of two (samples, n) activation streams."""

    def __init__(self, n: int, device):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.count = 0
        self.sa, self.sb, self.saa, self.sbb, self.sab = z(n), z(n), z(n), z(n), z(n, n)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add a batch; float32 sums are added into the float64 totals in place (no float64
        copies of the (n, n) product)."""
        a, b = a.float(), b.float()
        self.count += a.shape[0]
        self.sa.add_(a.sum(0))
        self.sb.add_(b.sum(0))
        self.saa.add_((a * a).sum(0))
        self.sbb.add_((b * b).sum(0))
        self.sab.add_(a.T @ b)

    def cost(self, method: str) -> torch.Tensor:
        """The (n, n) cost matrix: ``E[a bᵀ]`` (ols) or the Pearson correlation, computed in
        place on one (n, n) buffer."""
        m = max(self.count, 1)
        if method == "ols":
            return self.sab / m
        ma, mb = self.sa / m, self.sb / m
        cov = (self.sab / m).sub_(torch.outer(ma, mb))
        sa = (self.saa / m - ma * ma).clamp_min(0).sqrt()
        sb = (self.sbb / m - mb * mb).clamp_min(0).sqrt()
        denom = torch.outer(sa, sb)
        # Dead (zero-variance) units correlate with nothing: cost 0 instead of NaN.
        dead = denom <= 1e-12 if float(sa.min()) * float(sb.min()) <= 1e-12 else None
        corr = cov.div_(denom.clamp_min_(1e-300))
        if dead is not None:
            corr.masked_fill_(dead, 0.0)
        return corr.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


@torch.no_grad()
def _activation_costs(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec,
                      perms: Sequence[str], x: adapter.Inputs, method: str,
                      batch_size: int) -> dict[str, torch.Tensor]:
    points = _observation_points(model_a, spec, perms)
    rec_a = _Recorder(model_a, points, spec.sizes)
    rec_b = _Recorder(model_b, points, spec.sizes)
    device = next(iter(model_a.parameters())).device
    moments = {p: _Moments(spec.sizes[p], device) for p in perms}
    with adapter.forward_hooks(rec_a.hooks + rec_b.hooks), module_mode(model_a, False), \
            module_mode(model_b, False):
        for _, batch in adapter.as_data(x).batches(batch_size):
            xb = adapter.to_device(batch.inputs, device)
            cap_a = rec_a.run(model_a, xb)
            cap_b = rec_b.run(model_b, xb)
            for p in perms:
                for a, b in zip(cap_a[p], cap_b[p], strict=True):
                    moments[p].add(a, b)
    return {p: moments[p].cost(method) for p in perms}


def activation_matching(model_a: nn.Module, model_b: nn.Module, data, method: str = "corr", *,
                        spec: PermutationSpec | None = None, num_examples: int | None = 2000,
                        batch_size: int = 250, one_pass: bool = True) -> Perm:
    """Activation matching: one LAP per permutation on the similarity of the units' activations
    over `data` (a Dataset, (x, y) or an input tensor), both models in eval mode.

    method: ``corr`` (Pearson correlation; dead units get 0 instead of NaN) or ``ols``
    (``E[z_A z_Bᵀ]``, the least-squares criterion). Activations are observed where the next
    layers read them (a stream shared by several blocks is observed at all its readers; spatial
    positions count as samples).

    The paper matches layer by layer, recomputing the next layer's statistics on the
    already-permuted B (``one_pass=False`` does exactly that). Because every permutation is
    applied to all its axes, the permuted B computes the same function, so the statistics of
    the layers not yet matched are the same: ``one_pass=True`` (the default) collects them all
    in one pass and gives the identical result (a test checks it)."""
    if method not in ACTIVATION_METHODS:
        raise ConfigError(f"unknown activation matching method '{method}'; choose one of "
                          f"{', '.join(ACTIVATION_METHODS)}")
    if spec is not None and spec.structured or spec is None and _is_transformer(model_a):
        from basinmerge.align.transformer_matching import (
            structured_activation_matching,
            transformer_spec_from_data,
        )

        spec = spec or transformer_spec_from_data(model_a, data)
        return structured_activation_matching(model_a, model_b, data, method, spec=spec,
                                              num_examples=num_examples)
    x = model_inputs(data, num_examples)
    spec = resolve_spec(model_a, adapter.take_inputs(x, slice(0, 2)), spec)
    state_a, state_b = as_state_dict(model_a), as_state_dict(model_b)
    check_compatible([state_a, state_b], ["model A", "model B"])
    check_state(spec, state_a, "model A")
    perms = list(spec.perm_to_axes)
    if one_pass:
        costs = _activation_costs(model_a, model_b, spec, perms, x, method, batch_size)
        return {p: torch.as_tensor(_lap(costs[p]), dtype=torch.long) for p in perms}
    perm = identity_permutation(spec)
    work = copy.deepcopy(model_b)
    for p in perms:
        work.load_state_dict(apply_permutation(spec, perm, state_b))
        cost = _activation_costs(model_a, work, spec, [p], x, method, batch_size)[p]
        perm[p] = torch.as_tensor(_lap(cost), dtype=torch.long)
    return perm


# --------------------------------------------------------------------------- STE matching


@dataclass
class STETrace:
    """Per-step training loss of the midpoint, the held-out midpoint losses at the checks
    (step, loss), and the step whose permutation was kept (0: plain weight matching)."""

    losses: list[float] = field(default_factory=list)
    held_out: list[tuple[int, float]] = field(default_factory=list)
    best_step: int = 0
    best_loss: float = float("inf")
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def midpoint_loss(model_a: nn.Module, state_b: Mapping[str, torch.Tensor], data,
                  bn_data=None, alpha: float = 0.5) -> float:
    """Loss of ``(1 − α) θ_A + α θ_B`` on `data` (BatchNorm statistics recomputed from
    `bn_data`, default `data`)."""
    net = copy.deepcopy(model_a)
    net.load_state_dict(lerp(as_state_dict(model_a), state_b, alpha))
    if has_batchnorm(net):
        reset_bn_stats(net, bn_data if bn_data is not None else data)
    return evaluate(net, data)["loss"]


def ste_matching(model_a: nn.Module, model_b: nn.Module, data, steps: int = 100, lr: float = 1e-3,
                 *, spec: PermutationSpec | None = None, batch_size: int = 128,
                 held_out=None, eval_every: int | None = None, seed: int = 0,
                 max_iter: int = 100) -> tuple[Perm, STETrace]:
    """Straight-through estimator matching (Ainsworth et al., §3.3).

    Learns ``Θ̃_B`` (initialized to ``Θ_A``) by Adam on the cross-entropy of the midpoint
    ``½(Θ_A + proj(Θ̃_B))``, where ``proj`` weight-matches B onto ``Θ̃_B`` (warm-started from the
    last permutation) and the backward pass treats ``proj`` as the identity. The permutation
    with the lowest midpoint loss on `held_out` (default: the last 10% of `data`, which is then
    not trained on) is returned; plain weight matching is the first candidate, so the result is
    never worse on the held-out data. `data` must be labelled (a Dataset or (x, y))."""
    t_start = time.perf_counter()
    if steps < 0:
        raise ConfigError(f"steps must be >= 0, got {steps}")
    d = adapter.as_data(data, "STE matching data").labeled("ste_matching")
    if held_out is None:
        n_hold = max(1, len(d) // 10)
        if len(d) - n_hold < 1:
            raise ConfigError("ste_matching needs at least two labelled examples")
        held_out = d.take(slice(len(d) - n_hold, None))
        d = d.take(slice(0, len(d) - n_hold))
    spec = resolve_spec(model_a, d.head(2).inputs, spec)
    keys = parameter_keys(model_a)
    pa = {k: v.detach() for k, v in model_a.named_parameters()}
    pb = {k: v.detach() for k, v in model_b.named_parameters()}
    _matched_params(spec, pa, pb)
    state_b = as_state_dict(model_b)
    buffers = {k: v.detach() for k, v in model_a.named_buffers()}
    bn_data = d.head(2000)  # BatchNorm statistics of the held-out midpoints
    eval_every = eval_every or max(1, steps // 10)

    trace = STETrace()
    perm, _ = weight_matching(spec, pa, pb, max_iter=max_iter, seed=seed)
    best_perm = perm
    trace.best_loss = midpoint_loss(model_a, apply_permutation(spec, perm, state_b), held_out, bn_data)
    trace.held_out.append((0, trace.best_loss))

    tilde = {k: pa[k].clone().requires_grad_(True) for k in keys}
    opt = torch.optim.Adam(tilde.values(), lr=lr)
    net = copy.deepcopy(model_a).train()
    gen = torch.Generator().manual_seed(int(seed))
    device = pa[keys[0]].device
    order, pos = torch.randperm(len(d), generator=gen), 0
    for step in range(1, steps + 1):
        if pos + batch_size > len(d) and pos > 0:
            order, pos = torch.randperm(len(d), generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        with torch.no_grad():
            perm, _ = weight_matching(spec, {k: t.detach() for k, t in tilde.items()}, pb,
                                      max_iter=max_iter, seed=seed + step, init_perm=perm)
            proj = apply_permutation(spec, perm, pb)
        mid = {k: 0.5 * (pa[k] + proj[k] + tilde[k] - tilde[k].detach()) for k in keys}
        bufs = {k: v.clone() for k, v in buffers.items()}
        batch = d.take(idx)
        xb = adapter.to_device(batch.inputs, device)
        loss = adapter.loss(adapter.call(net, {**mid, **bufs}, xb), batch.labels, xb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        trace.losses.append(float(loss.detach()))
        if step % eval_every == 0 or step == steps:
            held = midpoint_loss(model_a, apply_permutation(spec, perm, state_b), held_out, bn_data)
            trace.held_out.append((step, held))
            if held < trace.best_loss:
                trace.best_loss, trace.best_step, best_perm = held, step, perm
    trace.seconds = time.perf_counter() - t_start
    return best_perm, trace


# --------------------------------------------------------------------------- MergeMany


def merge_many(models: Sequence[nn.Module | Mapping[str, torch.Tensor]],
               spec: PermutationSpec | None = None, *, max_iter: int = 100, seed: int = 0,
               weights: Sequence[float] | None = None) -> tuple[StateDict, list[Perm]]:
    """MergeMany (Ainsworth et al., Algorithm 3): repeatedly weight-match each model (in random
    order) to the mean of the others, warm-started from its current permutation, until a round
    changes nothing; return the (weighted) mean of the permuted models and the permutations.

    The merged state's BatchNorm running statistics are averages: recompute them
    (`reset_bn_stats`) or use `repair` before evaluating."""
    if len(models) < 2:
        raise ConfigError(f"merge_many needs at least two models, got {len(models)}")
    if spec is None:
        if not isinstance(models[0], nn.Module):
            raise ConfigError("merge_many: pass spec= when merging state_dicts")
        spec = resolve_spec(models[0])
    states = [as_state_dict(m) for m in models]
    names = [f"model {i}" for i in range(len(states))]
    check_compatible(states, names)
    for s, name in zip(states, names, strict=True):
        check_state(spec, s, name)
    keys = parameter_keys(models[0]) if isinstance(models[0], nn.Module) else parameter_keys(states[0])
    params = [{k: s[k] for k in keys} for s in states]
    k_models = len(states)
    perms = [identity_permutation(spec) for _ in states]
    permuted = [dict(p) for p in params]
    rng = np.random.default_rng(seed)
    for it in range(max_iter):
        changed = False
        for i in rng.permutation(k_models):
            others = [permuted[j] for j in range(k_models) if j != i]
            target = weighted_average(others)
            new, _ = weight_matching(spec, target, params[i], max_iter=max_iter,
                                     seed=seed + 1000 * it + int(i), init_perm=perms[i])
            if any(not torch.equal(new[p], perms[i][p]) for p in new):
                changed = True
                perms[i] = new
                permuted[i] = apply_permutation(spec, new, params[i])
        if not changed:
            break
    full = [apply_permutation(spec, perms[i], states[i]) for i in range(k_models)]
    return weighted_average(full, weights), perms
