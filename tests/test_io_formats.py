"""Checkpoints from anywhere: HF model folders (single file, sharded, pickled .bin), bare
safetensors and .pt files in; the same form out (`io.save_like`), loadable with
`from_pretrained`; tied weights kept; bad folders, indexes and outputs refused with one error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tiny_hf  # tests/tiny_hf.py (skips the module without transformers)
from basinmerge import io, models
from basinmerge.errors import CheckpointError, ConfigError

transformers = pytest.importorskip("transformers")



IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hf") / "bert"
    tiny_hf.bert(0).save_pretrained(d)
    (d / "tokenizer_config.json").write_text('{"model_max_length": 32}')
    (d / "vocab.txt").write_text("\n".join(f"t{i}" for i in range(100)))
    return d


@pytest.fixture(scope="module")
def gpt2_sharded(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hf") / "gpt2"
    tiny_hf.gpt2(1).save_pretrained(d, max_shard_size="20KB")
    return d


def test_hf_folder_reads_and_writes_back_as_an_hf_folder(bert_dir, tmp_path):
    original = tiny_hf.bert(0)
    assert io.checkpoint_format(bert_dir) == "hf"
    state, meta = io.load_state(bert_dir)
    assert meta["format"] == "hf" and meta["hf_config"]["model_type"] == "bert"
    ref = original.state_dict()
    assert all(torch.equal(state[k], ref[k]) for k in state)
    model, _ = io.load_model(bert_dir)
    assert type(model).__name__ == "BertForSequenceClassification" and not model.training
    assert torch.equal(_logits(model), _logits(original))

    out = io.save_like(state, tmp_path / "out", like=bert_dir, meta={**meta, "note": "x"})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                     "tokenizer_config.json", "vocab.txt"]
    assert (out / "config.json").read_bytes() == (bert_dir / "config.json").read_bytes()
    back = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert torch.equal(_logits(back), _logits(original))
    m2 = io.read_meta(out)
    assert m2["note"] == "x" and m2["format"] == "hf" and "hf_config" in m2
    # the header records only what describes the model, not the input's format
    assert "format" not in json.loads(_header(out / "model.safetensors")[io.META_KEY])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def _header(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_sharded_folder_with_tied_weights(gpt2_sharded, tmp_path):
    original = tiny_hf.gpt2(1)
    assert (gpt2_sharded / io.HF_SAFETENSORS_INDEX).is_file()
    index = io.tensor_index(gpt2_sharded)
    files = {f for f, _, _ in index.values()}
    assert len(files) > 2  # really sharded
    ref = original.state_dict()
    # the tied lm_head is stored once, under the embedding's name
    assert "lm_head.weight" not in index and set(index) == set(ref) - {"lm_head.weight"}
    for k, (f, dt, shape) in index.items():
        assert f.is_file() and dt == "F32" and shape == tuple(ref[k].shape)
    model, meta = io.load_model(gpt2_sharded)
    assert model.lm_head.weight is model.transformer.wte.weight  # the tie is kept
    assert torch.equal(_logits(model), _logits(original))

    # write sharded (a small max shard size), tied weight once, loadable by from_pretrained
    out = io.save_like(model.state_dict(), tmp_path / "g", like=gpt2_sharded, meta=meta,
                       max_shard_mib=0.02)
    written = io.tensor_index(out)
    assert "lm_head.weight" not in written and set(written) == set(index)
    assert len({f for f, _, _ in written.values()}) > 2
    idx = json.loads((out / io.HF_SAFETENSORS_INDEX).read_text())
    assert idx["metadata"]["total_size"] == sum(ref[k].numel() * 4 for k in index)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert back.lm_head.weight.data_ptr() == back.transformer.wte.weight.data_ptr()
    assert torch.equal(_logits(back), _logits(original))
    # the same state read back: bit-identical tensors
    again, _ = io.load_state(out)
    assert all(torch.equal(again[k], ref[k]) for k in again)


def test_bare_safetensors_in_and_out(tmp_path):
    net = models.build("mlp", (1, 4, 4), 3, depth=1, width=8, seed=0)
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(bare))
    assert io.checkpoint_format(bare) == "safetensors"
    state, meta = io.load_state(bare)
    assert meta == {}
    with pytest.raises(CheckpointError, match="no architecture") as e:
        io.load_model(bare)
    assert "like=" in str(e.value) and "config.json" in str(e.value)
    like = io.save(net, tmp_path / "ours.safetensors")
    assert io.checkpoint_format(like) == "basinmerge"
    model, _ = io.load_model(bare, like=like)  # architecture from another checkpoint
    x = torch.randn(2, 1, 4, 4)
    with torch.no_grad():
        assert torch.equal(model(x), net.eval()(x))
    out = io.save_like(state, tmp_path / "o.safetensors", like=bare, meta={"merge": {"m": 1}})
    assert io.checkpoint_format(out) == "safetensors"  # bare in, bare out
    s2, m2 = io.load_state(out)
    assert m2["merge"] == {"m": 1} and all(torch.equal(s2[k], state[k]) for k in state)
    # project format in -> project format out (the architecture comes along)
    out2 = io.save_like(state, tmp_path / "p.safetensors", like=like)
    assert io.checkpoint_format(out2) == "basinmerge"
    with torch.no_grad():
        assert torch.equal(io.load_model(out2)[0](x), net(x))
    with pytest.raises(ConfigError, match="architecture"):
        io.save_like(state, tmp_path / "q.safetensors", like=bare, fmt="basinmerge")
    assert not (tmp_path / "q.safetensors").exists()


def test_pt_in_and_out(tmp_path):
    net = models.build("mlp", (1, 4, 4), 3, depth=1, width=8, seed=0)
    src = tmp_path / "w.pt"
    torch.save(net.state_dict(), src)
    assert io.checkpoint_format(src) == "pt"
    state, _ = io.load_state(src)
    out = io.save_like(state, tmp_path / "o.pt", like=src, meta={"note": 1})
    assert io.checkpoint_format(out) == "pt"
    s2, m2 = io.load_state(out)
    assert m2["note"] == 1 and all(torch.equal(s2[k], state[k]) for k in state)


def test_hf_folder_with_pickled_bin(tmp_path):
    original = tiny_hf.bert(2)
    d = tmp_path / "binbert"
    original.save_pretrained(d)
    (d / "model.safetensors").unlink()
    torch.save(original.state_dict(), d / io.HF_BIN)
    assert io.checkpoint_format(d) == "hf"
    model, meta = io.load_model(d)
    assert torch.equal(_logits(model), _logits(original))
    with pytest.raises(CheckpointError, match="pickled"):
        io.tensor_index(d)  # streaming needs safetensors
    # HF folder out (safetensors) from a .bin folder in
    out = io.save_like(model.state_dict(), tmp_path / "out", like=d, meta=meta)
    back = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert torch.equal(_logits(back), _logits(original))


class _Evil:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_bin_that_needs_pickle_is_refused(bert_dir, tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    (d / "config.json").write_bytes((bert_dir / "config.json").read_bytes())
    sentinel = tmp_path / "pwned"
    torch.save({"w": torch.zeros(2), "x": _Evil(sentinel)}, d / io.HF_BIN)
    for fn in (io.load_state, io.load_model):
        with pytest.raises(CheckpointError, match="weights_only=True") as e:
            fn(d)
        assert io.HF_BIN in str(e.value)
    assert not sentinel.exists()


def test_folder_without_weights(bert_dir, tmp_path):
    d = tmp_path / "empty_model"
    d.mkdir()
    (d / "config.json").write_bytes((bert_dir / "config.json").read_bytes())
    for fn in (io.checkpoint_format, io.load_state, io.load_model, io.tensor_index, io.read_meta):
        with pytest.raises(CheckpointError, match="no model weights") as e:
            fn(d)
        assert str(d) in str(e.value)


def test_index_naming_a_missing_shard(gpt2_sharded, tmp_path):
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(gpt2_sharded, d)
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    for fn in (io.load_state, io.tensor_index, io.load_model):
        with pytest.raises(CheckpointError, match="missing") as e:
            fn(d)
        assert victim.name in str(e.value)
    # an index that maps a key to a shard which does not hold it
    shutil.copytree(gpt2_sharded, tmp_path / "lying")
    ix = tmp_path / "lying" / io.HF_SAFETENSORS_INDEX
    obj = json.loads(ix.read_text())
    first = sorted(set(obj["weight_map"].values()))[0]
    obj["weight_map"]["ghost.weight"] = first
    ix.write_text(json.dumps(obj))
    for fn in (io.load_state, io.tensor_index):
        with pytest.raises(CheckpointError, match="'ghost.weight'"):
            fn(tmp_path / "lying")


def test_output_folder_refused_unless_forced(bert_dir, tmp_path):
    state, meta = io.load_state(bert_dir)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty") as e:
        io.save_like(state, out, like=bert_dir)
    assert str(out) in str(e.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # untouched
    io.save_like(state, out, like=bert_dir, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(CheckpointError, match="is an input"):
        io.save_like(state, bert_dir, like=bert_dir, force=True)
    assert (bert_dir / "model.safetensors").is_file()
    # an empty folder is fine without force
    (tmp_path / "empty").mkdir()
    io.save_like(state, tmp_path / "empty", like=bert_dir)


def test_failed_write_leaves_nothing(bert_dir, tmp_path, monkeypatch):
    state, _ = io.load_state(bert_dir)

    def boom(folder, *a, **k):
        (folder / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(io, "write_hf_weights", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_like(state, tmp_path / "out", like=bert_dir)
    assert list(tmp_path.iterdir()) == []


def test_like_with_another_architecture_names_the_key(bert_dir, gpt2_sharded):
    with pytest.raises(CheckpointError, match="key '") as e:
        io.load_model(bert_dir, like=gpt2_sharded)
    assert str(bert_dir) in str(e.value)


def test_half_precision_folder_stays_half(tmp_path):
    original = tiny_hf.bert(3).to(torch.bfloat16)
    original.save_pretrained(tmp_path / "bf16")
    model, meta = io.load_model(tmp_path / "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(_logits(model), _logits(original))
    out = io.save_like(model.state_dict(), tmp_path / "out", like=tmp_path / "bf16", meta=meta)
    assert {dt for _, dt, _ in io.tensor_index(out).values()} == {"BF16"}


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c.update(model_type="no_such_model"), "'no_such_model'"),
    (lambda c: c.pop("model_type"), "model_type None"),
    (lambda c: c.update(architectures=["BertForTeleportation"]), "'BertForTeleportation'"),
])
def test_hf_config_that_transformers_cannot_build(bert_dir, tmp_path, edit, message):
    import shutil

    d = tmp_path / "odd"
    shutil.copytree(bert_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message) as e:
        io.load_model(d)
    assert str(d / "config.json") in str(e.value)
    assert io.load_state(d)[0]  # the tensors alone still read


@pytest.mark.parametrize(("edit", "key"), [
    (lambda s: s.pop("classifier.bias"), "classifier.bias"),
    (lambda s: s.__setitem__("bert.pooler.dense.weight", torch.zeros(32, 31)),
     "bert.pooler.dense.weight"),
    (lambda s: s.__setitem__("extra.weight", torch.zeros(2)), "extra.weight"),
])
def test_hf_weights_that_do_not_fit_the_config_name_the_key(bert_dir, tmp_path, edit, key):
    import shutil

    d = tmp_path / "misfit"
    shutil.copytree(bert_dir, d)
    state, _ = io.load_state(d)
    edit(state)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=key) as e:
        io.load_model(d)
    assert str(d) in str(e.value)
