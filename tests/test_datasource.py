"""Data specs (issue 14, part 4): every form `basinmerge.datasource` reads gives the tensors
it should (hand-checked), a DataLoader gives the same result as the tensors it holds wherever
data is taken, data that does not fit the model is named with the model before any work, and
bad specs are one clear error."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from basinmerge import adapter, checks, connectivity, datasource, io, models
from basinmerge import data as data_mod
from basinmerge.errors import ConfigError, DataError, DataMismatchError
from basinmerge.merge.engine import align_checkpoints, merge_checkpoints
from basinmerge.train import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")

class Payload:
    """An object a .pt file can hold only through pickle."""


VOCAB = {"[PAD]": 0, "[UNK]": 1, "the": 2, "cat": 3, "sat": 4, "on": 5, "mat": 6}


@pytest.fixture(scope="module")
def digits_models(tmp_path_factory):
    """Two MLPs for digits, saved with their architecture record."""
    d = tmp_path_factory.mktemp("digits")
    paths = []
    for seed in (0, 1):
        net = models.build("mlp", (1, 8, 8), 10, seed=seed, width=16)
        paths.append(io.save(net, d / f"m{seed}.safetensors", {"dataset": "digits"}))
    return paths


def _tokenizer(folder):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    tk = Tokenizer(tok_models.WordLevel(VOCAB, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]",
                                                unk_token="[UNK]")
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def gpt2_folders(tmp_path_factory):
    """Two tiny GPT-2 LMs as HF folders (vocabulary 7, built offline with a word-level
    tokenizer saved next to the weights) and a two-file text corpus."""
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("gpt2")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(VOCAB),
                                  n_positions=32, bos_token_id=0, eos_token_id=0)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        transformers.GPT2LMHeadModel(cfg).save_pretrained(d / f"g{seed}")
        _tokenizer(d / f"g{seed}")
        paths.append(d / f"g{seed}")
    corpus = d / "corpus"
    corpus.mkdir()
    (corpus / "b.txt").write_text("on the mat the cat sat", encoding="utf-8")
    (corpus / "a.txt").write_text("the cat sat on the mat", encoding="utf-8")
    return paths, corpus


# --------------------------------------------------------------------------- every form


def test_project_dataset_with_split_and_a_seeded_subset():
    test = datasource.load("digits:test")
    ref = data_mod.load("digits", "test")
    assert torch.equal(test.x, ref.x) and torch.equal(test.y, ref.y)
    assert datasource.load("digits", split="test").info.split == "test"  # the caller's default
    sub = datasource.load("digits", n=50, seed=3)
    want = data_mod.load("digits", "train").subset(50, seed=3)
    assert torch.equal(sub.x, want.x) and torch.equal(sub.y, want.y)
    train, held_out = datasource.train_test("digits", n=20)
    assert len(train) == 20 and held_out.info.split == "test"
    assert datasource.train_test("digits:test")[1] is None  # a named split: itself alone


def test_hf_save_to_disk_folders_map_columns_and_pad_text(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8], [9, 10]], "label": [1, 0, 1],
                                     "idx": ["a", "b", "c"]})
    ds.save_to_disk(str(tmp_path / "one"))
    d = datasource.load(tmp_path / "one")
    assert torch.equal(d.inputs["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0], [9, 10, 0]]))
    assert torch.equal(d.inputs["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]]))
    assert torch.equal(d.labels, torch.tensor([1, 0, 1])) and d.source == str(tmp_path / "one")
    cut = datasource.load(tmp_path / "one", seq_len=2)
    assert cut.inputs["input_ids"].shape == (3, 2)
    # a DatasetDict: the split is chosen (train by default), an unknown one is named
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([2])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert len(datasource.load(tmp_path / "dict")) == 3
    assert datasource.load(f"{tmp_path / 'dict'}:test").labels.tolist() == [1]
    with pytest.raises(DataError, match="no split 'dev'; the folder has train, test"):
        datasource.load(f"{tmp_path / 'dict'}:dev")
    with pytest.raises(DataError, match="holds one Dataset, not splits"):
        datasource.load(f"{tmp_path / 'one'}:train")
    # in memory, through the adapter: the same rules (first n, padded)
    assert torch.equal(adapter.as_data(ds, limit=2).inputs["input_ids"],
                       torch.tensor([[5, 6, 7], [8, 0, 0]]))


def test_a_text_column_is_tokenized_with_the_given_tokenizer(tmp_path):
    datasets = pytest.importorskip("datasets")
    _tokenizer(tmp_path / "tok")
    datasets.Dataset.from_dict({"text": ["the cat sat", "mat"], "label": [0, 1]}).save_to_disk(
        str(tmp_path / "sst"))
    d = datasource.load(tmp_path / "sst", tokenizer=str(tmp_path / "tok"))
    assert d.inputs["input_ids"].tolist() == [[2, 3, 4], [6, 0, 0]]
    assert d.inputs["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        datasource.load(tmp_path / "sst")


def test_tensor_files_safetensors_and_pt(tmp_path):
    x, y = torch.randn(6, 1, 8, 8), torch.arange(6)
    save_file({"x": x, "y": y}, str(tmp_path / "xy.safetensors"))
    d = datasource.load(tmp_path / "xy.safetensors")
    assert torch.equal(d.inputs, x) and torch.equal(d.labels, y)
    ids = torch.randint(0, 7, (4, 5))
    torch.save({"input_ids": ids, "labels": ids.clone()}, tmp_path / "tok.pt")
    d = datasource.load(tmp_path / "tok.pt", n=2, seed=0)
    keep = datasource.subset_index(4, 2, 0)
    assert torch.equal(d.inputs["input_ids"], ids[keep]) and torch.equal(d.labels, ids[keep])
    torch.save({"x": Payload()}, tmp_path / "evil.pt")  # needs pickle beyond weights: refused
    with pytest.raises(DataError, match="evil.pt.*weights_only=True"):
        datasource.load(tmp_path / "evil.pt")
    save_file({"x": x, "input_ids": ids}, str(tmp_path / "both.safetensors"))
    with pytest.raises(DataError, match="holds 'x' and also input_ids"):
        datasource.load(tmp_path / "both.safetensors")


def test_text_with_bytes_and_with_the_model_folders_tokenizer(tmp_path, gpt2_folders):
    (tmp_path / "c.txt").write_text("abcdefghij", encoding="utf-8")
    d = datasource.load(tmp_path / "c.txt", tokenizer="bytes", seq_len=4)
    assert d.inputs["input_ids"].tolist() == [[97, 98, 99, 100], [101, 102, 103, 104]]
    assert d.inputs["attention_mask"].tolist() == [[1] * 4] * 2 and d.labels is None
    (g0, _), corpus = gpt2_folders
    # a folder: its .txt files by name, joined; the words through the folder's tokenizer
    d = datasource.load(corpus, model=g0, seq_len=6)
    assert d.inputs["input_ids"].tolist() == [[2, 3, 4, 5, 2, 6], [5, 2, 6, 2, 3, 4]]
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        datasource.load(corpus)
    with pytest.raises(ConfigError, match="no usable tokenizer files"):
        datasource.load(corpus, tokenizer=str(tmp_path))


# --------------------------------------------------------------------------- DataLoaders


def _loader(x, y, batch_size=7):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_a_dataloader_merges_as_its_tensors_do(digits_models, method):
    ds = data_mod.load("digits", "train").subset(40, seed=0)
    with_tensors = merge_checkpoints(digits_models, method, data=(ds.x, ds.y), reset_bn=False)
    with_loader = merge_checkpoints(digits_models, method, data=_loader(ds.x, ds.y),
                                    reset_bn=False)
    for k, v in with_tensors.state.items():
        torch.testing.assert_close(with_loader.state[k], v, rtol=0, atol=0)
    assert not torch.equal(with_tensors.state["layers.0.weight"],
                           io.load_state(digits_models[0])[0]["layers.0.weight"])


def test_a_dataloader_aligns_and_interpolates_as_its_tensors_do(digits_models):
    ds = data_mod.load("digits", "train").subset(60, seed=0)
    opts = {"num_examples": 60}
    a = align_checkpoints(*digits_models, "activation", data=(ds.x, ds.y), options=opts)
    b = align_checkpoints(*digits_models, "activation", data=_loader(ds.x, ds.y), options=opts)
    assert a.objective_after > a.objective_before and a.drift < 1e-4
    for k, v in a.state.items():
        assert torch.equal(b.state[k], v)
    net_a, _ = io.load_model(digits_models[0])
    net_b, _ = io.load_model(digits_models[1])
    c1 = connectivity.interpolate(net_a, net_b, (ds.x, ds.y), num_points=3)
    c2 = connectivity.interpolate(net_a, net_b, _loader(ds.x, ds.y), num_points=3)
    assert c1.to_dict() == c2.to_dict()


# --------------------------------------------------------------------------- mismatches


def test_mismatches_name_the_data_spec_and_the_model(tmp_path, digits_models, gpt2_folders):
    save_file({"x": torch.randn(4, 40), "y": torch.zeros(4).long()}, str(tmp_path / "wide.safetensors"))
    save_file({"x": torch.randn(4, 1, 8, 8), "y": torch.tensor([0, 1, 2, 12])},
              str(tmp_path / "k13.safetensors"))
    net, meta = io.load_model(digits_models[0])
    with pytest.raises(DataMismatchError, match=r"data \(.*wide.safetensors\) does not fit the "
                                                r"model in .*m0.safetensors: inputs of shape \(40,\)"):
        checks.check_data_fits(net, datasource.load(tmp_path / "wide.safetensors"),
                               source=digits_models[0])
    with pytest.raises(DataMismatchError, match=r"k13.safetensors\) has label 12, but the model "
                                                r"in .*m0.safetensors has 10 outputs"):
        checks.check_data_fits(net, datasource.load(tmp_path / "k13.safetensors"),
                               source=digits_models[0])
    with pytest.raises(DataMismatchError, match="trained on 'digits'"):  # the record, for datasets
        checks.check_data_fits(net, data_mod.load("mnist1d", "test"), meta=meta, source="m0")
    (g0, _), corpus = gpt2_folders
    gpt, _ = io.load_model(g0)
    bytes_data = datasource.load(corpus, tokenizer="bytes", seq_len=8)
    with pytest.raises(DataMismatchError, match=r"corpus\) has token id 116, but the model in "
                                                r".*g0 has a vocabulary of 7"):
        checks.check_data_fits(gpt, bytes_data, source=g0)
    long = datasource.load(corpus, model=g0, seq_len=64)  # one row of 12 tokens: fits
    checks.check_data_fits(gpt, long, source=g0)
    too_long = adapter.Data({"input_ids": torch.zeros(1, 40, dtype=torch.long)}, source="z")
    with pytest.raises(DataMismatchError, match="sequences of 40 tokens.* at most 32"):
        checks.check_data_fits(gpt, too_long, source=g0)
    assert issubclass(DataMismatchError, DataError) and issubclass(DataMismatchError, ConfigError)


def test_the_engines_check_before_any_work(tmp_path, digits_models):
    out = tmp_path / "o.safetensors"
    save_file({"x": torch.randn(4, 40), "y": torch.zeros(4).long()}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(DataMismatchError, match="wide.safetensors"):
        merge_checkpoints(digits_models, "regmean", data=str(tmp_path / "wide.safetensors"), out=out)
    with pytest.raises(DataMismatchError, match="alignment data .*wide.safetensors"):
        align_checkpoints(*digits_models, "activation", data=str(tmp_path / "wide.safetensors"),
                          out=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide.safetensors"]


# --------------------------------------------------------------------------- bad specs


def test_bad_specs_are_one_error(tmp_path, cli, digits_models):
    m0 = digits_models[0]
    res = cli("eval", m0, "--data", tmp_path / "missing.safetensors")
    assert res.code == 1 and "no such file or folder, and not a dataset name" in res.error
    res = cli("eval", m0, "--data", "digits:dev")
    assert res.code == 1 and "unknown split 'dev' for dataset 'digits'" in res.error
    res = cli("eval", m0, "--data", "nope")
    assert res.code == 1 and "data 'nope'" in res.error and "digits" in res.error
    (tmp_path / "notes.md").write_text("x")
    res = cli("eval", m0, "--data", tmp_path / "notes.md")
    assert res.code == 1 and "is not a data file" in res.error
    save_file({"x": torch.zeros(2, 3)}, str(tmp_path / "t.safetensors"))
    with pytest.raises(DataError, match="a split applies to"):
        datasource.load(f"{tmp_path / 't.safetensors'}:train")


# --------------------------------------------------------------------------- the CLI and recipes


def test_cli_takes_every_spec(tmp_path, cli, digits_models, gpt2_folders):
    import json

    ds = data_mod.load("digits", "test").subset(30, seed=0)
    save_file({"x": ds.x, "y": ds.y}, str(tmp_path / "held.safetensors"))
    m0, m1 = digits_models
    res = cli("eval", m0, "--data", tmp_path / "held.safetensors", "--json")
    assert res.code == 0
    net, _ = io.load_model(m0)
    want = evaluate(net, ds)
    assert json.loads(res.out)["accuracy"] == pytest.approx(want["accuracy"])
    res = cli("merge", m0, m1, "--method", "regmean", "--data", tmp_path / "held.safetensors",
              "--out", tmp_path / "rm.safetensors")
    assert res.code == 0, res.err
    rec = io.read_meta(tmp_path / "rm.safetensors")["recipe"]
    assert rec["data"]["spec"] == str(tmp_path / "held.safetensors")
    same = merge_checkpoints([m0, m1], "regmean", data=(ds.x, ds.y))
    got = io.load_state(tmp_path / "rm.safetensors")[0]
    for k, v in same.state.items():
        torch.testing.assert_close(got[k], v)
    res = cli("interpolate", m0, m1, "--data", tmp_path / "held.safetensors", "--points", "3",
              "--json")
    assert res.code == 0, res.err
    naive = json.loads(res.out)["curves"]["naive"]
    assert list(naive["metrics"]) == ["data"]  # one split: the data the spec names
    assert naive["metrics"]["data"]["accuracy"][0] == pytest.approx(want["accuracy"])
    (g0, g1), corpus = gpt2_folders
    res = cli("eval", g0, "--data", corpus, "--seq-len", "6", "--json")
    assert res.code == 0, res.err
    res = cli("align", g0, g1, "--method", "activation", "--data", corpus, "--seq-len", "6",
              "--out", tmp_path / "g1-aligned")
    assert res.code == 0, res.err
    assert io.read_meta(tmp_path / "g1-aligned")["recipe"]["data"]["spec"] == str(corpus)
    res = cli("align", g0, g1, "--method", "activation", "--data", corpus, "--tokenizer", "bytes",
              "--out", tmp_path / "g1-bad")
    assert res.code == 1 and "token id" in res.error and "vocabulary of 7" in res.error
    assert not (tmp_path / "g1-bad").exists()
    # the old option name still works
    assert cli("eval", m0, "--dataset", "digits", "--json").code == 0


def test_recipe_data_fields(tmp_path, digits_models):
    from basinmerge import recipe

    ds = data_mod.load("digits", "train").subset(40, seed=0)
    save_file({"x": ds.x, "y": ds.y}, str(tmp_path / "d.safetensors"))
    base = {"models": [str(p) for p in digits_models], "method": "regmean",
            "output": {"path": str(tmp_path / "r.safetensors")}}
    r = recipe.validate({**base, "data": str(tmp_path / "d.safetensors")})
    assert r.data.spec == str(tmp_path / "d.safetensors") and r.data.examples == 2000
    assert recipe.validate({**base, "data": {"dataset": "digits"}}).data.spec == "digits"
    with pytest.raises(ConfigError, match="field 'data.seq_len'"):
        recipe.validate({**base, "data": {"spec": "digits", "seq_len": 1}})
    with pytest.raises(ConfigError, match="field 'data.bogus'"):
        recipe.validate({**base, "data": {"spec": "digits", "bogus": 1}})
    r.run()
    same = merge_checkpoints(digits_models, "regmean", data=(ds.x, ds.y))
    got = io.load_state(tmp_path / "r.safetensors")[0]
    for k, v in same.state.items():
        torch.testing.assert_close(got[k], v)
    aligned = recipe.validate({"models": base["models"], "method": None,
                               "align": {"method": "activation",
                                         "data": str(tmp_path / "d.safetensors")},
                               "output": {"path": str(tmp_path / "al.safetensors")}})
    assert aligned.align.data.spec == str(tmp_path / "d.safetensors")
    aligned.run()
    want = align_checkpoints(*digits_models, "activation", data=(ds.x, ds.y))
    got = io.load_state(tmp_path / "al.safetensors")[0]
    for k, v in want.state.items():
        assert torch.equal(got[k], v)


def test_specs_in_the_python_api_equal_the_tensors_they_name(tmp_path, digits_models):
    from basinmerge.merge.engine import Alignment

    ds = data_mod.load("digits", "train").subset(40, seed=0)
    spec = str(tmp_path / "d.safetensors")
    save_file({"x": ds.x, "y": ds.y}, spec)
    opts = {"num_examples": 40}
    by_spec = merge_checkpoints(digits_models, "average", align=Alignment("activation", opts, spec))
    by_tensors = merge_checkpoints(digits_models, "average",
                                   align=Alignment("activation", opts, (ds.x, ds.y)))
    by_dataset = merge_checkpoints(digits_models, "regmean", data="digits:train")
    by_loaded = merge_checkpoints(digits_models, "regmean", data=data_mod.load("digits", "train"))
    for a, b in ((by_spec, by_tensors), (by_dataset, by_loaded)):
        for k, v in a.state.items():
            assert torch.equal(b.state[k], v)
