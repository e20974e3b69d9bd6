"""Weight scopes: closed forms vs Monte Carlo, fusion vs pooled samples, fit quality, live
units, the bad inputs, the `scope` CLI command and the Fig.-1 histogram figure."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from torch import nn

from basinmerge import io, models, plots
from basinmerge.cli import main
from basinmerge.errors import ConfigError
from basinmerge.scope import (
    DIVERGENCES,
    LayerScope,
    Scope,
    divergence,
    divergence_terms,
    excess_kurtosis,
    fit_quality,
    fuse,
    ks_gaussian,
    layer_values,
    live_input_masks,
    pairwise_mismatch,
    scope_keys,
    scope_rows,
    weight_scope,
)


def one_layer(mu: float, sd: float, n: int = 100) -> Scope:
    return Scope({"w": LayerScope(mu, sd, n)})


def three_layers(seed: int = 0) -> Scope:
    g = torch.Generator().manual_seed(seed)
    mus = torch.randn(3, generator=g, dtype=torch.float64) * 0.1
    sds = torch.rand(3, generator=g, dtype=torch.float64) * 0.5 + 0.05
    return Scope({f"l{i}.weight": LayerScope(float(m), float(s), 10 * (i + 1))
                  for i, (m, s) in enumerate(zip(mus, sds, strict=True))})


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("mu_a,sd_a,mu_b,sd_b", [(0.0, 1.0, 0.5, 2.0), (0.3, 0.05, -0.1, 0.08),
                                                 (1.0, 2.0, 1.0, 0.7)])
def test_kl_closed_forms_match_monte_carlo(mu_a, sd_a, mu_b, sd_b):
    g = torch.Generator().manual_seed(0)
    pa = torch.distributions.Normal(torch.tensor(mu_a, dtype=torch.float64), sd_a)
    pb = torch.distributions.Normal(torch.tensor(mu_b, dtype=torch.float64), sd_b)
    n = 400_000
    xa = mu_a + sd_a * torch.randn(n, generator=g, dtype=torch.float64)
    xb = mu_b + sd_b * torch.randn(n, generator=g, dtype=torch.float64)
    ratio_a = pa.log_prob(xa) - pb.log_prob(xa)  # E_a[log a/b] = KL(a ‖ b)
    ratio_b = pb.log_prob(xb) - pa.log_prob(xb)  # E_b[log b/a] = KL(b ‖ a)
    d = divergence(one_layer(mu_a, sd_a), one_layer(mu_b, sd_b), "kl").total
    r = divergence(one_layer(mu_a, sd_a), one_layer(mu_b, sd_b), "reverse_kl").total
    assert d == pytest.approx(float(ratio_a.mean()), abs=4 * float(ratio_a.std()) / math.sqrt(n))
    assert r == pytest.approx(float(ratio_b.mean()), abs=4 * float(ratio_b.std()) / math.sqrt(n))


@pytest.mark.parametrize("mu_a,sd_a,mu_b,sd_b", [(0.0, 1.0, 0.5, 2.0), (0.3, 0.05, -0.1, 0.08)])
def test_w2_closed_form_matches_sorted_samples_and_quantiles(mu_a, sd_a, mu_b, sd_b):
    w2 = divergence(one_layer(mu_a, sd_a), one_layer(mu_b, sd_b), "w2").total
    # Monotone coupling of two independent samples: sort both.
    g = torch.Generator().manual_seed(1)
    n = 400_000
    xa = (mu_a + sd_a * torch.randn(n, generator=g, dtype=torch.float64)).sort().values
    xb = (mu_b + sd_b * torch.randn(n, generator=g, dtype=torch.float64)).sort().values
    assert float(((xa - xb) ** 2).mean()) == pytest.approx(w2, rel=0.02)
    # Quantile functions on a midpoint grid: ∫ (F_a⁻¹(u) − F_b⁻¹(u))² du.
    u = (np.arange(100_000) + 0.5) / 100_000
    qa, qb = stats.norm.ppf(u, mu_a, sd_a), stats.norm.ppf(u, mu_b, sd_b)
    assert float(((qa - qb) ** 2).mean()) == pytest.approx(w2, rel=1e-3)


def test_closed_forms_match_the_textbook_formulas():
    a, b = three_layers(0), three_layers(1)
    for k in a:
        m, s, mt, stt = a[k].mean, a[k].std, b[k].mean, b[k].std
        kl = math.log(stt / s) + (s**2 + (m - mt) ** 2) / (2 * stt**2) - 0.5
        rkl = math.log(s / stt) + (stt**2 + (m - mt) ** 2) / (2 * s**2) - 0.5
        assert divergence(a, b, "kl").per_layer[k] == pytest.approx(kl, rel=1e-12)
        assert divergence(a, b, "reverse_kl").per_layer[k] == pytest.approx(rkl, rel=1e-12)
        assert divergence(a, b, "w2").per_layer[k] == pytest.approx((m - mt) ** 2 + (s - stt) ** 2)
    d = divergence(a, b, "kl")
    assert d.total == pytest.approx(sum(d.per_layer.values()))
    assert d.mean == pytest.approx(d.total / 3)


def test_kl_stays_accurate_near_equal_scopes():
    # σ = (1 + δ)σ*: KL ≈ δ². The textbook form loses it to cancellation, the log1p form not.
    s, st_ = torch.tensor([1.0 + 1e-7], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    x = (1.0 + 1e-7) ** 2 - 1.0
    exact = 0.5 * (x - math.log1p(x))  # ≈ δ² = 1e-14
    assert float(divergence_terms(zero, s, zero, st_, "kl")) == pytest.approx(exact, rel=1e-6)
    assert float(divergence_terms(zero, s, zero, st_, "kl")) == pytest.approx(1e-14, rel=1e-5)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_identical_scopes_give_zero_divergence(kind):
    a = three_layers(3)
    d = divergence(a, Scope(dict(a.items())), kind)
    assert all(v == 0.0 for v in d.per_layer.values())


finite_mu = st.floats(-2.0, 2.0, allow_nan=False)
pos_sd = st.floats(1e-3, 3.0, allow_nan=False)


@settings(max_examples=150, deadline=None)
@given(finite_mu, pos_sd, finite_mu, pos_sd, st.sampled_from(DIVERGENCES))
def test_divergence_nonnegative_and_zero_only_when_equal(m1, s1, m2, s2, kind):
    d = divergence(one_layer(m1, s1), one_layer(m2, s2), kind).total
    assert d >= 0.0
    if abs(m1 - m2) > 1e-6 or abs(s1 - s2) > 1e-6 * max(s1, s2):
        assert d > 0.0
    assert divergence(one_layer(m1, s1), one_layer(m1, s1), kind).total == 0.0


def test_reverse_kl_is_kl_with_the_roles_swapped_and_pairwise_mismatch():
    a, b, c = three_layers(0), three_layers(1), three_layers(2)
    assert divergence(a, b, "reverse_kl").total == pytest.approx(divergence(b, a, "kl").total)
    recs = pairwise_mismatch({"a": a, "b": b, "c": c})
    assert [(r["a"], r["b"], r["kind"]) for r in recs][:3] == [("a", "b", k) for k in DIVERGENCES]
    assert len(recs) == 3 * len(DIVERGENCES)
    for r in recs:
        x, y = {"a": a, "b": b, "c": c}[r["a"]], {"a": a, "b": b, "c": c}[r["b"]]
        assert r["total"] == pytest.approx(divergence(x, y, r["kind"]).total)


# --------------------------------------------------------------------------- fusion


def test_fuse_of_identical_scopes_is_the_identity():
    a = three_layers(4)
    for method in ("moment", "mean"):
        f = fuse([a, a, a], method=method)
        for k in a:
            assert f[k].mean == pytest.approx(a[k].mean, rel=1e-14, abs=1e-16)
            assert f[k].std == pytest.approx(a[k].std, rel=1e-14)
            assert f[k].count == a[k].count


def test_moment_fusion_equals_the_statistics_of_pooled_tensors_exactly():
    # Population statistics of finite samples fuse exactly with data-size weights.
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, generator=g, dtype=torch.float64) * s + m
             for n, s, m in ((300, 0.5, 0.2), (1000, 2.0, -1.0), (50, 0.1, 3.0))]
    # One layer per part (counts differ, so the scope records a common count).
    scopes = [Scope({"w": LayerScope(float(p.mean()), float(p.std(correction=0)), 1)})
              for p in parts]
    f = fuse(scopes, weights=[p.numel() for p in parts])
    pooled = torch.cat(parts)
    assert f["w"].mean == pytest.approx(float(pooled.mean()), rel=1e-12)
    assert f["w"].std == pytest.approx(float(pooled.std(correction=0)), rel=1e-12)


def test_moment_fusion_equals_pooled_gaussian_samples_weighted():
    comps = [(0.0, 1.0), (2.0, 0.5), (-1.0, 0.2)]
    p = [0.5, 0.3, 0.2]
    n = 600_000
    g = torch.Generator().manual_seed(2)
    pooled = torch.cat([m + s * torch.randn(int(w * n), generator=g, dtype=torch.float64)
                        for (m, s), w in zip(comps, p, strict=True)])
    f = fuse([one_layer(m, s) for m, s in comps], weights=p)
    assert f["w"].mean == pytest.approx(float(pooled.mean()), abs=0.01)
    assert f["w"].std == pytest.approx(float(pooled.std()), rel=0.005)
    # Plain averaging ignores the spread of the means: a smaller σ here.
    m = fuse([one_layer(m, s) for m, s in comps], weights=p, method="mean")
    assert m["w"].mean == pytest.approx(f["w"].mean)
    assert m["w"].std == pytest.approx(math.sqrt(sum(w * s * s for (_, s), w in zip(comps, p, strict=True))))
    assert m["w"].std < f["w"].std


scope_lists = st.lists(st.tuples(finite_mu, pos_sd, st.floats(0.01, 10.0)), min_size=1, max_size=5)


@settings(max_examples=100, deadline=None)
@given(scope_lists, st.randoms(use_true_random=False), st.sampled_from(["moment", "mean"]))
def test_fuse_is_invariant_to_order(items, rnd, method):
    scopes = [one_layer(m, s) for m, s, _ in items]
    weights = [w for _, _, w in items]
    order = list(range(len(items)))
    rnd.shuffle(order)
    f1 = fuse(scopes, weights, method)
    f2 = fuse([scopes[i] for i in order], [weights[i] for i in order], method)
    assert f1["w"].mean == pytest.approx(f2["w"].mean, rel=1e-9, abs=1e-12)
    assert f1["w"].std == pytest.approx(f2["w"].std, rel=1e-9)


@settings(max_examples=100, deadline=None)
@given(scope_lists, st.data())
def test_fuse_with_one_hot_weights_returns_that_scope(items, data):
    scopes = [one_layer(m, s) for m, s, _ in items]
    j = data.draw(st.integers(0, len(items) - 1))
    w = [0.0] * len(items)
    w[j] = data.draw(st.floats(0.1, 5.0))
    for method in ("moment", "mean"):
        f = fuse(scopes, w, method)
        assert f["w"].mean == pytest.approx(scopes[j]["w"].mean, rel=1e-12, abs=1e-15)
        assert f["w"].std == pytest.approx(scopes[j]["w"].std, rel=1e-12)


def test_fuse_rejects_bad_weights_and_methods():
    a = three_layers(0)
    with pytest.raises(ConfigError, match="weights"):
        fuse([a, a], [1.0, -1.0])
    with pytest.raises(ConfigError, match="weights"):
        fuse([a, a], [1.0])
    with pytest.raises(ConfigError, match="fusion 'median'"):
        fuse([a], method="median")
    with pytest.raises(ConfigError, match="at least one"):
        fuse([])


# --------------------------------------------------------------------------- scopes of models


def tiny_mlp(seed: int = 0) -> nn.Module:
    return models.build("mlp", (8,), 3, width=6, depth=2, seed=seed)


def test_weight_scope_of_a_model_and_its_state_dict():
    net = tiny_mlp()
    s = weight_scope(net)
    assert list(s) == ["layers.0.weight", "layers.1.weight", "head.weight"]
    w = net.head.weight.detach().double()
    assert s["head.weight"].mean == pytest.approx(float(w.mean()))
    assert s["head.weight"].std == pytest.approx(float(w.std(correction=0)))
    assert s["head.weight"].count == 18
    assert weight_scope(net.state_dict()) == s
    sb = weight_scope(net, include_bias=True)
    assert list(sb) == scope_keys(net.state_dict(), include_bias=True)
    assert "head.bias" in sb


def test_norm_parameters_and_buffers_are_not_scoped():
    net = models.build("resnet20", (3, 8, 8), 4, seed=0)
    keys = scope_keys(net)
    assert keys == scope_keys(net.state_dict())
    assert not any("norm" in k or "running" in k for k in keys)
    assert "stem.weight" in keys and "fc.weight" in keys
    assert "layer2.0.shortcut.0.weight" in keys


def test_scope_json_round_trip_and_table_rows():
    a = three_layers(5)
    assert Scope.from_json(a.to_json()) == a
    with pytest.raises(ConfigError, match="invalid scope"):
        Scope.from_dict({"w": {"mean": 0.0}})
    with pytest.raises(ConfigError, match="invalid scope JSON"):
        Scope.from_json("{")
    cols, rows = scope_rows({"x": a, "y": three_layers(6)})
    assert cols == ["layer", "scope", "n", "μ", "σ"]
    assert rows[0] == ["l0.weight", "x", 10, a["l0.weight"].mean, a["l0.weight"].std]
    assert [r[1] for r in rows] == ["x", "y"] * 3


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad,match", [
    (LayerScope(0.0, 0.0, 10), "layer 'l1.weight' has σ = 0"),
    (LayerScope(0.0, -1.0, 10), "layer 'l1.weight' has σ = -1"),
    (LayerScope(float("nan"), 1.0, 10), "layer 'l1.weight' has a non-finite"),
    (LayerScope(0.0, float("inf"), 10), "layer 'l1.weight' has a non-finite"),
])
def test_bad_statistics_name_the_layer(bad, match):
    good = three_layers(0)
    broken = Scope({**dict(good.items()), "l1.weight": LayerScope(bad.mean, bad.std, 20)})
    with pytest.raises(ConfigError, match=match):
        divergence(good, broken)
    with pytest.raises(ConfigError, match=match):
        fuse([good, broken])


def test_mismatched_layers_name_the_layer():
    a = three_layers(0)
    missing = Scope({k: v for k, v in a.items() if k != "l2.weight"})
    with pytest.raises(ConfigError, match="lacks layer 'l2.weight'"):
        divergence(a, missing)
    other = Scope({**dict(a.items()), "l1.weight": LayerScope(0.0, 1.0, 999)})
    with pytest.raises(ConfigError, match="layer 'l1.weight'.*another architecture"):
        divergence(a, other)
    with pytest.raises(ConfigError, match="unknown divergence 'js'"):
        divergence(a, a, "js")


# --------------------------------------------------------------------------- fit quality


def test_fit_quality_against_scipy():
    g = torch.Generator().manual_seed(0)
    state = {"gauss.weight": torch.randn(200, 100, generator=g) * 0.05,
             "unif.weight": torch.rand(200, 100, generator=g) - 0.5,
             "skew.weight": torch.distributions.Exponential(1.0).sample((200, 100))}
    fq = fit_quality(state, max_samples=None)
    for k, t in state.items():
        x = t.double().reshape(-1).numpy()
        assert fq[k].skewness == pytest.approx(stats.skew(x), rel=1e-6, abs=1e-9)
        assert fq[k].excess_kurtosis == pytest.approx(stats.kurtosis(x), rel=1e-6, abs=1e-9)
        ks = stats.kstest(x, "norm", args=(x.mean(), x.std())).statistic
        assert fq[k].ks == pytest.approx(ks, rel=1e-6)
        assert fq[k].ks_samples == x.size
    assert abs(fq["gauss.weight"].excess_kurtosis) < 0.1 and fq["gauss.weight"].ks < 0.01
    assert fq["unif.weight"].excess_kurtosis == pytest.approx(-1.2, abs=0.05)
    assert fq["skew.weight"].skewness == pytest.approx(2.0, abs=0.2)
    assert excess_kurtosis(state)["unif.weight"] == pytest.approx(fq["unif.weight"].excess_kurtosis)
    sub = fit_quality(state, max_samples=5000)
    assert sub["unif.weight"].ks_samples == 5000
    assert sub["unif.weight"].ks == pytest.approx(fq["unif.weight"].ks, abs=0.02)
    assert ks_gaussian(torch.tensor([0.0, 1.0, 2.0]), 1.0, 1.0) == pytest.approx(
        stats.kstest([0.0, 1.0, 2.0], "norm", args=(1.0, 1.0)).statistic)


# --------------------------------------------------------------------------- live units


def test_live_input_masks_find_planted_dead_units():
    net = tiny_mlp(1)
    dead = [1, 4]
    with torch.no_grad():
        net.layers[0].weight[dead] = 0.0
        net.layers[0].bias[dead] = -1.0  # ReLU(−1) = 0 for every input
    x = torch.randn(64, 8)
    masks = live_input_masks(net, x)
    m1 = masks["layers.1.weight"].reshape(-1)
    assert m1.tolist() == [i not in dead for i in range(6)]
    assert bool(masks["layers.0.weight"].all())
    live = weight_scope(net, input_masks=masks)
    w = net.layers[1].weight.detach().double()[:, [i for i in range(6) if i not in dead]]
    assert live["layers.1.weight"].count == w.numel()
    assert live["layers.1.weight"].std == pytest.approx(float(w.std(correction=0)))
    # The old 1-D input-axis masks give the same scope.
    assert weight_scope(net, input_masks={"layers.1.weight": m1})["layers.1.weight"] == \
        live["layers.1.weight"]


def test_live_input_masks_for_grouped_and_transposed_convs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.ReLU(),
                        nn.ConvTranspose2d(6, 2, 2))
    with torch.no_grad():
        net[0].weight[3] = 0.0
        net[0].bias[3] = -1.0  # channel 3 (in group 1 of the grouped conv) is dead
        net[2].weight[:3] = 0.0
        net[2].bias[:3] = -1.0  # output channels 0..2 of the grouped conv are dead
        net[2].bias[3:] = 5.0  # ... and 3..5 surely alive
    masks = live_input_masks(net, torch.randn(5, 2, 6, 6))
    g = masks["2.weight"].expand_as(net[2].weight)
    # Output channels 3..5 read input channels 2, 3 as their local inputs 0, 1: local 1 is dead.
    assert g[3:, 1].sum() == 0 and bool(g[3:, 0].all()) and bool(g[:3].all())
    t = masks["4.weight"].expand_as(net[4].weight)  # ConvTranspose: (in, out, k, k)
    assert t[:3].sum() == 0 and bool(t[3:].all())
    vals = layer_values(net, input_masks=masks)
    assert vals["4.weight"].numel() == 3 * 2 * 2 * 2


def test_a_mask_of_the_wrong_shape_names_the_layer():
    net = tiny_mlp()
    with pytest.raises(ConfigError, match="layer 'head.weight'"):
        weight_scope(net, input_masks={"head.weight": torch.ones(5, dtype=torch.bool)[None, :]})


# --------------------------------------------------------------------------- figure and CLI


def test_weight_histograms_figure(tmp_path):
    a, b = tiny_mlp(0), tiny_mlp(1)
    vals = {"a": layer_values(a), "b": layer_values(b)}
    fig = plots.weight_histograms(vals, {"a": weight_scope(a), "b": weight_scope(b)}, ncols=2)
    axes = [ax for ax in fig.axes if ax.axison]
    assert len(axes) == 3
    assert [ax.get_title() for ax in axes] == ["layers.0.weight", "layers.1.weight", "head.weight"]
    assert len(axes[0].lines) == 2  # one fitted Gaussian per model
    path = io.save_figure(fig, tmp_path / "h.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def ckpts(tmp_path):
    paths = []
    for seed in (0, 1):
        net = tiny_mlp(seed)
        p = tmp_path / f"m{seed}.safetensors"
        io.save(net, p, {"dataset": "digits"})
        paths.append(p)
    return paths


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(["-q", *args])
    out = capsys.readouterr()
    return e.value.code, out.out, " ".join(out.err.split())  # rich wraps long lines


def test_scope_command_json(ckpts, tmp_path, capsys):
    code, out, _ = run_cli(["scope", *map(str, ckpts), "--json", "--plot", str(tmp_path / "s.png")],
                           capsys)
    assert code in (0, None)
    rep = json.loads(out)
    nets = [io.load(p)[0] for p in ckpts]
    for name, net in zip(("m0", "m1"), nets, strict=True):
        assert Scope.from_dict(rep["scopes"][name]) == weight_scope(net)
        assert rep["fit_quality"][name]["head.weight"]["excess_kurtosis"] == pytest.approx(
            excess_kurtosis(net)["head.weight"])
    kinds = [r["kind"] for r in rep["mismatch"]]
    assert kinds == list(DIVERGENCES)
    assert rep["mismatch"][0]["total"] == pytest.approx(
        divergence(weight_scope(nets[0]), weight_scope(nets[1])).total)
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_scope_command_table_and_mismatched_architectures(ckpts, tmp_path, capsys):
    code, out, _ = run_cli(["scope", *map(str, ckpts)], capsys)
    assert code in (0, None)
    assert "pairwise scope mismatch" in out and "Gaussian fit quality" in out
    other = tmp_path / "wide.safetensors"
    io.save(models.build("mlp", (8,), 3, width=7, depth=2, seed=0), other)
    code, _, err = run_cli(["scope", str(ckpts[0]), str(other)], capsys)
    assert code == 1
    assert "layer 'layers.0.weight'" in err and "another architecture" in err


def test_scope_command_live_units(tmp_path, capsys):
    net = models.build("mlp", (1, 8, 8), 10, width=6, depth=2, seed=0)
    with torch.no_grad():
        net.layers[1].weight[2] = 0.0
        net.layers[1].bias[2] = -1.0  # unit 2 of the second hidden layer never fires
    p = tmp_path / "dead.safetensors"
    io.save(net, p, {"dataset": "digits"})
    code, out, err = run_cli(["scope", str(p), "--live", "--json"], capsys)
    assert code in (0, None), err
    live = Scope.from_dict(json.loads(out)["live_scopes"]["dead"])
    assert live["head.weight"].count == 10 * 5
    w = net.head.weight.detach().double()[:, [0, 1, 3, 4, 5]]
    assert live["head.weight"].std == pytest.approx(float(w.std(correction=0)))
    assert live["layers.1.weight"] == weight_scope(net)["layers.1.weight"]  # its inputs live
    code, _, err = run_cli(["scope", str(p), "--live", "--dataset", "nope"], capsys)
    assert code == 1 and "data 'nope'" in err and "not a dataset name" in err
    # A bare safetensors file (no architecture record: --like) with data from a tensor file:
    # the model is built and run, and the dead unit is found the same way.
    from safetensors.torch import save_file

    from basinmerge import data as data_mod

    bare, xy = tmp_path / "bare.safetensors", tmp_path / "xy.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(bare))
    ds = data_mod.load("digits", "train")
    save_file({"x": ds.x[:500].contiguous(), "y": ds.y[:500].contiguous()}, str(xy))
    code, _, err = run_cli(["scope", str(bare), "--live", "--json"], capsys)
    assert code == 1 and "bare" in err and "--data" in err  # no dataset named anywhere
    code, out, err = run_cli(["scope", str(bare), "--live", "--data", str(xy), "--like", str(p),
                              "--json"], capsys)
    assert code in (0, None), err
    assert Scope.from_dict(json.loads(out)["live_scopes"]["bare"]) == live
