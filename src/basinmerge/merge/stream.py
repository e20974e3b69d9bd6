"""Streaming merge of safetensors checkpoints: tensor by tensor, block by block.

`stream_merge(paths, method, out, base=...)` runs a data-free method (every method registered
with a per-key kernel: `streamable()`) over checkpoints without loading whole models. A
checkpoint is a safetensors file or an HF model folder, single file or sharded
(`basinmerge.io.tensor_index` says which file holds each key). Each file's
header gives every tensor's byte offsets (`read_entries`); a tensor, or a span of its rows, is
read with one plain ``readinto`` into a fresh tensor (no memory map: nothing stays resident
once a block is dropped, so each file is opened once for the whole merge), merged with the
very kernel the in-memory function uses, and written straight into the output file.

Coordinate-wise kernels (average, weighted, median, trimmed mean, task arithmetic, TIES with
the global per-model threshold) are fed row blocks of at most `block_mib` MiB per model, so the
working set is a few times K blocks whatever the tensor sizes; TIES's global thresholds are
found by radix selection over the same blocks (see `basinmerge.merge.task`), without a
model-sized buffer. Per-tensor kernels (DARE, per-tensor TIES trimming, DELLA, Breadcrumbs,
Model Stock, SLERP: their masks, thresholds, norms or angles are per tensor) get whole tensors,
so their peak is a few times K times the largest tensor.

Every block of every input is checked for NaN/Inf the first time it is read, by one sum (a sum
is finite only if every term is; the exact per-element test runs only when it is not, see
`basinmerge.state.all_finite`), and a bad value stops the merge naming the file and key. The
output is written incrementally in the safetensors format to a temporary file and renamed into
place; the result is bit for bit the in-memory merge of the same files.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from basinmerge import io
from basinmerge.errors import CheckpointError, ConfigError, IncompatibleModelsError
from basinmerge.io import META_KEY, atomic_path, read_header  # noqa: F401 - read_header: its old home
from basinmerge.merge._common import merged_items
from basinmerge.merge.registry import all_methods, get_method
from basinmerge.state import all_finite, bad_value_kind, check_compatible

# safetensors dtype names
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class Entry(NamedTuple):
    """One tensor of a safetensors file: dtype name, shape, and its bytes' absolute offsets."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_entries(path: str | os.PathLike) -> dict[str, Entry]:
    """Key -> `Entry` from a safetensors header, in the file's data order, without reading any
    tensor; offsets that do not fit the dtype and shape, or run past the end of the file
    (a truncated download), are refused naming the key."""
    path = Path(path)
    header, n, size = io.safetensors_header(path)
    header.pop("__metadata__", None)
    try:
        items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        entries = {}
        for k, v in items:
            shape = tuple(int(d) for d in v["shape"])
            a, b = (8 + n + int(o) for o in v["data_offsets"])
            entries[k] = Entry(v["dtype"], shape, a, b)
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed safetensors header ({e})") from e
    for k, ent in entries.items():
        if ent.dtype in DTYPES:
            want = math.prod(ent.shape) * DTYPES[ent.dtype].itemsize
            if ent.end - ent.start != want:
                raise CheckpointError(f"{path}: key '{k}' has {ent.end - ent.start} bytes, its "
                                      f"dtype and shape need {want}")
        if ent.end > size:
            raise CheckpointError(f"{path}: key '{k}' runs past the end of the file (truncated?)")
    return entries


class _TensorFile:
    """One safetensors file read with plain ``readinto`` calls into fresh tensors: whole
    tensors, or spans of rows, each one contiguous read. Unlike a memory map, nothing read stays
    resident once the caller drops the tensor, so the file can stay open for the whole merge."""

    def __init__(self, path: Path, entries: dict[str, Entry]):
        self.path, self.entries = path, entries
        self._f: Any = None

    def read(self, key: str, rows: slice | None = None) -> torch.Tensor:
        e = self.entries[key]
        dtype = DTYPES[e.dtype]
        shape = e.shape
        offset, nbytes = e.start, e.end - e.start
        if rows is not None and shape:
            row_bytes = nbytes // shape[0] if shape[0] else 0
            a, b, _ = rows.indices(shape[0])
            shape = (max(b - a, 0), *shape[1:])
            offset, nbytes = offset + a * row_bytes, max(b - a, 0) * row_bytes
        out = torch.empty(shape, dtype=dtype)
        if nbytes:
            if self._f is None:
                self._f = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
            buf = out.reshape(-1).view(torch.uint8).numpy().data  # a writable memoryview
            self._f.seek(offset)
            got = 0
            while got < nbytes:
                n = self._f.readinto(buf[got:])
                if not n:
                    raise CheckpointError(f"{self.path}: key '{key}' cannot be read (file truncated)")
                got += n
        return out

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class _Spec:
    """A tensor's dtype and shape from a header, for `basinmerge.state.check_compatible`."""

    def __init__(self, dtype: str, shape: tuple[int, ...]):
        self.dtype, self.shape = dtype, shape


class FileSource:
    """K safetensors checkpoints (files or HF model folders, single or sharded) and an optional
    base as a `TensorSource`, read one key (or one
    span of rows) at a time with plain contiguous reads; close it (or use it in a ``with``) to
    release the file handles.

    Every float tensor block is checked for NaN/Inf the first time it is read, by a sum (see
    `basinmerge.state.all_finite`); the error names the file and the key. `device`: where the
    blocks are handed to the kernels (the check runs there too)."""

    def __init__(self, paths: Sequence[str | os.PathLike], base: str | os.PathLike | None = None,
                 device: str | torch.device | None = None):
        self.paths = [Path(p) for p in paths]
        self.base_path = Path(base) if base is not None else None
        self.names = [str(p) for p in self.paths]
        self.device = torch.device(device) if device is not None else None
        self.indexes = [io.tensor_index(p) for p in self.paths]
        self.base_index = io.tensor_index(self.base_path) if self.base_path is not None else None
        self.headers = [{k: (dt, shape) for k, (_, dt, shape) in ix.items()} for ix in self.indexes]
        base_header = (None if self.base_index is None else
                       {k: (dt, shape) for k, (_, dt, shape) in self.base_index.items()})
        self._check(base_header)
        self._open: dict[Path, _TensorFile] = {}  # one reader per file, shared by the keys it holds
        self._checked: set[tuple[int, str, int | None]] = set()
        self.meta = {k: v for k, v in io.read_meta(self.paths[0]).items()
                     if k not in io.FORMAT_KEYS}

    def _check(self, base_header) -> None:
        """Same keys, shapes and dtypes everywhere: one error listing the first mismatches."""
        ref, ref_name = self.headers[0], self.names[0]
        headers, names = list(self.headers), list(self.names)
        if base_header is not None:
            headers.append(base_header)
            names.append(f"base {self.base_path}")
        specs: list[Any] = [{k: _Spec(dt, shape) for k, (dt, shape) in h.items()} for h in headers]
        check_compatible(specs, names)
        for k, (dt, _) in ref.items():
            if dt not in DTYPES:
                raise CheckpointError(f"{ref_name}: key '{k}' has dtype {dt}, which merging does not support")

    def keys(self) -> list[str]:
        return list(self.headers[0])

    def is_float(self, key: str) -> bool:
        return self.headers[0][key][0] in FLOAT_DTYPES

    def numel(self, key: str) -> int:
        return math.prod(self.headers[0][key][1])

    def shape(self, key: str) -> tuple[int, ...]:
        return self.headers[0][key][1]

    def element_size(self, key: str) -> int:
        return torch.empty((), dtype=DTYPES[self.headers[0][key][0]]).element_size()

    @property
    def num_models(self) -> int:
        return len(self.paths)

    @property
    def has_base(self) -> bool:
        return self.base_path is not None

    def _file(self, idx: int, key: str) -> _TensorFile:
        """The file that holds `key` of model `idx` (-1: the base), opened once."""
        index = self.base_index if idx < 0 else self.indexes[idx]
        assert index is not None
        path = Path(index[key][0])
        f = self._open.get(path)
        if f is None:
            f = self._open[path] = _TensorFile(path, read_entries(path))
        return f

    def _read(self, idx: int, name: str, key: str, rows: slice | None) -> torch.Tensor:
        t = self._file(idx, key).read(key, rows)
        if self.device is not None:
            t = t.to(self.device)
        part = (idx, key, None if rows is None else rows.start)
        if part not in self._checked:
            if t.is_floating_point() and not all_finite(t):
                raise IncompatibleModelsError(f"{name}: key '{key}' contains {bad_value_kind(t)} values")
            self._checked.add(part)
        return t

    def model_tensor(self, k: int, key: str, rows: slice | None = None) -> torch.Tensor:
        return self._read(k, self.names[k], key, rows)

    def base_tensor(self, key: str, rows: slice | None = None) -> torch.Tensor | None:
        if self.base_path is None:
            return None
        return self._read(-1, f"base {self.base_path}", key, rows)

    def close(self) -> None:
        for f in self._open.values():
            f.close()

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_safetensors_stream(path: str | os.PathLike,
                             specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                             items: Iterable[tuple[str, torch.Tensor]],
                             metadata: dict[str, str] | None = None) -> Path:
    """Write tensors to a safetensors file as they come, atomically: the header (from `specs`,
    in order) first, then each tensor's bytes. A tensor may come whole or as consecutive row
    blocks (the same key repeated); only one block is held at a time."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    pos = 0
    for key, dtype, shape in specs:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    with atomic_path(path, suffix=".safetensors") as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        expected = iter(specs)
        want: tuple[str, torch.dtype, tuple[int, ...]] = ("", torch.float32, ())
        rows_left = 0
        for key, t in items:
            if rows_left == 0:  # a new key starts
                upcoming = next(expected, None)
                if upcoming is None or upcoming[0] != key:
                    raise CheckpointError(f"{path}: streamed tensor '{key}' does not match the header")
                want = upcoming
                rows_left = want[2][0] if want[2] else 1
            shape = tuple(t.shape)
            if not want[2] or want[2][0] == 0:  # 0-d or empty: whole only
                block_ok, rows = shape == want[2], rows_left
            else:
                rows = shape[0] if shape else 0
                block_ok = shape[1:] == want[2][1:] and 0 < rows <= rows_left
            if not block_ok or t.dtype != want[1] or key != want[0]:
                raise CheckpointError(f"{path}: streamed tensor '{key}' does not match the header")
            rows_left -= rows
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t
        if rows_left or next(expected, None) is not None:
            raise CheckpointError(f"{path}: the stream ended before every tensor was written")
    return path


def streamable() -> list[str]:
    """The methods `stream_merge` can run: those registered with a per-key kernel."""
    return [m.name for m in all_methods() if m.streams]


def stream_merge(paths: Sequence[str | os.PathLike], method: str, out: str | os.PathLike, *,
                 base: str | os.PathLike | None = None, meta: dict | None = None,
                 block_mib: float = 1.0, device: str | torch.device | None = None,
                 **options: Any) -> Path:
    """Merge safetensors files with a data-free method, streaming, into `out` (atomically).

    `block_mib`: the most MiB of one tensor read from each model at a time by a
    coordinate-wise method. `device`: where the kernels run (``"cuda"``: blocks are copied
    there and the results back; the output is the same). The output's metadata is the first
    model's (so `basinmerge.io.load` rebuilds it) plus a ``merge`` record (method, options,
    inputs) and anything in `meta`."""
    if not block_mib > 0:
        raise ConfigError(f"block_mib must be positive, got {block_mib}")
    block_bytes = max(1, int(block_mib * 2**20))
    m = get_method(method)
    if not m.streams:
        raise ConfigError(f"method '{method}' cannot stream; streaming methods: {', '.join(streamable())}")
    options = m.check(options, has_base=base is not None, num_models=len(paths))
    needs_base = m.needs_base
    make_kernel = m.kernel
    assert make_kernel is not None  # m.streams holds exactly when the method has a kernel
    with FileSource(paths, base if needs_base else None, device=device) as source:
        kernel_opts = dict(options)
        if "block_bytes" in inspect.signature(make_kernel).parameters:
            kernel_opts["block_bytes"] = block_bytes
        kernel = make_kernel(source, **kernel_opts)
        record = {"method": method, "options": options, "inputs": source.names,
                  "base": str(base) if needs_base else None, "streamed": True}
        full_meta = {**source.meta, **(meta or {}), "merge": record}
        specs = [(k, DTYPES[dt], shape) for k, (dt, shape) in source.headers[0].items()]
        return write_safetensors_stream(out, specs, merged_items(source, kernel, block_bytes),
                                        {"format": "pt", META_KEY: json.dumps(full_meta, default=str)})
