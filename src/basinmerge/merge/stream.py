"""Streaming merge of safetensors checkpoints: tensor by tensor, block by block.

`stream_merge(paths, method, out, base=...)` runs a data-free method (every method registered
with a per-key kernel: `streamable()`) over checkpoints without loading whole models. A
checkpoint is a safetensors file or an HF model folder, single file or sharded
(`basinmerge.io.tensor_index` says which file holds each key). Each file's
header gives every tensor's byte offsets (`basinmerge.io.read_entries`); a tensor, or a span of its rows, is
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
place; the result is bit for bit the in-memory merge of the same files. With `max_shard_mib`
the output is an HF model folder, written shard by shard while merging (`write_hf_stream`).
`observe` shows every block read to a callback (the member guard's `GuardStats.observe`), so
the engine's guard costs no second read.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from basinmerge import io
from basinmerge.errors import CheckpointError, ConfigError, IncompatibleModelsError
from basinmerge.io import (  # noqa: F401 - read_header, read_entries, Entry: their old home
    META_KEY,
    Entry,
    atomic_path,
    read_entries,
    read_header,
)
from basinmerge.merge._common import Observer, merged_items
from basinmerge.merge.registry import all_methods, get_method
from basinmerge.state import all_finite, bad_value_kind, check_compatible

DTYPES = io.ST_DTYPES
DTYPE_NAMES = io.ST_DTYPE_NAMES
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


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


def write_hf_stream(folder: str | os.PathLike,
                    specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                    items: Iterable[tuple[str, torch.Tensor]],
                    metadata: dict[str, str] | None = None,
                    max_shard_bytes: int | None = None) -> list[Path]:
    """Write streamed tensors into the HF model folder `folder` (the caller's temporary folder,
    e.g. from `basinmerge.io.hf_output`, renamed into place when all is written) as they come:
    ``model.safetensors``, or, past `max_shard_bytes`, shards (`basinmerge.io.shard_plan`,
    HF's names) and ``model.safetensors.index.json``. Each shard is written with
    `write_safetensors_stream` while the merge runs; only one block is held at a time. Returns
    the files written."""
    folder = Path(folder)
    sizes = [(k, math.prod(shape) * torch.empty((), dtype=dt).element_size()) for k, dt, shape in specs]
    plan = io.shard_plan(sizes, max_shard_bytes) if max_shard_bytes is not None else [[k for k, _ in sizes]]
    if len(plan) == 1:
        return [write_safetensors_stream(folder / io.HF_SAFETENSORS, specs, items, metadata)]
    by_key = {spec[0]: spec for spec in specs}
    stream = iter(items)
    pending: list[tuple[str, torch.Tensor]] = []

    def shard_items(keys: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        while True:
            if not pending:
                nxt = next(stream, None)
                if nxt is None:
                    return
                pending.append(nxt)
            if pending[0][0] not in keys:
                return
            yield pending.pop()

    files, weight_map = [], {}
    for i, keys in enumerate(plan, 1):
        name = io.shard_name(i, len(plan))
        files.append(write_safetensors_stream(folder / name, [by_key[k] for k in keys],
                                              shard_items(set(keys)), metadata))
        weight_map.update({k: name for k in keys})
    if pending or next(stream, None) is not None:
        raise CheckpointError(f"{folder}: the stream holds tensors beyond the header")
    return [*files, io.write_hf_index(folder, weight_map, sum(n for _, n in sizes))]


def stream_merge(paths: Sequence[str | os.PathLike], method: str, out: str | os.PathLike, *,
                 base: str | os.PathLike | None = None, meta: dict | None = None,
                 block_mib: float = 1.0, device: str | torch.device | None = None,
                 observe: Observer | None = None, max_shard_mib: float | None = None,
                 **options: Any) -> Path:
    """Merge safetensors files with a data-free method, streaming, into `out` (atomically).

    `block_mib`: the most MiB of one tensor read from each model at a time by a
    coordinate-wise method. `device`: where the kernels run (``"cuda"``: blocks are copied
    there and the results back; the output is the same). The output's metadata is the first
    model's (so `basinmerge.io.load` rebuilds it) plus a ``merge`` record (method, options,
    inputs) and anything in `meta`. `observe(key, rows, tensors)` is shown every float block
    of the members as it is read (e.g. the member guard's `GuardStats.observe`).

    `max_shard_mib`: write an HF model folder at `out` instead of one file: the base's (else
    the first model's) config and tokenizer files, and the weights as ``model.safetensors`` or,
    past that many MiB, shards with their index, written while merging into a temporary folder
    renamed onto `out` at the end (an existing non-empty `out` is refused)."""
    if not block_mib > 0:
        raise ConfigError(f"block_mib must be positive, got {block_mib}")
    shard_bytes = io.max_shard_bytes(max_shard_mib) if max_shard_mib is not None else None
    m = get_method(method)
    if not m.streams:
        raise ConfigError(f"method '{method}' cannot stream; streaming methods: {', '.join(streamable())}")
    options = m.check(options, has_base=base is not None, num_models=len(paths))
    with FileSource(paths, base if m.needs_base else None, device=device) as source:
        if shard_bytes is None:
            return merge_source(source, method, out, options, block_mib=block_mib, meta=meta,
                                observe=observe)
        like = Path(base) if base is not None else Path(paths[0])
        with io.hf_output(out, like, inputs=[Path(p) for p in paths]) as tmp:
            merge_source(source, method, tmp, options, block_mib=block_mib, meta=meta,
                         observe=observe, max_shard_bytes=shard_bytes)
        return Path(out)


def merge_source(source: FileSource, method: str, out: str | os.PathLike,
                 options: dict[str, Any], *, block_mib: float = 1.0, meta: dict | None = None,
                 observe: Observer | None = None, max_shard_bytes: int | None = None,
                 inputs: Sequence[str] | None = None) -> Path:
    """The work of `stream_merge` over an open `source` with options already checked
    (`MergeMethod.check`): into the file `out` (atomically), or with `max_shard_bytes` into
    the (temporary, caller-owned) HF folder `out` (`write_hf_stream`). `inputs`: the names
    the merge record gives the inputs (default: the source's)."""
    block_bytes = max(1, int(block_mib * 2**20))
    m = get_method(method)
    make_kernel = m.kernel
    assert make_kernel is not None  # m.streams holds exactly when the method has a kernel
    kernel_opts = dict(options)
    if "block_bytes" in inspect.signature(make_kernel).parameters:
        kernel_opts["block_bytes"] = block_bytes
    kernel = make_kernel(source, **kernel_opts)
    record = {"method": method, "options": options,
              "inputs": list(inputs) if inputs is not None else source.names,
              "base": str(source.base_path) if source.base_path is not None else None,
              "streamed": True}
    full_meta = {**source.meta, **(meta or {}), "merge": record}
    specs = [(k, DTYPES[dt], shape) for k, (dt, shape) in source.headers[0].items()]
    items = merged_items(source, kernel, block_bytes, observe)
    header = {"format": "pt", META_KEY: json.dumps(full_meta, default=str)}
    if max_shard_bytes is not None:
        write_hf_stream(out, specs, items, header, max_shard_bytes)
        return Path(out)
    return write_safetensors_stream(out, specs, items, header)
