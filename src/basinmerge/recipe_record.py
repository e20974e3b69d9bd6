"""What a merge recipe records, without pydantic: the recipe's defaults (`basinmerge.recipe`'s
schema takes its defaults from here) and `plain_record`, the recorded form of a recipe whose
fields need no schema to judge them.

``basinmerge merge`` records its recipe in the output. Its options were already checked by the
method registry and the merge engine (before any work); validating the same fields again with
pydantic would only cost pydantic's import (about 60 ms, a tenth of a streamed K = 8 merge of
Llama-shaped checkpoints: benchmarks/bench_merge.py). So for a plain recipe (no data,
alignment, REPAIR or overrides, an output format and sizes the schema accepts) the command
records `plain_record`, which equals ``recipe.validate(obj).to_dict()`` (tested: the record of
a run equals its ``--print-recipe``); anything else goes through the schema."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from basinmerge.io import DEFAULT_MAX_SHARD_MIB

# the recipe's fields in the schema's order, with their defaults (None: required)
RECIPE_DEFAULTS: dict[str, Any] = {
    "models": None, "base": None, "method": None, "options": {}, "overrides": [], "align": None,
    "data": None, "reset_bn": True, "repair": False, "like": None, "stream": None,
    "block_mib": 1.0, "dtype": None, "device": "cpu", "strict": False, "output": None,
}
REQUIRED = ("models", "method", "output")
OUTPUT_DEFAULTS: dict[str, Any] = {"path": None, "format": "auto", "force": False,
                                   "max_shard_mib": DEFAULT_MAX_SHARD_MIB}
OUTPUT_FORMATS = ("auto", "basinmerge", "hf", "safetensors", "pt")
# fields whose value the schema must judge (nested models, validators): never plain
SCHEMA_FIELDS = ("overrides", "align", "data", "repair", "dtype")


def plain_record(obj: Mapping[str, Any], streams: bool) -> dict[str, Any] | None:
    """``recipe.validate(obj).to_dict()`` (the recipe as plain data, defaults left out) for a
    recipe whose method and options were checked already (`MergeMethod.check`) and whose
    other fields are plain: known fields of plain types, none of `SCHEMA_FIELDS` set, a known
    output format, positive sizes, ``stream: true`` only for a method that `streams`. None
    otherwise: validate it with the schema, which names the field at fault."""
    out = obj.get("output")
    if (not isinstance(out, Mapping) or any(k not in RECIPE_DEFAULTS for k in obj)
            or any(k not in OUTPUT_DEFAULTS for k in out) or any(k not in obj for k in REQUIRED)
            or any(obj.get(k, RECIPE_DEFAULTS[k]) != RECIPE_DEFAULTS[k] for k in SCHEMA_FIELDS)):
        return None
    plain = (isinstance(obj["models"], list) and len(obj["models"]) > 0
             and all(isinstance(m, str) for m in obj["models"])
             and isinstance(obj["method"], str) and isinstance(obj.get("options", {}), dict)
             and all(isinstance(obj.get(k), str | None) for k in ("base", "like"))
             and isinstance(obj.get("device", "cpu"), str)
             and all(isinstance(obj.get(k, False), bool) for k in ("reset_bn", "strict"))
             and obj.get("stream") in (None, False, True) and (streams or not obj.get("stream"))
             and _positive(obj.get("block_mib", 1.0))
             and isinstance(out.get("path"), str) and out.get("format", "auto") in OUTPUT_FORMATS
             and isinstance(out.get("force", False), bool)
             and _positive(out.get("max_shard_mib", DEFAULT_MAX_SHARD_MIB)))
    if not plain:
        return None
    record = {k: obj[k] for k in RECIPE_DEFAULTS if k in obj and k != "output"
              and (k in REQUIRED or obj[k] != RECIPE_DEFAULTS[k])}
    record["output"] = {k: out[k] for k in OUTPUT_DEFAULTS if k in out
                        and (k == "path" or out[k] != OUTPUT_DEFAULTS[k])}
    if "block_mib" in record:
        record["block_mib"] = float(record["block_mib"])
    if "max_shard_mib" in record["output"]:
        record["output"]["max_shard_mib"] = float(record["output"]["max_shard_mib"])
    return {k: record[k] for k in RECIPE_DEFAULTS if k in record}  # the schema's field order


def _positive(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v > 0
