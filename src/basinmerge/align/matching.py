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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

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
from basinmerge.align.spec import PermutationSpec, parameter_keys, resolve_spec
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


def _unit_layout(shape: Sequence[int], spec: PermutationSpec, key: str, axis: int):
    """How to view a tensor of `shape` as a (units, rest) matrix for `axis`.

    Blocked axes (a flattened conv output) are split into (units, block) first. Returns the
    expanded shape, the position the units of `axis` have in it, and, for every tagged axis of
    the key, the dimension its units occupy after moving `axis`'s units to the front."""
    expanded: list[int] = []
    unit_pos: dict[int, int] = {}
    for a, d in enumerate(shape):
        b = spec.block(key, a)
        unit_pos[a] = len(expanded)
        expanded += [d // b, b] if b != 1 else [d]
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
    return float(sum(torch.dot(params_a[k].reshape(-1).double(), params_b[k].reshape(-1).double())
                     for k in keys if params_a[k].is_floating_point()))


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
    cost_seconds: float = 0.0
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


class _Member:
    """One (key, axis) of a permutation: its column block in the permutation's buffers."""

    __slots__ = ("key", "axis", "perm", "c0", "c1", "shape", "dims")

    def __init__(self, key, axis, perm, c0, c1, shape, dims):
        self.key, self.axis, self.perm, self.c0, self.c1 = key, axis, perm, c0, c1
        self.shape, self.dims = shape, dims


class _WeightMatcher:
    """Coordinate ascent with every (key, axis) kept in a precomputed unit-major layout.

    For each permutation p, the layouts of all its (key, axis) members are stored side by side
    in one (n_p, Σ m) buffer for A (constant) and one for B (kept permuted by the current
    assignment). The cost matrix for p is then a single matrix product ``A_p @ B_pᵀ`` in the
    current coordinates of B; the LAP gives a relative permutation σ; an accepted σ is applied
    to the moved rows of B_p and to the matching dimension of the key's layouts in the other
    permutations' buffers (the only tensors that change). Cost matrices are cached and kept
    current (see `_apply`), and a permutation whose cost matrix has not changed since it was
    last solved is skipped (see `step`)."""

    def __init__(self, spec: PermutationSpec, params_a, params_b, keys, perm: Perm,
                 dtype: torch.dtype):
        self.spec = spec
        self.perm = {p: v.clone() for p, v in perm.items()}
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        self.members: dict[str, list[_Member]] = {}
        self.by_key: dict[str, list[_Member]] = {}
        keyset = set(keys)
        self.start_identity = all(bool((v == torch.arange(len(v))).all()) for v in perm.values())
        self._params_a, self._params_b = params_a, params_b
        self._b_started: dict[str, torch.Tensor] = {}
        for p, axes in spec.perm_to_axes.items():
            axes = [(k, a) for k, a in axes if k in keyset]
            if not axes:
                continue
            n = spec.sizes[p]
            cols, mems = 0, []
            for k, a in axes:
                expanded, src, dims = _unit_layout(params_a[k].shape, spec, k, a)
                moved = [expanded[src]] + [d for j, d in enumerate(expanded) if j != src]
                m = params_a[k].numel() // n
                mems.append(_Member(k, a, p, cols, cols + m, moved, dims))
                cols += m
            device = params_a[axes[0][0]].device
            self.A[p] = torch.empty(n, cols, dtype=dtype, device=device)
            self.B[p] = torch.empty(n, cols, dtype=dtype, device=device)
            self.members[p] = mems
            for mem in mems:
                # One strided copy per tensor and side, straight into its column block.
                self._view(mem, "A").copy_(_unit_major(params_a[mem.key], spec, mem.key, mem.axis))
                self._view(mem, "B").copy_(_unit_major(self._b_start(mem.key), spec, mem.key, mem.axis))
                self.by_key.setdefault(mem.key, []).append(mem)
        self.active = list(self.members)
        self.coupled = {p for p, mems in self.members.items()
                        if len({m.key for m in mems}) < len(mems)}
        # p's cost matrix changes only when a permutation sharing a key with p is accepted.
        self.neighbours = {p: {m.perm for mem in mems for m in self.by_key[mem.key]} - {p}
                           for p, mems in self.members.items()}
        self.dirty = set(self.active)
        self.M: dict[str, torch.Tensor | None] = {}
        self.updates: dict[str, int] = {}
        # Row norms bound the rounding error of cost matrix entries (`_gain`); B's row norms only
        # move with p's own σ (neighbours permute entries within rows). Computed in float32
        # and inflated by 0.1% to stay upper bounds.
        self.a_norm = {p: self._row_norms(self.A[p]) for p in self.active}
        self.b_norm = {p: self._row_norms(self.B[p]) for p in self.active}

    def _b_start(self, key: str) -> torch.Tensor:
        """B's tensor `key` under the starting permutation (computed once per key)."""
        if self.start_identity:
            return self._params_b[key]
        if key not in self._b_started:
            self._b_started[key] = permute_tensor(self.spec, self.perm, key, self._params_b[key])
        return self._b_started[key]

    def start_objective(self) -> float:
        """Σ ⟨A_k, π(B)_k⟩ over every key that carries a permutation at the starting permutation,
        exactly in float64, from the original (contiguous) tensors."""
        total = objective({k: self._params_a[k] for k in self.by_key},
                          {k: self._b_start(k) for k in self.by_key})
        self._b_started.clear()
        return total

    @staticmethod
    def _row_norms(buf: torch.Tensor) -> np.ndarray:
        return torch.linalg.vector_norm(buf, dim=1).cpu().numpy().astype(np.float64) * 1.001

    def _view(self, mem: _Member, side: str = "B") -> torch.Tensor:
        buf = self.B if side == "B" else self.A
        return buf[mem.perm][:, mem.c0:mem.c1].view(mem.shape)

    def cost(self, p: str) -> torch.Tensor:
        """p's cost matrix in the current coordinates of B (cached, kept up to date)."""
        m = self.M.get(p)
        if m is None:
            m = self.M[p] = self.A[p] @ self.B[p].T
            self.updates[p] = 0
        return m

    def _apply(self, p: str, sigma: torch.Tensor, rows: torch.Tensor | None = None) -> float:
        """Reorder p's units of B by sigma everywhere they appear.

        `rows` are the units that move (None: treat all as moving); only their slices are
        rewritten. Cached
        cost matrices follow: p's own by a column gather, a neighbour's by a low-rank
        correction over the moved units (or it is dropped and recomputed when that would not be
        cheaper). Returns the seconds spent on cost matrices."""
        t_cost = 0.0
        n_p = self.spec.sizes[p]
        if rows is None:
            self.B[p] = self.B[p].index_select(0, sigma)
        else:
            self.B[p].index_copy_(0, rows, self.B[p].index_select(0, sigma[rows]))
        m_p = self.M.get(p)
        if m_p is not None:
            self.M[p] = None if p in self.coupled else m_p.index_select(1, sigma)
        for mem in self.members[p]:
            for other in self.by_key[mem.key]:
                if other is mem or (other.perm == p and other.axis == mem.axis):
                    continue
                view = self._view(other)
                d = other.dims[mem.axis]
                if rows is None:
                    view.copy_(view.index_select(d, sigma))
                    self.M[other.perm] = None
                    continue
                new = view.index_select(d, sigma[rows])
                q = other.perm
                m_q = self.M.get(q)
                if m_q is not None:
                    t0 = time.perf_counter()
                    n_q = self.spec.sizes[q]
                    moved_cols = (other.c1 - other.c0) // n_p * len(rows)
                    if self.updates[q] >= _REFRESH or 2 * moved_cols >= self.A[q].shape[1]:
                        self.M[q] = None
                    else:
                        old = view.index_select(d, rows)
                        a = self._view(other, "A").index_select(d, rows)
                        m_q.addmm_(a.reshape(n_q, -1), (new - old).reshape(n_q, -1).T)
                        self.updates[q] += 1
                    t_cost += time.perf_counter() - t0
                view.index_copy_(d, rows, new)
        self.perm[p] = self.perm[p][sigma.cpu()]
        return t_cost

    def objective(self, keys=None) -> float:
        """Σ ⟨A_k, π(B)_k⟩ over `keys` (default: every key that carries a permutation, each
        once), exactly in float64."""
        total = 0.0
        for k in (self.by_key if keys is None else keys):
            mem = self.by_key[k][0]
            a = self.A[mem.perm][:, mem.c0:mem.c1].double()
            b = self.B[mem.perm][:, mem.c0:mem.c1].double()
            total += float((a * b).sum())
        return total

    def _gain(self, p: str, cost: torch.Tensor, cols: np.ndarray, changed: np.ndarray,
              sigma: torch.Tensor) -> float | None:
        """The objective's change if p's units move by σ, or None if it is not provably above
        the tolerance.

        The change is Σ_rows (C[i, σ(i)] − C[i, i]) over the moved rows. Each cost entry is
        within (K + n_upd·(2K + 3) + 1)·u·‖a_i‖‖b_j‖ of its exact value (a float32 product of
        length K, plus n_upd low-rank updates), so the decision is settled from the cost matrix
        whenever the change clears the tolerance by more than that bound either way; otherwise
        it is recomputed from the moved rows in float64 (exact products, rounding bounded by
        2u per term). An accepted step therefore always raises the exact objective by more
        than the tolerance: the objective never decreases and the loop cannot cycle."""
        c = cost.detach().cpu().numpy().astype(np.float64)
        estimate = float(c[changed, cols[changed]].sum() - c[changed, changed].sum())
        k = self.A[p].shape[1]
        u = torch.finfo(self.A[p].dtype).eps / 2
        factor = 1.01 * (k + self.updates.get(p, 0) * (2 * k + 3) + 1) * u
        a_n, b_n = self.a_norm[p][changed], self.b_norm[p]
        bound = factor * float((a_n * (b_n[cols[changed]] + b_n[changed])).sum())
        if estimate - bound > ACCEPT_TOL:
            return estimate
        if estimate + bound <= ACCEPT_TOL:
            return None
        rows = torch.as_tensor(changed, device=self.B[p].device)
        prod = self.A[p].index_select(0, rows) * (
            self.B[p].index_select(0, sigma[rows]) - self.B[p].index_select(0, rows))
        value = float(prod.sum(dtype=torch.float64))
        slack = float(prod.abs().sum(dtype=torch.float64)) * torch.finfo(prod.dtype).eps
        return value if value - slack > ACCEPT_TOL else None

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
        trace.cost_flops += 2.0 * self.A[p].shape[0] ** 2 * self.A[p].shape[1]
        changed = np.flatnonzero(cols != np.arange(cost.shape[0]))
        gain = None
        t_cost = 0.0
        if changed.size:
            sigma = torch.as_tensor(cols, dtype=torch.long, device=self.B[p].device)
            if p in self.coupled:  # a key with p on two axes: the objective is not linear in σ
                keys = list(dict.fromkeys(m.key for m in self.members[p]))
                before = self.objective(keys)
                self._apply(p, sigma)
                gain = self.objective(keys) - before
                if gain <= ACCEPT_TOL:
                    self._apply(p, torch.argsort(sigma))
                    gain = None
            else:
                gain = self._gain(p, cost, cols, changed, sigma)
                if gain is not None:
                    rows = torch.as_tensor(changed, device=self.B[p].device)
                    t_cost = self._apply(p, sigma, rows)
                    self.b_norm[p] = self.b_norm[p][cols]
            if gain is not None:
                self.dirty |= self.neighbours[p]
        trace.cost_seconds += t_cost
        trace.update_seconds += time.perf_counter() - t2 - t_cost
        return gain


def coordinate_ascent(steps: Sequence[Callable[[MatchingTrace], float | None]], total: float,
                      trace: MatchingTrace, max_iter: int, seed: int) -> None:
    """The sweep loop of weight matching (one place for every matcher): each sweep runs the
    `steps` (one per permutation, or per group of permutations solved together) in a fresh
    random order (numpy ``default_rng(seed)``); a step returns the objective's gain if it
    changed something, else None. Stops after a sweep without a gain or `max_iter` sweeps.
    Records sweeps, accepted steps, the objective after each sweep (`total` plus the gains)
    and convergence in `trace`."""
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        trace.sweeps += 1
        progress = False
        for i in rng.permutation(len(steps)):
            gain = steps[i](trace)
            if gain is not None:
                progress = True
                trace.accepted += 1
                total += gain
        trace.objective.append(total)
        if not progress:
            trace.converged = True
            return


def weight_matching(spec: PermutationSpec, params_a: Mapping[str, torch.Tensor],
                    params_b: Mapping[str, torch.Tensor], max_iter: int = 100, seed: int = 0,
                    init_perm: Mapping[str, torch.Tensor] | None = None,
                    dtype: torch.dtype = torch.float32) -> tuple[Perm, MatchingTrace]:
    """Weight matching: the permutation of B maximizing ``Σ_k ⟨A_k, π(B)_k⟩``.

    Coordinate ascent as in the paper: start from `init_perm` (identity by default); each sweep
    visits the permutations in a fresh random order (numpy ``default_rng(seed)``) and solves one
    LAP per permutation with the others fixed; a new assignment is kept only if it provably
    raises the objective by more than 1e-12 (the rounding of the check is bounded, see
    `_WeightMatcher._gain`); the loop stops after a sweep without progress or `max_iter`
    sweeps. Cost matrices are float32 (`dtype`) matrix products.

    params_a, params_b: the tensors to match on, with the spec's keys (pass parameters only:
    BatchNorm running statistics are data statistics). Returns the permutation (apply it to B
    with `apply_permutation`) and a `MatchingTrace`."""
    t_start = time.perf_counter()
    if max_iter < 1:
        raise ConfigError(f"max_iter must be >= 1, got {max_iter}")
    if spec.structured:  # transformer specs: head-structured / derived permutations
        from basinmerge.align.transformer_matching import structured_weight_matching

        return structured_weight_matching(spec, params_a, params_b, max_iter, seed, init_perm, dtype)
    keys = _matched_params(spec, params_a, params_b)
    perm = check_permutation(spec, init_perm) if init_perm is not None else identity_permutation(spec)
    trace = MatchingTrace()
    with torch.no_grad():
        matcher = _WeightMatcher(spec, params_a, params_b, keys, perm, dtype)
        fixed = [k for k in keys if k not in matcher.by_key]
        # The unpermuted tensors' share is constant; accepted gains are added as they come.
        total = objective(params_a, params_b, fixed) + matcher.start_objective()
        trace.objective.append(total)
        trace.setup_seconds = time.perf_counter() - t_start
        steps = [partial(matcher.step, p) for p in matcher.active]
        coordinate_ascent(steps, total, trace, max_iter, seed)
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
        a, b = a.float(), b.float()
        self.count += a.shape[0]
        self.sa += a.sum(0).double()
        self.sb += b.sum(0).double()
        self.saa += (a * a).sum(0).double()
        self.sbb += (b * b).sum(0).double()
        self.sab += (a.T @ b).double()

    def cost(self, method: str) -> torch.Tensor:
        m = max(self.count, 1)
        if method == "ols":
            return self.sab / m
        ma, mb = self.sa / m, self.sb / m
        cov = self.sab / m - ma[:, None] * mb[None, :]
        sa = (self.saa / m - ma * ma).clamp_min(0).sqrt()
        sb = (self.sbb / m - mb * mb).clamp_min(0).sqrt()
        denom = sa[:, None] * sb[None, :]
        # Dead (zero-variance) units correlate with nothing: cost 0 instead of NaN.
        corr = torch.where(denom > 1e-12, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))
        return torch.nan_to_num(corr, nan=0.0, posinf=0.0, neginf=0.0)


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
