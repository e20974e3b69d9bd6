"""REPAIR's LayerNorm counterpart and the transformer modes (layernorm, mlp, both)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from basinmerge.align.repair import REPAIR_MODES, Repair, check_mode, repair_points, unit_statistics
from basinmerge.connectivity import interpolate
from basinmerge.errors import ConfigError
from basinmerge.state import lerp, with_state

V, D, ALPHA = 11, 6, 0.3


class TinyLN(nn.Module):
    """Token embedding -> LayerNorm -> logits: one LayerNorm whose output is easy to compute."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(V, D)
        self.ln = nn.LayerNorm(D)
        self.head = nn.Linear(D, V)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(V, D, generator=g) * (1 + seed))
            self.ln.weight.copy_(torch.rand(D, generator=g) + 0.5)
            self.ln.bias.copy_(torch.randn(D, generator=g))

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.ln(self.emb(input_ids)))


def _batch(seed: int = 0, n: int = 8, length: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[: n // 2, 3:] = 0  # the first half of the rows are padded after 3 tokens
    return {"input_ids": ids, "attention_mask": mask}


def _ln_out(model: TinyLN, batch) -> torch.Tensor:
    """The LayerNorm's output on the unpadded tokens, (tokens, D), computed by hand."""
    e = model.emb.weight.detach().double()[batch["input_ids"]]
    e = e[batch["attention_mask"].bool()]
    x = (e - e.mean(-1, keepdim=True)) / (e.var(-1, unbiased=False, keepdim=True) + model.ln.eps).sqrt()
    return x * model.ln.weight.detach().double() + model.ln.bias.detach().double()


def _stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return z.mean(0), z.var(0, unbiased=False).sqrt()


def test_layernorm_repair_gives_the_hand_computed_interpolated_statistics():
    a, b = TinyLN(0).eval(), TinyLN(1).eval()
    batch = _batch()
    (ma, sa), (mb, sb) = _stats(_ln_out(a, batch)), _stats(_ln_out(b, batch))
    goal_mean, goal_std = (1 - ALPHA) * ma + ALPHA * mb, (1 - ALPHA) * sa + ALPHA * sb
    merged = with_state(a, lerp(a.state_dict(), b.state_dict(), ALPHA))
    before = _stats(_ln_out(merged, batch))
    assert (before[1] - goal_std).abs().max() > 0.05  # there is something to repair

    fixed = Repair([a, b], batch, num_examples=None, batch_size=64, mode="layernorm")(merged, ALPHA)
    mean, std = _stats(_ln_out(fixed, batch))
    torch.testing.assert_close(mean, goal_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std, goal_std, atol=1e-4, rtol=1e-4)
    # Only the LayerNorm's affine changed.
    assert torch.equal(fixed.emb.weight, merged.emb.weight)
    assert torch.equal(fixed.head.weight, merged.head.weight)


def test_padded_tokens_are_not_counted():
    a, b = TinyLN(0).eval(), TinyLN(1).eval()
    merged = with_state(a, lerp(a.state_dict(), b.state_dict(), ALPHA))
    batch = _batch()
    other = {k: v.clone() for k, v in batch.items()}
    pad = other["attention_mask"] == 0
    other["input_ids"][pad] = (other["input_ids"][pad] + 5) % V  # change only padded tokens
    fixed = [Repair([a, b], x, num_examples=None, batch_size=3, mode="layernorm")(merged, ALPHA)
             for x in (batch, other)]
    torch.testing.assert_close(fixed[0].ln.weight, fixed[1].ln.weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fixed[0].ln.bias, fixed[1].ln.bias, atol=1e-6, rtol=1e-6)
    # ... and counting them would have given other statistics.
    everything = {"input_ids": batch["input_ids"]}
    counted = Repair([a, b], everything, num_examples=None, mode="layernorm")(merged, ALPHA)
    assert (counted.ln.weight - fixed[0].ln.weight).abs().max() > 1e-3


@pytest.mark.parametrize("bad", ["ln", "LayerNorm", "", 1])
def test_unknown_modes_are_one_clear_error(bad):
    a, b = TinyLN(0), TinyLN(1)
    with pytest.raises(ConfigError, match="unknown REPAIR mode.*choose one of auto, units, layernorm, mlp, both"):
        check_mode(bad)
    with pytest.raises(ConfigError, match="unknown REPAIR mode"):
        Repair([a, b], _batch(), mode=bad)
    with pytest.raises(ConfigError, match="unknown REPAIR mode"):
        interpolate(a, b, {"train": _batch()}, num_points=3, repair=bad, progress=False)
    assert check_mode(True) == "auto" and set(REPAIR_MODES) >= {"layernorm", "mlp", "both"}


def test_layernorm_mode_without_a_layernorm_names_the_model():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ConfigError, match="repair mode 'layernorm': Sequential has no LayerNorm"):
        repair_points(net, torch.randn(2, 4), "layernorm")
    with pytest.raises(ConfigError, match="repair mode 'mlp': Sequential is not a transformer"):
        repair_points(net, torch.randn(2, 4), "mlp")


def test_recipe_rejects_an_unknown_repair_mode():
    from basinmerge.recipe import Recipe

    base = {"models": ["a", "b"], "method": "average", "data": {"dataset": "digits"},
            "output": {"path": "out"}}
    with pytest.raises(Exception, match="unknown REPAIR mode 'ln'"):
        Recipe.model_validate({**base, "repair": "ln"})
    assert Recipe.model_validate({**base, "repair": "layernorm"}).repair == "layernorm"
    assert Recipe.model_validate({**base, "repair": True}).repair is True


# --------------------------------------------------------------------------- HF transformers


def _gpt2(seed: int) -> nn.Module:
    tf = pytest.importorskip("transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(seed)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2,
                                            n_positions=8, bos_token_id=0, eos_token_id=0)).eval()


@pytest.mark.parametrize("mode,kinds", [("layernorm", {"norm"}), ("mlp", {"layer"}),
                                        ("both", {"norm", "layer"}), ("auto", {"norm", "layer"})])
def test_gpt2_modes_reach_the_interpolated_statistics(mode, kinds):
    a, b = _gpt2(0), _gpt2(1)
    batch = _batch(n=16)
    merged = with_state(a, lerp(a.state_dict(), b.state_dict(), ALPHA))
    r = Repair([a, b], batch, num_examples=None, batch_size=64, mode=mode)
    assert {p.kind for p in r.points} == kinds
    names = {p.module for p in r.points}
    if "layer" in kinds:  # the MLP's first projection (an HF Conv1D), not attention or the head
        assert {"transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"} <= names
        assert not any("attn" in n or "lm_head" in n for n in names)
    if "norm" in kinds:
        assert {"transformer.h.0.ln_1", "transformer.ln_f"} <= names
    fixed = r(merged, ALPHA)
    got = unit_statistics(fixed, r.points, batch)
    goal = r.goal((1 - ALPHA, ALPHA))
    for p in r.points:
        torch.testing.assert_close(got[p.module][0], goal[p.module][0], atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(got[p.module][1], goal[p.module][1], atol=2e-3, rtol=2e-3)


def test_interpolate_with_a_repair_mode_keeps_the_ends_and_records_the_mode():
    a, b = _gpt2(0), _gpt2(1)
    data = {"train": _batch(n=8)}
    plain = interpolate(a, b, data, num_points=3, progress=False)
    fixed = interpolate(a, b, data, num_points=3, repair="layernorm", progress=False)
    assert fixed.info["repair"] is True and fixed.info["repair_mode"] == "layernorm"
    loss, loss0 = fixed.metrics["train"]["loss"], plain.metrics["train"]["loss"]
    assert loss[0] == pytest.approx(loss0[0]) and loss[-1] == pytest.approx(loss0[-1])
    assert loss[1] != pytest.approx(loss0[1])  # the midpoint was repaired


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def ln_checkpoints(tmp_path_factory):
    from basinmerge import io, models

    d = tmp_path_factory.mktemp("ln")
    return [io.save(models.build("mlp", (1, 8, 8), 10, seed=s, depth=2, width=16, norm="layer"),
                    d / f"m{s}.safetensors", {"dataset": "digits"}) for s in (0, 1)]


def test_cli_interpolate_repair_mode(ln_checkpoints, capsys):
    import json

    from basinmerge.cli import main

    a, b = ln_checkpoints
    with pytest.raises(SystemExit) as exc:
        main(["-q", "interpolate", str(a), str(b), "--align", "weight", "--repair",
              "--repair-mode", "layernorm", "--points", "3", "--eval-limit", "64", "--json"])
    assert exc.value.code in (0, None)
    out = json.loads(capsys.readouterr().out)
    curve = out["curves"]["weight-aligned + REPAIR (layernorm)"]
    assert curve["info"]["repair_mode"] == "layernorm"
    assert set(out["curves"]) == {"naive", "weight-aligned", "weight-aligned + REPAIR (layernorm)"}


def test_cli_interpolate_unknown_repair_mode_fails_before_loading(tmp_path, capsys):
    from basinmerge.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["interpolate", str(tmp_path / "missing-a"), str(tmp_path / "missing-b"), "--align",
              "weight", "--repair", "--repair-mode", "norms"])
    assert exc.value.code == 1
    assert "unknown REPAIR mode 'norms'" in capsys.readouterr().err.replace("\n", " ")


def test_recipe_repair_mode_reaches_the_engine(tmp_path):
    import copy

    from basinmerge import data as data_mod
    from basinmerge import io, models, recipe
    from basinmerge.align.repair import repair

    paths = [io.save(models.build("mlp", (1, 8, 8), 10, depth=2, width=8, seed=s, norm="layer"),
                     tmp_path / f"{s}.safetensors") for s in (1, 2)]
    out = recipe.validate({"models": [str(p) for p in paths], "method": "average",
                           "repair": "layernorm", "data": {"dataset": "digits", "examples": 300},
                           "output": {"path": str(tmp_path / "r.safetensors")}}).run()
    na, nb = (io.load_model(p)[0] for p in paths)
    train = data_mod.load("digits", "train").subset(300, seed=0)
    merged = io.load_into(copy.deepcopy(na), lerp(na.state_dict(), nb.state_dict(), 0.5))
    want = repair(na, nb, merged, train, 0.5, mode="layernorm").state_dict()
    got, meta = io.load_state(out)
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    # Only LayerNorm affines moved (the Linear layers keep the plain average).
    plain = lerp(na.state_dict(), nb.state_dict(), 0.5)
    moved = {k for k in plain if not torch.allclose(got[k], plain[k])}
    assert moved and all(k.startswith("norms.") for k in moved), moved
    assert meta["merge"]["repair"] == "layernorm"


@pytest.fixture(scope="module")
def gpt2_text(tmp_path_factory):
    """Two tiny byte-level GPT-2 HF folders (different seeds) and a text corpus."""
    tf = pytest.importorskip("transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    d = tmp_path_factory.mktemp("gpt2text")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=256, n_embd=16, n_layer=2, n_head=2,
                                             n_positions=16, bos_token_id=0, eos_token_id=0))
        m.save_pretrained(d / f"g{seed}")
        paths.append(d / f"g{seed}")
    corpus = d / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog; " * 40, encoding="utf-8")
    return paths, corpus


def test_cli_merge_aligned_with_layernorm_repair_on_hf_text(gpt2_text, tmp_path, cli):
    """`merge --align activation --repair --repair-mode layernorm` on HF folders with a text
    corpus: the LayerNorm mode changes the LayerNorms and nothing else, the output opens with
    `from_pretrained`, records the mode, and equals the recipe the same call prints."""
    import transformers as tf

    from basinmerge import io
    from basinmerge import recipe as recipe_mod

    (a, b), corpus = gpt2_text
    common = [a, b, "--method", "average", "--align", "activation", "--data", corpus,
              "--tokenizer", "bytes", "--seq-len", "12", "--data-examples", "32"]
    assert cli("merge", *common, "-o", tmp_path / "plain").code == 0
    res = cli("merge", *common, "--repair", "--repair-mode", "layernorm", "-o", tmp_path / "ln")
    assert res.code == 0, res.err
    plain = io.load_state(tmp_path / "plain")[0]
    fixed = io.load_state(tmp_path / "ln")[0]
    changed = {k for k in plain if not torch.equal(plain[k], fixed[k])}
    assert changed and all(".ln_" in k for k in changed), changed
    merge_meta = io.read_meta(tmp_path / "ln")["merge"]
    assert merge_meta["repair"] == "layernorm" and merge_meta["align"]["method"] == "activation"
    net = tf.GPT2LMHeadModel.from_pretrained(tmp_path / "ln")
    torch.testing.assert_close(net.transformer.ln_f.weight.detach(), fixed["transformer.ln_f.weight"])

    printed = cli("merge", *common, "--repair", "--repair-mode", "layernorm", "-o",
                  tmp_path / "via-recipe", "--print-recipe")
    assert printed.code == 0
    (tmp_path / "r.yaml").write_text(printed.out)
    recipe_mod.load(tmp_path / "r.yaml").run()
    again = io.load_state(tmp_path / "via-recipe")[0]
    for k in fixed:
        torch.testing.assert_close(again[k], fixed[k], rtol=0, atol=0)


def test_cli_merge_repair_mode_without_repair_is_an_error(gpt2_text, tmp_path, cli):
    (a, b), _ = gpt2_text
    res = cli("merge", a, b, "--repair-mode", "mlp", "-o", tmp_path / "x")
    assert res.code != 0 and "--repair-mode mlp needs --repair" in res.error
    assert not (tmp_path / "x").exists()


def test_cli_interpolate_aligned_and_repaired_on_hf_text(gpt2_text, cli):
    import json

    (a, b), corpus = gpt2_text
    res = cli("interpolate", a, b, "--align", "activation", "--repair", "--data", corpus,
              "--tokenizer", "bytes", "--seq-len", "12", "--points", "3", "--json")
    assert res.code == 0, res.err
    curves = json.loads(res.out)["curves"]
    assert set(curves) == {"naive", "activation-aligned", "activation-aligned + REPAIR"}
    split = next(iter(curves["naive"]["metrics"]))
    ends = [curves[c]["metrics"][split]["loss"] for c in curves]
    for loss in ends[1:]:  # alignment and REPAIR change the path, not its ends
        assert loss[0] == pytest.approx(ends[0][0], rel=1e-5)
        assert loss[-1] == pytest.approx(ends[0][-1], rel=1e-5)
    assert ends[2][1] != pytest.approx(ends[1][1], rel=1e-6)
