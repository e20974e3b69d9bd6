"""The merge engine: merge checkpoint files with any registered method, end to end.

>>> from basinmerge.merge.engine import merge_checkpoints
>>> res = merge_checkpoints(["a.safetensors", "b.safetensors", "c.safetensors"], "ties",
...                         base="base.safetensors", options={"density": 0.3},
...                         out="merged.safetensors")
>>> res.warnings, res.members[0].scope_distance, res.to_dict()

`merge_checkpoints` owns everything between the files and the merged file, in this order:

1. **validation** before any work: the method's options, base and data (`MergeMethod.check`,
   one error naming the method and the option), the output path;
2. **loading** (`read_state`, the one place the engine reads a checkpoint) or, for a method
   with a per-key kernel over safetensors files, **streaming** (`stream_merge`): tensor by
   tensor, never holding K models;
3. the **member guard** (`basinmerge.merge.guard`): members far outside the others' weight
   scope are named in `MergeResult.warnings` (``strict=True``: an error instead);
4. the **merge**; BatchNorm: data-free merges average the running statistics (never task
   vectors) and the result warns that they should be reset; with `data`, they are recomputed
   on it (``reset_bn``, default: whenever data is given) and the summary says so;
   ``num_batches_tracked`` then counts the batches of that pass;
   Before the merge, optionally: **alignment** (`Alignment`: every member's hidden units
   permuted onto the first's with `basinmerge.align`); after it, optionally **REPAIR** (two
   members, average/weighted, on `data`). `overrides` merge the tensors whose key matches a
   pattern with their own options (per-tensor option groups, first match wins); `dtype` casts
   the output's floating tensors.
5. **writing** atomically: on any failure nothing is left at `out` (an existing file there is
   left as it was);
6. **reporting**: a `MergeResult` with the per-member summary (scope distance, accuracy on
   `eval_data`), warnings, gates, BN handling and timings.

Nothing here prints: the CLI prints the result.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from basinmerge import adapter, io
from basinmerge.errors import ConfigError, DataError
from basinmerge.merge._common import StateSource, bn_keys, model_names, prepare
from basinmerge.merge.guard import THRESHOLD, GuardReport, check_members
from basinmerge.merge.registry import MergeMethod, get_method, jsonable
from basinmerge.merge.stream import FileSource, stream_merge
from basinmerge.state import StateDict, check_compatible, module_mode, tied_aliases, with_state

PathLike = str | os.PathLike
BN_NOTE_DATA_FREE = ("the merged model has BatchNorm layers whose running statistics were "
                     "averaged, not recomputed for the merged weights; reset them on data "
                     "(pass data) before using it")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REPAIR_METHODS = ("average", "weighted")
Overrides = Sequence[tuple[str, Mapping[str, Any]]]


@dataclass(frozen=True)
class Alignment:
    """Permute every member's hidden units onto the first member's before merging (Git
    Re-Basin): `method` (``weight``, ``activation`` or ``ste``: `basinmerge.align.METHODS`),
    `options` (`find_permutation`'s keyword options: `alignment_options`), `data` (what
    activation and STE matching run on; default: the merge's data)."""

    method: str = "weight"
    options: Mapping[str, Any] = field(default_factory=dict)
    data: Any = None

    @classmethod
    def of(cls, align: Alignment | Mapping[str, Any] | None) -> Alignment | None:
        """An `Alignment` from itself, a mapping with its fields, or None."""
        if align is None or isinstance(align, Alignment):
            return align
        unknown = [k for k in align if k not in ("method", "options", "data")]
        if unknown:
            raise ConfigError(f"alignment has no field '{unknown[0]}' (method, options, data)")
        return cls(**dict(align))

    def check(self, data: Any) -> None:
        """One error, before any work, for an unknown method or option or missing data."""
        from basinmerge.align import METHODS

        if self.method not in METHODS:
            raise ConfigError(f"unknown alignment method '{self.method}'; choose one of: "
                              f"{', '.join(METHODS)}")
        accepted = alignment_options()
        unknown = [k for k in self.options if k not in accepted]
        if unknown:
            raise ConfigError(f"alignment has no option '{unknown[0]}'; options: "
                              f"{', '.join(accepted)}")
        if self.method != "weight" and self.data is None and data is None:
            raise ConfigError(f"alignment method '{self.method}' needs data (the alignment's "
                              "data, or the merge's)")

    def to_dict(self) -> dict:
        return {"method": self.method, "options": jsonable(dict(self.options))}


def alignment_options() -> list[str]:
    """The options an `Alignment` takes: `basinmerge.align.find_permutation`'s keyword options
    (its `spec` is found from the model)."""
    from basinmerge.align import find_permutation

    return [p.name for p in inspect.signature(find_permutation).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name != "spec"]


def align_members(models: Sequence[nn.Module], align: Alignment, data: Any = None) -> list[nn.Module]:
    """The models with every one after the first permuted onto the first (unchanged)."""
    from basinmerge.align import find_permutation, permuted_copy

    d = align.data if align.data is not None else data
    out = [models[0]]
    for mod in models[1:]:
        perm, spec, _ = find_permutation(models[0], mod, align.method, d, **align.options)
        out.append(permuted_copy(mod, spec, perm))
    return out


def option_groups(keys: Sequence[str], options: Mapping[str, Any], overrides: Overrides
                  ) -> list[tuple[list[str], dict[str, Any]]]:
    """(keys, options) per override whose pattern (fnmatch) matches some key, the first
    matching override winning, then the other keys with `options`; an override's options
    are laid over `options`."""
    taken: dict[int, list[str]] = {}
    rest: list[str] = []
    for k in keys:
        hit = next((i for i, (pattern, _) in enumerate(overrides)
                    if fnmatch.fnmatchcase(k, pattern)), None)
        (taken.setdefault(hit, []) if hit is not None else rest).append(k)
    out = [(taken[i], {**options, **overrides[i][1]}) for i in sorted(taken)]
    return out + ([(rest, dict(options))] if rest else [])


@dataclass
class MemberSummary:
    """One input model in the merge summary."""

    name: str
    scope_distance: float
    worst_layer: str | None
    flagged: bool
    accuracy: float | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "scope_distance": self.scope_distance,
                "worst_layer": self.worst_layer, "flagged": self.flagged,
                "accuracy": self.accuracy}


@dataclass
class MergeResult:
    """What `merge_checkpoints` did: the output (file or state), the members, the warnings."""

    method: str
    options: dict[str, Any]
    members: list[MemberSummary]
    guard: GuardReport
    out: Path | None = None
    state: StateDict | None = None
    streamed: bool = False
    bn: str = "none"  # "none", "averaged" (data-free, not reset) or "reset (N examples)"
    accuracy: float | None = None
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    gates_path: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def gates(self) -> Any:
        return self.info.get("gates")

    def to_dict(self) -> dict:
        info = {k: v for k, v in self.info.items() if k != "gates"}
        return {"method": self.method, "options": jsonable(self.options),
                "out": str(self.out) if self.out is not None else None,
                "streamed": self.streamed, "bn": self.bn, "accuracy": self.accuracy,
                "members": [m.to_dict() for m in self.members], "warnings": list(self.warnings),
                "guard": self.guard.to_dict(), "info": jsonable(info),
                "gates": self.gates.to_dict() if self.gates is not None else None,
                "gates_path": str(self.gates_path) if self.gates_path is not None else None,
                "timings": dict(self.timings)}


# --------------------------------------------------------------------------- files


def read_state(path: PathLike) -> tuple[StateDict, dict]:
    """A checkpoint's tensors and metadata: the one place the engine reads weights."""
    return io.load_state(path)


def read_model(path: PathLike, like: PathLike | None = None) -> tuple[nn.Module, dict]:
    """The model stored in a checkpoint (for methods and steps that run the network): built
    from the project's metadata, an HF config, or `like` (`io.load_model`)."""
    return io.load_model(path, like=like)


@dataclass
class Output:
    """Where and in which form the merge is written: `path`, `fmt` (`io.FORMATS`; an HF model
    folder or one file), `like` (the checkpoint whose form, config and tokenizer it copies)."""

    path: Path
    fmt: str
    like: Path
    force: bool = False
    max_shard_mib: float = io.DEFAULT_MAX_SHARD_MIB
    inputs: tuple[Path, ...] = ()

    @property
    def streams(self) -> bool:
        """Whether a streamed merge can write this form (one safetensors file)."""
        return self.fmt in ("hf", "basinmerge", "safetensors")


def check_output(out: PathLike, fmt: str = "safetensors", force: bool = False,
                 inputs: Sequence[PathLike] = ()) -> Path:
    """The output path, checked before any work: for a file format a file name with the
    format's suffix, not a folder, in a folder that exists or can be created; for ``hf`` a
    folder that is empty (or `force`) and none of the inputs."""
    out = Path(out)
    if str(out) in ("", "."):
        raise ConfigError("the output path is empty")
    if fmt == "hf":
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output {out} exists and is not a folder (an HF model is a folder)")
        for p in inputs:
            if out.resolve() == Path(p).resolve():
                raise ConfigError(f"output {out} is an input; choose another")
        if out.is_dir() and any(out.iterdir()) and not force:
            raise ConfigError(f"output folder {out} exists and is not empty; choose another, or "
                              "force the replacement")
    else:
        suffixes = io.PT_SUFFIXES if fmt == "pt" else (".safetensors",)
        if out.is_dir():
            raise ConfigError(f"output {out} is a folder; give a file name ending in {suffixes[0]}")
        if out.suffix not in suffixes:
            raise ConfigError(f"output {out}: the merged checkpoint is written as {fmt}; use a "
                              f"name ending in {' or '.join(suffixes)}")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"output {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"output {out}: folder {parent} is not writable")
    return out


def check_data_fits(model: nn.Module, data: Any, what: str, path: PathLike) -> None:
    """One error, before any work, when `data` (a dataset, an (x, y) pair, inputs, or a list of
    them) does not fit the network stored in `path`: its inputs do not run through it, or a
    label is not one of its outputs."""
    if data is None:
        return
    for d in (data if isinstance(data, list) else [data]):
        dd = adapter.as_data(d, what)
        y = dd.labels
        meta_name = getattr(getattr(d, "info", None), "name", None)
        label = f"{what}" + (f" ({meta_name})" if meta_name else "")
        first = dd.head(2).inputs
        shape = (tuple(first.shape[1:]) if isinstance(first, torch.Tensor)
                 else {k: tuple(v.shape[1:]) for k, v in first.items()})
        try:
            with torch.no_grad(), module_mode(model, False):
                out = adapter.forward(model, adapter.to_device(first, adapter.device_of(model)))
        except (RuntimeError, ValueError, TypeError) as e:
            raise DataError(f"{label} does not fit the model in {path}: inputs of shape "
                            f"{shape} ({str(e).splitlines()[0]})") from e
        if y is not None and y.numel() and out.dim() == 2 and int(y.max()) >= out.shape[1]:
            raise DataError(f"{label} has label {int(y.max())}, but the model in {path} has "
                            f"{out.shape[1]} outputs")


# --------------------------------------------------------------------------- the engine


def merge_checkpoints(paths: Sequence[PathLike], method: str, *, base: PathLike | None = None,  # noqa: C901 - sequential checks and stages; to split next round
                      options: Mapping[str, Any] | None = None,
                      weights: Sequence[float] | None = None, out: PathLike | None = None,
                      data: Any = None, stream: bool | None = None, block_mib: float = 1.0,
                      device: str = "cpu", reset_bn: bool | None = None, strict: bool = False,
                      names: Sequence[str] | None = None, progress: bool | None = None,
                      eval_data: Any = None, gates_out: PathLike | None = None,
                      guard_threshold: float = THRESHOLD, like: PathLike | None = None,
                      out_format: str | None = None, force: bool = False,
                      max_shard_mib: float = io.DEFAULT_MAX_SHARD_MIB,
                      meta: Mapping[str, Any] | None = None, overrides: Overrides = (),
                      align: Alignment | Mapping[str, Any] | None = None, repair: bool | str = False,
                      dtype: str | None = None) -> MergeResult:
    """Merge the checkpoints at `paths` with `method` (see the module docstring).

    `options`: the method's options (``MergeMethod.options``); `weights` is a shortcut for
    ``options["weights"]``. `data`: what a data-using method needs, and for any method the
    data its BatchNorm statistics are recomputed on (``reset_bn``: None = whenever data is
    given). `stream`: None = stream when the method has a kernel, every input is a
    ``.safetensors`` file and `out` is given. `eval_data`: labeled data to report each
    member's and the merge's accuracy on. `strict`: a member flagged by the guard is an error.
    Without `out` the merged state_dict is returned in ``MergeResult.state``.

    The output takes the inputs' form (`out_format` None): an HF model folder in (the base, else
    the first model) gives an HF folder out with its config and tokenizer files, sharded past
    `max_shard_mib`; a non-empty output folder is replaced only with `force`. `like`: a
    checkpoint to take the architecture from when a model must be built and the inputs do not
    record one. `meta`: extra metadata recorded in the output (e.g. the recipe).

    `overrides`: ``(pattern, options)`` pairs: the tensors whose key matches a pattern
    (fnmatch, first match wins) are merged on their own with those options laid over
    `options` (data-free methods; a method's global quantities, e.g. TIES's trim threshold,
    are then per group). `align`: an `Alignment` (or a mapping of its fields): the members are
    permuted onto the first before the merge. `repair`: REPAIR the merge of two members
    (average or weighted) on `data` (its BatchNorm layers are reset unless ``reset_bn`` is
    False); a string names the REPAIR mode (``layernorm``, ``mlp``, ``both``, ``units``;
    `basinmerge.align.repair`). `dtype`: ``float32``, ``float16`` or ``bfloat16``: the output's floating tensors
    are cast to it. Each of these merges in memory (no streaming)."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    m = get_method(method)
    given, opts = _options(m, options, weights, data, reset_bn, progress)
    files = [Path(p) for p in paths]
    opts = m.check(opts, has_base=base is not None, has_data=data is not None and bool(m.needs_data),
                   num_models=len(files))
    user_opts = {k: opts[k] for k in given}
    alignment = Alignment.of(align)
    groups = _check_extras(m, opts, overrides, alignment, repair, dtype, data, len(files),
                           has_base=base is not None)
    like_path = Path(base) if base is not None else files[0]
    inputs = tuple(files) + ((Path(base),) if base is not None else ()) + \
        ((Path(like),) if like is not None else ())
    target = None
    if out is not None:
        target = Output(Path(out), io.output_format(like_path, out_format), like_path, force,
                        max_shard_mib, inputs)
    out = _check_request(data, reset_bn, target, gates_out, block_mib)
    extra_meta = dict(meta or {})
    names = model_names(len(files), [str(p) for p in files] if names is None else names)
    in_memory = next((why for why, on in (("per-tensor overrides", overrides),
                                          ("alignment", alignment), ("REPAIR", repair),
                                          ("a dtype cast", dtype)) if on), None)
    streamed = _streaming(m, files, base, target, stream, in_memory)
    needs_members = alignment is not None or repair
    template, meta = (read_model(files[0], like) if needs_members or _runs_network(m, data, eval_data)
                      else (None, None))
    if template is not None:
        template.to(device)
        if "model" in m.options:  # the network a data-using method runs
            opts.setdefault("model", template)
        fits = [("data", data), ("eval_data", eval_data),
                ("alignment data", alignment.data if alignment is not None else None)]
        for what, d in fits:
            check_data_fits(template, d, what, files[0])
    timings["load"] = time.perf_counter() - t0

    models = None
    if needs_members:
        assert template is not None
        t = time.perf_counter()
        models = _member_models(template, files, like, device, names, alignment, data)
        timings["align"] = time.perf_counter() - t
    t = time.perf_counter()
    source, first_meta = _open_sources(m, files, base, names, streamed, models)
    meta = first_meta if meta is None else meta
    report = check_members(source, threshold=guard_threshold,
                           block_bytes=max(1, int(block_mib * 2**20)))
    if strict:
        report.raise_if_flagged()
    warnings = report.warnings()
    timings["guard"] = time.perf_counter() - t

    record = {"method": method, "options": jsonable(user_opts), "inputs": [str(p) for p in files],
              "base": str(base) if base is not None else None, "streamed": streamed,
              **_extras_record(overrides, alignment, repair, dtype)}
    inherited = ("merge", "recipe", "aligned_to", "alignment", *io.FORMAT_KEYS)
    out_meta = {**{k: v for k, v in (meta or {}).items() if k not in inherited}, **extra_meta}
    members = [MemberSummary(n, d, w, n in report.flagged())
               for n, d, w in zip(names, report.distance, report.worst, strict=True)]
    info: dict[str, Any] = {}
    gates_path = accuracy = None
    # everything up to the evaluation happens before the output is renamed into place: a
    # failure anywhere leaves nothing at `out`
    with _target(target) as tmp:
        t = time.perf_counter()
        if streamed:
            assert tmp is not None and target is not None  # streaming needs `out` (checked above)
            tmp = tmp / io.HF_SAFETENSORS if target.fmt == "hf" else tmp
            stream_merge(files, method, tmp, base=base, block_mib=block_mib, device=device,
                         meta={k: v for k, v in out_meta.items() if source.meta.get(k) != v},
                         **opts)
            has_bn = bool(bn_keys(source.keys()))
            wanted = (has_bn and data is not None and reset_bn is not False) or eval_data is not None
            state = read_state(tmp)[0] if wanted else None
        else:
            state, info = _run_method(m, source, data, names, opts, groups)
            has_bn = bool(bn_keys(state))
        timings["merge"] = time.perf_counter() - t
        if repair:
            assert models is not None and state is not None  # REPAIR merges in memory
            bn, state = _repair(models, state, opts, data, reset_bn, has_bn, timings, repair)
        else:
            bn, state = _batchnorm(m, template, state, data, reset_bn, has_bn, opts, timings)
        if dtype is not None and state is not None:
            state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v
                     for k, v in state.items()}
        if tmp is not None and state is not None and (not streamed or bn.startswith("reset")):
            assert target is not None
            t = time.perf_counter()
            if streamed and target.fmt == "hf":  # rewrite the streamed file (sharded as asked)
                tmp = tmp.parent
                (tmp / io.HF_SAFETENSORS).unlink()
            io.write_like(tmp, state, target.like, {**out_meta, "merge": {**record, "bn": bn}},
                          fmt=target.fmt, max_shard_mib=target.max_shard_mib)
            timings["write"] = time.perf_counter() - t
        if eval_data is not None and template is not None and state is not None:
            t = time.perf_counter()
            accuracy = _evaluate(template, members, source, files, state, eval_data, streamed)
            timings["evaluate"] = time.perf_counter() - t
        if out is not None and info.get("gates") is not None:
            gates_path = Path(gates_out) if gates_out is not None else out.with_suffix(".gates.json")
            io.write_json(gates_path, info["gates"].to_dict())
    if isinstance(source, FileSource):
        source.close()  # its file handles (the merge itself opened its own)
    if bn == "averaged":
        warnings.append(BN_NOTE_DATA_FREE)
    timings["total"] = time.perf_counter() - t0
    return MergeResult(method, user_opts, members, report, out=out,
                       state=None if out is not None else state, streamed=streamed, bn=bn,
                       accuracy=accuracy, warnings=warnings, info=info, gates_path=gates_path,
                       timings=timings)


def _check_request(data: Any, reset_bn: bool | None, out: Output | None,
                   gates_out: PathLike | None, block_mib: float) -> Path | None:
    """The engine's own arguments checked before any work; the output path."""
    if reset_bn and data is None:
        raise ConfigError("reset_bn needs data to recompute the BatchNorm statistics on (pass data)")
    if gates_out is not None and out is None:
        raise ConfigError("gates_out needs out (the merged checkpoint to write)")
    if not block_mib > 0:
        raise ConfigError(f"block_mib must be positive, got {block_mib}")
    if out is None:
        return None
    return check_output(out.path, out.fmt, out.force, out.inputs)


def _streaming(m: MergeMethod, files: list[Path], base: PathLike | None, out: Output | None,
               stream: bool | None, in_memory: str | None = None) -> bool:
    """Whether to stream: asked for (`stream`), or by default whenever the method has a kernel,
    every input is safetensors (a file or an HF folder), the output is a safetensors form and
    no step needs the whole models in memory (`in_memory` names it)."""
    inputs = files + ([Path(base)] if base is not None else [])
    can = (m.streams and out is not None and out.streams and in_memory is None
           and all(io.is_streamable(p) for p in inputs))
    if stream and not can:
        why = ("it has no per-key kernel" if not m.streams else "streaming writes a file: give out"
               if out is None else f"it writes safetensors, not {out.fmt}" if not out.streams
               else f"{in_memory} needs the models in memory" if in_memory is not None
               else "every input must be safetensors (a file or an HF model folder)")
        raise ConfigError(f"merge method '{m.name}' cannot stream here: {why}")
    return can if stream is None else bool(stream)


def _open_sources(m: MergeMethod, files: list[Path], base: PathLike | None, names: list[str],
                  streamed: bool, members: Sequence[nn.Module] | None = None) -> tuple[Any, dict]:
    """The members as a `TensorSource` (the files themselves when streaming, else their
    state_dicts, or those of `members` when they were loaded as models), checked for keys,
    shapes, dtypes and NaN/Inf, and the first file's metadata (empty for `members`: the
    caller has it)."""
    if streamed:
        source = FileSource(files, base)
        source.names = names
        return source, source.meta
    aliases = tied_aliases(members[0]) if members is not None else {}
    loaded: list[tuple[StateDict, dict]]
    if members is not None:  # each tied tensor once, as the files store it
        loaded = [({k: v.detach().cpu() for k, v in mod.state_dict().items() if k not in aliases},
                   {}) for mod in members]
    else:
        loaded = [read_state(p) for p in files]
    base_state = read_state(base)[0] if base is not None else None
    if base_state is not None:
        base_state = {k: v for k, v in base_state.items() if k not in aliases}
    states, base_state, names = prepare([s for s, _ in loaded], m.name, base=base_state,
                                        needs_base=m.needs_base, names=names)
    return StateSource(states, base_state, names), loaded[0][1]


def _member_models(template: nn.Module, files: list[Path], like: PathLike | None, device: str,
                   names: list[str], align: Alignment | None, data: Any) -> list[nn.Module]:
    """The members as models on `device` (the first a copy of `template`), checked to match,
    and permuted onto the first when `align` is given."""
    models = [copy.deepcopy(template)] + [read_model(p, like)[0].to(device) for p in files[1:]]
    check_compatible([mod.state_dict() for mod in models], names)
    return align_members(models, align, data) if align is not None else models


def _check_extras(m: MergeMethod, opts: Mapping[str, Any], overrides: Overrides,
                  align: Alignment | None, repair: bool | str, dtype: str | None, data: Any,
                  num_models: int, has_base: bool) -> list[tuple[str, dict[str, Any]]]:
    """The steps around the merge checked before any work; each override's full options."""
    if overrides and m.needs_data:
        raise ConfigError(f"merge method '{m.name}': per-tensor option overrides apply to "
                          "data-free methods")
    groups = [(pattern, m.check({**opts, **o}, has_base=has_base)) for pattern, o in overrides]
    if align is not None:
        align.check(data)
    if repair and (num_models != 2 or m.name not in REPAIR_METHODS or data is None):
        raise ConfigError("REPAIR needs two models, merge method average or weighted, and data")
    if repair:
        from basinmerge.align.repair import check_mode

        check_mode(repair)
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"unknown dtype '{dtype}'; choose one of: {', '.join(DTYPES)}")
    return groups


def _extras_record(overrides: Overrides, align: Alignment | None, repair: bool | str,
                   dtype: str | None) -> dict[str, Any]:
    """What the merge record says about the steps around the merge (only those taken)."""
    out: dict[str, Any] = {}
    if overrides:
        out["overrides"] = [{"pattern": p, "options": jsonable(dict(o))} for p, o in overrides]
    if align is not None:
        out["align"] = align.to_dict()
    if repair:
        out["repair"] = True if repair is True else repair
    if dtype is not None:
        out["dtype"] = dtype
    return out


def _run_method(m: MergeMethod, source: Any, data: Any, names: list[str],
                opts: Mapping[str, Any], groups: list[tuple[str, dict[str, Any]]]
                ) -> tuple[StateDict, dict]:
    """The method on the in-memory members: at once, or per option group (`option_groups`;
    `groups` holds each override's full options)."""
    if not groups:
        state, info = m.run(source.states, base=source.base, data=data, names=names, **opts)
        return {k: v.detach().cpu() for k, v in state.items()}, info
    keys = source.keys()
    merged: StateDict = {}
    for part_keys, o in option_groups(keys, opts, groups):
        part, _ = m.run([{k: s[k] for k in part_keys} for s in source.states],
                        base=None if source.base is None else {k: source.base[k] for k in part_keys},
                        names=names, **o)
        merged.update(part)
    return {k: merged[k].detach().cpu() for k in keys}, {}


@contextmanager
def _target(out: Output | None) -> Iterator[Path | None]:
    """A temporary path (a file, or for an HF folder a folder holding `like`'s config and
    tokenizer files) renamed onto the output when the block succeeds (None without `out`)."""
    if out is None:
        yield None
        return
    if out.fmt == "hf":
        with io.hf_output(out.path, out.like, out.force, out.inputs) as tmp:
            yield tmp
        return
    with io.atomic_path(out.path, suffix=out.path.suffix) as tmp:
        yield tmp


def _options(m: MergeMethod, options: Mapping[str, Any] | None, weights: Sequence[float] | None,
             data: Any, reset_bn: bool | None, progress: bool | None) -> tuple[list[str], dict]:
    """(the option names the caller gave, every option to pass: those plus what the engine
    sets for a data-using method: its BatchNorm reset and its progress bar)."""
    opts = dict(options or {})
    if weights is not None:
        if "weights" in opts:
            raise ConfigError(f"merge method '{m.name}': option 'weights' is given twice")
        opts["weights"] = list(weights)
    given = list(opts)
    if "reset_bn" in m.options and reset_bn is not None:
        opts.setdefault("reset_bn", bool(reset_bn))
    if "progress" in m.options and progress is not None:
        opts.setdefault("progress", bool(progress))
    return given, opts


def _runs_network(m: MergeMethod, data: Any, eval_data: Any) -> bool:
    return bool(m.needs_data) or data is not None or eval_data is not None


def _batchnorm(m: MergeMethod, template: nn.Module | None, state: StateDict | None, data: Any,
               reset_bn: bool | None, has_bn: bool, opts: Mapping[str, Any],
               timings: dict[str, float]) -> tuple[str, StateDict | None]:
    """(what happened to the BatchNorm statistics, the state after it)."""
    from basinmerge.train import reset_bn_stats

    if not has_bn:
        return "none", state
    if m.needs_data:  # the method recomputes them on its own data (its reset_bn option)
        return ("reset (on the method's data)" if opts.get("reset_bn", True) else "kept"), state
    if data is None or reset_bn is False or template is None or state is None:
        return "averaged", state
    t = time.perf_counter()
    model = with_state(template, state)
    reset_bn_stats(model, data)
    n = len(data) if hasattr(data, "__len__") and not isinstance(data, (tuple, list)) else None
    if n is None:
        x = data if isinstance(data, torch.Tensor) else data[0]
        n = int(x.shape[0])
    timings["bn_reset"] = time.perf_counter() - t
    return f"reset ({n} examples)", {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _repair(members: Sequence[nn.Module], state: StateDict, opts: Mapping[str, Any], data: Any,
            reset_bn: bool | None, has_bn: bool, timings: dict[str, float],
            mode: bool | str = "auto") -> tuple[str, StateDict]:
    """REPAIR of the merge of two members: each hidden unit gets the interpolated statistics of
    its units in the two members (`basinmerge.align.repair`); BatchNorm is reset on `data`."""
    from basinmerge.align.repair import repair

    t = time.perf_counter()
    w = opts.get("weights") or [1.0, 1.0]
    alpha = float(w[1]) / float(sum(w))
    merged = io.load_into(copy.deepcopy(members[0]), state, source="merged")
    fixed = repair(members[0], members[1], merged, data, alpha, bn_reset=reset_bn is not False,
                   mode=mode)
    timings["repair"] = time.perf_counter() - t
    bn = "none" if not has_bn else "reset (REPAIR)" if reset_bn is not False else "kept (REPAIR)"
    return bn, {k: v.detach().cpu() for k, v in fixed.state_dict().items()}


def _evaluate(template: nn.Module, members: list[MemberSummary], source: Any,
              paths: Sequence[Path], state: StateDict, eval_data: Any, streamed: bool) -> float:
    """Fill each member's accuracy on `eval_data`; return the merge's."""
    from basinmerge.train import evaluate

    for i, mem in enumerate(members):
        s = read_state(paths[i])[0] if streamed else source.states[i]
        mem.accuracy = evaluate(with_state(template, s), eval_data)["accuracy"]
    return evaluate(with_state(template, state), eval_data)["accuracy"]
