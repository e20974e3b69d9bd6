"""The WSA regularizer: value and gradient against the closed form and autograd, targets,
refresh, bad targets, training on digits, and `train --wsa-*`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from basinmerge import data, io, models, train
from basinmerge.cli import main
from basinmerge.errors import ConfigError
from basinmerge.scope import (
    DIVERGENCES,
    LayerScope,
    Scope,
    divergence,
    divergence_terms,
    fuse,
    layer_stats,
    weight_scope,
)
from basinmerge.wsa import LayerMoments, WSARegularizer, fused_refresh, wsa_penalty


def mlp64(seed: int = 0, width: int = 6, dtype=torch.float64) -> nn.Module:
    return models.build("mlp", (8,), 3, width=width, depth=2, seed=seed).to(dtype)


def scaled(s: Scope, factor: float, shift: float = 0.0) -> Scope:
    """Each layer's σ times `factor`, μ moved by `shift` σ."""
    return Scope({k: LayerScope(v.mean + shift * v.std, v.std * factor, v.count) for k, v in s.items()})


# --------------------------------------------------------------------------- value and gradient


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_penalty_gradcheck_float64(kind, reduce):
    g = torch.Generator().manual_seed(0)
    params = (torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True),
              (torch.randn(4, 2, 3, generator=g, dtype=torch.float64) * 0.3 + 0.2).requires_grad_())
    mu_t = torch.tensor([0.1, -0.2], dtype=torch.float64)
    sd_t = torch.tensor([0.7, 1.3], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *p: wsa_penalty(p, mu_t, sd_t, 0.7, kind, reduce), params)


def test_layer_moments_match_var_mean_and_its_autograd():
    g = torch.Generator().manual_seed(1)
    ps = [torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True) + 0.3,
          torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)]
    ps = [p.detach().requires_grad_() for p in ps]
    mu, var = LayerMoments.apply(*ps)
    w1, w2 = torch.rand(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    (mu @ w1 + var @ w2).backward()
    ours = [p.grad.clone() for p in ps]
    for p in ps:
        p.grad = None
    ref = [torch.var_mean(p, correction=0) for p in ps]
    ref_var, ref_mu = torch.stack([v for v, _ in ref]), torch.stack([m for _, m in ref])
    torch.testing.assert_close(mu, ref_mu)
    torch.testing.assert_close(var, ref_var)
    (ref_mu @ w1 + ref_var @ w2).backward()
    for a, p in zip(ours, ps, strict=True):
        torch.testing.assert_close(a, p.grad)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_regularizer_value_is_the_closed_form_by_hand(kind, reduce):
    net = mlp64(0)
    target = scaled(weight_scope(mlp64(1)), 1.7, 0.4)
    reg = WSARegularizer(target, lam=0.37, divergence=kind, reduce=reduce)
    terms = []
    for name, p in net.named_parameters():
        if name not in target:
            continue
        w = p.detach().reshape(-1).tolist()
        m = sum(w) / len(w)
        s = math.sqrt(sum((x - m) ** 2 for x in w) / len(w))
        mt, st = target[name].mean, target[name].std
        if kind == "kl":
            terms.append(math.log(st / s) + (s * s + (m - mt) ** 2) / (2 * st * st) - 0.5)
        elif kind == "reverse_kl":
            terms.append(math.log(s / st) + (st * st + (m - mt) ** 2) / (2 * s * s) - 0.5)
        else:
            terms.append((m - mt) ** 2 + (s - st) ** 2)
    by_hand = 0.37 * (sum(terms) / len(terms) if reduce == "mean" else sum(terms))
    assert reg(net).item() == pytest.approx(by_hand, rel=1e-10)
    per = reg.per_layer(net)
    assert per.tolist() == pytest.approx(terms, rel=1e-10)
    d = divergence(weight_scope(net), target, kind)
    assert reg(net).item() == pytest.approx(0.37 * (d.mean if reduce == "mean" else d.total),
                                            rel=1e-10)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_regularizer_gradient_matches_autograd_of_the_plain_formula(kind):
    net = mlp64(2)
    target = scaled(weight_scope(mlp64(3)), 0.6, -0.3)
    reg = WSARegularizer(target, lam=2.0, divergence=kind, reduce="sum")
    reg(net).backward()
    ours = {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    params = dict(net.named_parameters())
    stats = [layer_stats(params[k]) for k in target]
    mu, sd = torch.stack([m for m, _ in stats]), torch.stack([s for _, s in stats])
    mu_t, sd_t = target.tensors()
    (2.0 * divergence_terms(mu, sd, mu_t, sd_t, kind).sum()).backward()
    assert set(ours) == set(target)
    for k in target:
        torch.testing.assert_close(ours[k], params[k].grad, rtol=1e-10, atol=1e-14)


def test_identical_target_gives_zero_value_and_gradient():
    net = mlp64(4)
    reg = WSARegularizer.from_init(net, lam=5.0)
    v = reg(net)
    v.backward()
    assert v.item() < 1e-20  # the target came from float64 var_mean, the model from Σw, Σw²
    assert all(float(p.grad.abs().max()) < 1e-12 for p in net.parameters() if p.grad is not None)


def test_float32_model_works_and_target_is_a_constant():
    net = mlp64(0, dtype=torch.float32)
    reg = WSARegularizer(scaled(weight_scope(net), 2.0), lam=1.0)
    v = reg(net)
    assert v.dtype == torch.float32 and v.requires_grad
    assert v.item() == pytest.approx(divergence(weight_scope(net), reg.target).mean, rel=1e-4)


# --------------------------------------------------------------------------- targets


def test_target_constructors():
    a, b = mlp64(0), mlp64(1)
    ref = WSARegularizer.from_reference(a.state_dict(), 1.0)
    assert ref.target == weight_scope(a)
    assert WSARegularizer.from_reference(weight_scope(b), 1.0).target == weight_scope(b)
    fused = WSARegularizer.from_fused([a, b.state_dict()], 1.0, weights=[3, 1])
    assert fused.target == fuse([weight_scope(a), weight_scope(b)], [3, 1])
    init = WSARegularizer.from_init(b, 1.0, include_bias=True)
    assert "head.bias" in init.target
    assert init(b).item() < 1e-20
    with pytest.raises(ConfigError, match="must be a model, a state_dict or a Scope"):
        WSARegularizer.from_reference([1, 2], 1.0)


def test_refresh_is_called_every_k_steps():
    x, y = torch.randn(40, 8, dtype=torch.float64), torch.randint(0, 3, (40,))
    calls, returned = [], []

    def refresh(step, model):
        calls.append(step)
        returned.append(weight_scope(model))
        return returned[-1]

    net = mlp64(0)
    reg = WSARegularizer.from_init(net, 0.1, refresh=refresh, refresh_every=3)
    tr = train.Trainer(net, (x, y), batch_size=4, epochs=1, penalties=[reg])
    for _ in range(10):
        tr.step()
    assert calls == [3, 6, 9]
    assert reg.refreshes == 3
    assert reg.target is returned[-1]  # the scope after step 9


def test_lockstep_runs_follow_their_fused_scope():
    x, y = torch.randn(64, 8, dtype=torch.float64), torch.randint(0, 3, (64,))
    a, b = mlp64(0), mlp64(1)
    regs = [WSARegularizer.following([a, b], 0.5, every=2) for _ in range(2)]
    assert regs[0].target == fuse([weight_scope(a), weight_scope(b)])
    ta = train.Trainer(a, (x, y), optimizer="sgd", lr=0.05, batch_size=8, penalties=[regs[0]], seed=0)
    tb = train.Trainer(b, (x, y), optimizer="adam", lr=0.01, batch_size=8, penalties=[regs[1]], seed=1)
    for _ in range(4):
        ta.step()
        tb.step()
    # After B's 4th step (even), B's target is the fused scope of both current models.
    assert regs[1].target == fuse([weight_scope(a), weight_scope(b)])
    assert regs[1].target == fused_refresh([a, b])(8, b)
    assert regs[0].refreshes == regs[1].refreshes == 2


# --------------------------------------------------------------------------- bad targets


def test_bad_targets_raise_one_error_naming_the_layer():
    net = mlp64(0)
    good = weight_scope(net)
    missing = Scope({k: v for k, v in good.items() if k != "layers.1.weight"})
    with pytest.raises(ConfigError, match="lacks layer 'layers.1.weight'"):
        WSARegularizer(missing, 1.0).check(net)
    with pytest.raises(ConfigError, match="lacks layer 'layers.1.weight'"):
        WSARegularizer(missing, 1.0)(net)
    for bad, match in ((LayerScope(0.0, 0.0, 36), "'head.weight' has σ = 0"),
                       (LayerScope(0.0, -0.1, 36), "'head.weight' has σ = -0.1"),
                       (LayerScope(float("nan"), 0.1, 36), "'head.weight' has a non-finite"),
                       (LayerScope(0.0, float("inf"), 36), "'head.weight' has a non-finite")):
        with pytest.raises(ConfigError, match=match):
            WSARegularizer(Scope({**dict(good.items()), "head.weight": bad}), 1.0)
    other = weight_scope(mlp64(0, width=7))
    with pytest.raises(ConfigError, match="'layers.0.weight' has 56 weights.*another architecture"):
        WSARegularizer(other, 1.0).check(net)
    conv = weight_scope(models.build("resnet20", (3, 8, 8), 3, seed=0))
    with pytest.raises(ConfigError, match="'stem.weight' is not a parameter of the model"):
        WSARegularizer(conv, 1.0).check(net)
    with pytest.raises(ConfigError, match="not a Linear/Conv"):
        WSARegularizer(Scope({**dict(good.items()), "norms.0.weight": LayerScope(0, 1, 1)}), 1.0
                       ).check(models.build("mlp", (8,), 3, width=6, depth=2, norm="layer"))


@pytest.mark.parametrize("kw,match", [({"lam": -1.0}, "lambda"), ({"lam": float("nan")}, "lambda"),
                                      ({"lam": float("inf")}, "lambda"),
                                      ({"divergence": "js"}, "divergence 'js'"),
                                      ({"reduce": "max"}, "reduce 'max'"),
                                      ({"refresh_every": 0}, "refresh_every")])
def test_bad_options(kw, match):
    args = {"lam": 1.0, **kw}
    with pytest.raises(ConfigError, match=match):
        WSARegularizer(weight_scope(mlp64(0)), **args)


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "train"), data.load("digits", "test")


def _train(seed, digits, penalties=()):
    tr, te = digits
    net = models.build("mlp", tr.input_shape, 10, width=64, depth=2, seed=seed)
    init = weight_scope(net)
    train.fit(net, tr, lr=0.05, batch_size=64, epochs=5, seed=seed, progress=False,
              penalties=penalties(net) if callable(penalties) else penalties)
    return net, init, train.evaluate(net, te)["accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_wsa_on_digits_reaches_a_far_target_without_losing_accuracy(seed, digits, one_thread):
    # Target: σ three times the initialization's, μ moved by 0.3 σ — far from where plain
    # training ends (plain SGD closes about half of the σ gap in the hidden layers).
    plain, init, acc_plain = _train(seed, digits)
    target = scaled(init, 3.0, 0.3)
    reg_net, init2, acc_wsa = _train(seed, digits, lambda net: [WSARegularizer(target, 5.0)])
    assert init2 == init
    d0 = divergence(init, target).per_layer
    d_plain = divergence(weight_scope(plain), target).per_layer
    d_wsa = divergence(weight_scope(reg_net), target).per_layer
    for k in d0:
        assert d_wsa[k] <= 0.1 * d0[k], k  # falls by >= 90 %
        assert d_wsa[k] < d_plain[k], k
    assert abs(acc_wsa - acc_plain) <= 0.02


# --------------------------------------------------------------------------- CLI


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(["-q", *args])
    out = capsys.readouterr()
    return e.value.code, out.out, " ".join(out.err.split())


TRAIN = ["train", "-d", "digits", "--width", "16", "--epochs", "2", "--batch-size", "64",
         "--train-limit", "400"]


@pytest.mark.slow
def test_train_with_wsa_targets(tmp_path, capsys, one_thread):
    a, b, c, d = (tmp_path / f"{n}.safetensors" for n in "abcd")
    assert run_cli([*TRAIN, "-o", str(a), "--seed", "0"], capsys)[0] in (0, None)
    assert run_cli([*TRAIN, "-o", str(b), "--seed", "1", "--optimizer", "adam", "--lr", "0.01"],
                   capsys)[0] in (0, None)
    code, _, err = run_cli([*TRAIN, "-o", str(c), "--seed", "2", "--wsa-target",
                            f"fused:{a},{b}", "--wsa-lambda", "3", "--wsa-divergence", "w2",
                            "--wsa-reduce", "sum", "--wsa-bias"], capsys)
    assert code in (0, None), err
    net, meta = io.load(c)
    wsa = meta["wsa"]
    assert wsa["target"] == f"fused:{a},{b}" and wsa["divergence"] == "w2"
    assert wsa["reduce"] == "sum" and wsa["lambda"] == 3.0 and wsa["include_bias"] is True
    sa, sb = (weight_scope(io.load(p)[0], include_bias=True) for p in (a, b))
    assert Scope.from_dict(wsa["target_scope"]) == fuse([sa, sb])
    assert wsa["final_divergence"]["total"] == pytest.approx(
        divergence(weight_scope(net, include_bias=True), fuse([sa, sb]), "w2").total)
    # init: the run's own initialization scope, under KL by default.
    code, _, err = run_cli([*TRAIN, "-o", str(d), "--seed", "3", "--wsa-target", "init",
                            "--wsa-lambda", "10"], capsys)
    assert code in (0, None), err
    meta = io.read_meta(d)
    init_scope = weight_scope(models.build("mlp", (1, 8, 8), 10, width=16, seed=3))
    assert Scope.from_dict(meta["wsa"]["target_scope"]) == init_scope
    assert meta["wsa"]["divergence"] == "kl" and meta["wsa"]["reduce"] == "mean"
    plain = weight_scope(io.load(a)[0])
    assert meta["wsa"]["final_divergence"]["total"] < divergence(plain, init_scope).total
    # A reference checkpoint and a saved Scope JSON.
    (tmp_path / "t.json").write_text(weight_scope(io.load(a)[0]).to_json())
    for spec in (str(a), str(tmp_path / "t.json")):
        code, _, err = run_cli([*TRAIN, "--epochs", "1", "-o", str(tmp_path / "e.safetensors"),
                                "--wsa-target", spec], capsys)
        assert code in (0, None), err
        rec = io.read_meta(tmp_path / "e.safetensors")["wsa"]
        assert rec["target_scope"] == weight_scope(io.load(a)[0]).to_dict()
        assert rec["lambda"] == 1.0  # the default chosen by the wsa-defaults measurement


def test_train_wsa_bad_input(tmp_path, capsys):
    wide = tmp_path / "wide.safetensors"
    io.save(models.build("mlp", (1, 8, 8), 10, width=17, seed=0), wide)
    out = str(tmp_path / "x.safetensors")
    code, _, err = run_cli([*TRAIN, "-o", out, "--wsa-target", str(wide)], capsys)
    assert code == 1 and "layer 'layers.0.weight'" in err and "another architecture" in err
    assert "wide.safetensors" in err
    good = tmp_path / "good.safetensors"
    io.save(models.build("mlp", (1, 8, 8), 10, width=16, seed=1), good)
    code, _, err = run_cli([*TRAIN, "-o", out, "--wsa-target", f"fused:{good},{wide}"], capsys)
    assert code == 1 and "wide.safetensors: layer 'layers.0.weight' has 1088 weights" in err
    conv = tmp_path / "conv.safetensors"
    io.save(models.build("resnet20", (1, 8, 8), 10, seed=0), conv)
    code, _, err = run_cli([*TRAIN, "-o", out, "--wsa-target", f"fused:{conv}"], capsys)
    assert code == 1 and "lacks layer 'layers.0.weight'" in err
    code, _, err = run_cli([*TRAIN, "-o", out, "--wsa-target", str(tmp_path / "nope.safetensors")],
                           capsys)
    assert code == 1 and "nope.safetensors" in err and "not found" in err
    code, _, err = run_cli([*TRAIN, "-o", out, "--wsa-lambda", "0.5"], capsys)
    assert code == 1 and "--wsa-lambda needs --wsa-target" in err
    code, _, err = run_cli([*TRAIN, "-o", out, "--wsa-target", "init", "--wsa-divergence", "js"],
                           capsys)
    assert code == 1 and "unknown divergence 'js'" in err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers.0.weight": {"mean": 0, "std": 0, "count": 1024}}))
    code, _, err = run_cli([*TRAIN, "-o", out, "--wsa-target", str(bad)], capsys)
    assert code == 1 and "layer 'layers.0.weight' has σ = 0" in err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
def test_defaults_study_smoke(tmp_path, capsys, one_thread):
    out = tmp_path / "study"
    code, _, err = run_cli(["experiment", "wsa-defaults", "--scale", "smoke", "--out", str(out)],
                           capsys)
    assert code in (0, None), err
    rep = json.loads((out / "result.json").read_text())
    assert rep["command"].startswith("basinmerge experiment wsa-defaults --scale smoke")
    recs = {(r["variant"], r["init"]): r for r in rep["data"]["records"]}
    assert set(recs) == {(v, i) for v in ("none", "kl λ=1") for i in ("shared", "independent")}
    for init in ("shared", "independent"):
        # Pulling both runs toward their fused scope shrinks the endpoints' scope mismatch.
        assert recs[("kl λ=1", init)]["scope_kl"] < 0.5 * recs[("none", init)]["scope_kl"]
    assert set(rep["tables"]) == {"shared initialization", "independent initialization"}
    code, _, err = run_cli(["experiment", "wsa-defaults", "--variants", "bogus", "--out",
                            str(out)], capsys)
    assert code == 1 and "unknown variant 'bogus'" in err


def test_lazy_regularization_matches_the_per_step_gradient_on_average():
    """every=k: one call in k returns k x the penalty (same gradient summed over k calls), the
    others a constant 0 with no graph."""
    from basinmerge.models import build
    from basinmerge.scope import weight_scope

    net = build("mlp", (6,), 3, seed=0, width=8)
    target = weight_scope(build("mlp", (6,), 3, seed=1, width=8))
    full = WSARegularizer(target, 0.5)
    lazy = WSARegularizer(target, 0.5, every=4)
    ref = full(net)
    ref_grads = torch.autograd.grad(ref, list(net.parameters()), allow_unused=True)
    values = [lazy(net) for _ in range(8)]
    assert values[0].item() == pytest.approx(4 * ref.item(), rel=1e-6)
    assert values[4].item() == pytest.approx(4 * ref.item(), rel=1e-6)
    assert all(v.item() == 0.0 and not v.requires_grad for i, v in enumerate(values) if i % 4)
    grads = torch.autograd.grad(values[0], list(net.parameters()), allow_unused=True)
    for g, r in zip(grads, ref_grads, strict=True):
        if r is None:
            assert g is None
        else:
            assert torch.allclose(g, 4 * r, rtol=1e-5, atol=1e-8)
    with pytest.raises(ConfigError, match="every must be >= 1"):
        WSARegularizer(target, 0.5, every=0)
