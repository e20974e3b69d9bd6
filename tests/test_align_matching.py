"""Weight, activation and STE matching, MergeMany."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from basinmerge import data, models
from basinmerge.align import (
    activation_matching,
    align,
    apply_permutation,
    builtin_spec,
    merge_many,
    objective,
    random_permutation,
    ste_matching,
    weight_matching,
    weight_matching_reference,
)
from basinmerge.align.matching import (
    MatchingTrace,
    Prefetch,
    _activation_costs,
    coordinate_ascent,
    dot64,
)
from basinmerge.errors import ConfigError
from basinmerge.state import weighted_average


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def _randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.LayerNorm):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model


def _planted(model: nn.Module, seed: int):
    spec = builtin_spec(model)
    params = _params(model)
    return spec, params, apply_permutation(spec, random_permutation(spec, seed), params)


@pytest.mark.parametrize("name,shape,cfg", [
    ("mlp", (1, 8, 8), {"depth": 3, "width": 32}),
    ("resnet20", (3, 8, 8), {"width": 1, "norm": "batch"}),
], ids=["mlp", "resnet20"])
def test_weight_matching_recovers_a_planted_permutation(name, shape, cfg):
    model = _randomize_norms(models.build(name, shape, 10, seed=0, **cfg), 0)
    spec, params, planted = _planted(model, seed=11)
    perm, trace = weight_matching(spec, params, planted)
    recovered = apply_permutation(spec, perm, planted)
    assert all(torch.equal(recovered[k], params[k]) for k in params)
    assert trace.converged and trace.sweeps <= 5
    # The maximum is ⟨θ, θ⟩, reached exactly.
    assert trace.objective[-1] == pytest.approx(objective(params, params), rel=1e-6)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), width=st.sampled_from([8, 24]))
def test_objective_never_decreases_and_matches_a_recomputation(seed, width):
    a = models.build("mlp", (1, 6, 6), 10, seed=seed, depth=3, width=width)
    b = models.build("mlp", (1, 6, 6), 10, seed=seed + 1, depth=3, width=width)
    spec = builtin_spec(a)
    pa, pb = _params(a), _params(b)
    perm, trace = weight_matching(spec, pa, pb, seed=seed)
    obj = trace.objective
    assert all(y > x for x, y in zip(obj[:-2], obj[1:-1], strict=True))  # each sweep but the last gains
    assert obj[-1] == obj[-2] and trace.converged
    assert obj[0] == pytest.approx(objective(pa, pb), rel=1e-9)
    assert obj[-1] == pytest.approx(objective(pa, apply_permutation(spec, perm, pb)), rel=1e-5)


@pytest.mark.parametrize("name,shape,cfg", [
    ("mlp", (1, 8, 8), {"depth": 3, "width": 24}),
    ("vgg", (1, 8, 8), {"width": 0.25, "norm": "layer"}),
    ("resnet20", (3, 8, 8), {"width": 1, "norm": "layer"}),
], ids=["mlp", "vgg", "resnet20"])
@pytest.mark.parametrize("overlap", [False, True], ids=["one-thread", "overlap"])
def test_fast_weight_matching_equals_the_plain_official_loop(name, shape, cfg, overlap):
    a = _randomize_norms(models.build(name, shape, 10, seed=1, **cfg), 1)
    b = _randomize_norms(models.build(name, shape, 10, seed=2, **cfg), 2)
    spec = builtin_spec(a)
    perm, trace = weight_matching(spec, _params(a), _params(b), seed=3, overlap=overlap)
    ref, ref_trace = weight_matching_reference(spec, _params(a), _params(b), seed=3)
    assert all(torch.equal(perm[p], ref[p]) for p in perm)
    assert trace.sweeps == ref_trace.sweeps
    assert trace.objective[-1] == pytest.approx(ref_trace.objective[-1], rel=1e-6)
    # The overlapped loop really queued cost matrices ahead (which thread took each one is
    # up to the scheduler).
    assert (trace.queued > 0) == overlap


def _sweeps_with_prefetch(steps, work, lookahead=2, max_iter=3):
    """coordinate_ascent over `steps` with a prefetch whose items are (step, running steps)."""
    trace = MatchingTrace()
    plan = lambda step, running: [(step, tuple(running))]  # noqa: E731
    coordinate_ascent(steps, 0.0, trace, max_iter, seed=0,
                      prefetch=Prefetch(plan, work, lookahead))
    return trace


def test_prefetch_finishes_each_item_before_its_step_planned_against_the_steps_between():
    """The item for the visit at position t is done before that visit starts, and was planned
    against exactly the visits that may run while it is computed (those from its queueing to
    t - 1), so that a plan can leave out what they change."""
    done, ran, lookahead = [], [], 2

    def make(i):
        def step(trace):
            t = len(ran)
            if t:
                assert (i, tuple(ran[max(0, t - lookahead):t])) in done, (t, i, ran, done)
            ran.append(i)
            return 1.0 if len(ran) <= 8 else None  # progress in the first two sweeps only
        return step

    trace = _sweeps_with_prefetch([make(i) for i in range(4)], done.append, lookahead)
    assert trace.sweeps == 3 and trace.converged and len(ran) == 12
    # The visiting order is the plain loop's: a fresh permutation per sweep from one generator.
    rng = np.random.default_rng(0)
    assert ran == [int(i) for _ in range(3) for i in rng.permutation(4)]


def test_an_error_in_a_step_or_a_prefetch_stops_the_loop_and_its_thread():
    def boom(trace):
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError, match="step failed"):
        _sweeps_with_prefetch([boom, boom, boom], lambda item: None)

    def bad_work(item):
        raise ValueError("prefetch failed")

    with pytest.raises(ValueError, match="prefetch failed"):
        _sweeps_with_prefetch([lambda t: 1.0] * 3, bad_work)
    assert not [t for t in threading.enumerate() if t.name == "basinmerge-prefetch"]


def test_warm_start_from_the_answer_stops_after_one_sweep():
    model = models.build("mlp", (1, 6, 6), 10, seed=0, depth=2, width=16)
    spec, params, planted = _planted(model, seed=5)
    perm, _ = weight_matching(spec, params, planted)
    again, trace = weight_matching(spec, params, planted, init_perm=perm)
    assert trace.sweeps == 1 and trace.accepted == 0
    assert all(torch.equal(again[p], perm[p]) for p in perm)


def _digits_mlp(seed: int, width: int = 32, epochs: int = 3) -> nn.Module:
    from basinmerge.train import fit

    train = data.load("digits", "train")
    net = models.build("mlp", train.input_shape, 10, seed=seed, depth=2, width=width)
    fit(net, train, optimizer="adam", lr=3e-3, epochs=epochs, seed=seed, progress=False)
    return net.eval()


def test_activation_matching_recovers_a_planted_permutation():
    # A random-init MLP with Gaussian inputs: no dead units, no ties.
    a = models.build("mlp", (20,), 10, seed=0, depth=2, width=16).eval()
    spec = builtin_spec(a)
    b = models.build("mlp", (20,), 10, seed=0, depth=2, width=16)
    b.load_state_dict(apply_permutation(spec, random_permutation(spec, 4), a.state_dict()))
    x = torch.randn(400, 20)
    for method in ("corr", "ols"):
        perm = activation_matching(a, b, x, method)
        back = apply_permutation(spec, perm, b.state_dict())
        assert all(torch.equal(back[k], v) for k, v in a.state_dict().items())


def test_activation_matching_handles_dead_units_and_layer_by_layer_equals_one_pass():
    a, b = _digits_mlp(0), _digits_mlp(1)
    with torch.no_grad():  # kill four units of B's first layer
        b.layers[0].weight[:4] = 0.0
        b.layers[0].bias[:4] = -1.0
    x = data.load("digits", "train").x
    spec = builtin_spec(a)
    costs = _activation_costs(a, b, spec, spec.perms, x, "corr", 500)
    assert all(torch.isfinite(c).all() for c in costs.values())
    assert (costs["P_layers.0"][:, :4] == 0).all()
    one = activation_matching(a, b, x)
    seq = activation_matching(a, b, x, one_pass=False)
    for p in spec.perms:  # same optimal value (ties among dead units may be broken differently)
        idx = torch.arange(spec.sizes[p])
        assert costs[p][idx, one[p]].sum() == pytest.approx(float(costs[p][idx, seq[p]].sum()), abs=1e-6)
        assert sorted(one[p].tolist()) == idx.tolist()


def test_ste_keeps_the_best_permutation_on_held_out_data():
    a, b = _digits_mlp(0, epochs=2), _digits_mlp(1, epochs=2)
    train = data.load("digits", "train")
    perm, trace = ste_matching(a, b, train, steps=6, lr=1e-2, eval_every=2)
    assert [s for s, _ in trace.held_out] == [0, 2, 4, 6]
    assert trace.best_loss == min(v for _, v in trace.held_out)
    assert len(trace.losses) == 6 and all(torch.isfinite(torch.tensor(trace.losses)))
    assert sorted(perm["P_layers.0"].tolist()) == list(range(32))
    with pytest.raises(ConfigError, match="needs data"):
        align(a, b, "ste")


def test_merge_many_of_permuted_copies_returns_the_model():
    model = _randomize_norms(models.build("vgg", (1, 8, 8), 10, seed=0, width=0.25, norm="batch"), 3)
    model.eval()
    spec = builtin_spec(model)
    copies = []
    for s in range(3):
        c = models.build_from_config(model.config)
        c.load_state_dict(apply_permutation(spec, random_permutation(spec, 20 + s), model.state_dict()))
        copies.append(c)
    merged, perms = merge_many(copies, spec)
    aligned = [apply_permutation(spec, p, c.state_dict()) for p, c in zip(perms, copies, strict=True)]
    assert all(torch.equal(aligned[0][k], aligned[i][k]) for i in (1, 2) for k in aligned[0])
    net = models.build_from_config(model.config)
    net.load_state_dict(merged)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), model(x), atol=1e-5, rtol=1e-4)
    # The merge of the permuted copies equals their average once aligned.
    avg = weighted_average(aligned)
    assert all(torch.allclose(merged[k].float(), avg[k].float()) for k in merged)


def test_align_returns_an_equivalent_copy_closer_to_a():
    a, b = _digits_mlp(0, epochs=1), _digits_mlp(1, epochs=1)
    aligned = align(a, b, "weight")
    x = data.load("digits", "test").x[:32]
    with torch.no_grad():
        torch.testing.assert_close(aligned(x), b(x), atol=1e-5, rtol=1e-4)
    assert objective(_params(a), _params(aligned)) > objective(_params(a), _params(b))
    assert aligned.config == b.config and aligned.alignment["method"] == "weight"
    with pytest.raises(ConfigError, match="unknown alignment method"):
        align(a, b, "greedy")


@pytest.mark.parametrize("shape", [(0, 5), (), (7,), (3, 4, 5), (30000,), (40, 30)])
def test_dot64_is_the_float64_inner_product(shape):
    """Chunked float64 products and sums: the exact float64 inner product, for any shape and
    for a transposed (non-contiguous) view, across chunk boundaries."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    expected = float((a.double() * b.double()).sum())
    assert dot64(a, b, chunk=1000) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    if len(shape) == 2:
        assert dot64(a.T, b.T, chunk=7) == pytest.approx(expected, rel=1e-12, abs=1e-12)
