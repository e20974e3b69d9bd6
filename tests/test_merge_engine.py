"""The merge engine (`merge_checkpoints`), the member guard and BatchNorm statistics."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from basinmerge import data as data_mod
from basinmerge import io, models
from basinmerge.cli import app, main
from basinmerge.errors import ConfigError, DataError, IncompatibleModelsError
from basinmerge.merge import METHODS, merge, streamable, task_arithmetic
from basinmerge.merge._common import StateSource
from basinmerge.merge.engine import merge_checkpoints
from basinmerge.merge.guard import check_members, layer_statistics
from basinmerge.scope import weight_scope
from basinmerge.state import with_state
from basinmerge.train import fit, reset_bn_stats

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()

POISON = ("x1000", "flip", "noise")


def _poisoned(state: dict, kind: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif kind == "x1000":
            out[k] = v * 1000
        elif kind == "flip":
            out[k] = -v
        else:
            out[k] = torch.randn(v.shape, generator=g) * 10
    return out


def _perturbed(state: dict, eps: float, g: torch.Generator) -> dict:
    return {k: v + eps * v.std() * torch.randn(v.shape, generator=g)
            if v.is_floating_point() and v.numel() > 1 else v.clone() for k, v in state.items()}


@pytest.fixture(scope="module")
def trained():
    train = data_mod.load("digits", "train")
    net = models.build("mlp", train.input_shape, 10, seed=0, width=16)
    fit(net, train, epochs=2, lr=0.05, progress=False)
    return net, {k: v.clone() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def finetunes(trained, tmp_path_factory):
    """A base on digits and four fine-tunes on class-skewed subsets, saved."""
    net, base = trained
    train = data_mod.load("digits", "train")
    d = tmp_path_factory.mktemp("engine")
    base_path = io.save(net, d / "base.safetensors", {"dataset": "digits"})
    paths = []
    for i in range(4):
        m = copy.deepcopy(net)
        idx = torch.nonzero((train.y % 4 == i) | (torch.arange(len(train)) % 5 == 0)).flatten()
        fit(m, train.subset(idx), epochs=1, lr=0.05, seed=i, progress=False)
        paths.append(io.save(m, d / f"ft{i}.safetensors", {"dataset": "digits"}))
    return d, base_path, paths


# --------------------------------------------------------------------------- the guard


def test_guard_statistics_are_the_weight_scope(finetunes):
    _, _, paths = finetunes
    states = [io.load_state(p)[0] for p in paths]
    st = layer_statistics(StateSource(states), "layers.0.weight", block_bytes=512)  # row blocks
    for i, s in enumerate(states):
        scope = weight_scope(s)["layers.0.weight"]
        assert float(st["mu"][i]) == pytest.approx(scope.mean, abs=1e-12)
        assert float(st["sigma"][i]) == pytest.approx(scope.std, rel=1e-9)


def test_guard_is_quiet_on_eight_honest_finetunes(trained):
    _, base = trained
    g = torch.Generator().manual_seed(1)
    honest = [_perturbed(base, 0.05, g) for _ in range(8)]
    report = check_members(StateSource(honest))
    assert report.checked and report.flagged() == [] and report.warnings() == []
    assert max(report.distance) < report.threshold


@pytest.mark.parametrize("kind", POISON)
def test_guard_flags_and_names_a_poisoned_member(trained, kind):
    _, base = trained
    g = torch.Generator().manual_seed(2)
    members = [_perturbed(base, 0.05, g) for _ in range(4)]
    members.insert(2, _poisoned(members[0], kind))
    names = [f"m{i}" for i in range(5)]
    report = check_members(StateSource(members, names=names))
    assert report.flagged() == ["m2"]
    (w,) = report.warnings()
    assert w.startswith("member 'm2' is far outside") and "layer '" in w
    assert "median, trimmed_mean, soft" in w
    honest = [d for n, d in zip(names, report.distance, strict=True) if n != "m2"]
    assert max(honest) < report.threshold < report.distance[2]


def _llama_shaped(seed: int, layers: int = 3, d: int = 8, ff: int = 12, vocab: int = 20) -> dict:
    """A Llama-shaped state_dict: many weights of one shape (q, k, v, o of every layer)."""
    g = torch.Generator().manual_seed(seed)
    s = {"model.embed_tokens.weight": torch.randn(vocab, d, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            s[p + f"self_attn.{n}.weight"] = torch.randn(d, d, generator=g)
        s[p + "mlp.gate_proj.weight"] = torch.randn(ff, d, generator=g)
        s[p + "mlp.up_proj.weight"] = torch.randn(ff, d, generator=g)
        s[p + "mlp.down_proj.weight"] = torch.randn(d, ff, generator=g)
        s[p + "input_layernorm.weight"] = torch.ones(d)
    s["model.norm.weight"] = torch.ones(d)
    s["lm_head.weight"] = torch.randn(vocab, d, generator=g)
    return s


def test_guard_examines_every_weight_of_a_llama_shaped_model():
    """Regression: shapes alone (meta tensors, all with data pointer 0) once looked tied, so
    the guard compared one weight per distinct shape (4 of 23 here, 4 of 58 in a real Llama)."""
    g = torch.Generator().manual_seed(0)
    members = [_perturbed(_llama_shaped(0), 0.05, g) for _ in range(4)]
    weights = [k for k, v in members[0].items() if v.ndim == 2]
    assert len(weights) == 2 + 3 * 7
    report = check_members(StateSource(members))
    assert report.layers == len(weights)
    members[1]["model.layers.2.self_attn.v_proj.weight"] *= 1000  # one same-shaped weight of many
    flagged = check_members(StateSource(members))
    assert {f.layer for f in flagged.flags} == {"model.layers.2.self_attn.v_proj.weight"}


def _wide(seed: int) -> dict:
    """A base with one layer over the guard's sample size (400 x 400 = 160,000 coordinates)."""
    g = torch.Generator().manual_seed(seed)
    return {"big.weight": torch.randn(400, 400, generator=g) * 0.02,
            "small.weight": torch.randn(16, 400, generator=g) * 0.05,
            "small.bias": torch.zeros(16)}


@pytest.mark.parametrize("kind", [None, *POISON])
def test_sampled_guard_flags_poisoned_members_and_stays_quiet_on_honest_ones(kind):
    """Layers over SAMPLE coordinates are compared on a fixed sample: the sampled mu and sigma
    are within 3% of a sigma of the exact ones (differences between members within 0.5%),
    and the verdicts are those of the exact guard."""
    from basinmerge.merge.guard import SAMPLE, GuardStats

    g = torch.Generator().manual_seed(3)
    base = _wide(0)
    members = [_perturbed(base, 0.05, g) for _ in range(5)]
    if kind is not None:
        members[3] = _poisoned(members[3], kind)
    src = StateSource(members, names=[f"m{i}" for i in range(5)])
    assert src.numel("big.weight") > SAMPLE
    sampled, exact = check_members(src), check_members(src, sample=None)
    assert sampled.flagged() == exact.flagged() == ([] if kind is None else ["m3"])
    if kind is None:
        assert max(sampled.distance) < sampled.threshold
    s = layer_statistics(src, "big.weight", block_bytes=4096)
    e = layer_statistics(src, "big.weight", sample=None)
    assert ((s["mu"] - e["mu"]).abs() <= 0.03 * e["sigma"]).all()
    assert torch.allclose(s["sigma"], e["sigma"], rtol=0.01)
    # the members are sampled on the same coordinates: the differences between honest ones
    # are sharper still
    honest = [i for i in range(5) if kind is None or i != 3]
    diff_s, diff_e = s["mu"][honest] - s["mu"][0], e["mu"][honest] - e["mu"][0]
    assert ((diff_s - diff_e).abs() <= 0.005 * e["sigma"][honest]).all()
    stats = GuardStats(src)
    assert stats.keys == ["big.weight", "small.weight"]


def test_one_pass_guard_of_a_streamed_merge_equals_the_guard_read_separately(finetunes, tmp_path):
    """`stream_merge(observe=...)` feeds the guard the blocks the merge reads: the same report
    as `check_members` reading the files itself."""
    from basinmerge.merge.guard import GuardStats
    from basinmerge.merge.stream import FileSource, stream_merge

    _, base, paths = finetunes
    bad = io.save_state(_poisoned(io.load_state(paths[1])[0], "flip"), tmp_path / "flip.safetensors")
    inputs = [*paths, bad]
    with FileSource(inputs) as src:
        separate = check_members(src, block_bytes=1024)
        stats = GuardStats(src)
    stream_merge(inputs, "ties", tmp_path / "t.safetensors", base=base, block_mib=1024 / 2**20,
                 observe=stats.observe, density=0.5)
    one_pass = stats.report()
    assert one_pass.flagged() == separate.flagged() == [str(bad)]
    assert one_pass.distance == pytest.approx(separate.distance, rel=1e-9)
    assert one_pass.worst == separate.worst and one_pass.layers == separate.layers


@pytest.mark.parametrize("kind", POISON)
def test_engine_guard_warns_streaming_and_in_memory_and_strict_stops(finetunes, tmp_path, kind):
    _, _, paths = finetunes
    bad = io.save_state(_poisoned(io.load_state(paths[1])[0], kind), tmp_path / f"{kind}.safetensors",
                        io.read_meta(paths[1]))
    inputs = list(paths) + [bad]
    for stream in (True, False):
        res = merge_checkpoints(inputs, "average", out=tmp_path / f"avg_{stream}.safetensors",
                                stream=stream)
        assert res.streamed is stream
        assert [m.name for m in res.members if m.flagged] == [str(bad)]
        assert any(w.startswith(f"member '{bad}'") for w in res.warnings)
    out = tmp_path / "strict.safetensors"
    with pytest.raises(IncompatibleModelsError, match=f"member '{bad}' is far outside"):
        merge_checkpoints(inputs, "median", out=out, strict=True)
    assert not out.exists()


# --------------------------------------------------------------------------- engine


@pytest.mark.parametrize("method", sorted(streamable()))
def test_engine_streaming_equals_in_memory_for_every_streaming_method(finetunes, tmp_path, method):
    _, base, paths = finetunes
    m = METHODS[method]
    opts = {"weights": [1, 2, 3, 4]} if method == "weighted" else {}
    kw = dict(base=base if m.needs_base else None, options=opts)
    streamed = merge_checkpoints(paths, method, out=tmp_path / "s.safetensors", stream=True,
                                 block_mib=1e-3, **kw)
    memory = merge_checkpoints(paths, method, out=tmp_path / "m.safetensors", stream=False, **kw)
    assert streamed.streamed and not memory.streamed
    a, b = io.load_state(tmp_path / "s.safetensors")[0], io.load_state(tmp_path / "m.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), method
    ref = merge([io.load_state(p)[0] for p in paths], method,
                base=io.load_state(base)[0] if m.needs_base else None, **opts)
    assert all(torch.equal(a[k], ref[k]) for k in ref)
    assert [round(x, 9) for x in streamed.guard.distance] == [round(x, 9) for x in memory.guard.distance]


@pytest.mark.parametrize(("method", "args"), [
    ("ties", ["--opt", "density=0.3", "--opt", "scale=0.8"]),
    ("della", ["--opt", "drop=0.5", "--opt", "seed=2", "--no-stream"]),
    ("regmean", ["--opt", "alpha=0.5", "--opt", "num_examples=64", "--dataset", "digits",
                 "--data-examples", "200"]),
])
def test_engine_equals_the_cli_bit_for_bit(finetunes, tmp_path, method, args):
    _, base, paths = finetunes
    m = METHODS[method]
    cli_out = tmp_path / "cli.safetensors"
    base_args = ["--base", str(base)] if m.needs_base else []
    res = runner.invoke(app, ["merge", *map(str, paths), "--method", method, *base_args, *args,
                              "--out", str(cli_out), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    opts = {a.split("=")[0]: a.split("=")[1] for a in args[1::2] if "=" in a}
    data = None
    if "--dataset" in args:
        data = data_mod.load("digits", "train").subset(200, seed=0)
    api = merge_checkpoints(paths, method, base=base if m.needs_base else None, options=opts,
                            out=tmp_path / "api.safetensors", data=data,
                            stream=False if "--no-stream" in args else None)
    a, meta_a = io.load_state(cli_out)
    b, meta_b = io.load_state(tmp_path / "api.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta_a["merge"] == meta_b["merge"]
    assert report["members"] == [mem.to_dict() | {"accuracy": report["members"][i]["accuracy"]}
                                 for i, mem in enumerate(api.members)]


def test_engine_returns_the_state_without_out_and_checks_output_first(finetunes, tmp_path):
    _, base, paths = finetunes
    res = merge_checkpoints(paths, "task_arithmetic", base=base, options={"scale": 0.5})
    assert res.out is None and not res.streamed
    ref = task_arithmetic(io.load_state(base)[0], [io.load_state(p)[0] for p in paths], 0.5)
    assert all(torch.equal(res.state[k], v) for k, v in ref.items())
    for bad, message in [(tmp_path, "is a folder"), (tmp_path / "x.pt", "ending in .safetensors"),
                         (paths[0] / "x.safetensors", "is a file, not a folder")]:
        with pytest.raises(ConfigError, match=message):
            merge_checkpoints(paths, "average", out=bad)
    with pytest.raises(ConfigError, match="cannot stream here: it has no per-key kernel"):
        merge_checkpoints(paths, "regmean", out=tmp_path / "r.safetensors", stream=True,
                          data=torch.zeros(4, 64))
    with pytest.raises(ConfigError, match="'weights' is given twice"):
        merge_checkpoints(paths, "average", options={"weights": [1, 1, 1, 1]}, weights=[1, 2, 3, 4])
    assert json.dumps(res.to_dict())  # the summary is JSON


def test_failure_leaves_nothing_and_keeps_an_existing_output(finetunes, tmp_path):
    _, _, paths = finetunes
    bad = io.load_state(paths[0])[0]
    bad["head.bias"][0] = float("nan")
    bad_path = io.save_state(bad, tmp_path / "nan.safetensors")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    for stream in (True, False):
        with pytest.raises(IncompatibleModelsError, match="key 'head.bias' contains NaN"):
            merge_checkpoints([paths[1], bad_path], "average", out=out, stream=stream)
        assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors", "out.safetensors"]
    with pytest.raises(SystemExit) as e:
        main(["merge", str(paths[1]), str(bad_path), "--out", str(tmp_path / "new.safetensors")])
    assert e.value.code == 1 and not (tmp_path / "new.safetensors").exists()


def test_data_that_does_not_fit_is_named_before_any_work(finetunes, tmp_path):
    _, _, paths = finetunes
    out = tmp_path / "o.safetensors"
    with pytest.raises(DataError, match=r"eval_data does not fit the model in .*ft0.safetensors: "
                                        r"inputs of shape \(5,\)"):
        merge_checkpoints(paths, "average", out=out, eval_data=(torch.zeros(4, 5), torch.zeros(4).long()))
    with pytest.raises(DataError, match="data has label 12, but the model .* has 10 outputs"):
        merge_checkpoints(paths, "average", out=out,
                          data=(torch.zeros(4, 1, 8, 8), torch.full((4,), 12)))
    assert list(tmp_path.iterdir()) == []


def test_cli_summary_shows_scope_distances_and_the_warning(finetunes, tmp_path):
    _, _, paths = finetunes
    bad = io.save_state(_poisoned(io.load_state(paths[0])[0], "x1000"), tmp_path / "evil.safetensors",
                        io.read_meta(paths[0]))
    res = runner.invoke(app, ["merge", *map(str, paths), str(bad), "--method", "median",
                              "--out", str(tmp_path / "med.safetensors")])
    assert res.exit_code == 0, res.output
    flat = res.output.replace("\n", " ")
    assert "scope distance" in flat and "warning:" in flat and "evil.safetensors' is far outside" in flat
    assert (tmp_path / "med.safetensors").exists()


# --------------------------------------------------------------------------- BatchNorm


@pytest.fixture(scope="module")
def bn_family(tmp_path_factory):
    """A BatchNorm MLP and four members whose running variances are a tenth of the base's."""
    torch.manual_seed(0)
    net = models.build("mlp", (8,), 3, seed=0, width=6, norm="batch")
    x = torch.randn(256, 8) * 2 + 1
    reset_bn_stats(net, x)
    base = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    members = []
    for _ in range(4):
        s = _perturbed(base, 0.02, g)
        for k in s:
            if k.endswith("running_var"):
                s[k] = base[k] * 0.1
        members.append(s)
    d = tmp_path_factory.mktemp("bn")
    base_path = io.save(net, d / "base.safetensors")
    paths = [io.save(with_state(net, s), d / f"bn{i}.safetensors") for i, s in enumerate(members)]
    return net, base, members, x, base_path, paths


def test_task_arithmetic_over_batchnorm_members_stays_finite(bn_family):
    net, base, members, x, _, _ = bn_family
    out = task_arithmetic(base, members, scale=1.0)
    for k in out:
        if k.endswith("running_var"):
            # as task vectors: base + sum(0.1 v - v) = -2.6 v < 0; now the members' mean
            assert torch.equal(out[k], torch.stack([m[k] for m in members]).mean(0))
            assert (out[k] > 0).all()
    merged = with_state(net, out).eval()
    assert torch.isfinite(merged(x)).all()


def test_engine_averages_bn_without_data_and_resets_it_with_data(bn_family, tmp_path):
    net, base, members, x, base_path, paths = bn_family
    free = merge_checkpoints(paths, "task_arithmetic", base=base_path, out=tmp_path / "f.safetensors")
    assert free.bn == "averaged" and any("BatchNorm" in w for w in free.warnings)
    data = (x, torch.zeros(len(x), dtype=torch.long))
    for stream in (True, False):
        out = tmp_path / f"r{stream}.safetensors"
        res = merge_checkpoints(paths, "task_arithmetic", base=base_path, out=out, data=data,
                                stream=stream)
        assert res.bn == "reset (256 examples)" and not any("BatchNorm" in w for w in res.warnings)
        state, meta = io.load_state(out)
        ref = with_state(net, task_arithmetic(base, members))
        reset_bn_stats(ref, x)
        for k, v in ref.state_dict().items():
            assert torch.allclose(state[k], v, atol=1e-6), k
        assert state["norms.0.num_batches_tracked"].item() == 1  # one pass of one batch
        assert meta["merge"]["bn"] == "reset (256 examples)"
    # A DataLoader: the same statistics, and the examples counted (not its 4 batches).
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data), batch_size=64)
    res = merge_checkpoints(paths, "task_arithmetic", base=base_path, data=loader,
                            out=tmp_path / "loader.safetensors")
    assert res.bn == "reset (256 examples)"
    assert torch.equal(io.load_state(tmp_path / "loader.safetensors")[0]["norms.0.running_var"],
                       io.load_state(tmp_path / "rTrue.safetensors")[0]["norms.0.running_var"])
    with pytest.raises(ConfigError, match="reset_bn needs data"):
        merge_checkpoints(paths, "average", reset_bn=True)


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_cli_merges_bare_safetensors_and_exits_zero(tmp_path, stream):
    """Files with no architecture record (bare safetensors) merge without building a model;
    the command used to write the merge and then exit 1 trying to rebuild it."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"bare{i}.safetensors")
        save_file({"a.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(4, generator=g)},
                  str(paths[-1]))
    out = tmp_path / "out.safetensors"
    res = runner.invoke(app, ["merge", *map(str, paths[1:]), "-m", "ties", "--base", str(paths[0]),
                              stream, "--out", str(out)])
    assert res.exit_code == 0, res.output
    ref = merge([io.load_state(p)[0] for p in paths[1:]], "ties", base=io.load_state(paths[0])[0])
    got = io.load_state(out)[0]
    assert all(torch.equal(got[k], v) for k, v in ref.items())


def test_aligned_merge_of_tied_gpt2_folders_recovers_the_model(tmp_path):
    """Two HF GPT-2 folders, B a random head-structured permutation of A (tied lm_head): the
    engine aligns B onto A by weight matching, averages, and writes an HF folder whose model
    equals A, with lm_head still tied to the token embedding."""
    transformers = pytest.importorskip("transformers")
    from basinmerge import align
    from basinmerge.align.permute import random_permutation
    from basinmerge.merge.engine import merge_checkpoints

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    a = transformers.GPT2LMHeadModel(cfg).eval()
    spec = align.resolve_spec(a)
    b = align.permuted_copy(a, spec, random_permutation(spec, seed=3))
    assert not torch.equal(b.transformer.h[0].mlp.c_fc.weight, a.transformer.h[0].mlp.c_fc.weight)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    merge_checkpoints([tmp_path / "a", tmp_path / "b"], "average", align={"method": "weight"},
                      out=tmp_path / "m")
    m = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m").eval()
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, a(x).logits, atol=1e-5, rtol=1e-5)
