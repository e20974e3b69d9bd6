"""Streaming merge of safetensors checkpoints: tensor by tensor, memory-mapped.

`stream_merge(paths, method, out, base=...)` runs a data-free method (every method registered
with a per-key kernel: `streamable()`) over files without loading whole models: for each key
it opens every file with `basinmerge.io.StateReader`, takes that one tensor (memory-mapped),
merges it with the very kernel the in-memory function uses, writes the result straight into
the output file and lets go of the inputs. Files are reopened per key on purpose: the pages a
memory-mapped file has touched stay resident (and count in the process's RSS) as long as the
file is open, so one long-lived reader per model would end up holding every model.

Coordinate-wise kernels (average, weighted, median, trimmed mean, task arithmetic, TIES with
the global per-model threshold) are fed row blocks of at most `block_mib` MiB per model, read
with safetensors' slicing, so the working set is a few times K blocks whatever the tensor
sizes; TIES's global thresholds are found by radix selection over the same blocks (see
`basinmerge.merge.task`), without a model-sized buffer. Per-tensor kernels (DARE, per-tensor
TIES trimming, DELLA, Breadcrumbs, Model Stock, SLERP: their masks, thresholds, norms or angles
are per tensor) get whole tensors, so their peak is a few times K times the largest tensor. The output is written incrementally in the safetensors format to a
temporary file and renamed into place; the result is bit for bit the in-memory merge of the
same files.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from basinmerge import io
from basinmerge.errors import CheckpointError, ConfigError, IncompatibleModelsError
from basinmerge.io import META_KEY, StateReader, atomic_path, read_header  # noqa: F401 - read_header: its old home
from basinmerge.merge._common import merged_items
from basinmerge.merge.registry import all_methods, get_method
from basinmerge.state import check_compatible

# safetensors dtype names
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class _Spec:
    """A tensor's dtype and shape from a header, for `basinmerge.state.check_compatible`."""

    def __init__(self, dtype: str, shape: tuple[int, ...]):
        self.dtype, self.shape = dtype, shape


class FileSource:
    """K safetensors checkpoints (and an optional base) as a `TensorSource`, read one key at a
    time. A checkpoint is a safetensors file or an HF model folder, single file or sharded
    (`basinmerge.io.tensor_index` says which file holds each key).

    Every tensor is checked for NaN/Inf the first time it is read."""

    def __init__(self, paths: Sequence[str | os.PathLike], base: str | os.PathLike | None = None):
        self.paths = [Path(p) for p in paths]
        self.base_path = Path(base) if base is not None else None
        self.names = [str(p) for p in self.paths]
        self.indexes = [io.tensor_index(p) for p in self.paths]
        self.base_index = io.tensor_index(self.base_path) if self.base_path is not None else None
        self.headers = [{k: (dt, shape) for k, (_, dt, shape) in ix.items()} for ix in self.indexes]
        base_header = (None if self.base_index is None else
                       {k: (dt, shape) for k, (_, dt, shape) in self.base_index.items()})
        self._check(base_header)
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

    def _read(self, idx: int, index: dict, name: str, key: str, rows: slice | None) -> torch.Tensor:
        with StateReader(index[key][0]) as r:
            t = r.get(key, rows)
        part = (idx, key, None if rows is None else rows.start)
        if part not in self._checked:
            if t.is_floating_point() and not torch.isfinite(t).all():
                bad = "NaN" if torch.isnan(t).any() else "Inf"
                raise IncompatibleModelsError(f"{name}: key '{key}' contains {bad} values")
            self._checked.add(part)
        return t

    def model_tensor(self, k: int, key: str, rows: slice | None = None) -> torch.Tensor:
        return self._read(k, self.indexes[k], self.names[k], key, rows)

    def base_tensor(self, key: str, rows: slice | None = None) -> torch.Tensor | None:
        if self.base_index is None:
            return None
        return self._read(-1, self.base_index, f"base {self.base_path}", key, rows)


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
        want, rows_left = None, 0
        for key, t in items:
            if rows_left == 0:  # a new key starts
                want = next(expected, None)
                if want is None or want[0] != key:
                    raise CheckpointError(f"{path}: streamed tensor '{key}' does not match the header")
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
                 block_mib: float = 1.0, **options: Any) -> Path:
    """Merge safetensors files with a data-free method, streaming, into `out` (atomically).

    `block_mib`: the most MiB of one tensor read from each model at a time by a
    coordinate-wise method. The output's metadata is the first model's (so
    `basinmerge.io.load` rebuilds it) plus a ``merge`` record (method, options, inputs) and
    anything in `meta`."""
    if not block_mib > 0:
        raise ConfigError(f"block_mib must be positive, got {block_mib}")
    block_bytes = max(1, int(block_mib * 2**20))
    m = get_method(method)
    if not m.streams:
        raise ConfigError(f"method '{method}' cannot stream; streaming methods: {', '.join(streamable())}")
    options = m.check(options, has_base=base is not None, num_models=len(paths))
    needs_base = m.needs_base
    source = FileSource(paths, base if needs_base else None)
    kernel_opts = dict(options)
    if "block_bytes" in inspect.signature(m.kernel).parameters:
        kernel_opts["block_bytes"] = block_bytes
    kernel = m.kernel(source, **kernel_opts)
    record = {"method": method, "options": options, "inputs": source.names,
              "base": str(base) if needs_base else None, "streamed": True}
    full_meta = {**source.meta, **(meta or {}), "merge": record}
    specs = [(k, DTYPES[dt], shape) for k, (dt, shape) in source.headers[0].items()]
    return write_safetensors_stream(out, specs, merged_items(source, kernel, block_bytes),
                                    {"format": "pt", META_KEY: json.dumps(full_meta, default=str)})
