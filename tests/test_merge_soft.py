"""Soft Merging: the hard-concrete distribution, gates reaching exact 0 and 1, and robustness
to a malicious member (where plain averaging collapses)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from basinmerge import data as data_mod
from basinmerge import models
from basinmerge.errors import ConfigError
from basinmerge.merge import (
    average,
    deterministic_gate,
    expected_l0,
    hard_concrete_sample,
    median,
    soft,
    trimmed_mean,
)
from basinmerge.merge.soft import BETA, GAMMA, ZETA, soft_units
from basinmerge.state import with_state
from basinmerge.train import evaluate, fit

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- hard concrete


LOG_ALPHAS = torch.tensor([-3.0, -1.0, 0.0, 0.7, 2.0, 4.0])


def test_expected_l0_closed_form_matches_monte_carlo():
    n = 200_000
    la = LOG_ALPHAS.repeat(n, 1)
    z = hard_concrete_sample(la, generator=torch.Generator().manual_seed(0))
    mc = (z > 0).double().mean(0)
    closed = expected_l0(LOG_ALPHAS).double()
    assert torch.allclose(mc, closed, atol=0.004)
    # the documented constant: sigmoid(log_alpha + 1.5986) with the default beta, gamma, zeta
    assert torch.allclose(closed, torch.sigmoid(LOG_ALPHAS.double() + 1.5986), atol=1e-4)
    # P(z = 1) = sigmoid(log_alpha - beta * log((1 - gamma) / (zeta - 1)))
    p_one = torch.sigmoid(LOG_ALPHAS.double() - BETA * math.log((1 - GAMMA) / (ZETA - 1)))
    assert torch.allclose((z == 1).double().mean(0), p_one, atol=0.004)
    # at log_alpha = 0 a gate is open 83% of the time
    assert abs(float(expected_l0(torch.tensor(0.0))) - 0.832) < 0.001


def test_samples_are_exactly_zero_or_one_with_positive_probability_and_differentiable():
    la = torch.zeros(10_000, requires_grad=True)
    z = hard_concrete_sample(la, generator=torch.Generator().manual_seed(1))
    assert 0 < (z == 0).sum() < 10_000 and 0 < (z == 1).sum() < 10_000
    assert ((z >= 0) & (z <= 1)).all()
    z.sum().backward()
    inside = (z > 0) & (z < 1)
    assert (la.grad[inside] > 0).all() and (la.grad[~inside] == 0).all()


def test_test_time_gate_reaches_exact_zero_and_one():
    g = deterministic_gate(torch.tensor([-10.0, -2.4, -2.39, 0.0, 2.39, 2.4, 10.0]))
    assert g[0] == 0 and g[1] == 0 and 0 < g[2] < 1
    assert g[3] == pytest.approx(0.5)
    assert 0 < g[4] < 1 and g[5] == 1 and g[6] == 1


# --------------------------------------------------------------------------- soft merging


@pytest.fixture(scope="module")
def family():
    """A base MLP on digits and three fine-tunes on class-skewed subsets."""
    train, test = data_mod.load("digits", "train"), data_mod.load("digits", "test")
    net = models.build("mlp", train.input_shape, 10, seed=0, width=32)
    fit(net, train, epochs=2, lr=0.05, progress=False)
    members = []
    for i in range(3):
        m = copy.deepcopy(net)
        idx = torch.nonzero((train.y % 3 == i) | (torch.arange(len(train)) % 5 == 0)).flatten()
        fit(m, train.subset(idx), epochs=3, lr=0.05, seed=i, progress=False)
        members.append({k: v.clone() for k, v in m.state_dict().items()})
    clean = evaluate(with_state(net, average(members)), test)["accuracy"]
    return net, members, train, test, clean


def _bad(state, kind):
    g = torch.Generator().manual_seed(7)
    if kind == "x1000":
        return {k: v * 1000 for k, v in state.items()}
    if kind == "noise":
        return {k: torch.randn(v.shape, generator=g) * 10 for k, v in state.items()}
    return {k: -v for k, v in state.items()}


@pytest.mark.parametrize("units", ["module", "tensor"])
@pytest.mark.parametrize("kind", ["x1000", "noise"])
def test_malicious_member_gates_close_exactly_and_average_collapses(family, kind, units):
    net, members, train, test, clean = family
    bad = _bad(members[0], kind)
    group = members + [bad]
    before = [{k: v.clone() for k, v in s.items()} for s in group]
    avg_acc = evaluate(with_state(net, average(group)), test)["accuracy"]
    assert avg_acc < clean - 0.1  # plain averaging collapses
    model, gates = soft(group, train, model=net, units=units, progress=False)
    g = gates.gates
    assert (g[:, -1] == 0).all()  # the malicious member is switched off, exactly
    assert (g[:, :-1] == 1).float().mean() > 0.5  # good gates reach exactly 1
    assert not gates.fallback_units
    assert evaluate(model, test)["accuracy"] > clean - 0.03
    for s, b in zip(group, before, strict=True):  # the members' weights were not touched
        assert all(torch.equal(s[k], b[k]) for k in s)


def test_sign_flipped_member_gates_close_with_module_units(family):
    net, members, train, test, clean = family
    group = members + [_bad(members[0], "flip")]
    model, gates = soft(group, train, model=net, progress=False)  # default: module units
    assert gates.units == ["layers.0", "layers.1", "head"]
    assert (gates.gates[:, -1] == 0).all() and (gates.gates[:, :-1] > 0.99).all()
    assert evaluate(model, test)["accuracy"] > clean - 0.03
    # per-tensor units: every weight gate closes; a flipped bias does little harm, and its gate
    # closes only slowly (why module units are the default; see docs/methods.md)
    _, gates = soft(group, train, model=net, units="tensor", progress=False)
    weight_rows = [i for i, u in enumerate(gates.units) if u.endswith("weight")]
    assert (gates.gates[weight_rows, -1] == 0).all()


def test_median_and_trimmed_mean_survive_a_scaled_member(family):
    net, members, _, test, clean = family
    group = members + [_bad(members[0], "x1000")]
    for merged in (median(group), trimmed_mean(group, trim=0.25)):
        assert evaluate(with_state(net, merged), test)["accuracy"] > clean - 0.05


def test_units_subset_takes_the_rest_from_the_reference(family):
    net, members, train, _, _ = family
    model, gates = soft(members, train, model=net, units=["head"], reference=1, steps=5,
                        progress=False)
    state = model.state_dict()
    assert gates.units == ["head"] and gates.unit_keys == [["head.weight", "head.bias"]]
    assert torch.equal(state["layers.0.weight"], members[1]["layers.0.weight"])
    _, gates = soft(members, train, model=net, units=["layers.1.weight", "head"], steps=5,
                    progress=False)
    assert gates.log_alpha.shape == (2, 3)
    model, _ = soft(members, train, model=net, units=["head"], steps=5, progress=False)
    assert torch.allclose(model.state_dict()["layers.0.weight"], average(members)["layers.0.weight"])


def test_all_closed_unit_falls_back_to_the_strongest_gate(family):
    net, members, train, _, _ = family
    model, gates = soft(members, train, model=net, init=-6.0, steps=0, progress=False)
    assert len(gates.fallback_units) == len(gates.units)
    assert torch.equal(model.state_dict()["head.weight"], members[0]["head.weight"])


def test_soft_units_and_bad_options(family):
    net, members, train, _, _ = family
    assert [u for u, _ in soft_units(net, "tensor")][:2] == ["layers.0.weight", "layers.0.bias"]
    with pytest.raises(ConfigError, match="matches no parameter"):
        soft(members, train, model=net, units=["nope"])
    with pytest.raises(ConfigError, match="both contain"):
        soft(members, train, model=net, units=["head", "head.bias"])
    with pytest.raises(ConfigError, match="labeled data"):
        soft(members, train.x, model=net)
    with pytest.raises(ConfigError, match="optimizer"):
        soft(members, train, model=net, optimizer="rmsprop")


def test_soft_align_weight_recovers_a_permuted_copy() -> None:
    """A model and a hidden-unit permutation of it: without alignment their average is a
    different function; with align="weight" the permuted copy is mapped back exactly, so any
    gate combination is the model itself."""
    from basinmerge import data as data_mod
    from basinmerge.align import builtin_spec, random_permutation
    from basinmerge.align.permute import apply_permutation
    from basinmerge.models import build
    from basinmerge.train import evaluate, fit

    train = data_mod.load("digits").subset(400, seed=0)
    a = build("mlp", train.input_shape, 10, seed=0, width=24)
    fit(a, train, optimizer="adam", lr=3e-3, epochs=3, progress=False)
    spec = builtin_spec(a)
    b_state = apply_permutation(spec, random_permutation(spec, seed=3), a.state_dict())
    merged, table = soft([a, b_state], train, steps=5, model=a, align="weight", progress=False)
    for k, v in a.state_dict().items():
        assert torch.allclose(merged.state_dict()[k], v, atol=1e-6), k
    assert evaluate(merged, train)["accuracy"] == evaluate(a, train)["accuracy"]
    with pytest.raises(ConfigError, match="soft align"):
        soft([a, b_state], train, steps=1, model=a, align="bogus", progress=False)
