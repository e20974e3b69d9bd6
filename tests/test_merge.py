"""Merge methods against hand-computed values, closed forms and invariants."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from basinmerge import data as data_mod
from basinmerge import models
from basinmerge.errors import ConfigError, IncompatibleModelsError
from basinmerge.merge import (
    METHODS,
    adamerging,
    average,
    dare,
    diagonal_fisher,
    fisher,
    greedy_soup,
    median,
    merge,
    regmean,
    task_arithmetic,
    ties,
    trimmed_mean,
    weighted,
)
from basinmerge.merge.adamerging import adamerging_info
from basinmerge.merge.soup import greedy_soup_info
from basinmerge.state import with_state
from basinmerge.train import evaluate, fit

pytestmark = pytest.mark.usefixtures("one_thread")


def _vec(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32)}


@pytest.fixture(scope="module")
def digits():
    return data_mod.load("digits", "train"), data_mod.load("digits", "test")


@pytest.fixture(scope="module")
def family(digits):
    """A base MLP and three fine-tunes on class-skewed subsets of digits."""
    train, _ = digits
    net = models.build("mlp", train.input_shape, 10, seed=0, width=16)
    fit(net, train, epochs=2, lr=0.05, progress=False)
    base = {k: v.clone() for k, v in net.state_dict().items()}
    members = []
    for i in range(3):
        m = copy.deepcopy(net)
        idx = torch.nonzero((train.y % 3 == i) | (torch.arange(len(train)) % 5 == 0)).flatten()
        fit(m, train.subset(idx), epochs=2, lr=0.05, seed=i, progress=False)
        members.append({k: v.clone() for k, v in m.state_dict().items()})
    return net, base, members


# --------------------------------------------------------------------------- hand-computed


def test_average_weighted_median_trimmed_by_hand():
    a, b, c, d = _vec(1, 10), _vec(2, 20), _vec(4, 40), _vec(100, -1)
    assert torch.allclose(average([a, b, c])["w"], torch.tensor([7 / 3, 70 / 3]))
    assert torch.allclose(weighted([a, b], [3, 1])["w"], torch.tensor([1.25, 12.5]))
    assert torch.equal(median([a, b, c])["w"], torch.tensor([2.0, 20.0]))
    # even K: mean of the two middle values
    assert torch.equal(median([a, b, c, d])["w"], torch.tensor([3.0, 15.0]))
    # trim 0.25 of K=4 drops one value at each end, per coordinate
    assert torch.equal(trimmed_mean([a, b, c, d], trim=0.25)["w"], torch.tensor([3.0, 15.0]))
    assert torch.allclose(trimmed_mean([a, b, c], trim=0.25)["w"], average([a, b, c])["w"])


def test_task_arithmetic_by_hand():
    base = _vec(1, 1)
    out = task_arithmetic(base, [_vec(2, 0), _vec(4, 1)], scale=0.5)
    assert torch.allclose(out["w"], torch.tensor([1 + 0.5 * (1 + 3), 1 + 0.5 * (-1 + 0)]))


TAUS = [(1.0, -2.0, 0.5, 3.0), (2.0, 1.0, -1.5, -0.8), (-0.5, 1.5, -0.2, -1.0)]


def test_ties_sign_election_and_disjoint_mean():
    base = _vec(10, 10, 10, 10)
    models_ = [_vec(*(10 + t for t in tau)) for tau in TAUS]
    # no trimming: sums (2.5, 0.5, -1.2, 1.2) elect (+, +, -, +); average the agreeing values
    out = ties(base, models_, density=1.0, scale=1.0)
    assert torch.allclose(out["w"], 10 + torch.tensor([1.5, 1.25, -0.85, 3.0]))
    # density 0.5 keeps each model's top 2 |tau|: (0,-2,0,3), (2,0,-1.5,0), (0,1.5,0,-1);
    # sums (2, -0.5, -1.5, 2) elect (+, -, -, +) -> (2, -2, -1.5, 3), then scaled by 0.5
    out = ties(base, models_, density=0.5, scale=0.5, trim_mode="tensor")
    assert torch.allclose(out["w"], 10 + 0.5 * torch.tensor([2.0, -2.0, -1.5, 3.0]))
    # with one key, global and per-tensor trimming agree
    assert torch.equal(ties(base, models_, density=0.5, scale=0.5)["w"], out["w"])


def test_ties_global_trim_differs_from_per_tensor():
    base = {"a": torch.zeros(4), "b": torch.zeros(2)}
    m = {"a": torch.tensor([1.0, -2.0, 0.5, 3.0]), "b": torch.tensor([10.0, 9.0])}
    # global: top 3 of 6 magnitudes are 10, 9, 3
    g = ties(base, [m], density=0.5, trim_mode="global")
    assert torch.equal(g["a"], torch.tensor([0.0, 0.0, 0.0, 3.0]))
    assert torch.equal(g["b"], torch.tensor([10.0, 9.0]))
    # per tensor: top 2 of a, top 1 of b
    t = ties(base, [m], density=0.5, trim_mode="tensor")
    assert torch.equal(t["a"], torch.tensor([0.0, -2.0, 0.0, 3.0]))
    assert torch.equal(t["b"], torch.tensor([10.0, 0.0]))


def test_ties_exact_cancellation_elects_plus_as_mergekit():
    """A zero trimmed sum elects + (mergekit's `(sum >= 0) * 2 - 1`): the positive values are
    averaged. Coordinates: (1, -1) -> 1; (3, -1, -2) -> 3; (-2, 2, 0.5, -0.5) -> mean(2, 0.5);
    all zero -> 0."""
    base = _vec(0.0, 0.0, 0.0, 0.0)
    members = [_vec(1.0, 3.0, -2.0, 0.0), _vec(-1.0, -1.0, 2.0, 0.0),
               _vec(0.0, -2.0, 0.5, 0.0), _vec(0.0, 0.0, -0.5, 0.0)]
    out = ties(base, members, density=1.0)
    assert torch.equal(out["w"], torch.tensor([1.0, 3.0, 1.25, 0.0]))


def test_dare_rescales_in_expectation():
    n, p, c = 200_000, 0.7, 0.3
    base = {"w": torch.zeros(n)}
    out = dare(base, [{"w": torch.full((n,), c)}], drop=p, scale=1.0, seed=3)["w"]
    kept = out != 0
    assert torch.allclose(out[kept], torch.tensor(c / (1 - p)))  # survivors are rescaled
    assert abs(kept.double().mean().item() - (1 - p)) < 0.005
    assert abs(out.double().mean().item() - c) < 0.01 * c / (1 - p) * 3  # E[out] = tau
    again = dare(base, [{"w": torch.full((n,), c)}], drop=p, seed=3)["w"]
    other = dare(base, [{"w": torch.full((n,), c)}], drop=p, seed=4)["w"]
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_dare_then_ties_and_no_drop_is_plain():
    base = _vec(0, 0, 0, 0)
    ms = [_vec(*tau) for tau in TAUS]
    assert torch.equal(dare(base, ms, drop=0.0, scale=0.5)["w"], task_arithmetic(base, ms, 0.5)["w"])
    assert torch.equal(dare(base, ms, drop=0.0, then="ties", density=0.5)["w"],
                       ties(base, ms, density=0.5)["w"])


def test_fisher_weights_by_hand():
    a, b = _vec(1.0, 2.0), _vec(3.0, 6.0)
    fa, fb = _vec(1.0, 0.0), _vec(3.0, 0.0)
    # coordinate 0: (1*1 + 3*3) / (1 + 3); coordinate 1: both floored -> plain average
    out = fisher([a, b], None, fishers=[fa, fb])
    assert torch.allclose(out["w"], torch.tensor([2.5, 4.0]))
    # lambda = (1, 3): (1*1*1 + 3*3*3) / (1*1 + 3*3) and the lambda-weighted average
    out = fisher([a, b], None, fishers=[fa, fb], weights=[1, 3])
    assert torch.allclose(out["w"], torch.tensor([2.8, 5.0]))


def test_diagonal_fisher_matches_per_example_autograd():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(6, 4)
    got = diagonal_fisher(net, net.state_dict(), x)
    want = {k: torch.zeros_like(p) for k, p in net.named_parameters()}
    for xi in x:
        logp = torch.log_softmax(net(xi[None]), -1)[0]
        for y in range(3):
            grads = torch.autograd.grad(logp[y], list(net.parameters()), retain_graph=True)
            for (k, _), g in zip(net.named_parameters(), grads, strict=True):
                want[k] += logp[y].exp().detach() * g ** 2 / x.shape[0]
    for k in want:
        assert torch.allclose(got[k].float(), want[k], atol=1e-6), k


def test_regmean_alpha_one_is_least_squares_on_stacked_data():
    torch.manual_seed(0)
    layers = [nn.Linear(5, 3) for _ in range(2)]
    xs = [torch.randn(20, 5), torch.randn(20, 5) * 2 + 1]
    out = regmean(layers, xs, alpha=1.0, bias="regress", num_examples=None)
    xa = torch.cat([torch.cat([x, torch.ones(len(x), 1)], 1) for x in xs]).double()
    ya = torch.cat([lay(x) for lay, x in zip(layers, xs, strict=True)]).detach().double()
    sol = torch.linalg.lstsq(xa, ya).solution.T  # (out, in + 1)
    assert torch.allclose(out["weight"].double(), sol[:, :5], atol=1e-5)
    assert torch.allclose(out["bias"].double(), sol[:, 5], atol=1e-5)
    # a bias-free layer with the paper's default (weights only)
    nob = [nn.Linear(5, 3, bias=False) for _ in range(2)]
    out = regmean(nob, xs, alpha=1.0, num_examples=None)
    ya = torch.cat([lay(x) for lay, x in zip(nob, xs, strict=True)]).detach().double()
    sol = torch.linalg.lstsq(torch.cat(xs).double(), ya).solution.T
    assert torch.allclose(out["weight"].double(), sol, atol=1e-5)


def test_regmean_alpha_zero_weights_each_input_by_its_energy():
    torch.manual_seed(1)
    layers = [nn.Linear(3, 2, bias=False) for _ in range(2)]
    xs = [torch.randn(10, 3), torch.randn(10, 3) * 3]
    out = regmean(layers, xs, alpha=0.0, num_examples=None)["weight"]
    e = [(x ** 2).mean(0) for x in xs]  # diagonal of each Gram
    want = (e[0] * layers[0].weight + e[1] * layers[1].weight) / (e[0] + e[1])
    assert torch.allclose(out, want.detach(), atol=1e-6)


def test_regmean_dead_inputs_take_the_average():
    layers = [nn.Linear(3, 2, bias=False) for _ in range(2)]
    x = torch.randn(8, 3)
    x[:, 1] = 0  # input 1 never active
    out = regmean(layers, x, alpha=0.5, num_examples=None)["weight"]
    avg = (layers[0].weight + layers[1].weight) / 2
    assert torch.allclose(out[:, 1], avg[:, 1].detach())


# --------------------------------------------------------------------------- invariants


def _copies_case(method, net, member, base, train):
    k = 3
    copies = [{kk: v.clone() for kk, v in member.items()} for _ in range(k)]
    opts: dict = {}
    if method == "task_arithmetic":
        opts = dict(base=base, scale=1 / k)
    elif method == "ties":
        opts = dict(base=base, density=1.0)  # trimming is lossy by design
    elif method == "dare":
        opts = dict(base=base, drop=0.0, scale=1 / k)  # dropping is random by design
    elif method == "breadcrumbs":
        opts = dict(base=base, beta=0.0, gamma=0.0, scale=1 / k)  # trimming is lossy by design
    elif method == "della":
        opts = dict(base=base, drop=0.0, epsilon=0.0)  # dropping is random by design
    elif method == "model_stock":
        opts = dict(base=base)  # parallel task vectors: t = 1, the average
    elif method == "adamerging":
        opts = dict(base=base, data=train.x[:64], init=1 / k, steps=0, model=net)
    elif method == "weighted":
        opts = dict(weights=[1, 2, 3])
    elif method in ("greedy_soup", "soft"):
        opts = dict(data=train, model=net)
        if method == "soft":
            opts.update(steps=20, progress=False)
    elif method in ("fisher", "regmean"):
        opts = dict(data=train, model=net, num_examples=32)
    return copies, opts


@pytest.mark.parametrize("method", list(METHODS))
def test_merging_copies_of_one_model_returns_it(method, family, digits):
    """K copies merge to the model itself (TIES without trimming, DARE without dropping,
    task arithmetic / AdaMerging with coefficients summing to 1)."""
    net, base, members = family
    copies, opts = _copies_case(method, net, members[0], base, digits[0])
    out = merge(copies, method, **opts)
    for k, v in members[0].items():
        assert torch.allclose(out[k], v, atol=2e-5, rtol=1e-5), (method, k)


def test_integer_buffers_come_from_the_first_model():
    a = models.build("mlp", (4,), 3, seed=0, width=4, norm="batch")
    b = models.build("mlp", (4,), 3, seed=1, width=4, norm="batch")
    sa, sb = a.state_dict(), b.state_dict()
    sa["norms.0.num_batches_tracked"].fill_(7)
    sb["norms.0.num_batches_tracked"].fill_(9)
    for out in (average([sa, sb]), median([sa, sb]), ties(sb, [sa, sb])):
        assert out["norms.0.num_batches_tracked"].item() == 7
        assert out["norms.0.num_batches_tracked"].dtype == torch.int64


def test_data_using_merge_recomputes_batchnorm_statistics():
    torch.manual_seed(0)
    a = models.build("mlp", (4,), 3, seed=0, width=6, norm="batch")
    b = models.build("mlp", (4,), 3, seed=1, width=6, norm="batch")
    x = torch.randn(64, 4)
    out = regmean([a, b], x, num_examples=None)
    merged = with_state(a, out)
    pre = merged.layers[0](x)  # BN statistics must be those of the merged first layer
    assert torch.allclose(out["norms.0.running_mean"], pre.mean(0), atol=1e-5)
    assert torch.allclose(out["norms.0.running_var"], pre.var(0), atol=1e-4)


def test_adamerging_lowers_entropy_and_keeps_lambdas_in_range(family, digits):
    net, base, members = family
    x = digits[0].x[:256]
    state, info = adamerging_info(base, members, x, "task", model=net, steps=30, lr=0.05,
                                  progress=False)
    lam = list(info["lambdas"].values())
    assert all(0.0 <= v <= 1.0 for v in lam) and any(v != 0.3 for v in lam)
    assert info["entropy_last"] < info["entropy_first"]
    _, info = adamerging_info(base, members, x, "layer", model=net, steps=3, progress=False)
    assert all(len(v) == len(base) for v in info["lambdas"].values())
    assert set(state) == set(base)
    assert torch.allclose(adamerging(base, members, x, model=net, steps=0, progress=False)["head.bias"],
                          task_arithmetic(base, members, 0.3)["head.bias"], atol=1e-6)


def test_every_data_using_method_runs_on_batchnorm_models():
    """AdaMerging used to fail on BatchNorm models (running statistics took part in the
    differentiable merge); every data-using method now merges them and resets the statistics."""
    torch.manual_seed(0)
    nets = [models.build("mlp", (8,), 3, seed=i, width=6, norm="batch") for i in range(3)]
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    for method, kw in [("adamerging", dict(base=nets[0], steps=3, progress=False)),
                       ("fisher", dict(num_examples=8)), ("regmean", {}), ("greedy_soup", {}),
                       ("soft", dict(steps=3, progress=False))]:
        members = nets[1:] if method == "adamerging" else nets
        out = merge(members, method, data=(x, y), **kw)
        merged = with_state(nets[0], out)
        pre = merged.layers[0](x)  # the statistics are those of the merged first layer
        assert torch.allclose(out["norms.0.running_mean"], pre.mean(0), atol=1e-5), method
        assert torch.isfinite(merged.eval()(x)).all(), method


def test_greedy_soup_skips_a_model_that_hurts(family, digits):
    net, _, members = family
    train, _ = digits
    noise = {k: torch.randn_like(v) * 3 for k, v in members[0].items()}
    state, info = greedy_soup_info([noise] + members, train, model=net)
    assert "model 0" not in info["chosen"]
    assert info["order"][-1] == "model 0"
    best_single = max(info["accuracies"][n] for n in info["chosen"])
    assert info["soup_accuracy"][-1] >= best_single
    assert evaluate(with_state(net, state), train)["accuracy"] == pytest.approx(info["soup_accuracy"][-1])
    assert torch.equal(greedy_soup([noise] + members, train, model=net)["head.weight"], state["head.weight"])


def test_merge_dispatch_equals_the_direct_call(family):
    _, base, members = family
    assert torch.equal(merge(members, "ties", base=base, density=0.3)["head.weight"],
                       ties(base, members, density=0.3)["head.weight"])


# --------------------------------------------------------------------------- bad input


def test_different_architectures_name_model_and_key():
    a = models.build("mlp", (4,), 3, seed=0, width=4)
    b = models.build("mlp", (4,), 3, seed=0, width=5)
    with pytest.raises(IncompatibleModelsError, match=r"key 'layers.0.weight'.*model 1"):
        average([a, b])


def test_nan_and_inf_name_model_and_key():
    a = _vec(1.0, 2.0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(IncompatibleModelsError, match=r"model 1: key 'w' contains (NaN|Inf)"):
            ties(_vec(0, 0), [a, _vec(1.0, bad)])


def test_base_that_does_not_match():
    with pytest.raises(IncompatibleModelsError, match="base"):
        task_arithmetic({"w": torch.zeros(3)}, [_vec(1, 2), _vec(3, 4)])


@pytest.mark.parametrize("method", list(METHODS))
def test_too_few_models(method):
    with pytest.raises(ConfigError, match="needs at least"):
        merge([], method, **({"base": _vec(0.0)} if METHODS[method].needs_base else {}),
              **({"data": torch.zeros(1, 1)} if METHODS[method].needs_data else {}))


def test_soft_needs_two_models(family, digits):
    net, _, members = family
    with pytest.raises(ConfigError, match="'soft' needs at least 2 models"):
        merge(members[:1], "soft", data=digits[0], model=net)


def test_bad_method_options_and_missing_inputs():
    a, b = _vec(1.0), _vec(2.0)
    with pytest.raises(ConfigError, match="unknown merge method 'foo'"):
        merge([a, b], "foo")
    with pytest.raises(ConfigError, match="has no option 'density'"):
        merge([a, b], "average", density=0.2)
    with pytest.raises(ConfigError, match="needs a base"):
        merge([a, b], "ties")
    with pytest.raises(ConfigError, match="needs labeled data"):
        merge([a, b], "greedy_soup")
    with pytest.raises(ConfigError, match="density must be in"):
        ties(a, [b], density=0.0)
    with pytest.raises(ConfigError, match="drop probability"):
        dare(a, [b], drop=1.0)
    with pytest.raises(ConfigError, match="trim must be"):
        trimmed_mean([a, b], trim=0.5)
    with pytest.raises(ConfigError, match="runs the network"):
        fisher([a, b], torch.zeros(2, 1))
    with pytest.raises(ConfigError, match="weights"):
        weighted([a, b], [1.0, -1.0])
