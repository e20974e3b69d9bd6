"""Streaming merges over safetensors files: bit-for-bit equal to the in-memory merge."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from basinmerge import io, models
from basinmerge.errors import CheckpointError, ConfigError, IncompatibleModelsError
from basinmerge.merge import METHODS, merge, stream_merge, streamable
from basinmerge.merge._common import row_blocks
from basinmerge.merge.stream import write_safetensors_stream
from basinmerge.merge.task import kth_smallest


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "enc.weight": torch.randn(17, 9, generator=g),
        "enc.bias": torch.randn(17, generator=g),
        "deep.weight": torch.randn(5, 5, generator=g, dtype=torch.float64),
        "half": torch.randn(6, generator=g).to(torch.float16),
        "scalar": torch.randn((), generator=g),
        "norm.num_batches_tracked": torch.tensor(seed, dtype=torch.int64),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    paths = []
    for i in range(4):
        paths.append(io.save_state(_state(i + 1), d / f"m{i}.safetensors", {"note": f"model {i}"}))
    base = io.save_state(_state(99), d / "base.safetensors")
    return d, paths, base


CASES = [
    ("average", {}),
    ("weighted", {"weights": [1, 2, 3, 4]}),
    ("median", {}),
    ("trimmed_mean", {"trim": 0.25}),
    ("task_arithmetic", {"scale": 0.3}),
    ("ties", {"density": 0.2, "scale": 1.0}),
    ("ties", {"density": 0.4, "trim_mode": "tensor"}),
    ("dare", {"drop": 0.5, "scale": 0.5, "seed": 3}),
    ("dare", {"drop": 0.3, "then": "ties", "density": 0.3, "seed": 1}),
    ("slerp", {}),
    ("della", {"drop": 0.5, "epsilon": 0.2, "seed": 2}),
    ("breadcrumbs", {"beta": 0.1, "gamma": 0.5, "scale": 0.7}),
    ("model_stock", {}),
]


@pytest.mark.parametrize("block_mib", [1.0, 1e-4])  # 1e-4 MiB: blocks of 2 rows of enc.weight
@pytest.mark.parametrize(("method", "opts"), CASES)
def test_streaming_equals_in_memory_bit_for_bit(files, method, opts, block_mib):
    d, paths, base = files
    needs_base = METHODS[method].needs_base
    out = stream_merge(paths, method, d / f"out_{method}.safetensors",
                       base=base if needs_base else None, block_mib=block_mib, **opts)
    streamed, meta = io.load_state(out)
    states = [io.load_state(p)[0] for p in paths]
    b = io.load_state(base)[0] if needs_base else None
    ref = merge(states, method, base=b, **opts)
    # also against tensors that were never memory-mapped
    fresh = merge([_state(i + 1) for i in range(4)], method,
                  base=_state(99) if needs_base else None, **opts)
    assert set(streamed) == set(ref)
    for k, v in ref.items():
        assert streamed[k].dtype == v.dtype, k
        assert torch.equal(streamed[k], v), (method, k)
        assert torch.equal(fresh[k], v), (method, k)
    assert streamed["norm.num_batches_tracked"].item() == 1  # from the first model
    assert meta["merge"]["method"] == method and meta["merge"]["streamed"] is True
    assert meta["note"] == "model 0"


def test_streamed_checkpoint_rebuilds_the_model(tmp_path):
    paths = []
    for i in range(3):
        net = models.build("mlp", (6,), 3, seed=i, width=4)
        paths.append(io.save(net, tmp_path / f"n{i}.safetensors", {"dataset": "x"}))
    out = stream_merge(paths, "average", tmp_path / "avg.safetensors")
    merged, meta = io.load(out)
    ref = merge([io.load(p)[0] for p in paths], "average")
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in ref.items())
    assert meta["model"]["name"] == "mlp"


def test_nan_in_a_file_names_file_and_key_and_leaves_no_output(files, tmp_path):
    d, paths, _ = files
    bad = _state(5)
    bad["enc.bias"][3] = float("nan")
    bad_path = io.save_state(bad, tmp_path / "bad.safetensors")
    out = tmp_path / "never.safetensors"
    with pytest.raises(IncompatibleModelsError, match=r"bad\.safetensors: key 'enc.bias' contains NaN"):
        stream_merge([paths[0], bad_path], "average", out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.safetensors"]  # no temporary left


def test_mismatched_files_and_bad_requests(files, tmp_path):
    d, paths, base = files
    other = _state(6)
    other["enc.weight"] = torch.zeros(3, 3)
    other_path = io.save_state(other, tmp_path / "other.safetensors")
    with pytest.raises(IncompatibleModelsError, match=r"key 'enc.weight'.*other\.safetensors has \(3, 3\)"):
        stream_merge([paths[0], other_path], "average", tmp_path / "o.safetensors")
    missing = {k: v for k, v in _state(7).items() if k != "half"}
    missing_path = io.save_state(missing, tmp_path / "missing.safetensors")
    with pytest.raises(IncompatibleModelsError, match="base .*missing.safetensors lacks key 'half'"):
        stream_merge(paths, "ties", tmp_path / "o.safetensors", base=missing_path)
    with pytest.raises(ConfigError, match="cannot stream"):
        stream_merge(paths, "fisher", tmp_path / "o.safetensors")
    with pytest.raises(ConfigError, match="needs a base"):
        stream_merge(paths, "ties", tmp_path / "o.safetensors")
    with pytest.raises(ConfigError, match="needs at least 1 model"):
        stream_merge([], "average", tmp_path / "o.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        stream_merge([tmp_path / "nope.safetensors"], "average", tmp_path / "o.safetensors")
    assert set(streamable()) == {"average", "weighted", "median", "trimmed_mean", "slerp",
                                 "task_arithmetic", "ties", "dare", "della", "breadcrumbs",
                                 "model_stock"}


def test_stream_writer_output_is_standard_safetensors(tmp_path):
    tensors = {"b": torch.arange(6, dtype=torch.int32).reshape(2, 3),
               "a": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
               "flag": torch.tensor([True, False])}
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    path = write_safetensors_stream(tmp_path / "w.safetensors", specs, iter(tensors.items()),
                                    {"hello": "world"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"hello": "world"}
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)
    with pytest.raises(CheckpointError, match="does not match the header"):
        write_safetensors_stream(tmp_path / "x.safetensors", specs, iter([("a", tensors["a"])]))
    assert not (tmp_path / "x.safetensors").exists()


def test_row_blocks_cover_the_first_axis_in_order():
    blocks = row_blocks((17, 9), 4, 80)  # 36 bytes a row: 2 rows a block
    assert [(b.start, b.stop) for b in blocks] == [(a, min(a + 2, 17)) for a in range(0, 17, 2)]
    assert row_blocks((17, 9), 4, 10) == [slice(a, a + 1) for a in range(17)]  # at least a row
    assert row_blocks((17, 9), 4, 10**6) == [None]  # fits: whole
    assert row_blocks((), 4, 1) == [None] and row_blocks((0, 3), 4, 1) == [None]
    assert row_blocks((17, 9), 4, None) == [None]


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, 1e-30, 0.5, 0.5000001, 1.0, 3.0, 7e20]) | st.floats(
           0, 1e6, allow_nan=False, allow_infinity=False), min_size=1, max_size=60),
       cuts=st.lists(st.integers(0, 60), max_size=4), wide=st.booleans(), data=st.data())
def test_radix_select_equals_sorting(values, cuts, wide, data):
    """kth_smallest over arbitrary chunkings equals the rank-th value of the sorted list."""
    dtype = torch.float64 if wide else torch.float32
    t = torch.tensor(values, dtype=dtype)
    rank = data.draw(st.integers(1, t.numel()))
    edges = sorted({0, t.numel(), *[min(c, t.numel()) for c in cuts]})
    chunks = [t[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)]
    assert kth_smallest(lambda: iter(chunks), rank, wide) == float(t.sort().values[rank - 1])
    with pytest.raises(ValueError, match="exceeds"):
        kth_smallest(lambda: iter(chunks), t.numel() + 1, wide)


def test_writer_takes_row_blocks_and_rejects_overflowing_ones(tmp_path):
    w = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    specs = [("w", torch.float32, (5, 3)), ("s", torch.float32, ())]
    parts = [("w", w[:2]), ("w", w[2:4]), ("w", w[4:]), ("s", torch.tensor(2.0))]
    path = write_safetensors_stream(tmp_path / "w.safetensors", specs, iter(parts))
    with safe_open(str(path), framework="pt") as f:
        assert torch.equal(f.get_tensor("w"), w) and f.get_tensor("s").item() == 2.0
    for bad in ([("w", w[:2]), ("w", w)], [("w", w[:, :2])], [("w", w[:2]), ("s", torch.tensor(1.0))]):
        with pytest.raises(CheckpointError, match="does not match the header"):
            write_safetensors_stream(tmp_path / "x.safetensors", specs, iter(bad))
    with pytest.raises(CheckpointError, match="ended before"):
        write_safetensors_stream(tmp_path / "x.safetensors", specs, iter(parts[:2]))
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(ConfigError, match="block_mib"):
        stream_merge([path], "average", tmp_path / "y.safetensors", block_mib=0)


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 20), n=st.integers(1, 40), seed=st.integers(0, 2**31 - 1),
       ties=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_coordinate_median_equals_torch_median(k, n, seed, ties, dtype):
    """Property: the sorting-network median (K <= 16; a sort beyond) is torch.median for odd K
    and, the project's convention, the mean of the two middle values for even K (of which
    torch.median gives the lower one); repeated values included."""
    from basinmerge.merge._common import coordinate_median

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k, n, generator=g)
    if ties:
        x = x.round()  # many equal values per coordinate
    tensors = [t.to(dtype) for t in x]
    copies = [t.clone() for t in tensors]
    got = coordinate_median(tensors)
    stacked = torch.stack([t.to(got.dtype) for t in tensors])
    s = stacked.sort(dim=0).values
    assert torch.equal(s[(k - 1) // 2], stacked.median(dim=0).values)  # torch's: the lower one
    want = s[k // 2] if k % 2 else (s[k // 2 - 1] + s[k // 2]) / 2
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(tensors, copies, strict=True))  # inputs kept


def test_sorting_network_sorts_every_zero_one_input():
    """The 0-1 principle: a comparator network that sorts every 0/1 input sorts every input."""
    import itertools

    from basinmerge.merge._common import median_network, sorting_network

    for k in range(1, 11):
        for bits in itertools.product((0, 1), repeat=k):
            v = list(bits)
            for i, j in sorting_network(k):
                v[i], v[j] = min(v[i], v[j]), max(v[i], v[j])
            assert v == sorted(bits)
            m = list(bits)
            for i, j in median_network(k):
                m[i], m[j] = min(m[i], m[j]), max(m[i], m[j])
            assert m[(k - 1) // 2] == v[(k - 1) // 2] and m[k // 2] == v[k // 2]
