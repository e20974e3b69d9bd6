"""Checkpoints and output files. The only module of the core that touches the file system.

- `save(model, path, meta)`: safetensors with JSON metadata (architecture config, dataset,
  training config, metrics, library version); `load(path)` rebuilds the model with no other
  input and returns ``(model, meta)``.
- `save_state` / `load_state`: the same for a bare state_dict.
- `StateReader`: a memory-mapped, tensor-by-tensor reader for streaming merges.
- `atomic_path`, `write_json`, `write_text`, `save_figure`: every write goes to a temporary file
  in the target folder and is renamed into place, so no half-written output is ever left.

A ``.pt``/``.pth`` file is read with ``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
    """Write a state_dict and JSON metadata as safetensors, atomically."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = dict(meta or {})
    meta.setdefault("basinmerge_version", _library_version())
    header = {META_KEY: json.dumps(meta, default=_json_default)}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def save(model: nn.Module, path: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> Path:
    """Save a model built by `basinmerge.models.build` with its architecture config and `meta`
    (dataset, training config, metrics, ...)."""
    config = getattr(model, "config", None)
    if config is None:
        raise CheckpointError(f"{path}: the model has no 'config' attribute; build it with "
                              "basinmerge.models.build (or use save_state for a bare state_dict)")
    full = {**dict(meta or {}), "model": config}
    return save_state(model.state_dict(), path, full)


def read_meta(path: str | os.PathLike) -> dict:
    """The JSON metadata of a checkpoint, without reading its tensors."""
    path = _existing(path)
    if path.suffix in PT_SUFFIXES:
        return _load_pt(path)[1]
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = _header_meta(f.metadata())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    return _parse_meta(path, raw)


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


def load_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint's tensors and metadata (no model is built)."""
    path = _existing(path)
    if path.suffix in PT_SUFFIXES:
        return _load_pt(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = _parse_meta(path, _header_meta(f.metadata()))
            state = {}
            for k in f.keys():
                try:
                    state[k] = f.get_tensor(k)
                except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                    raise CheckpointError(f"{path}: key '{k}' cannot be read ({e})") from e
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt "
                              f"({e})") from e
    return state, meta


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> nn.Module:
    """Load `state` into `model`, raising one clear error naming the first bad key."""
    expected = model.state_dict()
    for k, v in expected.items():
        if k not in state:
            raise CheckpointError(f"{source}: key '{k}' is missing (the architecture needs it)")
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: key '{k}' has shape {tuple(state[k].shape)}, the "
                                  f"architecture expects {tuple(v.shape)}")
    extra = [k for k in state if k not in expected]
    if extra:
        raise CheckpointError(f"{source}: key '{extra[0]}' is not part of the architecture"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    model.load_state_dict({k: state[k].to(expected[k].dtype) for k in expected})
    return model


def load(path: str | os.PathLike, config: Mapping[str, Any] | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model stored in `path` and return ``(model, meta)``.

    The architecture comes from the file's metadata; `config` overrides it (needed for a bare
    ``.pt`` state_dict)."""
    path = Path(path)
    state, meta = load_state(path)
    arch = dict(config) if config is not None else meta.get("model")
    if arch is None:
        raise CheckpointError(f"{path}: no architecture config in the metadata; pass config=...")
    if not isinstance(arch, Mapping):
        raise CheckpointError(f"{path}: the architecture config ('model' in the metadata) must "
                              f"be a JSON object, found {type(arch).__name__}")
    try:
        model = build_from_config(arch)
    except ConfigError as e:
        raise CheckpointError(f"{path}: bad architecture config ({e})") from e
    load_into(model, state, source=str(path))
    model.eval()
    return model, meta


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
