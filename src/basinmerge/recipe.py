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
    data: digits                    # a data spec (basinmerge.datasource), or a mapping:
    # data: {spec: corpus.txt, examples: 2000, seed: 0, seq_len: 128, tokenizer: bytes, root: null}
    reset_bn: true                  # after a data-free merge, when `data` is given
    repair: false                   # REPAIR the average of two (aligned) models on `data`;
                                    # or a mode: layernorm / mlp / both (transformers), units
    like: null                      # a checkpoint giving the architecture when needed
    stream: null                    # null: stream when the method and inputs allow
    block_mib: 1.0
    dtype: null                     # float32 / float16 / bfloat16: cast the output
    device: cpu
    strict: false                   # true: a member flagged by the merge guard stops the merge
    output: {path: merged, format: auto, force: false, max_shard_mib: 4096}

A merge recipe runs through the merge engine (`basinmerge.merge.engine.merge_checkpoints`),
the same as ``basinmerge merge``: loading, streaming, alignment, the member guard (its
warnings are in `Recipe.merge()`'s result), the BatchNorm policy (without `data` the running
statistics are averaged and the result warns), REPAIR, the dtype cast and the atomic output
all happen there. ``method: null`` aligns the second model onto the first and writes it.

`format: auto` writes the inputs' form (`basinmerge.io.save_like`: an HF folder in gives an HF
folder out, ...). With `overrides`, the keys are split into groups (the tensors each override
matches, then the rest) and each group is merged on its own with its options; a method's global
quantities (TIES's global trim threshold) are then per group. Every output records its recipe
in its metadata (``recipe``). `Recipe.to_yaml()` gives the file back; ``basinmerge merge ...
--print-recipe`` prints the recipe of a command line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from basinmerge.datasource import DEFAULT_SEQ_LEN
from basinmerge.errors import ConfigError
from basinmerge.recipe_record import OUTPUT_DEFAULTS, RECIPE_DEFAULTS

if TYPE_CHECKING:
    from basinmerge.merge.engine import MergeResult

_STRICT = ConfigDict(extra="forbid")


class Override(BaseModel):
    """Options for the tensors whose key matches `pattern` (fnmatch, e.g. ``*.attn.*``)."""

    model_config = _STRICT
    pattern: str
    options: dict[str, Any] = Field(default_factory=dict)


class Data(BaseModel):
    """Data for data-using methods, activation alignment and BN reset: a data spec
    (`basinmerge.datasource`: a dataset ``NAME[:split]``, a datasets folder, a tensor file or a
    text corpus), or the mapping below; ``dataset:`` is read as ``spec:``."""

    model_config = _STRICT
    spec: str = Field(validation_alias=AliasChoices("spec", "dataset"))
    examples: int | None = Field(2000, gt=0)
    seed: int = 0
    seq_len: int = Field(DEFAULT_SEQ_LEN, ge=2)
    tokenizer: str | None = None  # "bytes" or a folder with tokenizer files; default the model's
    root: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: Any) -> Any:
        return {"spec": v} if isinstance(v, str) else v

    def load(self, model: str | None = None) -> Any:
        """The data it names (`datasource.load`), text read with `model`'s tokenizer by default."""
        from basinmerge import datasource

        return datasource.load(self.spec, n=self.examples, seed=self.seed, seq_len=self.seq_len,
                               tokenizer=self.tokenizer, root=self.root, model=model)


class Alignment(BaseModel):
    """Permute every model's hidden units onto the first's before merging (Git Re-Basin)."""

    model_config = _STRICT
    method: Literal["weight", "activation", "ste"]
    spec: Literal["auto"] = "auto"  # the permutation spec, found from the model's structure
    data: Data | None = None  # a data spec (activation / ste); default: the recipe's data
    options: dict[str, Any] = Field(default_factory=dict)  # find_permutation's options

    @field_validator("options")
    @classmethod
    def _known_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        from basinmerge.merge.engine import alignment_options

        accepted = alignment_options()
        for k in v:
            if k not in accepted:
                raise _FieldError(f"align.options.{k}", f"alignment has no option '{k}'; "
                                  f"options: {', '.join(accepted)}")
        return v


class Output(BaseModel):
    model_config = _STRICT
    path: str
    # the formats: `recipe_record.OUTPUT_FORMATS` (tested equal)
    format: Literal["auto", "basinmerge", "hf", "safetensors", "pt"] = OUTPUT_DEFAULTS["format"]
    force: bool = OUTPUT_DEFAULTS["force"]
    max_shard_mib: float = Field(OUTPUT_DEFAULTS["max_shard_mib"], gt=0)


class Recipe(BaseModel):
    """A merge (or an alignment) of checkpoints; see the module docstring."""

    model_config = _STRICT
    models: list[str] = Field(min_length=1)
    base: str | None = RECIPE_DEFAULTS["base"]
    method: str | None  # required; null: align only
    options: dict[str, Any] = Field(default_factory=dict)
    overrides: list[Override] = Field(default_factory=list)
    align: Alignment | None = None
    data: Data | None = None
    # defaults: `recipe_record.RECIPE_DEFAULTS` (what `basinmerge merge` records without
    # this schema, `recipe_record.plain_record`)
    reset_bn: bool = RECIPE_DEFAULTS["reset_bn"]
    repair: bool | str = RECIPE_DEFAULTS["repair"]  # a string: the REPAIR mode (`align.repair.REPAIR_MODES`)
    like: str | None = RECIPE_DEFAULTS["like"]
    stream: bool | None = RECIPE_DEFAULTS["stream"]
    block_mib: float = Field(RECIPE_DEFAULTS["block_mib"], gt=0)
    dtype: str | None = RECIPE_DEFAULTS["dtype"]  # float32 / float16 / bfloat16 (`engine.DTYPES`)
    device: str = RECIPE_DEFAULTS["device"]
    strict: bool = RECIPE_DEFAULTS["strict"]  # a member flagged by the merge guard stops the merge
    output: Output

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str | None) -> str | None:
        from basinmerge.merge.engine import DTYPES

        if v is not None and v not in DTYPES:
            raise ValueError(f"unknown dtype '{v}'; choose one of: {', '.join(DTYPES)}")
        return v

    @field_validator("repair")
    @classmethod
    def _known_repair_mode(cls, v: bool | str) -> bool | str:
        from basinmerge.align.repair import REPAIR_MODES

        if isinstance(v, str) and v not in REPAIR_MODES:
            raise ValueError(f"unknown REPAIR mode '{v}'; choose one of: {', '.join(REPAIR_MODES)}")
        return v

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
        from basinmerge.merge.engine import REPAIR_METHODS

        if self.repair and (len(self.models) != 2 or self.method not in REPAIR_METHODS
                            or self.data is None):
            raise _FieldError("repair", "REPAIR needs two models, method average or weighted, "
                              "and data")
        if self.stream and (not m.streams or self.overrides or self.align or self.repair
                            or self.dtype):
            raise _FieldError("stream", f"method '{self.method}' cannot stream here (data-free "
                              "methods, no overrides, alignment, REPAIR or dtype)")
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
        return _run(self)[0]

    def merge(self) -> MergeResult:
        """Run a merge recipe; the merge engine's result (member guard warnings, BatchNorm
        handling, timings; `MergeResult.out` is the output path)."""
        if self.method is None:
            raise ConfigError("this recipe aligns only (method: null); run() it")
        res = _run(self)[1]
        assert res is not None
        return res


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


def _run(recipe: Recipe) -> tuple[Path, MergeResult | None]:
    """Run a recipe: a merge through the merge engine (`merge_checkpoints`, which owns loading,
    streaming, alignment, the member guard, BatchNorm, REPAIR and writing), or an alignment
    alone (`align_checkpoints`). Returns (output path, the engine's result; None for an
    alignment alone)."""
    from basinmerge.merge.engine import Alignment as EngineAlignment
    from basinmerge.merge.engine import align_checkpoints, merge_checkpoints

    first = recipe.base or recipe.models[0]  # whose tokenizer reads text data (as the CLI)
    train = recipe.data.load(first) if recipe.data is not None else None
    out_format = None if recipe.output.format == "auto" else recipe.output.format
    meta = {"recipe": recipe.to_dict()}
    if recipe.method is None:
        assert recipe.align is not None  # the schema: method null needs align
        a, b = recipe.models
        align_data = recipe.align.data.load(first) if recipe.align.data is not None else train
        aligned = align_checkpoints(a, b, recipe.align.method, data=align_data,
                                    options=recipe.align.options, like=recipe.like,
                                    device=recipe.device, out=recipe.output.path,
                                    out_format=out_format, force=recipe.output.force,
                                    max_shard_mib=recipe.output.max_shard_mib, meta=meta)
        assert aligned.out is not None
        return aligned.out, None
    align = None
    if recipe.align is not None:
        align = EngineAlignment(recipe.align.method, recipe.align.options,
                                recipe.align.data.load(first) if recipe.align.data is not None
                                else None)
    res = merge_checkpoints(
        recipe.models, recipe.method, base=recipe.base, options=recipe.options,
        overrides=[(o.pattern, o.options) for o in recipe.overrides], align=align,
        repair=recipe.repair, data=train, reset_bn=None if recipe.reset_bn else False,
        stream=recipe.stream, block_mib=recipe.block_mib, device=recipe.device,
        strict=recipe.strict, like=recipe.like, dtype=recipe.dtype, out=recipe.output.path,
        out_format=out_format, force=recipe.output.force,
        max_shard_mib=recipe.output.max_shard_mib, meta=meta)
    assert res.out is not None
    return res.out, res
