"""Merge recipes: one YAML file (or one `Recipe` object) that says everything a merge does.

>>> from basinmerge import recipe
>>> r = recipe.load("merge.yaml")          # validated; errors name the field
>>> r.run()                                # writes r.output.path, returns it

A recipe (every field but `models`, `method` and `output` is optional)::

    models: [ft/a, ft/b]            # checkpoints in any format basinmerge.io reads
    base: base_model                # task_arithmetic / ties / dare / adamerging
    method: ties                    # a basinmerge.merge method (required); null: align only
    options: {density: 0.2, scale: 1.0}
    overrides:                      # per-tensor options by key pattern (fnmatch), first wins
      - pattern: "*.attention.*"
        options: {density: 0.5}
    align: {method: weight, data: null, options: {max_iter: 100}}  # permute onto models[0]
    data: {dataset: digits, examples: 2000}    # data-using methods, alignment, BN reset
    reset_bn: true                  # after a data-free merge, when `data` is given
    repair: false                   # REPAIR the average of two (aligned) models on `data`
    like: null                      # a checkpoint giving the architecture when needed
    stream: null                    # null: stream when the method and inputs allow
    block_mib: 1.0
    dtype: null                     # float32 / float16 / bfloat16: cast the output
    device: cpu
    output: {path: merged, format: auto, force: false, max_shard_mib: 4096}

`format: auto` writes the inputs' form (`basinmerge.io.save_like`: an HF folder in gives an HF
folder out, ...). With `overrides`, the keys are split into groups (the tensors each override
matches, then the rest) and each group is merged on its own with its options; a method's global
quantities (TIES's global trim threshold) are then per group. Every output records its recipe
in its metadata (``recipe``). `Recipe.to_yaml()` gives the file back; ``basinmerge merge ...
--print-recipe`` prints the recipe of a command line.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from basinmerge import io
from basinmerge.errors import ConfigError
from basinmerge.state import as_state_dict

_STRICT = ConfigDict(extra="forbid")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Override(BaseModel):
    """Options for the tensors whose key matches `pattern` (fnmatch, e.g. ``*.attn.*``)."""

    model_config = _STRICT
    pattern: str
    options: dict[str, Any] = Field(default_factory=dict)


class Alignment(BaseModel):
    """Permute every model's hidden units onto the first's before merging (Git Re-Basin)."""

    model_config = _STRICT
    method: Literal["weight", "activation", "ste"]
    spec: Literal["auto"] = "auto"  # the permutation spec, found from the model's structure
    data: str | None = None  # a dataset name (activation / ste); default: the recipe's data
    options: dict[str, Any] = Field(default_factory=dict)  # find_permutation's options


class Data(BaseModel):
    """A dataset of the project: data-using methods, activation alignment and BN reset."""

    model_config = _STRICT
    dataset: str
    examples: int | None = Field(2000, gt=0)
    root: str | None = None
    seed: int = 0


class Output(BaseModel):
    model_config = _STRICT
    path: str
    format: Literal["auto", "basinmerge", "hf", "safetensors", "pt"] = "auto"
    force: bool = False
    max_shard_mib: float = Field(io.DEFAULT_MAX_SHARD_MIB, gt=0)


class Recipe(BaseModel):
    """A merge (or an alignment) of checkpoints; see the module docstring."""

    model_config = _STRICT
    models: list[str] = Field(min_length=1)
    base: str | None = None
    method: str | None  # required; null: align only
    options: dict[str, Any] = Field(default_factory=dict)
    overrides: list[Override] = Field(default_factory=list)
    align: Alignment | None = None
    data: Data | None = None
    reset_bn: bool = True
    repair: bool = False
    like: str | None = None
    stream: bool | None = None
    block_mib: float = Field(1.0, gt=0)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    device: str = "cpu"
    output: Output

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str | None) -> str | None:
        from basinmerge import merge

        if v is not None and v not in merge.methods():
            raise ValueError(f"unknown merge method '{v}'; choose one of: "
                             f"{', '.join(merge.methods())}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.method is None:
            if self.align is None or len(self.models) != 2:
                raise ValueError("method: null (align only) needs align and exactly two models")
            return self
        from basinmerge import merge
        from basinmerge.merge.registry import needs_base_message

        m = merge.get_method(self.method)
        _check_options(m, self.options, "options")
        for i, o in enumerate(self.overrides):
            _check_options(m, o.options, f"overrides.{i}.options")
        if self.overrides and m.needs_data:
            raise _FieldError("overrides", f"per-tensor options apply to data-free methods, not "
                              f"'{self.method}'")
        if m.needs_base and self.base is None:
            raise _FieldError("base", needs_base_message(self.method))
        if not m.needs_base and self.base is not None:
            raise _FieldError("base", f"merge method '{self.method}' does not use a base model "
                              "(option 'base')")
        if m.needs_data and self.data is None:
            raise _FieldError("data", f"merge method '{self.method}' needs data (option 'data')")
        if self.repair and (len(self.models) != 2 or self.method not in ("average", "weighted")
                            or self.data is None):
            raise _FieldError("repair", "REPAIR needs two models, method average or weighted, "
                              "and data")
        if self.stream and (not m.streams or self.overrides or self.align or self.repair):
            raise _FieldError("stream", f"method '{self.method}' cannot stream here (data-free "
                              "methods, no overrides, no alignment)")
        return self

    # ----------------------------------------------------------------------- API

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data, defaults left out (what `to_yaml` writes)."""
        return self.model_dump(mode="json", exclude_defaults=True)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def run(self) -> Path:
        """Merge (or align) as the recipe says and write `output.path`; returns that path."""
        return _merge(self)[0]


class _FieldError(ValueError):
    """A validation error about a field other than the one being validated."""

    def __init__(self, field: str, msg: str):
        super().__init__(msg)
        self.field = field


def _check_options(method, options: Mapping[str, Any], where: str) -> None:
    accepted = method.options()
    for k in options:
        if k not in accepted:
            raise _FieldError(f"{where}.{k}", f"method '{method.name}' has no option '{k}'; "
                              f"options: {', '.join(accepted) or 'none'}")


def validate(obj: Mapping[str, Any], source: str = "recipe") -> Recipe:
    """A `Recipe` from plain data; a bad field raises one `ConfigError` naming it."""
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{source}: a recipe is a mapping (models:, method:, output: ...)")
    try:
        return Recipe.model_validate(dict(obj))
    except ValidationError as e:
        err = e.errors()[0]
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, _FieldError):
            field, msg = ctx_err.field, str(ctx_err)
        else:
            field = ".".join(str(p) for p in err["loc"]) or "recipe"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
        raise ConfigError(f"{source}: field '{field}': {msg}") from None


def load(path: str | os.PathLike) -> Recipe:
    """Read and validate a YAML (or JSON) recipe file."""
    import yaml

    path = Path(path)
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: recipe file not found") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    return validate(obj, str(path))


# --------------------------------------------------------------------------- running


def _groups(keys: list[str], recipe: Recipe) -> list[tuple[list[str], dict[str, Any]]]:
    """(keys, options) per override (first match wins), then the rest with the base options."""
    taken: dict[int, list[str]] = {}
    rest: list[str] = []
    for k in keys:
        hit = next((i for i, o in enumerate(recipe.overrides) if fnmatch.fnmatchcase(k, o.pattern)),
                   None)
        (taken.setdefault(hit, []) if hit is not None else rest).append(k)
    out = [(taken[i], {**recipe.options, **recipe.overrides[i].options}) for i in sorted(taken)]
    return out + ([(rest, dict(recipe.options))] if rest else [])


def _can_stream(recipe: Recipe, m) -> bool:
    if recipe.stream is False or not m.streams or recipe.overrides or recipe.align or recipe.repair:
        return False
    if recipe.data is not None and recipe.reset_bn:  # the BN reset runs the model
        return False
    inputs = recipe.models + ([recipe.base] if recipe.base else [])
    return all(io.is_streamable(p) for p in inputs)


def _merge(recipe: Recipe) -> tuple[Path, dict]:
    """Run a recipe with the library's merge functions. The one place a recipe calls them (to
    be switched to the merge engine); returns (output path, info)."""
    from basinmerge import merge as merge_mod
    from basinmerge import train as train_mod
    from basinmerge.merge.stream import stream_merge

    out = Path(recipe.output.path)
    like = recipe.base or recipe.models[0]  # config, tokenizer and architecture come from here
    fmt = None if recipe.output.format == "auto" else recipe.output.format
    record: dict[str, Any] = {"recipe": recipe.to_dict()}
    inputs = [*recipe.models, *(p for p in (recipe.base, recipe.like) if p)]
    info: dict = {}
    method = recipe.method or ""
    m = merge_mod.get_method(method) if recipe.method is not None else None
    like_fmt = io.checkpoint_format(like)
    if (m is not None and _can_stream(recipe, m) and recipe.dtype is None
            and fmt in (None, like_fmt)):
        if like_fmt == "hf":
            with io.hf_output(out, like, recipe.output.force, inputs) as tmp:
                stream_merge(recipe.models, method, tmp / io.HF_SAFETENSORS,
                             base=recipe.base, meta=record, block_mib=recipe.block_mib,
                             **recipe.options)
        else:
            stream_merge(recipe.models, method, out, base=recipe.base, meta=record,
                         block_mib=recipe.block_mib, **recipe.options)
        return out, info
    train = _train_data(recipe)
    needs_model = recipe.align is not None or recipe.repair or (m is not None and m.needs_data)
    if needs_model:
        loaded = [io.load_model(p, like=recipe.like) for p in recipe.models]
        states_or_models: list[Any] = [mod.to(recipe.device) for mod, _ in loaded]
        meta = loaded[0][1]
        if recipe.align is not None:
            states_or_models = _aligned(states_or_models, recipe, train)
        base: Any = (io.load_model(recipe.base, like=recipe.like)[0].to(recipe.device)
                     if recipe.base else None)
    else:
        loaded_states = [io.load_state(p) for p in recipe.models]
        states_or_models = [s for s, _ in loaded_states]
        meta = loaded_states[0][1]
        base = io.load_state(recipe.base)[0] if recipe.base else None
    names = list(recipe.models)
    if m is None:  # align only: the second model, permuted onto the first
        state = as_state_dict(states_or_models[1])
        meta = io.read_meta(recipe.models[1])
    elif m.needs_data:
        opts = dict(recipe.options)
        if "reset_bn" in m.options():
            opts.setdefault("reset_bn", recipe.reset_bn)
        state, info = merge_mod.merge(states_or_models, method, base=base,
                                      data=train.to(recipe.device), names=names,
                                      return_info=True, **opts)
    else:
        states = [as_state_dict(s) for s in states_or_models]
        base_state = as_state_dict(base) if base is not None else None
        state = {}
        for keys, opts in _groups(list(states[0]), recipe):
            part = merge_mod.merge([{k: s[k] for k in keys} for s in states], method,
                                   base=None if base_state is None else
                                   {k: base_state[k] for k in keys}, names=names, **opts)
            state.update(part)
        state = {k: state[k] for k in states[0]}
        if recipe.repair:
            state = _repair(states_or_models, state, recipe, train)
        elif train is not None and recipe.reset_bn:
            state = _reset_bn(state, recipe, train, train_mod)
    state = {k: v.detach().cpu() for k, v in state.items()}
    if recipe.dtype is not None:
        dt = DTYPES[recipe.dtype]
        state = {k: v.to(dt) if v.is_floating_point() else v for k, v in state.items()}
    meta = {k: v for k, v in meta.items() if k not in ("merge", "recipe")}
    if m is not None:
        record["merge"] = {"method": method, "options": recipe.options, "inputs": names,
                           "base": recipe.base, "streamed": False}
    io.save_like(state, out, like, {**meta, **record}, fmt=fmt,
                 max_shard_mib=recipe.output.max_shard_mib, force=recipe.output.force,
                 inputs=inputs)
    return out, info


def _train_data(recipe: Recipe):
    if recipe.data is None:
        return None
    from basinmerge import data as data_mod

    train = data_mod.load(recipe.data.dataset, "train", recipe.data.root)
    if recipe.data.examples is not None and recipe.data.examples < len(train):
        train = train.subset(recipe.data.examples, seed=recipe.data.seed)
    return train


def _aligned(models: list, recipe: Recipe, train) -> list:
    """Every model after the first, permuted onto the first."""
    from basinmerge.align import find_permutation, permuted_copy

    assert recipe.align is not None
    data = train
    if recipe.align.data is not None:
        data = _train_data(recipe.model_copy(update={"data": Data(dataset=recipe.align.data, examples=2000)}))
    if recipe.align.method != "weight" and data is None:
        raise ConfigError(f"align: method '{recipe.align.method}' needs data (align.data or data)")
    out = [models[0]]
    for mod in models[1:]:
        try:
            perm, spec, _ = find_permutation(models[0], mod, recipe.align.method, data,
                                             **recipe.align.options)
        except TypeError as e:
            raise ConfigError(f"align.options: {e}") from e
        out.append(permuted_copy(mod, spec, perm))
    return out


def _reset_bn(state, recipe: Recipe, train, train_mod):
    """BatchNorm statistics recomputed on the data, when the model has BatchNorm."""
    model, _ = io.load_model(recipe.models[0], like=recipe.like)
    if not train_mod.has_batchnorm(model):
        return state
    io.load_into(model, state)
    train_mod.reset_bn_stats(model, train)
    return as_state_dict(model)


def _repair(models: list, state, recipe: Recipe, train):
    """REPAIR of the merge of two models: each unit gets the endpoints' interpolated statistics."""
    import copy

    from basinmerge.align.repair import repair

    weights = recipe.options.get("weights") or [1.0, 1.0]
    alpha = float(weights[1]) / float(sum(weights))
    merged = io.load_into(copy.deepcopy(models[0]), state, source="merged")
    fixed = repair(models[0], models[1], merged, train, alpha, bn_reset=recipe.reset_bn)
    return as_state_dict(fixed)
