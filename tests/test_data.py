"""Datasets: the real file formats (IDX, CIFAR python pickles) written here and read back, the
bundled and generated datasets, the missing-data error, and `Dataset.subset`."""

from __future__ import annotations

import gzip
import os
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from basinmerge import data
from basinmerge.errors import BasinmergeError, ConfigError, DataError

IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
             np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    """Tests see only the directories they create (no user $BASINMERGE_DATA)."""
    monkeypatch.delenv("BASINMERGE_DATA", raising=False)


# --------------------------------------------------------------------------- writers


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    """Write `arr` in the IDX format (big-endian payload), gzip-compressed when `gz`."""
    dt = arr.dtype.newbyteorder(">") if arr.dtype.itemsize > 1 else arr.dtype
    header = bytes([0, 0, IDX_CODES[dt], arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    raw = header + arr.astype(dt).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_idx_dataset(folder: Path, n_train: int = 30, n_test: int = 12, seed: int = 0) -> dict:
    """The four MNIST/Fashion-MNIST files: train as .gz, test uncompressed (both real forms)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train": (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
                  rng.integers(0, 10, n_train, dtype=np.uint8)),
        "test": (rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
                 rng.integers(0, 10, n_test, dtype=np.uint8)),
    }
    write_idx(folder / "train-images-idx3-ubyte.gz", arrays["train"][0], gz=True)
    write_idx(folder / "train-labels-idx1-ubyte.gz", arrays["train"][1], gz=True)
    write_idx(folder / "t10k-images-idx3-ubyte", arrays["test"][0], gz=False)
    write_idx(folder / "t10k-labels-idx1-ubyte", arrays["test"][1], gz=False)
    return arrays


def write_cifar_batch(path: Path, images: np.ndarray, labels: np.ndarray, label_key: bytes,
                      extra: dict | None = None) -> None:
    """A batch exactly as the CIFAR python archives hold it: a dict with bytes keys, 'data' an
    (N, 3072) uint8 array, labels a list of ints, pickled with protocol 2."""
    d = {b"batch_label": b"testing batch", label_key: [int(v) for v in labels],
         b"data": images.reshape(len(images), -1), b"filenames": [b"img_%d.png" % i for i in range(len(images))]}
    d.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


def write_cifar10(folder: Path, per_batch: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    sub = folder / "cifar-10-batches-py"
    out = {"train": [], "test": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        imgs = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        labs = rng.integers(0, 10, per_batch)
        write_cifar_batch(sub / name, imgs, labs, b"labels")
        out["test" if name == "test_batch" else "train"].append((imgs, labs))
    return {k: (np.concatenate([a for a, _ in v]), np.concatenate([b for _, b in v])) for k, v in out.items()}


def write_cifar100(folder: Path, n: int = 5, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    sub = folder / "cifar-100-python"
    out = {}
    for split in ("train", "test"):
        imgs = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labs = np.concatenate([[99, 0], rng.integers(0, 100, n - 2)])
        write_cifar_batch(sub / split, imgs, labs, b"fine_labels",
                          {b"coarse_labels": [int(v) // 5 for v in labs]})
        out[split] = (imgs, labs)
    return out


def normalized(images: np.ndarray, name: str) -> torch.Tensor:
    """The expected model input: pixels / 255, then the per-channel (x - mean) / std."""
    mean, std = data._NORM[name]
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


# --------------------------------------------------------------------------- IDX


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
       dtype=st.sampled_from(list(IDX_CODES)), gz=st.booleans(), seed=st.integers(0, 2**16))
def test_idx_round_trip(tmp_path, shape, dtype, gz, seed):
    rng = np.random.default_rng(seed)
    if dtype.kind == "f":
        arr = rng.standard_normal(shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        arr = rng.integers(info.min, int(info.max) + 1, shape).astype(dtype)
    path = write_idx(tmp_path / f"a{seed}.idx", arr, gz)
    back = data.read_idx(path)
    assert back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_is_a_data_error_naming_the_file(tmp_path, gz):
    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    raw = bytes([0, 0, 0x08, 3]) + struct.pack(">III", 2, 28, 28) + arr.tobytes()
    path = tmp_path / ("cut.idx.gz" if gz else "cut.idx")
    cut = raw[:-100]
    path.write_bytes(gzip.compress(cut) if gz else cut)
    with pytest.raises(DataError, match="truncated") as e:
        data.read_idx(path)
    assert str(path) in str(e.value)
    if gz:  # a gzip stream cut short
        path.write_bytes(gzip.compress(raw)[:-30])
        with pytest.raises(DataError) as e:
            data.read_idx(path)
        assert str(path) in str(e.value)


def test_corrupt_idx_files(tmp_path):
    bad_magic = tmp_path / "magic.idx"
    bad_magic.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(DataError, match="magic"):
        data.read_idx(bad_magic)
    bad_code = tmp_path / "code.idx"
    bad_code.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(DataError, match="type code"):
        data.read_idx(bad_code)
    # A damaged deflate stream (zlib.error, which is no OSError) is a DataError as well.
    raw = bytes([0, 0, 0x08, 1]) + struct.pack(">I", 4000) + bytes(range(250)) * 16
    gz = bytearray(gzip.compress(raw))
    for i in range(12, 30):  # inside the compressed blocks, just after the gzip header
        gz[i] ^= 0xFF
    broken = tmp_path / "broken.gz"
    broken.write_bytes(bytes(gz))
    with pytest.raises(DataError) as e:
        data.read_idx(broken)
    assert str(broken) in str(e.value)
    with pytest.raises(DataError, match="cannot read"):
        data.read_idx(tmp_path / "absent.idx")


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_dataset_from_root(tmp_path, name):
    arrays = write_idx_dataset(tmp_path / name)
    for split in ("train", "test"):
        ds = data.load(name, split, root=tmp_path)
        images, labels = arrays[split]
        assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
        assert ds.x.shape == (len(labels), 1, 28, 28) and ds.input_shape == (1, 28, 28)
        assert ds.num_classes == 10 and len(ds) == len(labels)
        torch.testing.assert_close(ds.x, normalized(images, name), rtol=0, atol=1e-6)
        assert torch.equal(ds.y, torch.from_numpy(labels.astype(np.int64)))
        # root wins over the system copy of Fashion-MNIST
        assert ds.info.source == str(tmp_path / name)
    # x, y = load(...) unpacks
    x, y = data.load(name, "test", root=tmp_path)
    assert x.shape[0] == y.shape[0] == 12


def test_idx_dataset_via_environment(tmp_path, monkeypatch):
    arrays = write_idx_dataset(tmp_path / "mnist", seed=3)
    monkeypatch.setenv("BASINMERGE_DATA", str(tmp_path))
    ds = data.load("mnist", "train")
    assert torch.equal(ds.y, torch.from_numpy(arrays["train"][1].astype(np.int64)))
    torch.testing.assert_close(ds.x, normalized(arrays["train"][0], "mnist"), rtol=0, atol=1e-6)
    found = {r["name"]: r["found"] for r in data.datasets()}
    assert found["mnist"] == str(tmp_path / "mnist")


def test_idx_dataset_truncated_file_names_it(tmp_path):
    write_idx_dataset(tmp_path / "mnist")
    lbl = tmp_path / "mnist" / "t10k-labels-idx1-ubyte"
    lbl.write_bytes(lbl.read_bytes()[:-3])
    with pytest.raises(DataError) as e:
        data.load("mnist", "test", root=tmp_path)
    assert str(lbl) in str(e.value)


def test_idx_labels_out_of_range(tmp_path):
    write_idx_dataset(tmp_path / "mnist")
    lbl = tmp_path / "mnist" / "t10k-labels-idx1-ubyte"
    write_idx(lbl, np.full(12, 10, dtype=np.uint8), gz=False)
    with pytest.raises(DataError, match="labels must lie in 0..9") as e:
        data.load("mnist", "test", root=tmp_path)
    assert str(lbl) in str(e.value)


def test_idx_images_and_labels_must_agree(tmp_path):
    write_idx_dataset(tmp_path / "mnist")
    write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte", np.zeros(11, dtype=np.uint8), gz=False)
    with pytest.raises(DataError, match="do not match"):
        data.load("mnist", "test", root=tmp_path)


# --------------------------------------------------------------------------- CIFAR


def test_cifar10_pickle_batches(tmp_path):
    arrays = write_cifar10(tmp_path / "cifar10")
    for split, n in (("train", 15), ("test", 3)):
        ds = data.load("cifar10", split, root=tmp_path)
        images, labels = arrays[split]
        assert ds.x.shape == (n, 3, 32, 32) and ds.x.dtype == torch.float32
        assert ds.y.dtype == torch.int64 and ds.num_classes == 10
        torch.testing.assert_close(ds.x, normalized(images, "cifar10"), rtol=0, atol=1e-6)
        assert torch.equal(ds.y, torch.from_numpy(labels.astype(np.int64)))
    assert ds.info.classes[0] == "airplane"


def test_cifar100_pickle_batches_via_environment(tmp_path, monkeypatch):
    arrays = write_cifar100(tmp_path / "cifar100")
    monkeypatch.setenv("BASINMERGE_DATA", str(tmp_path))
    for split in ("train", "test"):
        ds = data.load("cifar100", split)
        images, labels = arrays[split]
        assert ds.num_classes == 100 and ds.x.shape == (5, 3, 32, 32)
        torch.testing.assert_close(ds.x, normalized(images, "cifar100"), rtol=0, atol=1e-6)
        assert torch.equal(ds.y, torch.from_numpy(labels.astype(np.int64)))  # fine labels, 0..99


class _Evil:
    """Unpickling this would run a shell command."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_cifar_pickle_with_code_is_refused(tmp_path):
    write_cifar10(tmp_path / "cifar10")
    sentinel = tmp_path / "pwned"
    batch = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_1"
    with open(batch, "wb") as f:
        pickle.dump({b"data": _Evil(sentinel), b"labels": [0]}, f, protocol=2)
    with pytest.raises(DataError, match="not allowed") as e:
        data.load("cifar10", "train", root=tmp_path)
    assert str(batch) in str(e.value) and "system" in str(e.value)
    assert not sentinel.exists()


def test_cifar_batch_malformed(tmp_path):
    path = tmp_path / "b"
    write_cifar_batch(path, np.zeros((2, 3, 32, 32), np.uint8), np.array([0, 1]), b"labels")
    with pytest.raises(DataError, match="no key 'fine_labels'"):
        data.read_cifar_batch(path, "fine_labels")
    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(DataError, match="3072"):
        data.read_cifar_batch(path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match="not a valid CIFAR"):
        data.read_cifar_batch(path)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_missing_dataset_says_how_to_get_it(tmp_path, name):
    with pytest.raises(DataError) as e:
        data.load(name, "train", root=tmp_path)
    msg = str(e.value)
    assert isinstance(e.value, BasinmergeError)
    assert f"'{name}' not found" in msg and "To get it:" in msg and str(tmp_path) in msg
    assert "Nothing is downloaded" in msg and "\n" not in msg
    assert {r["name"]: r["found"] for r in data.datasets(tmp_path)}[name] is None


def test_unknown_dataset_and_split():
    with pytest.raises(DataError, match="unknown dataset 'nope'.*digits"):
        data.load("nope")
    with pytest.raises(ConfigError, match="unknown split 'valid'"):
        data.load("digits", "valid")


def test_registry_lists_every_dataset(tmp_path):
    rows = data.datasets(tmp_path)
    assert [r["name"] for r in rows] == data.names()
    assert set(data.names()) == {"fashion-mnist", "mnist", "cifar10", "cifar100", "mnist1d", "digits"}
    found = {r["name"]: r["found"] for r in rows}
    assert found["digits"] and found["mnist1d"]


# --------------------------------------------------------------------------- digits


def test_digits_split_is_deterministic_stratified_and_disjoint():
    from sklearn.datasets import load_digits

    tr, te = data.load("digits", "train"), data.load("digits", "test")
    assert tr.x.shape == (1442, 1, 8, 8) and te.x.shape == (355, 1, 8, 8)
    assert tr.x.dtype == torch.float32 and tr.y.dtype == torch.int64
    assert abs(float(tr.x.mean())) < 1e-5 and abs(float(tr.x.std()) - 1) < 1e-3
    # Stratified: about a fifth of every class is in the test split.
    full = load_digits()
    counts = np.bincount(full.target, minlength=10)
    assert np.all(np.abs(torch.bincount(te.y, minlength=10).numpy() - counts / 5) <= 1)
    # Disjoint and complete: undoing the (shared) standardization, train + test is exactly the
    # original set of (image, label) rows, each used once.
    imgs = full.images / 16.0
    train_imgs = imgs[_train_rows(full.target)]
    mean, std = train_imgs.mean(), train_imgs.std()
    back = torch.cat([tr.x, te.x]).double().flatten(1).numpy() * std + mean
    rows = np.concatenate([np.round(back * 16).astype(int), np.concatenate([tr.y, te.y])[:, None]], 1)
    orig = np.concatenate([full.images.reshape(len(imgs), -1).astype(int), full.target[:, None]], 1)
    assert sorted(map(tuple, rows)) == sorted(map(tuple, orig))
    # Determinism: a fresh load (cache cleared) gives the same tensors.
    data._load_cached.cache_clear()
    tr2 = data.load("digits", "train")
    assert tr2 is not tr and torch.equal(tr2.x, tr.x) and torch.equal(tr2.y, tr.y)


def _train_rows(target: np.ndarray) -> np.ndarray:
    test = np.zeros(len(target), bool)
    for c in range(10):
        test[np.flatnonzero(target == c)[4::5]] = True
    return np.flatnonzero(~test)


# --------------------------------------------------------------------------- mnist1d


@pytest.fixture(scope="module")
def mnist1d():
    """Generate MNIST-1D once (about 3 s), from a cold cache, recording the global RNG streams
    around the generation (mnist1d reseeds them internally)."""
    data._mnist1d_arrays.cache_clear()
    data._load_cached.cache_clear()
    random.seed(1234)
    np.random.seed(1234)
    py_before, np_before = random.getstate(), np.random.get_state()[1].copy()
    tr, te = data.load("mnist1d", "train"), data.load("mnist1d", "test")
    rng_kept = random.getstate() == py_before and np.array_equal(np.random.get_state()[1], np_before)
    return tr, te, rng_kept


def test_mnist1d_shapes_and_normalization(mnist1d):
    tr, te, _ = mnist1d
    assert tr.x.shape == (4000, 40) and te.x.shape == (1000, 40)
    assert tr.input_shape == (40,) and tr.num_classes == 10
    assert tr.x.dtype == torch.float32 and tr.y.dtype == torch.int64
    assert abs(float(tr.x.mean())) < 1e-4 and abs(float(tr.x.std()) - 1) < 1e-3
    assert set(tr.y.unique().tolist()) == set(range(10)) and te.y.min() >= 0 and te.y.max() <= 9


def test_mnist1d_is_the_fixed_published_set(mnist1d):
    tr, te, _ = mnist1d
    # The generator is seeded (seed 42 in get_dataset_args): the same data in every process
    # (values recorded from one run; a change means the generated set changed).
    assert tr.y[:12].tolist() == [2, 6, 4, 5, 6, 6, 6, 0, 3, 1, 6, 9]
    assert tr.x[0, :4].tolist() == pytest.approx([-0.332464, -0.472698, -0.780208, -1.011797], abs=1e-5)
    assert torch.equal(data.load("mnist1d", "test").x, te.x)


def test_mnist1d_leaves_global_rngs_alone(mnist1d):
    assert mnist1d[2]


# --------------------------------------------------------------------------- Fashion-MNIST

FASHION = data.FASHION_SYSTEM_DIR / "train-images-idx3-ubyte.gz"


@pytest.mark.skipif(not FASHION.is_file(),
                    reason=f"{FASHION} is absent (Debian package dataset-fashion-mnist not installed)")
def test_fashion_mnist_real_files():
    tr, te = data.load("fashion-mnist", "train"), data.load("fashion-mnist", "test")
    assert tr.x.shape == (60000, 1, 28, 28) and te.x.shape == (10000, 1, 28, 28)
    assert tr.x.dtype == torch.float32 and tr.y.dtype == torch.int64
    assert abs(float(tr.x.mean())) < 0.01 and abs(float(tr.x.std()) - 1) < 0.01
    lo, hi = (0 - 0.2860) / 0.3530, (1 - 0.2860) / 0.3530
    assert float(tr.x.min()) == pytest.approx(lo, abs=1e-5)
    assert float(tr.x.max()) == pytest.approx(hi, abs=1e-5)
    assert torch.bincount(tr.y).tolist() == [6000] * 10
    assert torch.bincount(te.y).tolist() == [1000] * 10
    assert tr.info.classes[0] == "T-shirt/top" and tr.info.source == str(data.FASHION_SYSTEM_DIR)
    assert data.first_available() == "fashion-mnist"


# --------------------------------------------------------------------------- Dataset.subset


def _toy(n: int) -> data.Dataset:
    info = data.DatasetInfo("toy", "train", (1,), 10, "test")
    return data.Dataset(torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n) % 10, info)


@settings(max_examples=60, deadline=None)
@given(n_total=st.integers(1, 60), frac=st.floats(0, 1), seed=st.none() | st.integers(0, 1000))
def test_subset_by_count(n_total, frac, seed):
    ds = _toy(n_total)
    n = max(1, round(frac * n_total))
    sub = ds.subset(n, seed=seed)
    rows = sub.x[:, 0].long()
    assert len(sub) == n and sub.info == ds.info
    assert torch.equal(sub.y, rows % 10)  # rows stay paired with their labels
    assert rows.unique().numel() == n and torch.all(rows[1:] > rows[:-1])  # distinct, in order
    if seed is None:
        assert rows.tolist() == list(range(n))
    else:
        assert torch.equal(ds.subset(n, seed=seed).x, sub.x)  # same seed, same subset


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_subset_by_indices_and_mask(draw):
    n = draw.draw(st.integers(1, 40))
    ds = _toy(n)
    idx = draw.draw(st.lists(st.integers(0, n - 1), max_size=50))
    sub = ds.subset(idx)
    assert sub.x[:, 0].long().tolist() == idx and sub.y.tolist() == [i % 10 for i in idx]
    mask = draw.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    by_mask = ds.subset(torch.tensor(mask))
    assert by_mask.x[:, 0].long().tolist() == [i for i, m in enumerate(mask) if m]


def test_subset_errors():
    ds = _toy(10)
    for bad in (0, 11, -1):
        with pytest.raises(ConfigError, match="outside 1..10"):
            ds.subset(bad)
    with pytest.raises(ConfigError, match=r"0\.\.9"):
        ds.subset([3, 10])
    with pytest.raises(ConfigError, match=r"0\.\.9"):
        ds.subset([-1])
    with pytest.raises(ConfigError, match="mask"):
        ds.subset(torch.ones(9, dtype=torch.bool))
    with pytest.raises(ConfigError, match="1-D"):
        ds.subset([[1, 2]])
    # numpy integers count as sizes, not as a 0-d index
    assert len(ds.subset(np.int64(4))) == 4
