"""Sharded HF output written while streaming (`stream_merge(max_shard_mib=)`, the engine and
`basinmerge merge --max-shard-mib`): the shard plan, HF's names and index, tensors equal to the
unsharded merge byte for byte, loadable with `from_pretrained`, nothing half-written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import tiny_hf  # tests/tiny_hf.py (skips the module without transformers)
from basinmerge import io
from basinmerge.cli import main
from basinmerge.errors import IncompatibleModelsError
from basinmerge.merge import stream_merge
from basinmerge.merge.engine import merge_checkpoints

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def berts(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("berts")
    out = []
    for i in range(3):
        d = root / f"bert{i}"
        tiny_hf.bert(i).save_pretrained(d)
        (d / "vocab.txt").write_text("\n".join(f"t{j}" for j in range(100)))
        out.append(d)
    return out


def _tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    out = {}
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as r:
                out.update({k: r.get_tensor(k) for k in r.keys()})  # noqa: SIM118 - not a dict
    return out


# --------------------------------------------------------------------------- the plan


def test_shard_plan_edge_cases():
    assert io.shard_plan([], 10) == [[]]
    assert io.shard_plan([("a", 4), ("b", 6)], 10) == [["a", "b"]]  # exactly full
    assert io.shard_plan([("a", 4), ("b", 7)], 10) == [["a"], ["b"]]
    # a tensor larger than the limit gets a shard of its own, wherever it comes
    assert io.shard_plan([("a", 3), ("big", 25), ("c", 3), ("d", 8)], 10) == \
        [["a"], ["big"], ["c"], ["d"]]
    assert io.shard_plan([("big", 25)], 10) == [["big"]]
    assert io.shard_plan([("a", 2), ("b", 2), ("c", 2)], 4) == [["a", "b"], ["c"]]
    assert io.shard_name(1, 3) == "model-00001-of-00003.safetensors"
    assert io.shard_name(12, 100) == "model-00012-of-00100.safetensors"


# --------------------------------------------------------------------------- streamed shards


def test_sharded_stream_equals_unsharded_and_loads_with_from_pretrained(berts, tmp_path):
    single = stream_merge(berts, "average", tmp_path / "single.safetensors")
    limit_mib = 0.01  # 10,485 bytes: the 12,800-byte word embeddings exceed it
    out = stream_merge(berts, "average", tmp_path / "sharded", max_shard_mib=limit_mib)
    index = json.loads((out / io.HF_SAFETENSORS_INDEX).read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    n = len(shards)
    assert n > 3 and [s.name for s in shards] == [io.shard_name(i, n) for i in range(1, n + 1)]
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    want = _tensors([single])
    got = _tensors(shards)
    assert list(got) == list(want)  # every key once, in the same order
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k].view(torch.uint8).reshape(-1),
                                                       v.view(torch.uint8).reshape(-1))
    nbytes = {k: v.numel() * v.element_size() for k, v in want.items()}
    assert index["metadata"]["total_size"] == sum(nbytes.values())
    for s in shards:  # each shard holds exactly the keys the index gives it, within the limit
        with safe_open(str(s), framework="pt") as r:
            keys = list(r.keys())
        assert sorted(keys) == sorted(k for k, f in index["weight_map"].items() if f == s.name)
        size = sum(nbytes[k] for k in keys)
        assert size <= limit_mib * 2**20 or len(keys) == 1
    big = "bert.embeddings.word_embeddings.weight"
    assert nbytes[big] > limit_mib * 2**20
    assert [k for k, f in index["weight_map"].items() if f == index["weight_map"][big]] == [big]
    assert (out / "config.json").is_file() and (out / "vocab.txt").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    # transformers loads it; its logits are those of the unsharded tensors in the model
    loaded = transformers.BertForSequenceClassification.from_pretrained(out).eval()
    ref = tiny_hf.bert(0)
    ref.load_state_dict(want, strict=False)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, ref(input_ids=IDS).logits)
    assert io.hf_weight_files(out) == [*shards, out / io.HF_SAFETENSORS_INDEX]


def test_engine_and_cli_stream_sharded_hf_folders(berts, tmp_path):
    res = merge_checkpoints(berts, "median", out=tmp_path / "engine", max_shard_mib=0.02)
    assert res.streamed and len(list((tmp_path / "engine").glob("model-*-of-*.safetensors"))) > 1
    with pytest.raises(SystemExit) as e:
        main(["merge", *map(str, berts), "-m", "median", "--out", str(tmp_path / "cli"),
              "--max-shard-mib", "0.02"])
    assert e.value.code in (0, None)
    a = _tensors(io.hf_weight_files(tmp_path / "engine"))
    b = _tensors(io.hf_weight_files(tmp_path / "cli"))
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    # one file below the limit
    merge_checkpoints(berts, "median", out=tmp_path / "one", max_shard_mib=100)
    assert io.hf_weight_files(tmp_path / "one") == [tmp_path / "one" / io.HF_SAFETENSORS]


def test_a_failing_sharded_stream_leaves_nothing(berts, tmp_path):
    """A bad value in the last tensor of one input stops the merge after several shards were
    written: no output folder, no temporary left."""
    state, _ = io.load_state(berts[2])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((berts[2] / "config.json").read_text())
    last = list(state)[-1]
    state[last] = state[last].clone()
    state[last].view(-1)[0] = math.nan
    io.save_state(state, bad / io.HF_SAFETENSORS)
    out = tmp_path / "out"
    with pytest.raises(IncompatibleModelsError, match=f"key '{last}'"):
        stream_merge([berts[0], berts[1], bad], "average", out, max_shard_mib=0.01)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]
