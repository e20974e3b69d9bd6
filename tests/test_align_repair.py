"""REPAIR, BN reset, interpolate(repair=True), and the CLI of the alignment issue."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from basinmerge import data, io, models
from basinmerge.align import Repair, repair, repair_points, reset_bn_stats
from basinmerge.align.repair import unit_statistics
from basinmerge.cli import app
from basinmerge.connectivity import interpolate
from basinmerge.errors import ConfigError
from basinmerge.state import lerp, with_state
from basinmerge.train import evaluate, fit


def _randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model.eval()


def _trained(name: str, seed: int, **cfg) -> nn.Module:
    train = data.load("digits", "train")
    net = models.build(name, train.input_shape, 10, seed=seed, **cfg)
    fit(net, train.subset(500, seed=seed), optimizer="adam", lr=3e-3, epochs=2, seed=seed,
        progress=False)
    return net.eval()


@pytest.mark.parametrize("name,cfg,kinds", [
    ("mlp", {"depth": 2, "width": 16, "norm": "none"}, {"layer"}),
    ("mlp", {"depth": 2, "width": 16, "norm": "layer"}, {"norm"}),
    ("vgg", {"width": 0.125, "norm": "none"}, {"layer"}),
    ("vgg", {"width": 0.125, "norm": "layer"}, {"norm", "layer"}),
], ids=["mlp", "mlp-ln", "vgg", "vgg-ln"])
def test_repaired_units_have_the_interpolated_statistics(name, cfg, kinds):
    x = data.load("digits", "train").x[:400]
    a, b = (_randomize_norms(models.build(name, (1, 8, 8), 10, seed=s, **cfg), s) for s in (0, 1))
    alpha = 0.3
    merged = with_state(a, lerp(a.state_dict(), b.state_dict(), alpha))
    # One calibration batch holding all the data: the folded statistics are exact.
    r = Repair([a, b], x, num_examples=None, batch_size=400)
    fixed = r(merged, alpha)
    assert {p.kind for p in r.points} == kinds
    got = unit_statistics(fixed, r.points, x)
    goal = r.goal((1 - alpha, alpha))
    for p in r.points:
        torch.testing.assert_close(got[p.module][0], goal[p.module][0], atol=2e-4, rtol=1e-3)
        # A unit with variance v gets std goal·sqrt(v / (v + eps)): exact up to eps, which only
        # matters for nearly dead units.
        live = goal[p.module][1] > 0.05
        torch.testing.assert_close(got[p.module][1][live], goal[p.module][1][live], atol=2e-3,
                                   rtol=2e-3)
    before = unit_statistics(merged, r.points, x)
    assert any((before[p.module][1] - goal[p.module][1]).abs().max() > 1e-2 for p in r.points)
    assert merged.state_dict().keys() == fixed.state_dict().keys()  # same architecture


def test_repair_of_a_batchnorm_model_is_the_bn_reset():
    a, b = (_randomize_norms(models.build("resnet20", (1, 8, 8), 10, seed=s, norm="batch"), s)
            for s in (0, 1))
    train = data.load("digits", "train").subset(200)
    x = train.x
    merged = with_state(a, lerp(a.state_dict(), b.state_dict(), 0.5))
    points, has_bn = repair_points(a, x[:2])
    assert points == [] and has_bn
    fixed = repair(a, b, merged, x, 0.5)
    reset = reset_bn_stats(with_state(merged, merged.state_dict()), train)
    with torch.no_grad():
        torch.testing.assert_close(fixed(x[:16]), reset(x[:16]))


def test_interpolate_with_repair_matches_repair_at_each_point():
    a = _trained("mlp", 0, depth=2, width=16)
    b = _trained("mlp", 1, depth=2, width=16)
    train, test = data.load("digits", "train"), data.load("digits", "test")
    stats = train.subset(300, seed=0)
    curve = interpolate(a, b, {"test": test}, num_points=3, bn_data=stats, repair=True,
                        progress=False)
    plain = interpolate(a, b, {"test": test}, num_points=3, progress=False)
    mid = repair(a, b, with_state(a, lerp(a.state_dict(), b.state_dict(), 0.5)), stats, 0.5)
    assert curve.metrics["test"]["loss"][1] == pytest.approx(evaluate(mid, test)["loss"], rel=1e-6)
    assert curve.metrics["test"]["loss"][0] == plain.metrics["test"]["loss"][0]  # nodes untouched
    assert curve.info["repair"] is True


def test_repair_needs_somewhere_to_fold():
    class NoBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6, bias=False)
            self.b = nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    with pytest.raises(ConfigError, match="layer 'a' has no bias"):
        repair_points(NoBias(), torch.randn(2, 4))
    m = models.build("mlp", (4,), 2, depth=1, width=4)
    with pytest.raises(ConfigError, match="give alpha"):
        Repair([m, m], torch.randn(8, 4))(m)


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    paths = []
    for seed in (0, 1):
        net = _trained("mlp", seed, depth=2, width=16)
        paths.append(io.save(net, d / f"m{seed}.safetensors", {"dataset": "digits"}))
    other = models.build("mlp", (1, 8, 8), 10, depth=2, width=12)
    paths.append(io.save(other, d / "other.safetensors"))
    return paths


def test_cli_align_writes_an_equivalent_aligned_checkpoint(checkpoints, tmp_path):
    a, b, _ = checkpoints
    out = tmp_path / "b_aligned.safetensors"
    res = CliRunner().invoke(app, ["align", str(a), str(b), "--method", "activation", "--data",
                                   "digits", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "midpoint test loss naive / aligned" in res.output
    aligned, meta = io.load(out)
    orig, _ = io.load(b)
    x = data.load("digits", "test").x[:20]
    with torch.no_grad():
        torch.testing.assert_close(aligned(x), orig(x), atol=1e-5, rtol=1e-4)
    assert meta["alignment"]["method"] == "activation" and meta["aligned_to"] == str(a)
    assert not torch.equal(aligned.state_dict()["layers.0.weight"], orig.state_dict()["layers.0.weight"])


@pytest.mark.parametrize("args,message", [
    (["--method", "greedy"], "unknown --method 'greedy'"),
    (["--method", "ste"], "--method ste needs --data"),
])
def test_cli_align_bad_options(checkpoints, tmp_path, args, message, capsys):
    a, b, _ = checkpoints
    from basinmerge.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["align", str(a), str(b), "--out", str(tmp_path / "x.safetensors"), *args])
    assert exc.value.code == 1
    assert message in capsys.readouterr().err.replace("\n", " ")


def test_cli_align_incompatible_models(checkpoints, tmp_path, capsys):
    a, _, other = checkpoints
    from basinmerge.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["align", str(a), str(other), "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "models do not match" in err and "layers.0.weight" in err


@pytest.mark.slow
def test_cli_rebasin_smoke(tmp_path):
    res = CliRunner().invoke(app, ["experiment", "rebasin", "--dataset", "digits", "--scale",
                                   "smoke", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["command"].startswith("basinmerge experiment rebasin --dataset digits")
    table = result["tables"]["barriers"]
    methods = {r[1] for r in table["rows"]}
    assert methods == {"naive", "weight", "activation", "ste"}
    assert {r[0] for r in table["rows"]} >= {"mlp-16", "vgg-bn-x0.125", "resnet20-ln-x1"}
    assert (tmp_path / "barrier_vs_width.png").stat().st_size > 1000
    assert len(result["tables"]["merge_many"]["rows"]) == 4
