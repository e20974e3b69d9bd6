"""Checkpoints and output files: bit-identical round trips, metadata, atomic writes, corrupt and
mismatched files, .pt files read with weights_only=True, and the streaming StateReader."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from basinmerge import io, models
from basinmerge.errors import CheckpointError, ConfigError


def _with_running_stats(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-default running statistics and affine parameters, so that a
    round trip that dropped buffers would show in eval-mode outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.num_batches_tracked.fill_(7)
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model


MODELS = {
    "mlp": lambda: models.build("mlp", (1, 8, 8), 10, depth=2, width=16, seed=1),
    "vgg-batch": lambda: _with_running_stats(
        models.build("vgg", (3, 16, 16), 10, width=0.25, norm="batch", seed=2)),
    "resnet20": lambda: _with_running_stats(
        models.build("resnet20", (3, 16, 16), 10, width=1, norm="batch", seed=3)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_save_load_round_trip_is_bit_identical(tmp_path, name):
    model = MODELS[name]().eval()
    x = torch.randn(4, *model.config["in_shape"], generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = model(x)
    meta = {"dataset": "digits", "training": {"lr": 0.1, "optimizer": "sgd"},
            "metrics": {"test": {"accuracy": 0.5, "loss": 1.25}}, "history": [1, 2.5, None]}
    path = io.save(model, tmp_path / "sub" / f"{name}.safetensors", meta)
    loaded, meta2 = io.load(path)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    sa, sb = model.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)
    assert {k: meta2[k] for k in meta} == meta
    assert meta2["model"] == model.config
    assert meta2["basinmerge_version"] == __import__("basinmerge").__version__
    assert io.read_meta(path) == meta2


def test_meta_with_tensors_and_paths(tmp_path):
    model = MODELS["mlp"]()
    path = io.save(model, tmp_path / "m.safetensors",
                   {"t": torch.tensor([1.5, 2.0]), "p": Path("/a/b"), "n": torch.tensor(3)})
    meta = io.read_meta(path)
    assert meta["t"] == [1.5, 2.0] and meta["p"] == "/a/b" and meta["n"] == 3


def test_save_requires_a_built_model(tmp_path):
    with pytest.raises(CheckpointError, match="no 'config'"):
        io.save(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(st.tuples(st.sampled_from(["float32", "float64", "float16", "bfloat16", "int64",
                                                 "int32", "uint8", "bool"]),
                                st.lists(st.integers(0, 4), max_size=3)), min_size=1, max_size=5),
       seed=st.integers(0, 1000))
def test_state_round_trip_any_dtype_and_shape(tmp_path, specs, seed):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (dtype, shape) in enumerate(specs):
        t = torch.randn(tuple(shape), generator=g, dtype=torch.float64) * 50
        state[f"k{i}.w"] = t.to(getattr(torch, dtype))
    path = io.save_state(state, tmp_path / f"s{seed}.safetensors", {"seed": seed})
    back, meta = io.load_state(path)
    assert back.keys() == state.keys() and meta["seed"] == seed
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


# --------------------------------------------------------------------------- atomic writes


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_leaves_only_the_target(tmp_path):
    path = io.save(MODELS["mlp"](), tmp_path / "a.safetensors")
    io.write_json(tmp_path / "r.json", {"x": 1})
    assert _listing(tmp_path) == ["a.safetensors", "r.json"]
    mode = 0o666 & ~_umask()
    assert os.stat(path).st_mode & 0o777 == mode  # an ordinary file, not a private temp file
    assert os.stat(tmp_path / "r.json").st_mode & 0o777 == mode
    assert io.read_json(tmp_path / "r.json") == {"x": 1}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    model = MODELS["mlp"]()
    target = tmp_path / "a.safetensors"
    io.save(model, target, {"version": 1})
    original = target.read_bytes()

    def half_write_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", half_write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        io.save(model, target, {"version": 2})
    with pytest.raises(OSError, match="disk full"):
        io.save(model, tmp_path / "new.safetensors")
    assert _listing(tmp_path) == ["a.safetensors"]
    assert target.read_bytes() == original


def test_atomic_path_on_exception(tmp_path):
    with pytest.raises(KeyError), io.atomic_path(tmp_path / "deep" / "out.txt") as tmp:
        tmp.write_text("half")
        raise KeyError("boom")
    assert _listing(tmp_path / "deep") == []


# --------------------------------------------------------------------------- bad files


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return io.save(MODELS["mlp"](), tmp_path / "good.safetensors", {"dataset": "digits"})


@pytest.mark.parametrize("damage", ["truncate", "header_only", "garbage", "empty", "bad_json_header"])
def test_corrupt_safetensors_names_the_file(tmp_path, ckpt, damage):
    raw = ckpt.read_bytes()
    bad = tmp_path / f"{damage}.safetensors"
    bad.write_bytes({
        "truncate": raw[:-50],
        "header_only": raw[:8],
        "garbage": bytes(range(256)) * 3,
        "empty": b"",
        "bad_json_header": (20).to_bytes(8, "little") + b"{not json at all!!!}",
    }[damage])
    for fn in (io.load, io.load_state, io.read_meta, io.StateReader):
        with pytest.raises(CheckpointError) as e:
            fn(bad)
        assert str(bad) in str(e.value)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        io.load(tmp_path / "nope.safetensors")


def _rewrite(src: Path, dst: Path, edit) -> Path:
    state, meta = io.load_state(src)
    edit(state, meta)
    return io.save_state(state, dst, meta)


@pytest.mark.parametrize(("edit", "key", "what"), [
    (lambda s, m: s.__setitem__("layers.1.weight", torch.zeros(16, 15)), "layers.1.weight", "shape"),
    (lambda s, m: s.pop("head.bias"), "head.bias", "missing"),
    (lambda s, m: s.__setitem__("layers.9.weight", torch.zeros(2)), "layers.9.weight", "not part"),
])
def test_weights_that_do_not_fit_name_the_key(tmp_path, ckpt, edit, key, what):
    bad = _rewrite(ckpt, tmp_path / "bad.safetensors", edit)
    with pytest.raises(CheckpointError, match=what) as e:
        io.load(bad)
    assert f"'{key}'" in str(e.value) and str(bad) in str(e.value)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda s, m: m.pop("model"), "like= another checkpoint"),
    (lambda s, m: m.__setitem__("model", "mlp"), "must be a JSON object"),
    (lambda s, m: m.__setitem__("model", {**m["model"], "name": "transformer"}), "unknown model"),
    (lambda s, m: m["model"].__setitem__("bogus", 1), "bad option"),
])
def test_bad_architecture_metadata(tmp_path, ckpt, edit, match):
    bad = _rewrite(ckpt, tmp_path / "bad.safetensors", edit)
    with pytest.raises(CheckpointError, match=match) as e:
        io.load(bad)
    assert str(bad) in str(e.value)


# --------------------------------------------------------------------------- .pt files


def test_pt_state_dict_with_config(tmp_path):
    model = MODELS["vgg-batch"]().eval()
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="no architecture"):
        io.load(path)
    loaded, meta = io.load(path, config=model.config)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert meta == {}
    # the {"state_dict", "meta"} layout carries its metadata
    torch.save({"state_dict": model.state_dict(), "meta": {"model": model.config, "note": "hi"}},
               tmp_path / "w2.pth")
    loaded2, meta2 = io.load(tmp_path / "w2.pth")
    assert meta2["note"] == "hi" and io.read_meta(tmp_path / "w2.pth") == meta2
    with torch.no_grad():
        assert torch.equal(loaded2(x), model(x))


class _Evil:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_pt_with_pickled_code_is_refused(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": _Evil(sentinel)}, path)
    with pytest.raises(CheckpointError, match="weights_only=True") as e:
        io.load_state(path)
    assert str(path) in str(e.value)
    assert not sentinel.exists()


def test_pt_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="expected a state_dict"):
        io.load_state(path)
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="cut.pt"):
        io.load_state(tmp_path / "cut.pt")


# --------------------------------------------------------------------------- StateReader


def test_state_reader_streams_the_same_tensors(tmp_path):
    model = MODELS["resnet20"]()
    path = io.save(model, tmp_path / "r.safetensors", {"dataset": "x"})
    state, meta = io.load_state(path)
    with io.StateReader(path) as r:
        assert r.meta == meta
        assert sorted(r.keys()) == sorted(state)
        for k in r.keys():
            t = r.get(k)
            assert r.shape(k) == tuple(state[k].shape)
            assert t.dtype == state[k].dtype and torch.equal(t, state[k])
        with pytest.raises(CheckpointError, match="'nope'"):
            r.get("nope")
        with pytest.raises(CheckpointError, match="'nope'"):
            r.shape("nope")
    torch.save(model.state_dict(), tmp_path / "r.pt")
    with pytest.raises(CheckpointError, match="safetensors"):
        io.StateReader(tmp_path / "r.pt")


def test_read_json_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        io.read_json(tmp_path / "none.json")
    (tmp_path / "b.json").write_text("{oops")
    with pytest.raises(ConfigError, match="invalid JSON"):
        io.read_json(tmp_path / "b.json")
    io.write_json(tmp_path / "ok.json", {"a": torch.tensor([1, 2]), "b": Path("p")})
    assert json.loads((tmp_path / "ok.json").read_text()) == {"a": [1, 2], "b": "p"}


LEGACY = Path(__file__).parent / "data" / "legacy_mergescope_mlp.safetensors"


def test_checkpoint_written_under_the_old_name_still_loads():
    """A file written by the library before its rename (metadata under the old key, made by
    `io.save` of that release with a 16-unit MLP on digits) loads, builds its model and keeps its
    metadata; its outputs equal those recorded in its own metadata."""
    from safetensors import safe_open

    with safe_open(str(LEGACY), framework="pt") as f:
        header = f.metadata()
    assert io.META_KEY not in header and "mergescope" in header  # really the old format
    net, meta = io.load(LEGACY)
    assert meta["dataset"] == "digits"
    assert meta["basinmerge_version"] == "0.1.0"          # the old version key is carried over
    x = torch.tensor(meta["probe_input"])
    with torch.no_grad():
        out = net.eval()(x)
    assert torch.allclose(out, torch.tensor(meta["probe_output"]), atol=1e-6)
    assert io.read_meta(LEGACY)["dataset"] == "digits"
    state, _ = io.load_state(LEGACY)
    reader = io.StateReader(LEGACY)
    try:
        assert reader.meta["dataset"] == "digits"
        assert set(reader.keys()) == set(state)
    finally:
        reader.close()
