"""Data specs: the one place that turns what a user names as data into data a method takes.

`load(spec)` reads a **data spec**, a string:

- ``NAME[:split]``: a project dataset (`basinmerge.data.names()`: ``digits``, ``mnist1d``,
  ``fashion-mnist``, ...), split ``train`` (default) or ``test``;
- ``PATH[:split]``: a Hugging Face ``datasets`` folder written by ``save_to_disk`` (a
  ``Dataset``, or a ``DatasetDict`` whose split is chosen: default ``train``), read with
  ``datasets.load_from_disk`` (the ``hf`` extra). Columns map to the model's inputs:
  ``input_ids``, ``attention_mask``, ``token_type_ids``, ``pixel_values`` (also ``image`` /
  ``img``), ``x``; ``labels`` (also ``label``). Token-id columns of different lengths are
  padded (and cut at `seq_len`) with an attention mask; a text column (``text``,
  ``sentence``, ``content``) is tokenized when there are no token ids;
- ``FILE.safetensors`` / ``FILE.pt``: named tensors (``x`` and ``y``, or ``input_ids``,
  ``attention_mask``, ``pixel_values``, ... and ``labels``); ``.pt`` read with
  ``weights_only=True``;
- ``FILE.txt``, or a folder of ``.txt`` files: text for a causal LM, tokenized as one stream
  and cut into rows of `seq_len` tokens (``input_ids`` and ``attention_mask``; the labels are
  the next tokens).

Text is tokenized with `tokenizer`: ``"bytes"`` (UTF-8 bytes as ids 0..255, for tiny models
without tokenizer files), a folder holding tokenizer files (``transformers.AutoTokenizer``,
offline), or by default the tokenizer of `model` (an HF model folder). `n` keeps a random
`n` examples (seeded by `seed`, kept in order); `root` is where project datasets live.

`resolve(data)` does the same for the Python API and passes through every in-memory form the
adapter takes (a project `Dataset`, ``(x, y)``, a dict batch, a ``torch.utils.data.DataLoader``),
mapping an in-memory ``datasets.Dataset`` by the column rules above. Feeding batches to a
model is `basinmerge.adapter`'s job, not this module's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from basinmerge import data as data_mod
from basinmerge.adapter import LABEL_KEYS, Data
from basinmerge.errors import CheckpointError, ConfigError, DataError

TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth")
TEXT_SUFFIX = ".txt"
TEXT_COLUMNS = ("text", "sentence", "content")
TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
COLUMN_ALIASES = {"label": "labels", "image": "pixel_values", "img": "pixel_values"}
DEFAULT_SEQ_LEN = 128
BYTES = "bytes"

Tokenizer = Callable[[str], list[int]]


@dataclass(frozen=True)
class Spec:
    """A parsed data spec: `kind` (``dataset``, ``hf``, ``tensors`` or ``text``), the dataset
    name or path `target`, and the `split` named in it (None: not named)."""

    text: str
    kind: str
    target: str
    split: str | None = None


def _kind_of(path: Path) -> str | None:
    if path.is_dir():
        if any((path / f).is_file() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
            return "hf"
        if any(path.glob(f"*{TEXT_SUFFIX}")):
            return "text"
        return None
    if path.is_file():
        if path.suffix in TENSOR_SUFFIXES:
            return "tensors"
        if path.suffix == TEXT_SUFFIX:
            return "text"
    return None


def parse(spec: str | os.PathLike) -> Spec:
    """What a data spec names; one `DataError` for a spec that names nothing readable."""
    text = str(spec)
    if not text:
        raise DataError("data spec is empty; give a dataset name or a path")
    candidates: list[tuple[str, str | None]] = [(text, None)]
    if ":" in text:
        left, named = text.rsplit(":", 1)
        candidates.append((left, named or None))
    for target, split in candidates:
        if target in data_mod.names():
            return Spec(text, "dataset", target, split)
        path = Path(target)
        if path.exists():
            kind = _kind_of(path)
            if kind is None:
                raise DataError(f"data '{text}': {path} is not a data file (a .safetensors, .pt "
                                "or .txt file, a folder of .txt files, or a datasets "
                                "save_to_disk folder)")
            if split is not None and kind != "hf":
                raise DataError(f"data '{text}': a split applies to project datasets and "
                                f"datasets folders, not to {path.name}")
            return Spec(text, kind, target, split)
    raise DataError(f"data '{text}': no such file or folder, and not a dataset name (datasets: "
                    f"{', '.join(data_mod.names())})")


# --------------------------------------------------------------------------- tokenizers


def _byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def tokenizer_for(tokenizer: str | None, model: str | os.PathLike | None = None
                  ) -> tuple[Tokenizer, int]:
    """(text -> token ids, the padding id) for `tokenizer` (``"bytes"``, or a folder with
    tokenizer files), or by default the tokenizer files in the HF model folder `model`."""
    if tokenizer == BYTES:
        return _byte_ids, 0
    folder = tokenizer if tokenizer is not None else (
        str(model) if model is not None and Path(model).is_dir() else None)
    if folder is None:
        raise ConfigError("text data needs a tokenizer: give tokenizer 'bytes' "
                          "or a folder with tokenizer files (by default the model's HF folder)")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except ImportError as e:
        raise ConfigError("reading a tokenizer needs transformers (the hf extra), or pass "
                          "tokenizer 'bytes'") from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"tokenizer {folder}: no usable tokenizer files ({str(e).splitlines()[0]}); "
                          "give tokenizer 'bytes' or a folder with tokenizer files") from e
    tok.model_max_length = 1 << 60  # the stream is cut into rows here, not by the tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return (lambda text: list(tok(text, add_special_tokens=False)["input_ids"])), int(pad or 0)


# --------------------------------------------------------------------------- readers


def subset_index(total: int, n: int | None, seed: int | None) -> torch.Tensor | None:
    """Rows to keep: None for all; the first `n` (seed None) or a random `n` in order."""
    if n is None or n >= total:
        return None
    if n < 1:
        raise ConfigError(f"the number of examples must be >= 1, got {n}")
    if seed is None:
        return torch.arange(n)
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(total, generator=g)[:n].sort().values


def subset(d: Any, n: int | None, seed: int | None) -> Any:
    """`n` examples of a project `Dataset` or an `adapter.Data` (see `subset_index`)."""
    idx = subset_index(len(d), n, seed)
    if idx is None:
        return d
    return d.subset(idx) if isinstance(d, data_mod.Dataset) else d.take(idx)


def _pad(rows: Sequence[Any], value: int, seq_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as one (N, T) tensor padded with `value` and cut at
    `seq_len`, and the attention mask (1 on tokens, 0 on padding)."""
    rows = [torch.as_tensor(r).reshape(-1)[:seq_len] for r in rows]
    width = max(int(r.numel()) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : r.numel()] = r
        mask[i, : r.numel()] = 1
    return ids, mask


def _named_tensors(tensors: Mapping[str, torch.Tensor], source: str) -> Data:
    """Named tensors (``x``/``y`` or the model's input names and ``labels``) as `Data`."""
    named = {COLUMN_ALIASES.get(k, k): v for k, v in tensors.items()}
    labels = named.pop("y", None)
    for k in LABEL_KEYS:
        if labels is None:
            labels = named.pop(k, None)
    if "x" in named:
        if len(named) > 1:
            others = ", ".join(k for k in named if k != "x")
            raise DataError(f"data '{source}': holds 'x' and also {others}; give 'x' and 'y', "
                            "or the model's input names (input_ids, attention_mask, ...) and "
                            "'labels'")
        return Data(named["x"], labels, source)
    if not named:
        raise DataError(f"data '{source}': no input tensors (keys: {', '.join(tensors) or 'none'}); "
                        "give 'x' and 'y', or input_ids / pixel_values ... and 'labels'")
    return Data(named, labels, source)


def _read_tensors(spec: Spec) -> Data:
    from basinmerge import io

    try:
        tensors, _ = io.load_state(spec.target)
    except CheckpointError as e:
        raise DataError(f"data '{spec.text}': {e}") from e
    return _named_tensors(tensors, spec.text)


def _read_text(spec: Spec, tokenize: Tokenizer, seq_len: int) -> Data:
    """A .txt file or a folder's .txt files (sorted by name) as rows of `seq_len` tokens."""
    path = Path(spec.target)
    files = sorted(path.glob(f"*{TEXT_SUFFIX}")) if path.is_dir() else [path]
    try:
        text = "\n".join(f.read_text(encoding="utf-8") for f in files)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"data '{spec.text}': cannot read the text ({e})") from e
    return text_rows(tokenize(text), seq_len, spec.text)


def text_rows(ids: Sequence[int], seq_len: int, source: str = "text") -> Data:
    """A token stream cut into rows of `seq_len` tokens (the last partial row dropped, unless
    there is only one) as a causal-LM batch: ``input_ids`` and an all-ones mask."""
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2, got {seq_len}")
    stream = torch.as_tensor(list(ids), dtype=torch.long)
    if stream.numel() < 2:
        raise DataError(f"data '{source}': the text has fewer than two tokens")
    rows = max(1, stream.numel() // seq_len)
    width = min(seq_len, int(stream.numel()))
    ids_t = stream[: rows * width].reshape(rows, width)
    return Data({"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t)}, None, source)


def _load_hf(spec: Spec) -> Any:
    try:
        import datasets
    except ImportError as e:
        raise ConfigError(f"data '{spec.text}': reading a datasets folder needs the 'datasets' "
                          "package (pip install basinmerge[hf])") from e
    try:
        ds = datasets.load_from_disk(spec.target)
    except (OSError, ValueError, FileNotFoundError) as e:
        raise DataError(f"data '{spec.text}': not a readable datasets folder "
                        f"({str(e).splitlines()[0]})") from e
    if isinstance(ds, datasets.DatasetDict):
        split = spec.split or "train"
        if split not in ds:
            raise DataError(f"data '{spec.text}': no split '{split}'; the folder has "
                            f"{', '.join(ds)}")
        return ds[split]
    if spec.split is not None:
        raise DataError(f"data '{spec.text}': the folder holds one Dataset, not splits; drop "
                        f"':{spec.split}'")
    return ds


def from_hf_dataset(ds: Any, *, n: int | None = None, seed: int | None = None,
                    seq_len: int | None = None, tokenize: Tokenizer | None = None,
                    pad_id: int = 0, source: str = "datasets.Dataset") -> Data:
    """A ``datasets.Dataset`` (in memory or loaded from disk) as `Data` by the column rules
    of the module docstring; `n`/`seed` as in `load` (seed None: the first `n`)."""
    idx = subset_index(len(ds), n, seed)
    if idx is not None and seed is not None:
        ds = ds.select(idx.tolist())
    table = ds.with_format("torch")[: len(ds) if idx is None or seed is not None else len(idx)]
    cols: dict[str, torch.Tensor] = {}
    text: dict[str, list] = {}
    for k, v in table.items():
        key = COLUMN_ALIASES.get(k, k)
        if isinstance(v, torch.Tensor):
            cols[key] = v[:, :seq_len] if key in TOKEN_COLUMNS and seq_len and v.dim() == 2 else v
        elif key in TOKEN_COLUMNS and v and all(isinstance(t, torch.Tensor) for t in v):
            cols[key] = _pad(v, 0 if key != "input_ids" else pad_id, seq_len)[0]
            if key == "input_ids":
                cols.setdefault("attention_mask", _pad(v, 0, seq_len)[1])
        else:
            text[k] = v
    if "input_ids" not in cols and "pixel_values" not in cols and "x" not in cols:
        column = next((c for c in TEXT_COLUMNS if c in text), None)
        if column is None or tokenize is None:
            raise ConfigError(f"{source}: no column to feed the model (columns: "
                              f"{', '.join(ds.column_names)}); give input_ids, pixel_values or "
                              "x" + (f", or a tokenizer for column '{column}'" if column else ""))
        ids, mask = _pad([tokenize(str(t)) or [pad_id] for t in text[column]], pad_id, seq_len)
        cols.update(input_ids=ids, attention_mask=mask)
    return _named_tensors(cols, source)


# --------------------------------------------------------------------------- entry points


def load(spec: str | os.PathLike, *, split: str | None = None, n: int | None = None,
         seed: int = 0, seq_len: int = DEFAULT_SEQ_LEN, tokenizer: str | None = None,
         root: str | None = None, model: str | os.PathLike | None = None
         ) -> data_mod.Dataset | Data:
    """The data a spec names (module docstring): a project `Dataset` for a dataset name, else
    an `adapter.Data` whose `source` is the spec. `split`: the split when the spec names none
    (default ``train``); `model`: the HF model folder whose tokenizer reads text."""
    s = parse(spec)
    if s.kind == "dataset":
        return subset(data_mod.load(s.target, s.split or split or "train", root), n, seed)
    if s.kind == "tensors":
        return subset(_read_tensors(s), n, seed)
    if s.kind == "text":
        return subset(_read_text(s, tokenizer_for(tokenizer, model)[0], seq_len), n, seed)
    ds = _load_hf(s)
    tokenize: Tokenizer | None = None
    pad = 0
    if _needs_tokenizer(ds):
        tokenize, pad = tokenizer_for(tokenizer, model)
    return from_hf_dataset(ds, n=n, seed=seed, seq_len=seq_len, tokenize=tokenize, pad_id=pad,
                           source=s.text)


def _needs_tokenizer(ds: Any) -> bool:
    cols = {COLUMN_ALIASES.get(c, c) for c in ds.column_names}
    return not cols & {"input_ids", "pixel_values", "x"} and bool(cols & set(TEXT_COLUMNS))


def is_hf_dataset(obj: Any) -> bool:
    """An HF ``datasets.Dataset`` (duck-typed: ``datasets`` need not be imported)."""
    return (hasattr(obj, "column_names") and hasattr(obj, "with_format")
            and hasattr(obj, "__getitem__"))


def resolve(data: Any, **options: Any) -> Any:
    """`data` as a method takes it: a spec (str or path) loaded with `load(**options)`, an
    in-memory ``datasets.Dataset`` mapped by its columns, anything else as it is (None too)."""
    if isinstance(data, str | os.PathLike):
        return load(data, **options)
    if is_hf_dataset(data):
        keep = {k: options[k] for k in ("n", "seed", "seq_len") if k in options}
        return from_hf_dataset(data, **keep)
    return data


def as_dataset(data: Any, what: str = "data", *, split: str = "train") -> data_mod.Dataset:
    """Labelled classification data with tensor inputs as the project's `Dataset` (what the
    federated simulator partitions by label and feeds its clients): any form `resolve` gives
    or `adapter.as_data` takes (a `Dataset` passes through). Its class count is one past the
    largest label. One `ConfigError` naming `what` for inputs that are not one tensor (token
    rows: text is not classification data here), missing labels, or labels that are not one
    class index per example."""
    if isinstance(data, data_mod.Dataset):
        return data
    from basinmerge.adapter import as_data

    d = as_data(resolve(data), what)
    name = d.source or what
    if not isinstance(d.inputs, torch.Tensor):
        raise ConfigError(f"{name}: needs one input tensor x (classification data); got the "
                          f"inputs {', '.join(sorted(d.inputs))}")
    y = d.labels
    if y is None:
        raise ConfigError(f"{name}: no labels (y or labels): classification data needs them")
    if y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
        raise ConfigError(f"{name}: labels must be one integer class index per example; got "
                          f"{str(y.dtype).removeprefix('torch.')} of shape {tuple(y.shape)}")
    if len(y) and int(y.min()) < 0:
        raise ConfigError(f"{name}: labels must be class indices >= 0; found {int(y.min())}")
    x = d.inputs
    info = data_mod.DatasetInfo(name=name, split=split, input_shape=tuple(x.shape[1:]),
                                num_classes=int(y.max()) + 1 if len(y) else 0,
                                source=d.source or "memory")
    return data_mod.Dataset(x, y.long(), info)


def train_test(spec: str, *, n: int | None = None, seed: int = 0,
               seq_len: int = DEFAULT_SEQ_LEN, tokenizer: str | None = None,
               root: str | None = None, model: str | os.PathLike | None = None,
               test_split: str = "test") -> tuple[data_mod.Dataset | Data, data_mod.Dataset | Data | None]:
    """(data to work on, data to report on) for a command: a project dataset named without a
    split gives its training split (`n` random examples) and its `test_split`; any other spec
    gives itself and None."""
    s = parse(spec)
    work = load(spec, n=n, seed=seed, seq_len=seq_len, tokenizer=tokenizer, root=root, model=model)
    if s.kind == "dataset" and s.split is None:
        return work, data_mod.load(s.target, test_split, root)
    return work, None


def describe(data: Any) -> str | None:
    """The name of `data` for errors and records: a spec itself, a dataset's name and split,
    an `adapter.Data`'s source; None for anonymous data."""
    if isinstance(data, str | os.PathLike):
        return str(data)
    info = getattr(data, "info", None)
    if info is not None and getattr(info, "name", None):
        return f"{info.name}:{info.split}" if getattr(info, "split", None) else str(info.name)
    return getattr(data, "source", None)
