"""Checkpoints and output files. The only module of the core that touches the file system.

- `save(model, path, meta)`: safetensors with JSON metadata (architecture config, dataset,
  training config, metrics, library version); `load(path)` rebuilds the model with no other
  input and returns ``(model, meta)``.
- `save_state` / `load_state`: the same for a bare state_dict.
- `StateReader`: a memory-mapped, tensor-by-tensor reader for streaming merges.
- Checkpoints from anywhere (see "Formats" below): `checkpoint_format`, `load_state`,
  `read_meta`, `tensor_index`, `load_model(path, like=...)` and `save_like(state, out, like)`.
- `safetensors_header`: the one safetensors header parser (cached per file); `read_header`,
  `read_entries` and every reader here use it.
- HF shards: `shard_plan`, `shard_name`, `write_hf_index`, `hf_weight_files` (also used by the
  streaming writer, `basinmerge.merge.stream.write_hf_stream`).
- `atomic_path`, `write_json`, `write_text`, `save_figure`: every write goes to a temporary file
  in the target folder and is renamed into place, so no half-written output is ever left.

A ``.pt``/``.pth``/``.bin`` file is read with ``torch.load(weights_only=True)``: no pickled code
runs.

Formats (`checkpoint_format`):

- ``"basinmerge"``: a safetensors file whose metadata (JSON under the ``basinmerge`` header key)
  names its architecture (``model``); `load_model` rebuilds it with no other input.
- ``"hf"``: a Hugging Face model folder (``save_pretrained``): ``config.json`` and
  ``model.safetensors``, or shards listed in ``model.safetensors.index.json``, or
  ``pytorch_model.bin`` (single or sharded; read with ``weights_only=True``). `load_model` loads
  the class named in ``config.architectures`` with its ``from_pretrained`` (after our own checks
  of the files; `transformers` is imported only then).
- ``"safetensors"``: any other safetensors file (a bare state_dict; our metadata, if present,
  is still read).
- ``"pt"``: a ``.pt``/``.pth``/``.bin`` file holding a state_dict, or ``{"state_dict", "meta"}``.

The ``meta`` returned with the tensors is the file's own metadata (the project's JSON, ``{}``
when there is none); for an HF folder it is that plus ``format: "hf"`` and ``hf_config`` (the
parsed ``config.json``). Keys in `FORMAT_KEYS` describe the input and are never written back.

Tied weights: HF files store a tied tensor once (GPT-2's ``lm_head.weight`` is
``transformer.wte.weight``). `load_state` returns the stored tensors only; `load_model`
rebuilds the model (whose constructor ties them) and fills a missing tied key from its partner;
`save_like` writes each shared tensor once again.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from basinmerge.errors import CheckpointError, ConfigError
from basinmerge.models import build_from_config

META_KEY = "basinmerge"
# Checkpoints written before the rename keep their metadata under the old name; read them too.
LEGACY_META_KEYS = ("mergescope",)
PT_SUFFIXES = (".pt", ".pth", ".bin")
FORMATS = ("basinmerge", "hf", "safetensors", "pt")
# Keys of `meta` that describe the input's format: read, never written into an output.
FORMAT_KEYS = ("format", "hf_config")
HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_BIN = "pytorch_model.bin"
HF_BIN_INDEX = "pytorch_model.bin.index.json"
# Files of an HF folder that hold weights (not copied into an output folder).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
DEFAULT_MAX_SHARD_MIB = 4096.0


# --------------------------------------------------------------------------- atomic writes


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error
    it is removed (an existing `path` is then left as it was). Parent folders are created.

    The result gets mode 0o666 minus the umask, like any ordinary output file (``mkstemp``
    and safetensors' writer would leave every output private, mode 0o600)."""
    path = Path(path)
    suffix = suffix or path.suffix or ".tmp"
    for _ in range(100):
        tmp_path = path.parent / f".{path.name}.{secrets.token_hex(6)}{suffix}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            if not path.parent.is_dir():
                raise ConfigError(f"{path}: cannot be created, a file is in the way") from None
            continue
        except OSError as e:  # name the output, not the temporary file beside it
            raise ConfigError(f"{path}: cannot be written ({e.strerror or e})") from e
    else:  # pragma: no cover - 100 collisions of 48 random bits
        raise FileExistsError(f"{path}: could not create a temporary file beside it")
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


RUN_MARKERS = ("result.json", "run.json", "report.md")


def check_output(path: str | os.PathLike, *, folder: bool = False,
                 suffixes: tuple[str, ...] = (), overwrite: bool = True,
                 overwrite_hint: str = "choose another or allow overwriting it") -> Path:
    """Check an output path before any work, creating nothing: one `ConfigError` naming the
    path if it is empty, has the wrong extension (`suffixes`, for a file), is a folder where a
    file is wanted (or the reverse), lies under a file, or its nearest existing folder is not
    writable (tried with a temporary file, removed at once). With ``overwrite=False`` an
    existing file, or a folder holding an earlier run (`RUN_MARKERS`), is
    refused too, with `overwrite_hint` (the caller's words for how to allow it).

    `atomic_path` later creates the missing parents and writes; this only makes sure that
    will work, so a long run never fails at its very end."""
    raw = os.fspath(path)
    p = Path(raw)
    what = "output folder" if folder else "output file"
    if not raw.strip() or (not folder and raw == "."):  # a CLI's Path("") arrives as "."
        raise ConfigError(f"the {what} path is empty")
    if p.exists():
        if folder and not p.is_dir():
            raise ConfigError(f"{p}: is a file; the {what} must be a folder")
        if not folder and p.is_dir():
            raise ConfigError(f"{p}: is a folder; the {what} must be a file")
    if not folder and suffixes and p.suffix.lower() not in suffixes:
        raise ConfigError(f"{p}: the {what} must end in {' or '.join(suffixes)}")
    if p.exists():
        if not overwrite:
            marker = next((m for m in RUN_MARKERS if (p / m).is_file()), None) if folder else p.name
            if marker is not None:
                held = f"holds an earlier run ({marker})" if folder else "exists"
                raise ConfigError(f"{p}: {held}; {overwrite_hint}")
    anc = p if folder and p.is_dir() else p.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ConfigError(f"{p}: '{anc}' is a file, so the {what} cannot be created under it")
    try:
        fd, probe = tempfile.mkstemp(prefix=".basinmerge-probe-", dir=anc)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{p}: cannot write in '{anc}' ({e.strerror or e})") from e
    return p


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only be
    read by setting it, which races with other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: file not found") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from e


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


# --------------------------------------------------------------------------- checkpoints


def _library_version() -> str:
    from basinmerge import __version__

    return __version__


def save_state(state: Mapping[str, torch.Tensor], path: str | os.PathLike,
               meta: Mapping[str, Any] | None = None) -> Path:
    """Write a state_dict and JSON metadata as safetensors, atomically. Tied tensors (one
    storage under several names, as in GPT-2's state_dict or a re-tied merge) are written once
    (safetensors refuses shared memory); loading them into the model ties them again."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in _unshared(state).items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=header_metadata(meta))
    return path


def header_metadata(meta: Mapping[str, Any] | None) -> dict[str, str]:
    """The safetensors header metadata that records `meta` (less `FORMAT_KEYS`, plus the library
    version); ``format: pt`` is what `transformers` expects of a PyTorch safetensors file."""
    meta = {k: v for k, v in dict(meta or {}).items() if k not in FORMAT_KEYS}
    meta.setdefault("basinmerge_version", _library_version())
    return {"format": "pt", META_KEY: json.dumps(meta, default=_json_default)}


def save(model: nn.Module, path: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> Path:
    """Save a model built by `basinmerge.models.build` with its architecture config and `meta`
    (dataset, training config, metrics, ...)."""
    config = getattr(model, "config", None)
    if config is None or not isinstance(config, Mapping):
        raise CheckpointError(f"{path}: the model has no 'config' attribute; build it with "
                              "basinmerge.models.build (or use save_state for a bare state_dict, "
                              "save_like for another format)")
    full = {**dict(meta or {}), "model": config}
    return save_state(model.state_dict(), path, full)


# --------------------------------------------------------------------------- formats


# safetensors dtype names
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
ST_DTYPE_NAMES = {v: k for k, v in ST_DTYPES.items()}


class Entry(NamedTuple):
    """One tensor of a safetensors file: dtype name, shape, and its bytes' absolute offsets."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class SafetensorsHeader(NamedTuple):
    """A safetensors file's header: its tensors (`Entry`, in the file's data order) and its
    ``__metadata__`` strings."""

    entries: dict[str, Entry]
    metadata: dict[str, str]


_HEADERS: dict[tuple[str, int, int, int, int], SafetensorsHeader] = {}


def safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """The header of a safetensors file, read without any tensor: the one parser every reader
    uses. Offsets that do not fit a tensor's dtype and shape, or run past the end of the file (a
    truncated download), are refused naming the key. Cached per file (path, inode, size,
    modification and change times), so checking, streaming and reading metadata parse it
    once; treat the result as read-only."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: checkpoint file not found") from e
    except OSError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    ident = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    hit = _HEADERS.get(ident)
    if hit is None:
        hit = _parse_safetensors_header(path, st.st_size)
        if len(_HEADERS) > 256:
            _HEADERS.clear()
        _HEADERS[ident] = hit
    return hit


def _parse_safetensors_header(path: Path, size: int) -> SafetensorsHeader:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: checkpoint file not found") from e
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: malformed safetensors header")
    metadata = header.pop("__metadata__", None) or {}
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
        if ent.dtype in ST_DTYPES:
            want = math.prod(ent.shape) * ST_DTYPES[ent.dtype].itemsize
            if ent.end - ent.start != want:
                raise CheckpointError(f"{path}: key '{k}' has {ent.end - ent.start} bytes, its "
                                      f"dtype and shape need {want}")
        if ent.end > size:
            raise CheckpointError(f"{path}: key '{k}' runs past the end of the file (truncated?)")
    return SafetensorsHeader(entries, dict(metadata))


def read_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Key -> (dtype name, shape) from a safetensors header, in the file's data order, without
    reading any tensor."""
    return {k: (e.dtype, e.shape) for k, e in safetensors_header(path).entries.items()}


def read_entries(path: str | os.PathLike) -> dict[str, Entry]:
    """Key -> `Entry` (dtype, shape, byte offsets) from a safetensors header, in data order."""
    return dict(safetensors_header(path).entries)


def _hf_weights(folder: Path) -> Path:
    """The weights file (or index) of an HF model folder."""
    for name in (HF_SAFETENSORS_INDEX, HF_SAFETENSORS, HF_BIN_INDEX, HF_BIN):
        if (folder / name).is_file():
            return folder / name
    loose = sorted(folder.glob("*.safetensors"))
    if len(loose) == 1:  # a folder holding one bare safetensors file under another name
        return loose[0]
    raise CheckpointError(f"{folder}: a folder with no model weights (looked for {HF_SAFETENSORS}, "
                          f"{HF_SAFETENSORS_INDEX}, {HF_BIN}, {HF_BIN_INDEX})")


def _resolve(path: str | os.PathLike) -> Path:
    """`path` as given, after checking it exists."""
    path = Path(path)
    if path.is_dir():
        _hf_weights(path)
    elif not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    return path


def checkpoint_format(path: str | os.PathLike) -> str:
    """What `path` is: ``"basinmerge"``, ``"hf"``, ``"safetensors"`` or ``"pt"`` (module
    docstring). Reads only a header."""
    path = _resolve(path)
    if path.is_dir():
        return "hf"
    if path.suffix in PT_SUFFIXES:
        return "pt"
    raw = _header_meta(safetensors_header(path).metadata)
    return "basinmerge" if "model" in _parse_meta(path, raw) else "safetensors"


def is_streamable(path: str | os.PathLike) -> bool:
    """Whether `path` can be read tensor by tensor (safetensors: a file or an HF folder)."""
    path = _resolve(path)
    return _weight_files(path)[0] == "safetensors"


def _read_index(index: Path) -> dict[str, Path]:
    """key -> shard file from an HF ``*.index.json``, every shard checked to exist."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({e})") from e
    out: dict[str, Path] = {}
    for key, shard in weight_map.items():
        file = index.parent / str(shard)
        if not file.is_file():
            raise CheckpointError(f"{index}: names shard '{shard}' (for key '{key}'), which is "
                                  "missing")
        out[key] = file
    return out


def _weight_files(path: Path) -> tuple[str, dict[str, Path] | Path]:
    """("safetensors" | "pt", the file or the key -> shard map) of a checkpoint."""
    file = _hf_weights(path) if path.is_dir() else path
    kind = "pt" if file.name.endswith((".bin", ".bin.index.json", ".pt", ".pth")) else "safetensors"
    if file.name.endswith(".index.json"):
        return kind, _read_index(file)
    return kind, file


def tensor_index(path: str | os.PathLike) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """key -> (file, safetensors dtype name, shape) over one safetensors file or an HF folder
    (single file or sharded), from the headers alone; for streaming."""
    path = _resolve(path)
    kind, files = _weight_files(path)
    if kind != "safetensors":
        raise CheckpointError(f"{path}: reading tensor by tensor needs safetensors files, this "
                              "checkpoint holds pickled (.bin/.pt) weights")
    if isinstance(files, Path):
        return {k: (files, dt, shape) for k, (dt, shape) in read_header(files).items()}
    headers = {f: read_header(f) for f in dict.fromkeys(files.values())}
    out: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for file, header in headers.items():  # shard by shard, each in data order
        for k, (dt, shape) in header.items():
            if files.get(k) == file:
                out[k] = (file, dt, shape)
    missing = [k for k in files if k not in out]
    if missing:
        raise CheckpointError(f"{path}: the index maps key '{missing[0]}' to "
                              f"{files[missing[0]].name}, which does not hold it")
    return out


def _header_meta(header: Mapping[str, str] | None) -> str:
    """The raw JSON metadata from a safetensors header: our key, else a legacy one."""
    header = header or {}
    for key in (META_KEY, *LEGACY_META_KEYS):
        if key in header:
            return header[key]
    return "{}"


def _parse_meta(path: Path, raw: str) -> dict:
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata is not valid JSON ({e.msg})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: metadata must be a JSON object")
    for old in LEGACY_META_KEYS:
        if f"{old}_version" in meta:
            meta.setdefault(f"{META_KEY}_version", meta.pop(f"{old}_version"))
    return meta


def _hf_meta(folder: Path, file_meta: dict) -> dict:
    config = None
    if (folder / HF_CONFIG).is_file():
        try:
            config = json.loads((folder / HF_CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{folder / HF_CONFIG}: not valid JSON ({e})") from e
    return {**file_meta, "format": "hf", "hf_config": config}


def read_meta(path: str | os.PathLike) -> dict:
    """The metadata of a checkpoint (see the module docstring), without reading its tensors
    (a pickled file is read whole)."""
    path = _resolve(path)
    kind, files = _weight_files(path)
    if kind == "pt":
        meta = _load_pt(files if isinstance(files, Path) else next(iter(files.values())))[1]
    else:
        first = files if isinstance(files, Path) else next(iter(files.values()), None)
        meta = {} if first is None else _safetensors_meta(first)
    return _hf_meta(path, meta) if path.is_dir() else meta


def _safetensors_meta(path: Path) -> dict:
    return _parse_meta(path, _header_meta(safetensors_header(path).metadata))


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    return path


def _load_pt(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or unsafe file
        raise CheckpointError(f"{path}: cannot read with torch.load(weights_only=True): "
                              f"{str(e).splitlines()[0]}") from e
    meta: dict = {}
    if isinstance(obj, Mapping) and "state_dict" in obj:
        meta = dict(obj.get("meta", {}) or {})
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state_dict (a mapping of names to tensors)")
    return dict(obj), meta


def _load_safetensors(path: Path, keys: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = _parse_meta(path, _header_meta(f.metadata()))
            state = {}
            for k in (f.keys() if keys is None else keys):
                try:
                    state[k] = f.get_tensor(k)
                except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                    raise CheckpointError(f"{path}: key '{k}' cannot be read ({e})") from e
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt "
                              f"({e})") from e
    return state, meta


def load_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint's tensors and metadata, any format (no model is built)."""
    path = _resolve(path)
    kind, files = _weight_files(path)
    read = _load_pt if kind == "pt" else _load_safetensors
    if isinstance(files, Path):
        state, meta = read(files)
    else:  # sharded: each shard once, its keys in the index
        state, meta = {}, {}
        for i, shard in enumerate(dict.fromkeys(files.values())):
            part, shard_meta = read(shard)
            wanted = [k for k, f in files.items() if f == shard]
            absent = [k for k in wanted if k not in part]
            if absent:
                raise CheckpointError(f"{path}: the index maps key '{absent[0]}' to {shard.name}, "
                                      "which does not hold it")
            state.update({k: part[k] for k in wanted})
            meta = shard_meta if i == 0 else meta
    return state, (_hf_meta(path, meta) if path.is_dir() else meta)


def _tie_groups(model: nn.Module) -> dict[str, list[str]]:
    """key -> the other state_dict keys that share its storage (tied weights)."""
    by_ptr: dict[tuple, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if v.numel():
            by_ptr.setdefault((v.untyped_storage().data_ptr(), v.storage_offset(),
                               tuple(v.shape), v.stride()), []).append(k)
    return {k: [o for o in ks if o != k] for ks in by_ptr.values() if len(ks) > 1 for k in ks}


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> nn.Module:
    """Load `state` into `model`, raising one clear error naming the first bad key. A key the
    model ties to another (one tensor under two names) may be absent: it is filled from its
    partner, so the tie is kept."""
    expected = model.state_dict()
    ties = _tie_groups(model)
    state = dict(state)
    for k, v in expected.items():
        if k not in state:
            partner = next((o for o in ties.get(k, ()) if o in state), None)
            if partner is None:
                raise CheckpointError(f"{source}: key '{k}' is missing (the architecture needs it)")
            state[k] = state[partner]
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: key '{k}' has shape {tuple(state[k].shape)}, the "
                                  f"architecture expects {tuple(v.shape)}")
    extra = [k for k in state if k not in expected]
    if extra:
        raise CheckpointError(f"{source}: key '{extra[0]}' is not part of the architecture"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    model.load_state_dict({k: state[k].to(expected[k].dtype) for k in expected})
    return model


def _no_architecture(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: no architecture to build a model from (no 'model' in its metadata, no HF "
        "config.json); give an HF model folder with config.json, a checkpoint written by "
        "basinmerge, or like= another checkpoint of the same architecture")


def _hf_class(path: Path, config: Mapping[str, Any]) -> tuple[Any, Any]:
    """(model class, config object) for an HF config: ``architectures[0]``, else AutoModel."""
    try:
        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError as e:
        raise CheckpointError(f"{path}: building a Hugging Face model needs the 'transformers' "
                              "package (pip install 'basinmerge[hf]')") from e
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"{path / HF_CONFIG}: model_type {model_type!r} is not one "
                              f"transformers {transformers.__version__} knows")
    try:
        cfg = CONFIG_MAPPING[model_type].from_dict(dict(config))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / HF_CONFIG}: transformers cannot read it ({e})") from e
    archs = list(getattr(cfg, "architectures", None) or [])
    cls = getattr(transformers, archs[0], None) if archs else transformers.AutoModel
    if cls is None:
        raise CheckpointError(f"{path / HF_CONFIG}: architecture '{archs[0]}' is not in "
                              f"transformers {transformers.__version__}")
    return cls, cfg


def _build_hf(path: Path, config: Mapping[str, Any]) -> nn.Module:
    """The `transformers` model named by an HF config, randomly initialized."""
    cls, cfg = _hf_class(path, config)
    try:
        return cls.from_config(cfg) if hasattr(cls, "from_config") else cls(cfg)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
        raise CheckpointError(f"{path / HF_CONFIG}: cannot build the model ({e})") from e


def _from_pretrained(path: Path, config: Mapping[str, Any]) -> nn.Module:
    """An HF folder loaded by `transformers` itself (no random initialization first, ties and
    non-persistent buffers as it sets them), after our own checks of its files; any key that
    does not fit is one error."""
    cls, cfg = _hf_class(path, config)
    from transformers.utils import logging as hf_logging

    bar, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # its load report: bad keys are our one error below
    try:
        model, info = cls.from_pretrained(str(path), config=cfg, local_files_only=True,
                                          output_loading_info=True, dtype="auto",
                                          ignore_mismatched_sizes=True)  # reported below
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad folder
        raise CheckpointError(f"{path}: transformers cannot load it "
                              f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
                              ) from e
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    for kind, what in (("missing_keys", "is missing (the architecture needs it)"),
                       ("mismatched_keys", "has a shape the architecture does not expect"),
                       ("unexpected_keys", "is not part of the architecture")):
        keys = sorted(info.get(kind) or (), key=str)
        if keys:
            first = keys[0]
            if isinstance(first, tuple) and len(first) == 3:  # (key, stored shape, expected)
                what = f"has shape {tuple(first[1])}, the architecture expects {tuple(first[2])}"
                first = first[0]
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise CheckpointError(f"{path}: key '{first}' {what}{more}")
    return model


def _build(path: Path, meta: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> nn.Module:
    if config is None and meta.get("hf_config") is not None:
        return _build_hf(path, meta["hf_config"])
    arch = dict(config) if config is not None else meta.get("model")
    if arch is None:
        raise _no_architecture(path)
    if not isinstance(arch, Mapping):
        raise CheckpointError(f"{path}: the architecture config ('model' in the metadata) must "
                              f"be a JSON object, found {type(arch).__name__}")
    try:
        return build_from_config(dict(arch))
    except ConfigError as e:
        raise CheckpointError(f"{path}: bad architecture config ({e})") from e


def load_model(path: str | os.PathLike, like: str | os.PathLike | None = None,
               ) -> tuple[nn.Module, dict]:
    """Build the model stored at `path` (any format) in eval mode and return ``(model, meta)``;
    when every stored float tensor has one dtype, the model gets it.

    The architecture comes from the project's metadata, from an HF folder's ``config.json``
    (through `transformers`), or, when `like` is given, from that other checkpoint (of the
    same architecture; only its architecture is used). Anything else raises one error that
    says which of these to give."""
    path = _resolve(path)
    if like is None and path.is_dir():
        meta = read_meta(path)
        if meta.get("hf_config") is not None:
            if _weight_files(path)[0] == "safetensors":
                tensor_index(path)  # every shard there, every key where the index says
            else:
                load_state(path)  # pickled weights: weights_only=True before transformers reads them
            return _from_pretrained(path, meta["hf_config"]).eval(), meta
    state, meta = load_state(path)
    if like is not None:
        like = _resolve(like)
        model = _build(like, read_meta(like))
    else:
        model = _build(path, meta)
    float_dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(float_dtypes) == 1:  # keep the stored precision (a bfloat16 model stays bfloat16)
        model.to(float_dtypes.pop())
    load_into(model, state, source=str(path))
    model.eval()
    return model, meta


def load(path: str | os.PathLike, config: Mapping[str, Any] | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model stored in `path` and return ``(model, meta)``: `load_model`, or with
    `config` (a project architecture config, e.g. for a bare ``.pt`` state_dict) that one."""
    if config is None:
        return load_model(path)
    path = _resolve(path)
    state, meta = load_state(path)
    model = _build(path, meta, config)
    load_into(model, state, source=str(path))
    model.eval()
    return model, meta


# --------------------------------------------------------------------------- writing like the input


def _unshared(state: Mapping[str, torch.Tensor], drop: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """`state` with each tensor stored once: a key whose tensor shares storage with an earlier
    key (a tied weight), or a key in `drop`, is left out (safetensors refuses shared tensors)."""
    drop = set(drop)
    seen: set[tuple] = set()
    out = {}
    for k, v in state.items():
        if k in drop:
            continue
        if v.numel():
            ident = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape),
                     v.stride())
            if ident in seen:
                continue
            seen.add(ident)
        out[k] = v
    return out


def _tied_duplicates(state: Mapping[str, torch.Tensor], stored: set[str]) -> list[str]:
    """Keys of `state` absent from an HF file's `stored` keys whose tensor equals a stored one:
    tied weights (the file keeps one name per tensor)."""
    extra = [k for k in state if k not in stored]
    out = []
    for k in extra:
        v = state[k]
        if any(o in stored and state[o].shape == v.shape and torch.equal(state[o], v)
               for o in state if o != k):
            out.append(k)
    return out


def _check_out_folder(out: Path, force: bool, inputs: Iterable[Path] = ()) -> None:
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder (an HF model is a folder)")
    for p in inputs:
        if out.resolve() == Path(p).resolve():
            raise CheckpointError(f"{out}: the output folder is an input; choose another")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CheckpointError(f"{out}: output folder exists and is not empty; choose another, "
                              "or force the replacement")


@contextmanager
def atomic_folder(out: str | os.PathLike, force: bool = False,
                  inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out`, on error it is
    removed. Refuses an existing non-empty `out` unless `force`, and an `out` among `inputs`."""
    out = Path(out)
    _check_out_folder(out, force, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(6)}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.{secrets.token_hex(6)}.old"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def hf_output(out: str | os.PathLike, like: str | os.PathLike, force: bool = False,
              inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """An HF model folder being written: a temporary folder holding copies of `like`'s
    non-weight files (config.json, tokenizer, generation config, ...); write the weights into
    it and it is renamed onto `out` on success (see `atomic_folder`; `out` may be none of
    `like` and `inputs`)."""
    like = Path(like)
    with atomic_folder(out, force, [like, *map(Path, inputs)]) as tmp:
        if like.is_dir():
            for f in sorted(like.iterdir()):
                if f.is_file() and not f.name.endswith((*_WEIGHT_SUFFIXES, ".index.json")):
                    shutil.copy2(f, tmp / f.name)
        yield tmp


def shard_plan(sizes: Iterable[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """The keys of each shard, in order, for tensors of the given byte `sizes` (``(key,
    bytes)`` in write order): a shard is closed when the next tensor would take it past
    `max_shard_bytes`; a tensor larger than that gets a shard of its own (as `transformers`
    does). Always at least one shard."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, n in sizes:
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards


def shard_name(i: int, n: int) -> str:
    """HF's name of shard `i` (from 1) of `n`: ``model-00001-of-00003.safetensors``."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def max_shard_bytes(max_shard_mib: float) -> int:
    """`max_shard_mib` in bytes, checked."""
    if not max_shard_mib > 0:
        raise ConfigError(f"max_shard_mib must be positive, got {max_shard_mib}")
    return max(1, int(max_shard_mib * 2**20))


def write_hf_index(folder: str | os.PathLike, weight_map: Mapping[str, str], total_size: int) -> Path:
    """Write ``model.safetensors.index.json`` (``metadata.total_size``: the tensors' bytes;
    ``weight_map``: key -> shard file name) into `folder`."""
    path = Path(folder) / HF_SAFETENSORS_INDEX
    index = {"metadata": {"total_size": int(total_size)}, "weight_map": dict(weight_map)}
    path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return path


def hf_weight_files(folder: str | os.PathLike) -> list[Path]:
    """The files of an HF model folder that hold (or index) its weights: ``model.safetensors``,
    or the shards and their index (``pytorch_model.bin`` likewise)."""
    folder = Path(folder)
    kind, files = _weight_files(folder)
    if isinstance(files, Path):
        return [files]
    return [*dict.fromkeys(files.values()), _hf_weights(folder)]


def write_hf_weights(folder: Path, state: Mapping[str, torch.Tensor],
                     meta: Mapping[str, Any] | None = None,
                     max_shard_mib: float = DEFAULT_MAX_SHARD_MIB) -> list[Path]:
    """Write `state` into `folder` as HF does: ``model.safetensors``, or shards of at most
    `max_shard_mib` MiB with ``model.safetensors.index.json``. Returns the files written."""
    limit = max_shard_bytes(max_shard_mib)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    header = header_metadata(meta)
    sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    shards = shard_plan(sizes.items(), limit)
    if len(shards) == 1:
        save_file(tensors, str(folder / HF_SAFETENSORS), metadata=header)
        return [folder / HF_SAFETENSORS]
    files, weight_map = [], {}
    for i, keys in enumerate(shards, 1):
        name = shard_name(i, len(shards))
        save_file({k: tensors[k] for k in keys}, str(folder / name), metadata=header)
        files.append(folder / name)
        weight_map.update({k: name for k in keys})
    return [*files, write_hf_index(folder, weight_map, sum(sizes.values()))]


def save_like(state: Mapping[str, torch.Tensor], out: str | os.PathLike,
              like: str | os.PathLike, meta: Mapping[str, Any] | None = None, *,
              fmt: str | None = None, max_shard_mib: float = DEFAULT_MAX_SHARD_MIB,
              force: bool = False, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Write `state` to `out` in the form of the checkpoint `like` (or in `fmt`), atomically.

    - ``"hf"``: a model folder: `like`'s config and tokenizer files copied, the weights as
      ``model.safetensors`` or shards of at most `max_shard_mib` MiB with their index; tied
      weights stored once. An existing non-empty `out` is refused unless `force`; `out` equal
      to `like` or one of `inputs` always is.
    - ``"basinmerge"``: a safetensors file with `meta` and `like`'s architecture (``model``).
    - ``"safetensors"``: a safetensors file with `meta` (no architecture).
    - ``"pt"``: ``torch.save({"state_dict": ..., "meta": ...})`` (read back by `load_state`).
    `meta` is recorded in every form (safetensors header / the dict's ``meta``)."""
    fmt = output_format(like, fmt)
    out = Path(out)
    if fmt == "hf":
        with hf_output(out, like, force, inputs) as tmp:
            write_like(tmp, state, like, meta, fmt=fmt, max_shard_mib=max_shard_mib)
        return out
    if out.is_dir():
        raise CheckpointError(f"{out}: is a folder; a {fmt} checkpoint is one file")
    with atomic_path(out, suffix=out.suffix or ".safetensors") as tmp:
        write_like(tmp, state, like, meta, fmt=fmt, max_shard_mib=max_shard_mib)
    return out


def output_format(like: str | os.PathLike, fmt: str | None = None) -> str:
    """The form an output takes: `fmt` if given (checked), else the form of `like`."""
    fmt = fmt or checkpoint_format(like)
    if fmt not in FORMATS:
        raise ConfigError(f"unknown checkpoint format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    return fmt


def write_like(target: str | os.PathLike, state: Mapping[str, torch.Tensor],
               like: str | os.PathLike, meta: Mapping[str, Any] | None = None, *,
               fmt: str | None = None, max_shard_mib: float = DEFAULT_MAX_SHARD_MIB) -> Path:
    """The writing half of `save_like`, not atomic: for ``"hf"`` `target` is a folder being
    built (from `hf_output`) that receives the weight files; otherwise the file to write (a
    temporary path from `atomic_path`)."""
    fmt = output_format(like, fmt)
    target = Path(target)
    meta = {k: v for k, v in dict(meta or {}).items() if k not in FORMAT_KEYS}
    if fmt == "hf":
        stored: set[str] = set()
        if Path(like).is_dir() and _weight_files(Path(like))[0] == "safetensors":
            stored = set(tensor_index(like))
        tensors = _unshared(state, _tied_duplicates(state, stored) if stored else ())
        write_hf_weights(target, tensors, meta, max_shard_mib)
        return target
    if fmt == "basinmerge" and "model" not in meta:
        arch = read_meta(like).get("model")
        if arch is None:
            raise ConfigError(f"{target}: the basinmerge format records the architecture, and "
                              f"neither the metadata nor {like} has one; write 'safetensors'")
        meta["model"] = arch
    if fmt == "pt":
        meta.setdefault("basinmerge_version", _library_version())
        torch.save({"state_dict": {k: v.detach().cpu() for k, v in state.items()}, "meta": meta},
                   target)
        return target
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in _unshared(state).items()}
    save_file(tensors, str(target), metadata=header_metadata(meta))
    return target


class StateReader:
    """Read one tensor at a time from a safetensors file, memory-mapped (for streaming merges).

    >>> with StateReader("a.safetensors") as r:
    ...     for key in r.keys(): t = r.get(key)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = _existing(path)
        if self.path.suffix in PT_SUFFIXES:
            raise CheckpointError(f"{self.path}: streaming needs a safetensors file, not a pickle")
        try:
            self._f = safe_open(str(self.path), framework="pt")
            self._ctx = self._f.__enter__()
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({e})") from e
        try:
            self.meta = _parse_meta(self.path, _header_meta(self._ctx.metadata()))
        except CheckpointError:
            self.close()
            raise

    def keys(self) -> list[str]:
        return list(self._ctx.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        try:
            return tuple(self._ctx.get_slice(key).get_shape())
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{self.path}: key '{key}' cannot be read ({e})") from e

    def get(self, key: str, rows: slice | None = None) -> torch.Tensor:
        """The tensor `key`, or only its rows `rows` (a slice along the first axis)."""
        try:
            if rows is None:
                return self._ctx.get_tensor(key)
            return self._ctx.get_slice(key)[rows]
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{self.path}: key '{key}' cannot be read ({e})") from e

    def close(self) -> None:
        self._f.__exit__(None, None, None)

    def __enter__(self) -> StateReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
