"""Recipes and the CLI on checkpoints from anywhere: merges of HF folders that open with
`from_pretrained` and equal a merge by hand; bare safetensors merges that exit 0; a printed
recipe that runs to the same output; one error per invalid field; outputs that refuse to
overwrite a folder."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from basinmerge import io, models, recipe
from basinmerge.cli import main
from basinmerge.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _mlps(d: Path, n: int = 3) -> list[Path]:
    base = models.build("mlp", (1, 4, 4), 3, depth=1, width=8, seed=0)
    paths = [io.save(base, d / "base.safetensors", {"dataset": "digits"})]
    for i in range(n - 1):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
        paths.append(io.save(m, d / f"m{i}.safetensors", {"dataset": "digits"}))
    return paths


def _same(a: Path, b: Path) -> bool:
    sa, sb = io.load_state(a)[0], io.load_state(b)[0]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- recipes


def test_printed_recipe_runs_to_the_same_merge(tmp_path, capsys):
    base, a, b = _mlps(tmp_path)
    cli_out = tmp_path / "cli.safetensors"
    args = ["merge", str(a), str(b), "--method", "ties", "--base", str(base), "--opt", "density=0.5",
            "--opt", "scale=0.8"]
    code, _, err = _run([*args, "--out", str(cli_out)], capsys)
    assert code == 0, err
    rec_out = tmp_path / "rec.safetensors"
    code, text, err = _run([*args, "--out", str(rec_out), "--print-recipe"], capsys)
    assert code == 0, err
    assert not rec_out.exists()  # printing merges nothing
    obj = yaml.safe_load(text)
    assert obj["method"] == "ties" and obj["options"] == {"density": 0.5, "scale": 0.8}
    (tmp_path / "r.yaml").write_text(text)
    code, _, err = _run(["run", str(tmp_path / "r.yaml")], capsys)
    assert code == 0, err
    assert _same(cli_out, rec_out)
    # both outputs record the recipe they came from
    assert io.read_meta(rec_out)["recipe"] == obj
    assert io.read_meta(cli_out)["recipe"]["options"] == obj["options"]
    # and the Python API is the same schema
    assert recipe.load(tmp_path / "r.yaml").to_dict() == obj


def test_recipe_overrides_by_pattern_equal_a_merge_by_hand(tmp_path):
    base, a, b = _mlps(tmp_path)
    r = recipe.validate({
        "models": [str(a), str(b)], "base": str(base), "method": "task_arithmetic",
        "options": {"scale": 1.0}, "overrides": [{"pattern": "head.*", "options": {"scale": 0.25}}],
        "output": {"path": str(tmp_path / "o.safetensors")}})
    out = r.run()
    got = io.load_state(out)[0]
    sb, sa, s2 = (io.load_state(p)[0] for p in (base, a, b))
    for k in sb:
        scale = 0.25 if k.startswith("head.") else 1.0
        want = sb[k] + scale * ((sa[k] - sb[k]) + (s2[k] - sb[k]))
        assert torch.allclose(got[k], want, atol=1e-6), k
    assert any(k.startswith("head.") for k in sb) and any(not k.startswith("head.") for k in sb)
    assert io.checkpoint_format(out) == "basinmerge"  # project format in, project format out
    assert io.load_model(out)[0] is not None


GOOD = {"models": ["a.safetensors", "b.safetensors"], "base": "base.safetensors",
        "method": "ties", "options": {"density": 0.2}, "output": {"path": "o.safetensors"}}


@pytest.mark.parametrize(("edit", "field"), [
    (lambda r: r.update(method="nope"), "method"),
    (lambda r: r.pop("method"), "method"),
    (lambda r: r.update(align={"options": {}}), "align.method"),
    (lambda r: r["options"].update(bogus=1), "options.bogus"),
    (lambda r: r.update(overrides=[{"pattern": "*.attn.*", "options": {"alpha": 1}}]),
     "overrides.0.options.alpha"),
    (lambda r: r.update(overrides=[{"options": {}}]), "overrides.0.pattern"),
    (lambda r: r.update(models=[]), "models"),
    (lambda r: r.pop("base"), "base"),
    (lambda r: r.update(colour="red"), "colour"),
    (lambda r: r["output"].update(format="onnx"), "output.format"),
    (lambda r: r["output"].update(max_shard_mib=0), "output.max_shard_mib"),
    (lambda r: r.pop("output"), "output"),
    (lambda r: r.update(dtype="float8"), "dtype"),
    (lambda r: r.update(block_mib=-1), "block_mib"),
    (lambda r: r.update(align={"method": "magic"}), "align.method"),
    (lambda r: r.update(data={"dataset": "digits", "examples": 0}), "data.examples"),
    (lambda r: r.update(method="fisher", base=None, options={}), "data"),
    (lambda r: r.update(stream=True, overrides=[{"pattern": "x", "options": {}}]), "stream"),
    (lambda r: r.update(method="average", base=None, options={}, repair=True), "repair"),
])
def test_each_invalid_field_names_itself(edit, field):
    r = copy.deepcopy(GOOD)
    edit(r)
    with pytest.raises(ConfigError) as e:
        recipe.validate(r, "my.yaml")
    assert f"my.yaml: field '{field}'" in str(e.value)


def test_recipe_file_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="not found"):
        recipe.load(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("models: [a\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        recipe.load(tmp_path / "bad.yaml")
    (tmp_path / "u.yaml").write_text(yaml.safe_dump({**GOOD, "method": "nope"}))
    code, _, err = _run(["run", str(tmp_path / "u.yaml")], capsys)
    assert code == 1 and "field 'method'" in err and "Traceback" not in err


def test_recipe_dtype_casts_the_output(tmp_path):
    _, a, b = _mlps(tmp_path)
    out = recipe.validate({"models": [str(a), str(b)], "method": "average", "dtype": "bfloat16",
                           "output": {"path": str(tmp_path / "h.safetensors")}}).run()
    got = io.load_state(out)[0]
    sa, sb = io.load_state(a)[0], io.load_state(b)[0]
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], ((sa[k] + sb[k]) / 2)
               .to(torch.bfloat16)) for k in got)


# --------------------------------------------------------------------------- bare safetensors


def test_merge_of_bare_safetensors_exits_0(tmp_path, capsys):
    states = [models.build("mlp", (1, 4, 4), 3, depth=1, width=8, seed=s).state_dict()
              for s in (1, 2)]
    paths = []
    for i, s in enumerate(states):
        paths.append(tmp_path / f"b{i}.safetensors")
        save_file({k: v.contiguous() for k, v in s.items()}, str(paths[-1]))
    for extra in ([], ["--no-stream"]):
        out = tmp_path / f"avg{len(extra)}.safetensors"
        code, _, err = _run(["merge", *map(str, paths), "--out", str(out), *extra], capsys)
        assert code == 0, err
        got = io.load_state(out)[0]
        assert all(torch.equal(got[k], (states[0][k] + states[1][k]) / 2) for k in got)
        assert io.checkpoint_format(out) == "safetensors"
    # a command that runs the model takes its architecture from --like
    net = models.build("mlp", (1, 8, 8), 10, depth=1, width=8, seed=3)
    bare = tmp_path / "digits_bare.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(bare))
    like = io.save(models.build("mlp", (1, 8, 8), 10, depth=1, width=8), tmp_path / "l.safetensors")
    code, _, err = _run(["eval", str(bare), "--dataset", "digits"], capsys)
    assert code == 1 and "no architecture" in err
    code, out, err = _run(["eval", str(bare), "--dataset", "digits", "--like", str(like),
                           "--json"], capsys)
    assert code == 0, err
    from basinmerge import data as data_mod
    from basinmerge.train import evaluate

    want = evaluate(net.eval(), data_mod.load("digits", "test"))["accuracy"]
    assert json.loads(out)["accuracy"] == pytest.approx(want)


def test_mismatched_models_list_the_first_few(tmp_path, capsys):
    a = io.save(models.build("mlp", (1, 4, 4), 3, depth=1, width=8), tmp_path / "a.safetensors")
    b = io.save(models.build("mlp", (1, 4, 4), 3, depth=1, width=6), tmp_path / "b.safetensors")
    for extra in ([], ["--no-stream"]):
        code, _, err = _run(["merge", str(a), str(b), "--out", str(tmp_path / "o.safetensors"),
                             *extra], capsys)
        err = err.replace("\n", "")
        assert code == 1 and err.count("has shape") >= 2, err
        assert not (tmp_path / "o.safetensors").exists()


# --------------------------------------------------------------------------- HF folders

def _bert(seed: int, labels: int = 3):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100, max_position_embeddings=32,
                                  num_labels=labels)
    return transformers.BertForSequenceClassification(cfg).eval()


IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def berts(tmp_path_factory):
    d = tmp_path_factory.mktemp("berts")
    nets = [_bert(s) for s in (0, 1, 2)]
    for name, net in zip(("base", "ft_a", "ft_b"), nets, strict=True):
        net.save_pretrained(d / name)
    (d / "base" / "tokenizer_config.json").write_text("{}")
    return d, nets


def test_cli_merge_of_hf_folders_opens_with_from_pretrained(berts, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    d, (base, a, b) = berts
    sa, sb, s0 = a.state_dict(), b.state_dict(), base.state_dict()
    by_hand = copy.deepcopy(a)
    by_hand.load_state_dict({k: s0[k] + 0.5 * ((sa[k] - s0[k]) + (sb[k] - s0[k])) for k in sa})
    with torch.no_grad():
        want = by_hand(input_ids=IDS).logits
    outs = {}
    for extra in ([], ["--no-stream"]):
        out = tmp_path / f"merged{len(extra)}"
        code, _, err = _run(["merge", str(d / "ft_a"), str(d / "ft_b"), "--method",
                             "task_arithmetic", "--base", str(d / "base"), "--opt", "scale=0.5",
                             "--out", str(out), *extra], capsys)
        assert code == 0, err
        assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
        net = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
        with torch.no_grad():
            assert torch.allclose(net(input_ids=IDS).logits, want, atol=1e-5)
        assert io.read_meta(out)["recipe"]["method"] == "task_arithmetic"
        outs[len(extra)] = out
    assert _same(outs[0], outs[1])  # streamed and in-memory: the same bits
    # the output folder is not overwritten without --force, and is left as it was
    before = sorted(p.name for p in outs[0].iterdir())
    code, _, err = _run(["merge", str(d / "ft_a"), str(d / "ft_b"), "--out", str(outs[0])], capsys)
    assert code == 1 and "not empty" in err and "Traceback" not in err
    assert sorted(p.name for p in outs[0].iterdir()) == before and _same(outs[0], outs[1])
    for extra in ([], ["--no-stream"]):  # an input is never the output, --force or not
        code, _, err = _run(["merge", str(outs[1]), str(d / "ft_b"), "--out", str(outs[1]),
                             "--force", *extra], capsys)
        assert code == 1 and "is an input" in err and _same(outs[0], outs[1])
    code, _, err = _run(["merge", str(d / "ft_a"), str(d / "ft_b"), "--out", str(outs[0]),
                         "--force"], capsys)
    assert code == 0, err
    assert not _same(outs[0], outs[1])  # replaced by the average


def test_hf_recipe_sharded_output_equals_the_cli(berts, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    d, _ = berts
    out_cli = tmp_path / "cli"
    args = ["merge", str(d / "ft_a"), str(d / "ft_b"), "--method", "ties", "--base", str(d / "base"),
            "--opt", "density=0.3", "--no-stream", "--max-shard-mib", "0.05"]
    code, _, err = _run([*args, "--out", str(out_cli)], capsys)
    assert code == 0, err
    assert (out_cli / io.HF_SAFETENSORS_INDEX).is_file()
    code, text, _ = _run([*args, "--out", str(tmp_path / "rec"), "--print-recipe"], capsys)
    out = recipe.validate(yaml.safe_load(text)).run()
    assert _same(out, out_cli) and (out / io.HF_SAFETENSORS_INDEX).is_file()
    transformers.AutoModelForSequenceClassification.from_pretrained(out)


def test_hf_folders_that_do_not_match(berts, tmp_path, capsys):
    d, _ = berts
    _bert(5, labels=4).save_pretrained(tmp_path / "four")
    code, _, err = _run(["merge", str(d / "ft_a"), str(tmp_path / "four"), "--out",
                         str(tmp_path / "o")], capsys)
    assert code == 1 and "classifier.weight" in err and "classifier.bias" in err
    assert not (tmp_path / "o").exists()
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code, _, err = _run(["merge", str(d / "ft_a"), str(tmp_path / "noweights"), "--out",
                         str(tmp_path / "o")], capsys)
    assert code == 1 and "no model weights" in err and not (tmp_path / "o").exists()


def test_scope_reads_hf_folders(berts, capsys):
    d, (base, _, _) = berts
    code, out, err = _run(["scope", str(d / "base"), str(d / "ft_a"), "--json"], capsys)
    assert code == 0, err
    scopes = json.loads(out)["scopes"]["base"]
    w = base.state_dict()["bert.encoder.layer.0.attention.self.query.weight"]
    layer = scopes["layers"]["bert.encoder.layer.0.attention.self.query.weight"] \
        if "layers" in scopes else scopes["bert.encoder.layer.0.attention.self.query.weight"]
    assert layer["mean"] == pytest.approx(float(w.mean()), abs=1e-6)


def test_align_recipe_equals_the_align_command(tmp_path, capsys):
    a = io.save(models.build("mlp", (1, 4, 4), 3, depth=2, width=8, seed=1), tmp_path / "a.safetensors")
    b = io.save(models.build("mlp", (1, 4, 4), 3, depth=2, width=8, seed=2), tmp_path / "b.safetensors")
    cli_out = tmp_path / "b_cli.safetensors"
    code, _, err = _run(["align", str(a), str(b), "--out", str(cli_out)], capsys)
    assert code == 0, err
    code, text, err = _run(["align", str(a), str(b), "--out", str(tmp_path / "b_rec.safetensors"),
                            "--print-recipe"], capsys)
    assert code == 0, err
    r = recipe.validate(yaml.safe_load(text))
    assert r.method is None and r.align is not None and r.align.method == "weight"
    out = r.run()
    assert _same(out, cli_out)
    # the aligned model computes what B computes, and is not B
    x = torch.randn(5, 1, 4, 4)
    with torch.no_grad():
        assert torch.allclose(io.load_model(out)[0](x), io.load_model(b)[0](x), atol=1e-5)
    assert not _same(out, b)
    assert io.read_meta(cli_out)["recipe"]["align"]["method"] == "weight"
    # align, then merge: the average of A and permuted B
    merged = recipe.validate({**r.to_dict(), "method": "average",
                              "output": {"path": str(tmp_path / "m.safetensors")}}).run()
    sa, sp, sm = (io.load_state(p)[0] for p in (a, out, merged))
    assert all(torch.allclose(sm[k], (sa[k] + sp[k]) / 2) for k in sm)


def test_recipe_repair_equals_repair_by_hand(tmp_path):
    from basinmerge import data as data_mod
    from basinmerge.align.repair import repair
    from basinmerge.state import lerp

    a = io.save(models.build("mlp", (1, 8, 8), 10, depth=2, width=8, seed=1), tmp_path / "a.safetensors")
    b = io.save(models.build("mlp", (1, 8, 8), 10, depth=2, width=8, seed=2), tmp_path / "b.safetensors")
    out = recipe.validate({"models": [str(a), str(b)], "method": "average", "repair": True,
                           "data": {"dataset": "digits", "examples": 300},
                           "output": {"path": str(tmp_path / "r.safetensors")}}).run()
    na, nb = io.load_model(a)[0], io.load_model(b)[0]
    train = data_mod.load("digits", "train").subset(300, seed=0)
    merged = io.load_into(copy.deepcopy(na), lerp(na.state_dict(), nb.state_dict(), 0.5))
    want = repair(na, nb, merged, train, 0.5).state_dict()
    got = io.load_state(out)[0]
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    plain = lerp(na.state_dict(), nb.state_dict(), 0.5)
    assert not all(torch.allclose(got[k], plain[k]) for k in plain)  # REPAIR changed something


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def _bad_inputs(d: Path, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    import shutil

    (tmp_path / "noweights").mkdir()
    shutil.copy(d / "ft_a" / "config.json", tmp_path / "noweights")
    shutil.copytree(d / "ft_a", tmp_path / "sharded")
    state = io.load_state(tmp_path / "sharded")[0]
    (tmp_path / "sharded" / "model.safetensors").unlink()
    io.write_hf_weights(tmp_path / "sharded", state, max_shard_mib=0.05)
    victim = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    victim.unlink()
    (tmp_path / "evil").mkdir()
    shutil.copy(d / "ft_a" / "config.json", tmp_path / "evil")
    torch.save({"w": torch.zeros(2), "x": _Evil()}, tmp_path / "evil" / io.HF_BIN)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(
        {"models": [str(d / "ft_a"), str(d / "ft_b")], "method": "average",
         "options": {"density": 0.2}, "output": {"path": str(tmp_path / "out")}}))
    a, b = str(d / "ft_a"), str(d / "ft_b")
    return {
        "no weights": (["merge", a, str(tmp_path / "noweights")], "no model weights"),
        "missing shard": (["merge", a, str(tmp_path / "sharded")], victim.name),
        "pickle": (["merge", a, str(tmp_path / "evil"), "--no-stream"], "weights_only=True"),
        "pickle, streaming": (["merge", a, str(tmp_path / "evil"), "--stream"], "cannot stream"),
        "recipe option": (["run", str(tmp_path / "r.yaml")], "field 'options.density'"),
        "recipe method": (["merge", a, b, "--method", "nope"], "unknown merge method 'nope'"),
    }


@pytest.mark.parametrize("case", ["no weights", "missing shard", "pickle", "pickle, streaming",
                                  "recipe option", "recipe method"])
def test_bad_input_is_one_error_and_writes_nothing(berts, tmp_path, capsys, case):
    d, _ = berts
    args, message = _bad_inputs(d, tmp_path)[case]
    if args[0] == "merge":
        args = [*args, "--out", str(tmp_path / "out")]
    code, out, err = _run(args, capsys)
    flat = err.replace("\n", " ")
    assert code == 1 and message in flat and "Traceback" not in err, err
    assert err.startswith("error") and "pickled code ran" not in out + err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_recipe_resets_batchnorm_on_its_data(tmp_path):
    from basinmerge import data as data_mod
    from basinmerge.train import reset_bn_stats

    nets = [models.build("mlp", (1, 8, 8), 10, depth=1, width=8, norm="batch", seed=s) for s in (1, 2)]
    paths = [io.save(n, tmp_path / f"bn{i}.safetensors") for i, n in enumerate(nets)]
    spec = {"models": list(map(str, paths)), "method": "average",
            "data": {"dataset": "digits", "examples": 200},
            "output": {"path": str(tmp_path / "m.safetensors")}}
    got = io.load_state(recipe.validate(spec).run())[0]
    sa, sb = nets[0].state_dict(), nets[1].state_dict()
    by_hand = io.load_into(copy.deepcopy(nets[0]),
                           {k: (sa[k] + sb[k]) / 2 if sa[k].is_floating_point() else sa[k] for k in sa})
    reset_bn_stats(by_hand, data_mod.load("digits", "train").subset(200, seed=0))
    want = by_hand.state_dict()
    bn_keys = [k for k in want if "running" in k]
    bad = [(k, got[k], want[k]) for k in want if not torch.allclose(got[k], want[k], atol=1e-6)]
    assert bn_keys and not bad, bad
    assert not torch.allclose(got[bn_keys[0]], (sa[bn_keys[0]] + sb[bn_keys[0]]) / 2)
    off = recipe.validate({**spec, "reset_bn": False,
                           "output": {"path": str(tmp_path / "n.safetensors")}}).run()
    assert torch.equal(io.load_state(off)[0][bn_keys[0]], (sa[bn_keys[0]] + sb[bn_keys[0]]) / 2)


# --------------------------------------------------------------------------- one engine


def test_engine_overrides_and_dtype_equal_a_merge_by_hand(tmp_path):
    from basinmerge.merge.engine import merge_checkpoints

    base, a, b = _mlps(tmp_path)
    res = merge_checkpoints([a, b], "task_arithmetic", base=base, options={"scale": 1.0},
                            overrides=[("head.*", {"scale": 0.25}), ("*", {"scale": 0.5})],
                            dtype="float16", out=tmp_path / "o.safetensors")
    got = io.load_state(res.out)[0]
    sb, sa, s2 = (io.load_state(p)[0] for p in (base, a, b))
    for k in sb:  # first matching pattern wins: head.* 0.25, everything else 0.5
        scale = 0.25 if k.startswith("head.") else 0.5
        want = (sb[k] + scale * ((sa[k] - sb[k]) + (s2[k] - sb[k]))).to(torch.float16)
        assert got[k].dtype == torch.float16 and torch.equal(got[k], want), k
    rec = io.read_meta(res.out)["merge"]
    assert not res.streamed and rec["dtype"] == "float16"
    assert [o["pattern"] for o in rec["overrides"]] == ["head.*", "*"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"overrides": [("head.*", {"density": 0.5})]}, "has no option 'density'"),
    ({"overrides": [("head.*", {"scale": 1.0})], "stream": True}, "per-tensor overrides needs"),
    ({"dtype": "float8"}, "unknown dtype 'float8'"),
    ({"align": {"method": "weight", "options": {"nope": 1}}}, "alignment has no option 'nope'"),
    ({"align": {"method": "activation"}}, "needs data"),
    ({"repair": True}, "REPAIR needs two models"),
])
def test_engine_extras_are_checked_before_any_work(tmp_path, kwargs, message):
    from basinmerge.merge.engine import merge_checkpoints

    base, a, b = _mlps(tmp_path)
    out = tmp_path / "o.safetensors"
    with pytest.raises(ConfigError, match=message):
        merge_checkpoints([a, b], "task_arithmetic", base=base, out=out, **kwargs)
    assert not out.exists()


def test_recipe_gets_the_member_guard_and_the_bn_policy(tmp_path, capsys):
    from basinmerge.errors import IncompatibleModelsError
    from basinmerge.merge.engine import BN_NOTE_DATA_FREE

    nets = [models.build("mlp", (1, 8, 8), 10, depth=1, width=8, norm="batch", seed=0)
            for _ in range(4)]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in nets:
            for p in n.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        for p in nets[3].parameters():
            p.mul_(1000)  # a poisoned member
    paths = [str(io.save(n, tmp_path / f"m{i}.safetensors")) for i, n in enumerate(nets)]
    spec = {"models": paths, "method": "average",
            "output": {"path": str(tmp_path / "avg.safetensors")}}
    res = recipe.validate(spec).merge()
    assert [m.name for m in res.members if m.flagged] == [paths[3]]
    assert any(w.startswith(f"member '{paths[3]}'") for w in res.warnings)
    assert res.bn == "averaged" and BN_NOTE_DATA_FREE in res.warnings  # no data: BN not reset
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**spec, "output": {
        "path": str(tmp_path / "cli.safetensors")}}))
    code, _, err = _run(["run", str(tmp_path / "r.yaml")], capsys)
    assert code == 0 and f"member '{paths[3]}'" in err.replace("\n", "") and "averaged" in err
    strict = {**spec, "strict": True, "output": {"path": str(tmp_path / "s.safetensors")}}
    with pytest.raises(IncompatibleModelsError, match="far outside"):
        recipe.validate(strict).run()
    assert not (tmp_path / "s.safetensors").exists()


def test_a_merge_of_merges_records_its_own_recipe(tmp_path, capsys):
    """Inputs that carry a recipe (earlier merges) do not lend it to the output, streamed or
    not: the output records the recipe of the command that wrote it."""
    base, a, b = _mlps(tmp_path)
    firsts = []
    for i, method in enumerate(("average", "median")):
        firsts.append(tmp_path / f"first{i}.safetensors")
        code, _, err = _run(["merge", str(a), str(b), "--method", method, "--out",
                             str(firsts[-1])], capsys)
        assert code == 0, err
    for extra in ([], ["--no-stream"]):
        out = tmp_path / f"second{len(extra)}.safetensors"
        code, _, err = _run(["merge", *map(str, firsts), "--method", "average", "--out", str(out),
                             *extra], capsys)
        assert code == 0, err
        rec = io.read_meta(out)["recipe"]
        assert rec["models"] == [str(p) for p in firsts] and rec["method"] == "average"
        assert io.read_meta(out)["merge"]["inputs"] == [str(p) for p in firsts]


@pytest.mark.parametrize("extra", [
    [],
    ["--method", "ties", "--base", "{base}", "--opt", "density=0.5", "--stream", "--block-mib",
     "2", "--strict", "--device", "cpu"],
    ["--method", "weighted", "--weights", "1,3,2", "--no-stream", "--format", "safetensors",
     "--max-shard-mib", "100", "--no-reset-bn"],
    ["--method", "median", "--like", "{base}", "--force"],
])
def test_cli_records_without_the_schema_what_print_recipe_prints(tmp_path, capsys, monkeypatch,
                                                                 extra):
    """A plain `basinmerge merge` records its recipe without pydantic (`plain_record`); the
    record equals the schema's: what --print-recipe prints and `basinmerge run` reads."""
    base, a, b = _mlps(tmp_path)
    out = tmp_path / "m.safetensors"
    args = ["merge", str(a), str(b), str(base), "--out", str(out),
            *[e.format(base=base) for e in extra]]
    if "--base" in args:  # the base is not a member then
        args.remove(str(base))
    code, text, err = _run([*args, "--print-recipe"], capsys)
    assert code == 0, err
    printed = yaml.safe_load(text)

    def schema(*a, **k):
        raise AssertionError("a plain command line is recorded without the schema")

    monkeypatch.setattr(recipe, "validate", schema)
    code, _, err = _run(args, capsys)
    assert code == 0, err
    assert io.read_meta(out)["recipe"] == printed
    monkeypatch.undo()
    assert recipe.validate(printed).to_dict() == printed


def test_plain_record_equals_the_schema_or_declines():
    from typing import get_args

    from basinmerge.recipe_record import OUTPUT_FORMATS, plain_record

    assert get_args(recipe.Output.model_fields["format"].annotation) == OUTPUT_FORMATS
    full = {"models": ["a", "b"], "base": "z", "method": "ties",
            "options": {"density": 0.2, "scale": 1}, "reset_bn": True, "data": None, "like": "l",
            "stream": True, "block_mib": 2, "device": "cuda", "strict": True,
            "output": {"path": "o", "format": "hf", "force": True, "max_shard_mib": 10}}
    bare = {"models": ["a"], "method": "average", "options": {}, "stream": None, "block_mib": 1.0,
            "output": {"path": "o.safetensors", "format": "auto", "max_shard_mib": 4096.0}}
    for obj in (full, bare):
        assert plain_record(obj, streams=True) == recipe.validate(obj).to_dict()
        assert list(plain_record(obj, streams=True)) == list(recipe.validate(obj).to_dict())
    # what the schema must judge (or refuse, naming the field) is left to it
    for edit in ({"block_mib": 0}, {"output": {"path": "o", "format": "onnx"}},
                 {"output": {"path": "o", "max_shard_mib": -1}}, {"data": "digits"},
                 {"align": {"method": "weight"}}, {"repair": True}, {"dtype": "float16"},
                 {"overrides": [{"pattern": "*", "options": {}}]}, {"bogus": 1}, {"models": []},
                 {"stream": "yes"}):
        assert plain_record({**full, **edit}, streams=True) is None, edit
    assert plain_record(full, streams=False) is None  # stream: true for a method that cannot
