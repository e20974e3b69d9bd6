"""Datasets, read offline from files on disk or generated; nothing is ever downloaded.

`load(name, split)` returns a `Dataset`: float32 inputs (normalized), int64 labels and an
`info` record (input shape, number of classes, where the data came from). A `Dataset` unpacks as
`x, y = load(...)`.

Registry (`datasets()` lists them with where each was found):

- ``fashion-mnist``: IDX files from Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist``), or ``root``, or ``$BASINMERGE_DATA/fashion-mnist``.
- ``mnist``: the same IDX format, from ``root`` or ``$BASINMERGE_DATA/mnist``.
- ``cifar10`` / ``cifar100``: the standard python pickle batches, from ``root`` or
  ``$BASINMERGE_DATA/cifar10|cifar100`` (read with a restricted unpickler: no code runs).
- ``mnist1d``: generated with ``mnist1d.data.make_dataset(get_dataset_args())``.
- ``digits``: scikit-learn's bundled 8x8 digits, a deterministic stratified 80/20 split.
"""

from __future__ import annotations

import gzip
import numbers
import os
import pickle
import random
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from basinmerge.errors import ConfigError, DataError

SPLITS = ("train", "test")
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")

# Per-channel normalization constants (the usual published ones).
_NORM = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    split: str
    input_shape: tuple[int, ...]
    num_classes: int
    source: str
    classes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Dataset:
    """In-memory tensors. Treat them as read-only: `load` caches and shares them."""

    x: torch.Tensor
    y: torch.Tensor
    info: DatasetInfo

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield self.x
        yield self.y

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.info.input_shape

    def subset(self, indices: int | Sequence[int] | torch.Tensor, seed: int | None = None) -> Dataset:
        """A subset of the examples.

        An integer n takes n examples: the first n, or a random n (kept in their original order)
        when `seed` is given. A sequence or tensor of indices selects those rows in that order;
        a boolean mask of length ``len(self)`` selects the rows where it is true."""
        if isinstance(indices, numbers.Integral) and not isinstance(indices, bool):
            n = int(indices)
            if not 0 < n <= len(self):
                raise ConfigError(f"subset size {n} is outside 1..{len(self)} for {self.info.name}")
            if seed is None:
                idx = torch.arange(n)
            else:
                g = torch.Generator().manual_seed(seed)
                idx = torch.randperm(len(self), generator=g)[:n].sort().values
            return replace(self, x=self.x[idx], y=self.y[idx])
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise ConfigError(f"a boolean subset mask must have shape ({len(self)},) for "
                                  f"{self.info.name}, got {tuple(idx.shape)}")
            idx = idx.nonzero().flatten()
        elif idx.ndim != 1 or (idx.numel() and (idx.is_floating_point() or idx.is_complex())):
            raise ConfigError(f"subset indices must be a 1-D sequence of integers, got shape "
                              f"{tuple(idx.shape)} of {idx.dtype}")
        idx = idx.to(torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise ConfigError(f"subset indices must lie in 0..{len(self) - 1} for {self.info.name}")
        return replace(self, x=self.x[idx], y=self.y[idx])

    def to(self, device: str | torch.device) -> Dataset:
        return replace(self, x=self.x.to(device), y=self.y.to(device))


# --------------------------------------------------------------------------- format readers


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read IDX file ({e.strerror})") from e
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip stream ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtypes: dict[int, npt.DTypeLike] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = raw[2], raw[3]
    if code not in dtypes or ndim == 0:
        raise DataError(f"{path}: unsupported IDX type code 0x{code:02x} / ndim {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    dtype = np.dtype(dtypes[code])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX payload has {len(raw) - header} bytes, header says "
                        f"{expected} (shape {dims}); the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only; any other global is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data batch")


def read_cifar_batch(path: str | os.PathLike, label_key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python pickle batch: (N, 3, 32, 32) uint8 images and int64 labels."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            d = _SafeUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise DataError(f"{path}: cannot read CIFAR batch ({e.strerror})") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise DataError(f"{path}: not a valid CIFAR python batch ({e})") from e
    if not isinstance(d, dict):
        raise DataError(f"{path}: a CIFAR batch must hold a dict, found {type(d).__name__}")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    for key in ("data", label_key):
        if key not in d:
            raise DataError(f"{path}: CIFAR batch has no key '{key}' (keys: {sorted(d)})")
    try:
        data = np.asarray(d["data"], dtype=np.uint8)
        labels = np.asarray(d[label_key], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: CIFAR 'data'/'{label_key}' are not numeric arrays ({e})") from e
    if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or data.shape[0] != labels.shape[0]:
        raise DataError(f"{path}: CIFAR 'data' has shape {data.shape} for {labels.shape} "
                        f"labels; expected (N, 3072) and (N,)")
    return data.reshape(-1, 3, 32, 32), labels


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    """Labels outside 0..num_classes-1 would only fail later, deep inside the loss."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels must lie in 0..{num_classes - 1}, found "
                        f"{int(labels.min())}..{int(labels.max())}")


# --------------------------------------------------------------------------- locating files


def _candidate_dirs(name: str, root: str | os.PathLike | None, extra: Sequence[Path] = ()) -> list[Path]:
    dirs: list[Path] = []
    if root is not None:
        dirs += [Path(root), Path(root) / name]
    env = os.environ.get("BASINMERGE_DATA")
    if env:
        dirs.append(Path(env) / name)
    dirs += list(extra)
    return dirs


def _find_file(dirs: Sequence[Path], stems: Sequence[str]) -> Path | None:
    for d in dirs:
        for stem in stems:
            for candidate in (d / stem, d / (stem + ".gz")):
                if candidate.is_file():
                    return candidate
    return None


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_paths(name: str, split: str, root) -> tuple[Path, Path] | None:
    extra = [FASHION_SYSTEM_DIR] if name == "fashion-mnist" else []
    dirs = _candidate_dirs(name, root, extra)
    img_stem, lbl_stem = _IDX_FILES[split]
    img = _find_file(dirs, [img_stem, img_stem.replace("-idx3-", ".idx3-")])
    lbl = _find_file(dirs, [lbl_stem, lbl_stem.replace("-idx1-", ".idx1-")])
    if img is None or lbl is None:
        return None
    return img, lbl


_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}


def _cifar_dir(name: str, root) -> Path | None:
    sub, train_files, _, _, _ = _CIFAR[name]
    for d in _candidate_dirs(name, root):
        for cand in (d, d / sub):
            if (cand / train_files[0]).is_file():
                return cand
    return None


# --------------------------------------------------------------------------- loaders


def _normalize_images(images: np.ndarray, name: str) -> torch.Tensor:
    x = torch.from_numpy(np.array(images, dtype=np.float32)).div_(255.0)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    mean, std = _NORM[name]
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous()


def _load_idx(name: str, split: str, root) -> Dataset:
    paths = _idx_paths(name, split, root)
    if paths is None:
        raise DataError(_missing_message(name, root))
    img_path, lbl_path = paths
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"{img_path}: images of shape {images.shape} do not match labels of "
                        f"shape {labels.shape} in {lbl_path}")
    _check_labels(labels, 10, lbl_path)
    x = _normalize_images(images, name)
    y = torch.from_numpy(labels.astype(np.int64))
    classes = FASHION_CLASSES if name == "fashion-mnist" else tuple(str(i) for i in range(10))
    info = DatasetInfo(name, split, tuple(x.shape[1:]), 10, str(img_path.parent), classes)
    return Dataset(x, y, info)


def _load_cifar(name: str, split: str, root) -> Dataset:
    d = _cifar_dir(name, root)
    if d is None:
        raise DataError(_missing_message(name, root))
    _, train_files, test_files, label_key, k = _CIFAR[name]
    files = [d / f for f in (train_files if split == "train" else test_files)]
    parts = [read_cifar_batch(f, label_key) for f in files]
    for f, (_, lab) in zip(files, parts, strict=True):
        _check_labels(lab, k, f)
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    x = _normalize_images(images, name)
    classes = CIFAR10_CLASSES if name == "cifar10" else None
    info = DatasetInfo(name, split, (3, 32, 32), k, str(d), classes)
    return Dataset(x, torch.from_numpy(labels), info)


def _standardize(train: np.ndarray, arr: np.ndarray) -> torch.Tensor:
    mean, std = float(train.mean()), float(train.std())
    return torch.from_numpy(((arr - mean) / std).astype(np.float32))


@lru_cache(maxsize=1)
def _mnist1d_arrays() -> dict:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - a core dependency
        raise DataError("mnist1d is not installed: pip install mnist1d") from e
    # make_dataset generates the data from a fixed seed; it never downloads (get_dataset would).
    # It reseeds Python's and NumPy's global RNGs: keep the caller's streams as they were.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        return make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _load_mnist1d(split: str, root) -> Dataset:
    d = _mnist1d_arrays()
    xs = d["x"] if split == "train" else d["x_test"]
    ys = d["y"] if split == "train" else d["y_test"]
    x = _standardize(np.asarray(d["x"], dtype=np.float64), np.asarray(xs, dtype=np.float64))
    y = torch.from_numpy(np.asarray(ys, dtype=np.int64))
    info = DatasetInfo("mnist1d", split, (x.shape[1],), 10, "generated (mnist1d.make_dataset)",
                       tuple(str(i) for i in range(10)))
    return Dataset(x.contiguous(), y, info)


def _load_digits(split: str, root) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64) / 16.0
    labels = np.asarray(bunch.target, dtype=np.int64)
    # Deterministic stratified 80/20 split: within each class, every fifth example is test.
    test_mask = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        test_mask[idx[4::5]] = True
    sel = test_mask if split == "test" else ~test_mask
    x = _standardize(images[~test_mask], images[sel]).unsqueeze(1)
    info = DatasetInfo("digits", split, (1, 8, 8), 10, "scikit-learn (bundled)",
                       tuple(str(i) for i in range(10)))
    return Dataset(x.contiguous(), torch.from_numpy(labels[sel]), info)


@dataclass(frozen=True)
class _Entry:
    loader: Callable[[str, object], Dataset]
    locate: Callable[[object], str | None]
    description: str


_REGISTRY: dict[str, _Entry] = {
    "fashion-mnist": _Entry(lambda s, r: _load_idx("fashion-mnist", s, r),
                            lambda r: _where(_idx_paths("fashion-mnist", "train", r)),
                            "Fashion-MNIST, 60k/10k 28x28 grey images (IDX files)"),
    "mnist": _Entry(lambda s, r: _load_idx("mnist", s, r),
                    lambda r: _where(_idx_paths("mnist", "train", r)),
                    "MNIST, 60k/10k 28x28 digits (IDX files, user-provided)"),
    "cifar10": _Entry(lambda s, r: _load_cifar("cifar10", s, r),
                      lambda r: _where(_cifar_dir("cifar10", r)),
                      "CIFAR-10, 50k/10k 32x32 colour images (python batches, user-provided)"),
    "cifar100": _Entry(lambda s, r: _load_cifar("cifar100", s, r),
                       lambda r: _where(_cifar_dir("cifar100", r)),
                       "CIFAR-100, 50k/10k 32x32 colour images (python batches, user-provided)"),
    "mnist1d": _Entry(lambda s, r: _load_mnist1d(s, r), lambda r: _mnist1d_where(),
                      "MNIST-1D, 4000/1000 length-40 signals (generated offline)"),
    "digits": _Entry(lambda s, r: _load_digits(s, r), lambda r: "scikit-learn (bundled)",
                     "sklearn digits, 1442/355 8x8 images (bundled)"),
}


def _where(found) -> str | None:
    if found is None:
        return None
    if isinstance(found, tuple):
        return str(found[0].parent)
    return str(found)


def _mnist1d_where() -> str | None:
    try:
        import mnist1d  # noqa: F401
    except ImportError:
        return None
    return "generated (mnist1d package)"


_HOW_TO_GET = {
    "fashion-mnist": "install Debian's package (sudo apt-get install dataset-fashion-mnist), or "
                     "put the four IDX .gz files in ROOT/fashion-mnist or $BASINMERGE_DATA/fashion-mnist",
    "mnist": "put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
             "and t10k-labels-idx1-ubyte.gz in ROOT/mnist or $BASINMERGE_DATA/mnist",
    "cifar10": "extract cifar-10-python.tar.gz into ROOT/cifar10 or $BASINMERGE_DATA/cifar10",
    "cifar100": "extract cifar-100-python.tar.gz into ROOT/cifar100 or $BASINMERGE_DATA/cifar100",
    "mnist1d": "pip install mnist1d",
    "digits": "pip install scikit-learn",
}


def _missing_message(name: str, root) -> str:
    where = ", ".join(str(d) for d in _candidate_dirs(
        name, root, [FASHION_SYSTEM_DIR] if name == "fashion-mnist" else []))
    return (f"dataset '{name}' not found (looked in: {where or 'no directory given'}). "
            f"To get it: {_HOW_TO_GET[name]}. Nothing is downloaded at run time.")


def names() -> list[str]:
    return list(_REGISTRY)


def datasets(root: str | os.PathLike | None = None) -> list[dict]:
    """Every registered dataset with its description and where it was found (None: missing)."""
    return [{"name": n, "description": e.description, "found": e.locate(root),
             "how_to_get": _HOW_TO_GET[n]} for n, e in _REGISTRY.items()]


def load(name: str, split: str = "train", root: str | os.PathLike | None = None) -> Dataset:
    """Load a dataset split as normalized float32 inputs and int64 labels."""
    if name not in _REGISTRY:
        raise DataError(f"unknown dataset '{name}'; choose one of: {', '.join(_REGISTRY)}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}' for dataset '{name}'; use 'train' or 'test'")
    key_root = None if root is None else str(Path(root).resolve())
    return _load_cached(name, split, key_root, os.environ.get("BASINMERGE_DATA"))


@lru_cache(maxsize=16)
def _load_cached(name: str, split: str, root: str | None, _env: str | None) -> Dataset:
    return _REGISTRY[name].loader(split, root)


def first_available(preference: Sequence[str] = ("fashion-mnist", "mnist1d")) -> str:
    """The first dataset of `preference` that can be loaded here."""
    for n in preference:
        if _REGISTRY[n].locate(None) is not None:
            return n
    raise DataError(f"none of {', '.join(preference)} is available")

