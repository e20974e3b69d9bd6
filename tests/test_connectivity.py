"""Interpolation curves, barriers, the `interpolate` CLI, the proximal penalty and the
mode-connectivity study (smoke scale)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from basinmerge import connectivity, data, io, models
from basinmerge.cli import app, main
from basinmerge.connectivity import Curve, barriers, interpolate, path_grid
from basinmerge.errors import ConfigError, IncompatibleModelsError
from basinmerge.experiments import mode_connectivity as mc
from basinmerge.penalties import ProximalPenalty
from basinmerge.scope import fuse, symmetric_kl, weight_scope
from basinmerge.train import Trainer, evaluate, fit, reset_bn_stats

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def digits():
    return {"train": data.load("digits", "train"), "test": data.load("digits", "test")}


def _trained(digits, seed: int, norm: str = "none", epochs: int = 2, optimizer: str = "sgd",
             lr: float = 0.05) -> torch.nn.Module:
    net = models.build("mlp", (1, 8, 8), 10, seed=seed, width=32, depth=2, norm=norm)
    fit(net, digits["train"], epochs=epochs, seed=seed, optimizer=optimizer, lr=lr, progress=False)
    return net


@pytest.fixture(scope="module")
def mlp_pair(digits):
    return _trained(digits, 0), _trained(digits, 1)


@pytest.fixture(scope="module")
def bn_pair(digits):
    return _trained(digits, 0, norm="batch"), _trained(digits, 1, norm="batch")


# --------------------------------------------------------------------------- barriers by hand


def test_barriers_of_a_hand_made_curve():
    # α = 0, .25, .5, .75, 1; endpoints L_A = 1, L_B = 3.
    c = Curve([0.0, 0.25, 0.5, 0.75, 1.0],
              {"test": {"loss": [1.0, 2.0, 4.0, 3.2, 3.0], "accuracy": [0.9, 0.8, 0.5, 0.6, 0.7]}})
    b = barriers(c)["test"]
    assert b["loss_barrier"] == pytest.approx(4.0 - 2.0)                 # max − ½(1 + 3)
    # linear reference 1, 1.5, 2, 2.5, 3 -> excess 0, .5, 2, .7, 0
    assert b["linear_loss_barrier"] == pytest.approx(2.0)
    assert b["acc_barrier"] == pytest.approx(0.8 - 0.5)                  # ½(.9 + .7) − .5
    assert (b["loss_a"], b["loss_b"], b["acc_a"], b["acc_b"]) == (1.0, 3.0, 0.9, 0.7)
    assert b["max_loss_at"] == 0.5 and b["mid_loss"] == 4.0


def test_git_rebasin_barrier_counts_unequal_endpoints_the_linear_one_does_not():
    c = Curve([0.0, 0.5, 1.0], {"train": {"loss": [0.0, 1.5, 2.0], "accuracy": [1.0, 1.0, 1.0]}})
    b = barriers(c)["train"]
    assert b["loss_barrier"] == pytest.approx(1.0)          # 2.0 − ½(0 + 2): the max is endpoint B
    assert b["linear_loss_barrier"] == pytest.approx(0.5)   # 1.5 − 1.0 at α = .5
    assert b["acc_barrier"] == 0.0
    c2 = Curve([0.0, 0.5, 1.0], {"train": {"loss": [0.0, 0.5, 2.0], "accuracy": [1.0, 1.0, 1.0]}})
    b2 = barriers(c2)["train"]
    assert b2["loss_barrier"] == pytest.approx(1.0)         # the same: no interior bump needed
    assert b2["linear_loss_barrier"] == pytest.approx(0.0)  # never above the chord


def test_barriers_of_a_three_model_path_and_its_segments():
    # Nodes at t = 0, 1, 2 with losses 1, 2, 3; interior points t = .5 and 1.5.
    t = [0.0, 0.5, 1.0, 1.5, 2.0]
    c = Curve(t, {"test": {"loss": [1.0, 2.5, 2.0, 4.0, 3.0], "accuracy": [0.9, 0.6, 0.8, 0.4, 0.7]}},
              num_models=3)
    b = barriers(c)["test"]
    assert b["loss_barrier"] == pytest.approx(4.0 - 2.0)                 # max − mean(1, 2, 3)
    # piecewise-linear reference: 1, 1.5, 2, 2.5, 3 -> excess 0, 1, 0, 1.5, 0
    assert b["linear_loss_barrier"] == pytest.approx(1.5)
    assert b["acc_barrier"] == pytest.approx(0.8 - 0.4)                  # mean(.9, .8, .7) − .4
    assert (b["loss_a"], b["loss_b"]) == (1.0, 3.0)
    s0, s1 = barriers(c.segment(0))["test"], barriers(c.segment(1))["test"]
    assert s0["loss_barrier"] == pytest.approx(2.5 - 1.5) and s0["linear_loss_barrier"] == pytest.approx(1.0)
    assert s1["loss_barrier"] == pytest.approx(4.0 - 2.5) and s1["acc_barrier"] == pytest.approx(0.75 - 0.4)
    assert c.segment(1).t == [0.0, 0.5, 1.0]
    with pytest.raises(ConfigError, match="segment 2"):
        c.segment(2)


def test_path_grid_shares_nodes_once():
    assert path_grid(2, 3) == [(0, 0.0), (0, 0.5), (0, 1.0)]
    assert path_grid(3, 3) == [(0, 0.0), (0, 0.5), (0, 1.0), (1, 0.5), (1, 1.0)]
    with pytest.raises(ConfigError, match="num_points"):
        path_grid(2, 1)


def test_curve_round_trips_through_json():
    c = Curve([0.0, 1.0], {"test": {"loss": [1.0, 2.0], "accuracy": [0.5, 0.6]}}, 2, "x", {"k": 1})
    back = Curve.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c


# --------------------------------------------------------------------------- interpolate


def test_self_interpolation_is_flat_with_zero_barriers(digits, mlp_pair):
    a = mlp_pair[0]
    curve = interpolate(a, a, digits, num_points=5, progress=False)
    ref = evaluate(a, digits["test"])
    assert curve.t == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    for split in ("train", "test"):
        loss = np.asarray(curve.metrics[split]["loss"])
        assert np.ptp(loss) < 1e-6
    assert curve.metrics["test"]["loss"][2] == pytest.approx(ref["loss"], abs=1e-6)
    for b in barriers(curve).values():
        assert abs(b["loss_barrier"]) < 1e-6 and abs(b["linear_loss_barrier"]) < 1e-6
        assert b["acc_barrier"] == 0.0


def test_self_interpolation_of_a_bn_model_is_flat_because_the_endpoints_are_reset_too(digits,
                                                                                      bn_pair):
    """By default the endpoints are reset with the interior points (reset_endpoints follows
    bn_reset), so a BN model's path to itself is flat; keeping the endpoints' own statistics
    makes the barrier of a model with itself non-zero."""
    a = bn_pair[0]
    curve = interpolate(a, a, digits, num_points=3, progress=False)
    assert curve.info["reset_endpoints"] is True
    assert np.ptp(curve.metrics["test"]["loss"]) < 1e-5
    assert abs(barriers(curve)["test"]["loss_barrier"]) < 1e-5
    kept = interpolate(a, a, digits, num_points=3, reset_endpoints=False, progress=False)
    assert abs(barriers(kept)["test"]["loss_barrier"]) > 1e-4
    off = interpolate(a, a, digits, num_points=3, bn_reset=False, progress=False)
    assert off.info["reset_endpoints"] is False


def test_reset_endpoints_equal_evaluate_after_a_bn_reset(digits, bn_pair):
    a, b = bn_pair
    curve = interpolate(a, b, digits, num_points=3, splits=["test"], progress=False)
    for i, m in ((0, a), (-1, b)):
        reset = reset_bn_stats(copy.deepcopy(m), digits["train"])
        assert curve.metrics["test"]["loss"][i] == pytest.approx(
            evaluate(reset, digits["test"])["loss"], abs=1e-6)


@pytest.mark.parametrize("pair", ["mlp_pair", "bn_pair"])
def test_curve_endpoints_equal_evaluate(digits, pair, request):
    a, b = request.getfixturevalue(pair)
    running = {k: v.clone() for k, v in b.state_dict().items()}
    curve = interpolate(a, b, digits, num_points=4, reset_endpoints=False, progress=False)
    for split in ("train", "test"):
        ea, eb = evaluate(a, digits[split]), evaluate(b, digits[split])
        assert curve.metrics[split]["loss"][0] == pytest.approx(ea["loss"], abs=1e-6)
        assert curve.metrics[split]["loss"][-1] == pytest.approx(eb["loss"], abs=1e-6)
        assert curve.metrics[split]["accuracy"][0] == ea["accuracy"]
        assert curve.metrics[split]["accuracy"][-1] == eb["accuracy"]
    # the input models are untouched (BN statistics included)
    for k, v in b.state_dict().items():
        assert torch.equal(v, running[k])


def test_bn_reset_changes_a_bn_midpoint_and_not_an_mlp_midpoint(digits, mlp_pair, bn_pair):
    kw = dict(num_points=3, splits=["test"], progress=False)
    m_on = interpolate(*mlp_pair, digits, bn_reset=True, **kw)
    m_off = interpolate(*mlp_pair, digits, bn_reset=False, **kw)
    assert m_on.metrics == m_off.metrics
    assert m_on.info["bn_reset"] is False  # nothing to reset in an MLP
    b_on = interpolate(*bn_pair, digits, bn_reset=True, **kw)
    b_off = interpolate(*bn_pair, digits, bn_reset=False, **kw)
    assert b_on.info["bn_reset"] is True
    # without the reset the endpoints keep their statistics: a different midpoint, and the
    # same endpoints as with the reset when those are kept explicitly
    assert abs(b_on.metrics["test"]["loss"][1] - b_off.metrics["test"]["loss"][1]) > 1e-3
    kept = interpolate(*bn_pair, digits, bn_reset=True, reset_endpoints=False, **kw)
    assert kept.metrics["test"]["loss"][0] == b_off.metrics["test"]["loss"][0]
    assert kept.metrics["test"]["loss"][2] == b_off.metrics["test"]["loss"][2]
    assert kept.metrics["test"]["loss"][1] == b_on.metrics["test"]["loss"][1]


def test_without_bn_reset_the_midpoint_collapses(digits, bn_pair):
    """Interpolating BN running statistics between unrelated models gives statistics that do
    not describe the interpolated network (variance collapse): its midpoint is worse than with
    recomputed statistics."""
    kw = dict(num_points=3, splits=["test"], progress=False)
    on = barriers(interpolate(*bn_pair, digits, bn_reset=True, **kw))["test"]
    off = barriers(interpolate(*bn_pair, digits, bn_reset=False, **kw))["test"]
    assert off["mid_loss"] > on["mid_loss"]
    assert off["loss_barrier"] > on["loss_barrier"]


def test_piecewise_path_through_three_models_passes_through_each(digits, mlp_pair):
    c_model = _trained(digits, 2, epochs=1)
    models3 = [mlp_pair[0], mlp_pair[1], c_model]
    curve = interpolate(models3, data=digits, num_points=3, splits=["test"], progress=False)
    assert curve.num_models == 3 and curve.t == pytest.approx([0, 0.5, 1, 1.5, 2])
    for node, m in zip(curve.node_indices(), models3, strict=True):
        assert curve.metrics["test"]["loss"][node] == pytest.approx(evaluate(m, digits["test"])["loss"], abs=1e-6)
    seg = interpolate(mlp_pair[1], c_model, digits, num_points=3, splits=["test"], progress=False)
    assert curve.segment(1).metrics["test"]["loss"] == pytest.approx(seg.metrics["test"]["loss"], abs=1e-6)


def test_transform_hook_sees_every_point(digits, mlp_pair):
    seen = []

    def hook(net, seg, alpha):
        seen.append((seg, alpha))
        return net

    interpolate(*mlp_pair, digits, num_points=4, splits=["test"], transform=hook, progress=False)
    assert [a for _, a in seen] == pytest.approx([0, 1 / 3, 2 / 3, 1])


def test_interpolate_rejects_bad_input(digits, mlp_pair):
    other = models.build("mlp", (1, 8, 8), 10, width=16, depth=2)
    with pytest.raises(IncompatibleModelsError, match="shape"):
        interpolate(mlp_pair[0], other, digits, progress=False)
    with pytest.raises(ConfigError, match="split 'val'"):
        interpolate(*mlp_pair, digits, splits=["val"], progress=False)
    with pytest.raises(ConfigError, match="not both"):
        interpolate(list(mlp_pair), mlp_pair[1], digits, progress=False)
    with pytest.raises(ConfigError, match="num_points"):
        interpolate(*mlp_pair, digits, num_points=1, progress=False)


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, mlp_pair):
    d = tmp_path_factory.mktemp("ckpt")
    paths = []
    for i, m in enumerate(mlp_pair):
        paths.append(io.save(m, d / f"m{i}.safetensors", {"dataset": "digits"}))
    small = models.build("mlp", (1, 8, 8), 10, width=16, depth=2)
    paths.append(io.save(small, d / "small.safetensors", {"dataset": "digits"}))
    return paths


def test_cli_interpolate_prints_the_barriers_of_the_library(checkpoints, digits, tmp_path):
    a, b, _ = checkpoints
    runner = CliRunner()
    res = runner.invoke(app, ["-q", "interpolate", str(a), str(b), "--points", "5", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    got = out["curves"]["naive"]["barriers"]
    ma, mb = io.load(a)[0], io.load(b)[0]
    want = barriers(interpolate(ma, mb, digits, num_points=5, progress=False))
    for split in ("train", "test"):
        assert got[split]["loss_barrier"] == pytest.approx(want[split]["loss_barrier"], abs=1e-6)
        assert got[split]["acc_barrier"] == pytest.approx(want[split]["acc_barrier"])
    png = tmp_path / "curve.png"
    res = runner.invoke(app, ["-q", "interpolate", str(a), str(b), "--dataset", "digits",
                              "--points", "3", "--plot", str(png), "--eval-limit", "100"])
    assert res.exit_code == 0, res.output
    assert "barriers: m0.safetensors → m1.safetensors on digits" in res.output and "naive" in res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_interpolate_align_adds_aligned_and_repaired_curves(checkpoints, capsys):
    """--align weight adds the aligned curve, whose endpoints equal the naive ones (the aligned
    B computes the same function) and whose barrier is lower; --repair adds a third curve."""
    a, b, _ = checkpoints
    res = CliRunner().invoke(app, ["-q", "interpolate", str(a), str(b), "--points", "5", "--json",
                                   "--align", "weight", "--repair"])
    assert res.exit_code == 0, res.output
    curves = json.loads(res.output)["curves"]
    assert list(curves) == ["naive", "weight-aligned", "weight-aligned + REPAIR"]
    naive, aligned = curves["naive"]["barriers"]["test"], curves["weight-aligned"]["barriers"]["test"]
    assert aligned["acc_b"] == pytest.approx(naive["acc_b"])
    assert aligned["loss_b"] == pytest.approx(naive["loss_b"], abs=1e-5)
    assert aligned["loss_barrier"] < naive["loss_barrier"]
    with pytest.raises(SystemExit) as e:
        main(["interpolate", str(a), str(b), "--points", "3", "--repair"])
    assert e.value.code == 1 and "--repair needs --align" in capsys.readouterr().err


def test_cli_interpolate_errors_cleanly_for_incompatible_checkpoints(checkpoints, capsys):
    a, _, small = checkpoints
    with pytest.raises(SystemExit) as e:
        main(["interpolate", str(a), str(small), "--points", "3"])
    assert e.value.code == 1
    err = " ".join(capsys.readouterr().err.split())  # the console may soft-wrap the line
    assert err.startswith("error: models do not match:") and err.count("error") == 1
    assert "small.safetensors" in err and "shape" in err and "Traceback" not in err


def test_cli_interpolate_errors_cleanly_for_a_missing_checkpoint(checkpoints, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["interpolate", str(checkpoints[0]), str(tmp_path / "nope.safetensors")])
    assert e.value.code == 1
    assert "nope.safetensors" in capsys.readouterr().err


# --------------------------------------------------------------------------- penalties, training


def test_proximal_penalty_value_gradient_and_detached_anchor():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    anchor = {k: v.detach().clone() for k, v in net.named_parameters()}
    pen = ProximalPenalty(net, mu=0.3)
    assert pen(net).item() == 0.0
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    value = pen(net)
    want = 0.15 * sum(((p - anchor[k]) ** 2).sum() for k, p in net.named_parameters())
    assert float(value) == pytest.approx(float(want), rel=1e-6)
    value.backward()
    for k, p in net.named_parameters():
        assert torch.allclose(p.grad, 0.3 * (p.detach() - anchor[k]))
    with pytest.raises(ConfigError, match="shape"):
        ProximalPenalty({"weight": torch.zeros(2, 2)}, 1.0)(net)
    with pytest.raises(ConfigError, match="mu"):
        ProximalPenalty(net, -1.0)


def test_lockstep_training_equals_separate_training(digits):
    """Independent runs stepped alternately are the same runs: lockstep only matters when a
    target is shared. Also: runs with different step counts both finish."""
    train = digits["train"].subset(300)
    cfg = dict(epochs=2, lr=0.05)
    a1 = models.build("mlp", (1, 8, 8), 10, seed=0, width=16, depth=1)
    b1 = models.build("mlp", (1, 8, 8), 10, seed=1, width=16, depth=1)
    a2, b2 = (models.build("mlp", (1, 8, 8), 10, seed=s, width=16, depth=1) for s in (0, 1))
    ta, tb = Trainer(a1, train, batch_size=32, seed=3, **cfg), Trainer(b1, train, batch_size=128, seed=4, **cfg)
    mc.train_lockstep([ta, tb])
    assert ta.step_count == ta.total_steps == 20 and tb.step_count == tb.total_steps == 6
    Trainer(a2, train, batch_size=32, seed=3, **cfg).run(progress=False)
    Trainer(b2, train, batch_size=128, seed=4, **cfg).run(progress=False)
    for x, y in ((a1, a2), (b1, b2)):
        for k, v in x.state_dict().items():
            assert torch.equal(v, y.state_dict()[k])


def test_dirichlet_halves_are_disjoint_complete_and_skewed():
    y = torch.arange(10).repeat_interleave(100)
    a, b = mc.dirichlet_halves(y, alpha=0.3, seed=0)
    assert len(set(a.tolist()) & set(b.tolist())) == 0 and len(a) + len(b) == 1000
    share = torch.bincount(y[a], minlength=10).float() / 100
    assert share.max() - share.min() > 0.5  # class-skewed, not an IID split
    a2, _ = mc.dirichlet_halves(y, alpha=0.3, seed=0)
    assert torch.equal(a, a2)
    with pytest.raises(ConfigError, match="alpha"):
        mc.dirichlet_halves(y, alpha=0.0, seed=0)


def test_fused_wsa_treatment_follows_the_pair(digits):
    """The fused target is built from the two models being trained (not copies) and refreshed
    during lockstep training."""
    cfg = mc.ScaleConfig.at("smoke")
    train = digits["train"].subset(256)  # 2 steps per epoch
    init = models.build("mlp", (1, 8, 8), 10, seed=0, width=16, depth=1)
    ctx = mc.PairContext(mc.CONDITIONS["optimizer"], 0, cfg, init, init, train, train,
                         {"train": train, "test": train}, "cpu", lambda: weight_scope(init))
    tr = next(t for t in mc.treatment_list(cfg) if t.name.startswith("wsa-fused-kl"))
    a, b = copy.deepcopy(init), copy.deepcopy(init)
    setup = tr.setup(ctx, a, b)
    reg_a, reg_b = setup.penalties[0][0], setup.penalties[1][0]
    assert reg_a.target == weight_scope(init)
    ta = mc._trainer(a, train, ctx.condition.a, cfg, 1, setup.penalties[0], {}, "cpu")
    tb = mc._trainer(b, train, ctx.condition.b, cfg, 2, setup.penalties[1], {}, "cpu")
    mc.train_lockstep([ta, tb])
    assert reg_a.target != weight_scope(init) and reg_b.target != weight_scope(init)
    assert reg_a.refresh(0, a) == fuse([weight_scope(a), weight_scope(b)])
    # B stepped last, and its final step is a refresh step: its target is the final fused scope
    assert tb.total_steps % cfg.refresh_every == 0
    assert reg_b.target == fuse([weight_scope(a), weight_scope(b)])


def test_treatment_registry_selects_by_prefix_and_keeps_plain():
    cfg = mc.ScaleConfig.at("quick")
    names = [t.name for t in mc.treatment_list(cfg)]
    assert names[:3] == ["plain", "weight-decay", "proximal"]
    n_wsa = len(cfg.kl_grid) + len(cfg.w2_grid)
    # 3 WSA targets, plus "aligned" and one "+aligned" per fused-WSA treatment
    assert len(names) == 3 + 3 * n_wsa + 1 + n_wsa
    sel = [t.name for t in mc.treatment_list(cfg, ["wsa-fused"])]
    assert sel[0] == "plain" and all(n.startswith("wsa-fused") for n in sel[1:])
    assert len(sel) == 1 + 2 * n_wsa
    with pytest.raises(ConfigError, match="unknown treatment 'nope'"):
        mc.treatment_list(cfg, ["nope"])


def test_symmetric_kl_is_zero_on_equal_scopes_and_symmetric(mlp_pair):
    sa, sb = weight_scope(mlp_pair[0]), weight_scope(mlp_pair[1])
    assert symmetric_kl(sa, sa) == pytest.approx(0.0, abs=1e-12)
    assert symmetric_kl(sa, sb) == pytest.approx(symmetric_kl(sb, sa))
    assert symmetric_kl(sa, sb) > 0


# --------------------------------------------------------------------------- the study


@pytest.mark.slow
def test_study_runs_end_to_end_at_smoke_scale(tmp_path):
    out = tmp_path / "mc"
    runner = CliRunner()
    res = runner.invoke(app, ["-q", "experiment", "mode-connectivity", "--dataset", "digits",
                              "--scale", "smoke", "--out", str(out)])
    assert res.exit_code == 0, res.output
    d = json.loads((out / "result.json").read_text())
    assert d["command"].startswith("basinmerge experiment mode-connectivity --dataset digits")
    cfg = mc.ScaleConfig.at("smoke")
    treats = mc.treatment_list(cfg)
    records = d["data"]["records"]
    assert len(records) == sum(t.applies_to(c) for c in mc.CONDITIONS for t in treats)
    # the alignment columns exist for the different-seed pairs only, and alignment helps there
    aligned = [r for r in records if r["treatment"] == "aligned"]
    assert aligned and {r["condition"] for r in aligned} == {"seed"}
    plain_seed = next(r for r in records if r["treatment"] == "plain" and r["condition"] == "seed")
    assert aligned[0]["test_acc_a"] == plain_seed["test_acc_a"]  # the same trained pair
    assert set(d["tables"]) == {"conditions"} | {f"condition: {c}" for c in mc.CONDITIONS}
    assert len(d["tables"]["conditions"]["rows"]) == len(mc.CONDITIONS)
    assert set(d["data"]["real_barrier"]) == set(mc.CONDITIONS)
    # each record's barrier is the barrier of its stored curve
    curves = {(c["condition"], c["treatment"], c["seed"]): c for c in d["data"]["curves"]}
    for r in records:
        curve = Curve.from_dict(curves[(r["condition"], r["treatment"], r["seed"])])
        assert barriers(curve)["test"]["loss_barrier"] == pytest.approx(r["test_loss_barrier"])
        assert 0.0 <= r["test_acc_a"] <= 1.0 and math.isfinite(r["scope_div_live"])
    # shared-init conditions start from one model; WSA toward the init keeps the scopes close
    md = (out / "result.md").read_text()
    assert "## conditions" in md and "wsa-fused-kl" in md
    pngs = sorted(p.name for p in out.glob("*.png"))
    curve_pngs = [p for p in pngs if p.startswith("curves_")]
    assert curve_pngs == sorted(f"curves_{c}.png" for c in mc.CONDITIONS)
    hist_pngs = [p for p in pngs if p.startswith("scope_histograms_")]
    assert "scope_histograms_plain.png" in hist_pngs and len(hist_pngs) == 2  # plain and best WSA
    assert len(pngs) == len(curve_pngs) + len(hist_pngs)
    for p in out.glob("*.png"):
        assert p.read_bytes()[:4] == b"\x89PNG"


def test_study_rejects_bad_options():
    with pytest.raises(ConfigError, match="scale"):
        mc.run(dataset="digits", scale="huge")
    with pytest.raises(ConfigError, match="condition 'nope'"):
        mc.run(dataset="digits", scale="smoke", conditions=["nope"])
    with pytest.raises(ConfigError, match="seeds"):
        mc.run(dataset="digits", scale="smoke", seeds=0)


def test_barrier_rows_match_barriers():
    c = Curve([0.0, 0.5, 1.0], {"test": {"loss": [1.0, 3.0, 1.0], "accuracy": [0.9, 0.5, 0.9]}})
    rows = connectivity.barrier_rows({"naive": c})
    assert len(rows) == 1 and rows[0][:2] == ["naive", "test"]
    assert dict(zip(connectivity.BARRIER_COLUMNS, rows[0], strict=True))["loss barrier"] == 2.0
