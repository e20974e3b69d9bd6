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

from basinmerge import checks, datasource, io
from basinmerge.errors import ConfigError
from basinmerge.merge._common import StateSource, bn_keys, merged_items, model_names, prepare
from basinmerge.merge.guard import THRESHOLD, GuardReport, GuardStats, observe_all
from basinmerge.merge.registry import MergeMethod, get_method, jsonable
from basinmerge.merge.stream import FileSource, merge_source
from basinmerge.state import (
    StateDict,
    as_state_dict,
    check_compatible,
    module_mode,
    tied_aliases,
    with_state,
)

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
    activation and STE matching run on, any form or a data spec; default: the merge's data)."""

    method: str = "weight"
    options: Mapping[str, Any] = field(default_factory=dict)
    data: Any = None

    def __post_init__(self) -> None:  # a data spec is read once, here
        object.__setattr__(self, "data", datasource.resolve(self.data))

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


# --------------------------------------------------------------------------- the engine


def merge_checkpoints(paths: Sequence[PathLike], method: str, *, base: PathLike | None = None,
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
    plan = _plan(paths, method, base=base, options=options, weights=weights, out=out, data=data,
                 stream=stream, block_mib=block_mib, device=device, reset_bn=reset_bn,
                 strict=strict, names=names, progress=progress, eval_data=eval_data,
                 gates_out=gates_out, guard_threshold=guard_threshold, like=like,
                 out_format=out_format, force=force, max_shard_mib=max_shard_mib, meta=meta,
                 overrides=overrides, align=align, repair=repair, dtype=dtype)
    plan.timings["load"] = time.perf_counter() - t0
    res = _Run(plan).run()
    res.timings["total"] = time.perf_counter() - t0
    return res


@dataclass
class _Plan:
    """A merge request after every check (`_plan`): what is merged, how and where; nothing has
    been merged or written yet. The fields not described are `merge_checkpoints`' arguments."""

    m: MergeMethod
    files: list[Path]
    base: PathLike | None
    opts: dict[str, Any]  # every option passed to the method (checked)
    user_opts: dict[str, Any]  # those the caller gave (recorded)
    groups: list[tuple[str, dict[str, Any]]]  # each override's full options
    alignment: Alignment | None
    target: Output | None  # where and in which form the output goes
    out: Path | None
    names: list[str]
    streamed: bool
    template: nn.Module | None  # the first member as a model, when a step runs the network
    meta: dict | None  # the first checkpoint's metadata, when the template was read
    extra_meta: dict[str, Any]
    data: Any
    eval_data: Any
    reset_bn: bool | None
    strict: bool
    block_mib: float
    device: str
    guard_threshold: float
    gates_out: PathLike | None
    like: PathLike | None
    overrides: Overrides
    repair: bool | str
    dtype: str | None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def block_bytes(self) -> int:
        return max(1, int(self.block_mib * 2**20))


def _plan(paths: Sequence[PathLike], method: str, *, base: PathLike | None,
          options: Mapping[str, Any] | None, weights: Sequence[float] | None,
          out: PathLike | None, data: Any, stream: bool | None, block_mib: float, device: str,
          reset_bn: bool | None, strict: bool, names: Sequence[str] | None,
          progress: bool | None, eval_data: Any, gates_out: PathLike | None,
          guard_threshold: float, like: PathLike | None, out_format: str | None, force: bool,
          max_shard_mib: float, meta: Mapping[str, Any] | None, overrides: Overrides,
          align: Alignment | Mapping[str, Any] | None, repair: bool | str,
          dtype: str | None) -> _Plan:
    """Every check before any work (options, base, data, output, the steps around the merge),
    whether to stream, and the template model when a step runs the network."""
    m = get_method(method)
    given, opts = _options(m, options, weights, data, reset_bn, progress)
    files = [Path(p) for p in paths]
    data, eval_data = (datasource.resolve(d, model=base or files[0]) for d in (data, eval_data))
    opts = m.check(opts, has_base=base is not None, has_data=data is not None and bool(m.needs_data),
                   num_models=len(files))
    alignment = Alignment.of(align)
    groups = _check_extras(m, opts, overrides, alignment, repair, dtype, data, len(files),
                           has_base=base is not None)
    target = _output(files, base, like, out, out_format, force, max_shard_mib)
    checked_out = _check_request(data, reset_bn, target, gates_out, block_mib)
    in_memory = next((why for why, on in (("per-tensor overrides", overrides),
                                          ("alignment", alignment), ("REPAIR", repair),
                                          ("a dtype cast", dtype)) if on), None)
    plan = _Plan(m, files, base, opts, {k: opts[k] for k in given}, groups, alignment, target,
                 checked_out, model_names(len(files), [str(p) for p in files] if names is None
                                          else names),
                 _streaming(m, files, base, target, stream, in_memory), None, None,
                 dict(meta or {}), data, eval_data, reset_bn, strict, block_mib, device,
                 guard_threshold, gates_out, like, overrides, repair, dtype)
    if alignment is not None or repair or _runs_network(m, data, eval_data):
        plan.template, plan.meta = _template(plan)
    return plan


def _output(files: list[Path], base: PathLike | None, like: PathLike | None,
            out: PathLike | None, out_format: str | None, force: bool,
            max_shard_mib: float) -> Output | None:
    """Where the output goes, in the inputs' form (the base's, else the first model's) unless
    `out_format` says otherwise."""
    if out is None:
        return None
    like_path = Path(base) if base is not None else files[0]
    inputs = tuple(files) + ((Path(base),) if base is not None else ()) + \
        ((Path(like),) if like is not None else ())
    return Output(Path(out), io.output_format(like_path, out_format), like_path, force,
                  max_shard_mib, inputs)


def _template(plan: _Plan) -> tuple[nn.Module, dict]:
    """The first member as a model on the device (the network a data-using method runs, set
    as its ``model`` option), with every given dataset checked to fit it."""
    template, meta = read_model(plan.files[0], plan.like)
    template.to(plan.device)
    if "model" in plan.m.options:
        plan.opts.setdefault("model", template)
    fits = [("data", plan.data), ("eval_data", plan.eval_data),
            ("alignment data", plan.alignment.data if plan.alignment is not None else None)]
    for what, d in fits:
        checks.check_data_fits(template, d, source=plan.files[0], what=what)
    return template, meta


class _Run:
    """The stages of a planned merge, in order (`run`): members (aligned when asked), the
    guard and the merge (one pass over the tensors where the method has a per-key kernel),
    BatchNorm / REPAIR, the dtype cast, writing, evaluation, the result."""

    def __init__(self, plan: _Plan):
        self.plan = plan
        self.timings = plan.timings
        self.models: list[nn.Module] | None = None
        self.info: dict[str, Any] = {}

    def run(self) -> MergeResult:
        p = self.plan
        if p.alignment is not None or p.repair:
            assert p.template is not None
            t = time.perf_counter()
            self.models = _member_models(p.template, p.files, p.like, p.device, p.names,
                                         p.alignment, p.data)
            self.timings["align"] = time.perf_counter() - t
        source, first_meta = _open_sources(p.m, p.files, p.base, p.names, p.streamed, self.models,
                                           p.device)
        try:
            return self._merge_and_write(source, first_meta if p.meta is None else p.meta)
        finally:
            if isinstance(source, FileSource):
                source.close()

    def _merge_and_write(self, source: Any, meta: dict | None) -> MergeResult:
        p = self.plan
        stats = GuardStats(source)
        one_pass = p.streamed or self._kernel(source) is not None
        if not one_pass:  # the method reads the members itself: the guard reads them first
            t = time.perf_counter()
            observe_all(stats, source, p.block_bytes)
            self._check_guard(stats.report(p.guard_threshold))
            self.timings["guard"] = time.perf_counter() - t
        record = {"method": p.m.name, "options": jsonable(p.user_opts),
                  "inputs": [str(f) for f in p.files],
                  "base": str(p.base) if p.base is not None else None, "streamed": p.streamed,
                  **_extras_record(p.overrides, p.alignment, p.repair, p.dtype)}
        inherited = ("merge", "recipe", "aligned_to", "alignment", *io.FORMAT_KEYS)
        out_meta = {**{k: v for k, v in (meta or {}).items() if k not in inherited}, **p.extra_meta}
        accuracy = None
        gates_path = None
        # everything up to the evaluation happens before the output is renamed into place: a
        # failure anywhere (a member the strict guard refuses included) leaves nothing at `out`
        with _target(p.target) as tmp:
            t = time.perf_counter()
            state, has_bn = self._merge(source, stats, tmp, out_meta)
            self.timings["merge"] = time.perf_counter() - t
            if one_pass:  # the guard was fed by the merge
                t = time.perf_counter()
                self._check_guard(stats.report(p.guard_threshold))
                self.timings["guard"] = time.perf_counter() - t
            bn, state = self._after_merge(state, has_bn)
            self._write(tmp, state, bn, out_meta, record)
            if p.eval_data is not None and p.template is not None and state is not None:
                t = time.perf_counter()
                accuracy = _evaluate(p.template, self.members, source, p.files, state,
                                     p.eval_data, p.streamed)
                self.timings["evaluate"] = time.perf_counter() - t
            if p.out is not None and self.info.get("gates") is not None:
                gates_path = (Path(p.gates_out) if p.gates_out is not None
                              else p.out.with_suffix(".gates.json"))
                io.write_json(gates_path, self.info["gates"].to_dict())
        warnings = self.report.warnings()
        if bn == "averaged":
            warnings.append(BN_NOTE_DATA_FREE)
        return MergeResult(p.m.name, p.user_opts, self.members, self.report, out=p.out,
                           state=None if p.out is not None else state, streamed=p.streamed,
                           bn=bn, accuracy=accuracy, warnings=warnings, info=self.info,
                           gates_path=gates_path, timings=self.timings)

    def _check_guard(self, report: GuardReport) -> None:
        """Keep the guard's report; with `strict`, a flagged member is an error."""
        self.report = report
        self.members = [MemberSummary(n, d, w, n in report.flagged())
                        for n, d, w in zip(self.plan.names, report.distance, report.worst,
                                           strict=True)]
        if self.plan.strict:
            report.raise_if_flagged()

    def _kernel(self, source: Any) -> Any:
        """The method's per-key kernel over an in-memory `source`, when the merge can be run
        through it (and so feed the guard as it goes): a kernel, no option groups."""
        p = self.plan
        if p.m.kernel is None or p.groups or p.streamed:
            return None
        return p.m.kernel

    def _merge(self, source: Any, stats: GuardStats, tmp: Path | None,
               out_meta: dict[str, Any]) -> tuple[StateDict | None, bool]:
        """(the merged state, or None when streamed to `tmp` and not needed in memory,
        whether the model has BatchNorm statistics)."""
        p = self.plan
        if p.streamed:
            assert tmp is not None and p.target is not None  # streaming needs `out` (checked)
            hf = p.target.fmt == "hf"
            merge_source(source, p.m.name, tmp, p.opts, block_mib=p.block_mib,
                         meta={k: v for k, v in out_meta.items() if source.meta.get(k) != v},
                         observe=stats.observe, inputs=[str(f) for f in p.files],
                         max_shard_bytes=io.max_shard_bytes(p.target.max_shard_mib) if hf else None)
            has_bn = bool(bn_keys(source.keys()))
            wanted = ((has_bn and p.data is not None and p.reset_bn is not False)
                      or p.eval_data is not None)
            return (read_state(tmp)[0] if wanted else None), has_bn
        make_kernel = self._kernel(source)
        if make_kernel is not None:
            merged = merged_items(source, make_kernel(source, **p.opts), observe=stats.observe)
            state = {k: v.detach().cpu() for k, v in merged}
        else:
            state, self.info = _run_method(p.m, source, p.data, p.names, p.opts, p.groups)
        return state, bool(bn_keys(state))

    def _after_merge(self, state: StateDict | None, has_bn: bool) -> tuple[str, StateDict | None]:
        """REPAIR or the BatchNorm handling, then the dtype cast: (what happened to BatchNorm,
        the state)."""
        p = self.plan
        if p.repair:
            assert self.models is not None and state is not None  # REPAIR merges in memory
            bn, state = _repair(self.models, state, p.opts, p.data, p.reset_bn, has_bn, self.timings,
                               p.repair)
        else:
            bn, state = _batchnorm(p.m, p.template, state, p.data, p.reset_bn, has_bn, p.opts,
                                   self.timings)
        if p.dtype is not None and state is not None:
            state = {k: v.to(DTYPES[p.dtype]) if v.is_floating_point() else v
                     for k, v in state.items()}
        return bn, state

    def _write(self, tmp: Path | None, state: StateDict | None, bn: str,
               out_meta: dict[str, Any], record: dict[str, Any]) -> None:
        """Write an in-memory merge (or a streamed one whose BatchNorm was reset) to `tmp`."""
        p = self.plan
        if tmp is None or state is None or (p.streamed and not bn.startswith("reset")):
            return
        assert p.target is not None
        t = time.perf_counter()
        if p.streamed and p.target.fmt == "hf":  # replace the streamed weights
            for f in io.hf_weight_files(tmp):
                f.unlink()
        io.write_like(tmp, state, p.target.like, {**out_meta, "merge": {**record, "bn": bn}},
                      fmt=p.target.fmt, max_shard_mib=p.target.max_shard_mib)
        self.timings["write"] = time.perf_counter() - t


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
                  streamed: bool, members: Sequence[nn.Module] | None = None,
                  device: str | None = None) -> tuple[Any, dict]:
    """The members as a `TensorSource` (the files themselves when streaming, else their
    state_dicts, or those of `members` when they were loaded as models), checked for keys,
    shapes, dtypes and NaN/Inf, and the first file's metadata (empty for `members`: the
    caller has it)."""
    if streamed:
        source = FileSource(files, base, device=None if device in (None, "cpu") else device)
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
    from basinmerge.adapter import as_data

    t = time.perf_counter()
    model = with_state(template, state)
    x = as_data(data, "BatchNorm reset data")  # read once (a loader too): its rows are counted
    reset_bn_stats(model, x)
    timings["bn_reset"] = time.perf_counter() - t
    return f"reset ({len(x)} examples)", {k: v.detach().cpu() for k, v in model.state_dict().items()}


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


# --------------------------------------------------------------------------- alignment alone


@dataclass
class AlignResult:
    """What `align_checkpoints` did: the permutation found, the objective ⟨θ_A, θ_B⟩ before and
    after, how far B's outputs moved (they should not), and, with evaluation data, A's and B's
    metrics and those of the naive and the aligned midpoint."""

    method: str
    permutations: int
    seconds: float
    objective_before: float
    objective_after: float
    out: Path | None = None
    state: StateDict | None = None
    sweeps: int | None = None
    drift: float | None = None  # max |Δ logits| between B and the aligned B
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # a, b, naive, aligned

    def to_dict(self) -> dict:
        return {"method": self.method, "permutations": self.permutations,
                "seconds": self.seconds, "objective_before": self.objective_before,
                "objective_after": self.objective_after, "sweeps": self.sweeps,
                "drift": self.drift, "metrics": self.metrics,
                "out": str(self.out) if self.out is not None else None}

    def record(self) -> dict:
        """What the output's metadata says about the alignment."""
        return {"method": self.method, "seconds": self.seconds,
                "objective_before": self.objective_before,
                "objective_after": self.objective_after,
                **({"sweeps": self.sweeps} if self.sweeps is not None else {})}


def align_checkpoints(model_a: PathLike, model_b: PathLike, method: str = "weight", *,
                      data: Any = None, eval_data: Any = None,
                      options: Mapping[str, Any] | None = None, like: PathLike | None = None,
                      device: str = "cpu", out: PathLike | None = None,
                      out_format: str | None = None, force: bool = False,
                      max_shard_mib: float = io.DEFAULT_MAX_SHARD_MIB,
                      meta: Mapping[str, Any] | None = None) -> AlignResult:
    """Permute B's hidden units onto A's (Git Re-Basin, `basinmerge.align.find_permutation`)
    and write the aligned B in B's form (`out`; without it the state is in the result).

    `data`: what activation and STE matching run on (any form, a data spec included:
    `basinmerge.datasource.resolve`), checked to fit both models before any work; `eval_data`:
    data to evaluate A, B and their naive and aligned midpoints on (BatchNorm reset on `data`).
    `options`: `find_permutation`'s keyword options (`alignment_options`)."""
    alignment = Alignment(method, dict(options or {}), None)
    data, eval_data = (datasource.resolve(d, model=model_a) for d in (data, eval_data))
    alignment.check(data)
    target = None
    if out is not None:
        target = check_output(out, io.output_format(model_b, out_format), force,
                              inputs=[model_a, model_b])
    nets, metas = [], []
    for path in (model_a, model_b):
        net, m = checks.load_model(path, like=like)
        nets.append(net)
        metas.append(m)
    check_compatible([n.state_dict() for n in nets], [str(model_a), str(model_b)])
    net_a, net_b = (n.to(device) for n in nets)
    for net, m, path in ((net_a, metas[0], model_a), (net_b, metas[1], model_b)):
        checks.check_data_fits(net, data, meta=m, source=path, what="alignment data")
        checks.check_data_fits(net, eval_data, meta=m, source=path, what="evaluation data")
    res = _permute(net_a, net_b, alignment, data)
    aligned = res.pop("model")
    result = AlignResult(**res)
    result.drift = _drift(net_b, aligned, eval_data if eval_data is not None else data)
    if eval_data is not None:
        result.metrics = _align_metrics(net_a, net_b, aligned, data, eval_data)
    state = as_state_dict(aligned.cpu())
    if target is None:
        result.state = state
        return result
    record = {**{k: v for k, v in io.read_meta(model_b).items() if k not in ("merge", "recipe")},
              "aligned_to": str(model_a), **dict(meta or {}), "alignment": result.record()}
    result.out = io.save_like(state, target, model_b, record, fmt=out_format,
                              max_shard_mib=max_shard_mib, force=force, inputs=[model_a])
    return result


def _permute(net_a: nn.Module, net_b: nn.Module, alignment: Alignment, data: Any) -> dict:
    from basinmerge.align import find_permutation, objective, permuted_copy

    t = time.perf_counter()
    perm, spec, info = find_permutation(net_a, net_b, alignment.method, data, **alignment.options)
    seconds = time.perf_counter() - t
    aligned = permuted_copy(net_b, spec, perm)
    pa = {k: v.detach() for k, v in net_a.named_parameters()}
    before = objective(pa, {k: v.detach() for k, v in net_b.named_parameters()})
    after = objective(pa, {k: v.detach() for k, v in aligned.named_parameters()})
    return {"method": alignment.method, "permutations": len(spec.perms), "seconds": seconds,
            "objective_before": float(before), "objective_after": float(after),
            "sweeps": info.get("sweeps") if alignment.method == "weight" else None,
            "model": aligned}


def _drift(net_b: nn.Module, aligned: nn.Module, data: Any) -> float | None:
    """max |Δ logits| between B and the aligned B on a few examples of `data` (or, for a
    project model without data, random inputs of its shape)."""
    from basinmerge import adapter

    if data is not None:
        probe: Any = adapter.as_data(data, "evaluation data", limit=64).inputs
    elif isinstance(cfg := getattr(net_b, "config", None), dict) and "in_shape" in cfg:
        probe = torch.randn(8, *cfg["in_shape"])
    else:
        return None
    with torch.no_grad(), module_mode(net_b, False), module_mode(aligned, False):
        return float((adapter.forward(net_b, probe) - adapter.forward(aligned, probe)).abs().max())


def _align_metrics(net_a: nn.Module, net_b: nn.Module, aligned: nn.Module, data: Any,
                   eval_data: Any) -> dict[str, dict[str, float]]:
    """A's and B's metrics on `eval_data`, and those of the naive and the aligned midpoint
    (BatchNorm statistics reset on `data`, else on `eval_data`)."""
    from basinmerge import train as train_mod
    from basinmerge.state import lerp

    def midpoint(b: nn.Module) -> dict[str, float]:
        net = copy.deepcopy(net_a)
        net.load_state_dict(lerp(net_a.state_dict(), b.state_dict(), 0.5))
        if train_mod.has_batchnorm(net):
            train_mod.reset_bn_stats(net, data if data is not None else eval_data)
        return train_mod.evaluate(net, eval_data)

    return {"a": train_mod.evaluate(net_a, eval_data), "b": train_mod.evaluate(net_b, eval_data),
            "naive": midpoint(net_b), "aligned": midpoint(aligned)}
