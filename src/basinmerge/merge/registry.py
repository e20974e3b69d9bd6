"""The one registry of merge methods, filled by `merge_method` in each method's own file.

A method is a function over models (state_dicts or modules) decorated where it is defined::

    @merge_method("slerp", summary="spherical interpolation of two models", kernel=slerp_kernel)
    def slerp(models, t=None, *, names=None):
        \"\"\"...

        Options:
            t: interpolation fraction toward the second model (default 0.5)
        \"\"\"

Everything the library, the engine, the streaming merge, the CLI and the studies need to know
comes from that one declaration:

- **options**: every parameter of the function's signature except the inputs (``models``,
  ``base``, ``data``/``unlabeled_data``, ``names``), with its type (the annotation), its
  default (no default: required) and its help line (``name: text`` in an ``Options:`` section
  of the docstring, or ``Annotated[float, "help"]``). Options whose type is a Python object (a module, state_dicts, a
  function) are library-only: the command line cannot give them.
- ``needs_base`` (a shared starting point theta_0), ``needs_data`` (None, ``"labeled"`` or
  ``"unlabeled"``), ``min_models``.
- ``kernel``: a kernel factory ``(source, **options) -> kernel`` (see
  `basinmerge.merge._common`) when the method merges each key from that key's K tensors
  alone: the method then streams over files (`stream_merge`), in row blocks when the kernel
  is elementwise. No other table lists the streaming methods.
- ``returns_info`` (the function returns ``(state, info)``) or ``convert`` (turns any other
  return value into ``(state, info)``).

`MergeMethod.check` is the one place that validates a request: an unknown option, a missing
required option, a missing or unwanted base or data, too few models: one `ConfigError` naming
the method and the option.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from basinmerge.errors import ConfigError
from basinmerge.merge._common import check_count, needs_base_message

# Parameters that are the method's inputs, not options.
INPUTS = ("models", "base", "data", "unlabeled_data", "names")
DATA_KINDS = (None, "labeled", "unlabeled")
_REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class Option:
    """One option of a merge method, from the function's signature and docstring."""

    name: str
    annotation: Any
    default: Any
    help: str
    cli: bool  # False: a Python object (module, state_dicts, ...) the command line cannot give

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    @property
    def type_name(self) -> str:
        return _type_name(self.annotation)

    def coerce(self, method: str, value: Any) -> Any:
        """`value` (as given, or parsed from ``key=value`` text) converted to this option's
        type; a value that does not fit gives one error naming the method and the option."""
        try:
            return _coerce(self.annotation, value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"merge method '{method}': option '{self.name}' expects "
                              f"{self.type_name}, got {value!r}") from e

    def to_dict(self) -> dict:
        return {"name": self.name, "type": self.type_name, "help": self.help,
                "default": None if self.required else jsonable(self.default),
                "required": self.required, "cli": self.cli}


class OptionTable(dict):
    """A method's options by name (`Option` values). Calling it gives the names, as the older
    ``Method.options()`` did, so code written against that keeps working."""

    def __call__(self) -> list[str]:
        return list(self)


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: how to call it and what it needs."""

    name: str
    fn: Callable[..., Any]
    summary: str
    options: OptionTable
    needs_base: bool = False
    needs_data: str | None = None
    min_models: int = 1
    kernel: Callable[..., Any] | None = None
    returns_info: bool = False
    convert: Callable[[Any], tuple[dict, dict]] | None = None
    _params: tuple[str, ...] = field(default=(), repr=False)

    @property
    def streams(self) -> bool:
        """True when the method merges key by key (a kernel) and so can stream over files."""
        return self.kernel is not None

    def option_names(self) -> list[str]:
        return list(self.options)

    def check(self, options: Mapping[str, Any], *, has_base: bool = False,
              has_data: bool = False, num_models: int | None = None) -> dict[str, Any]:
        """Validate a request and return the options converted to their types.

        One `ConfigError` for the first problem, naming the method and the option."""
        unknown = [k for k in options if k not in self.options]
        if unknown:
            raise ConfigError(f"merge method '{self.name}' has no option '{unknown[0]}'; options: "
                              f"{', '.join(self.options) or 'none'}")
        if num_models is not None:
            check_count(self.name, num_models, self.min_models)
        missing = [o.name for o in self.options.values() if o.required and options.get(o.name) is None]
        if missing:
            raise ConfigError(f"merge method '{self.name}' needs option '{missing[0]}' "
                              f"({self.options[missing[0]].help or self.options[missing[0]].type_name})")
        if self.needs_base and not has_base:
            raise ConfigError(needs_base_message(self.name))
        if not self.needs_base and has_base:
            raise ConfigError(f"merge method '{self.name}' does not use a base model (option 'base')")
        if self.needs_data and not has_data:
            kind = "labeled data" if self.needs_data == "labeled" else "data (inputs)"
            raise ConfigError(f"merge method '{self.name}' needs {kind} (option 'data')")
        if not self.needs_data and has_data:
            raise ConfigError(f"merge method '{self.name}' does not use data (option 'data')")
        return {k: self.options[k].coerce(self.name, v) for k, v in options.items()}

    def run(self, models: Sequence[Any], *, base: Any = None, data: Any = None,
            names: Sequence[str] | None = None, **options: Any) -> tuple[dict, dict]:
        """Call the method (after `check`): ``(merged state_dict, info)``."""
        kwargs: dict[str, Any] = dict(options)
        for param, value in (("models", models), ("base", base), ("names", names)):
            if param in self._params:
                kwargs[param] = value
        for param in ("data", "unlabeled_data"):
            if param in self._params:
                kwargs[param] = data
        out = self.fn(**kwargs)
        if self.convert is not None:
            return self.convert(out)
        if self.returns_info:
            return out[0], dict(out[1])
        return out, {}

    def help_lines(self) -> list[str]:
        """What `--help` shows for this method: summary, needs, options."""
        needs = []
        if self.needs_base:
            needs.append("base")
        if self.needs_data:
            needs.append(f"{self.needs_data} data")
        if self.min_models > 1:
            needs.append(f">= {self.min_models} models")
        tags = ([f"needs {', '.join(needs)}"] if needs else []) + (["streams"] if self.streams else [])
        head = f"{self.name}: {self.summary}" + (f" ({'; '.join(tags)})" if tags else "")
        lines = [head]
        for o in self.options.values():
            if not o.cli:
                continue
            default = "required" if o.required else f"default {jsonable(o.default)!r}"
            lines.append(f"  --opt {o.name}=... ({o.type_name}, {default}){': ' + o.help if o.help else ''}")
        return lines

    def to_dict(self) -> dict:
        return {"name": self.name, "summary": self.summary, "needs_base": self.needs_base,
                "needs_data": self.needs_data, "min_models": self.min_models,
                "streams": self.streams, "options": [o.to_dict() for o in self.options.values()]}


_REGISTRY: dict[str, MergeMethod] = {}


def merge_method(name: str, *, summary: str, needs_base: bool = False,
                 needs_data: str | None = None, min_models: int = 1,
                 kernel: Callable[..., Any] | None = None, returns_info: bool = False,
                 convert: Callable[[Any], tuple[dict, dict]] | None = None,
                 ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as merge method `name` (see the module docstring); the
    function itself is returned unchanged."""
    if needs_data not in DATA_KINDS:
        raise ValueError(f"needs_data must be one of {DATA_KINDS}, got {needs_data!r}")

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"merge method '{name}' is registered twice")
        sig = inspect.signature(fn)
        params = tuple(sig.parameters)
        if "models" not in params:
            raise ValueError(f"merge method '{name}': the function must take 'models'")
        if needs_base and "base" not in params:
            raise ValueError(f"merge method '{name}' needs a base but its function has no 'base'")
        if needs_data and not {"data", "unlabeled_data"} & set(params):
            raise ValueError(f"merge method '{name}' needs data but its function has no 'data'")
        hints = typing.get_type_hints(fn, include_extras=True)
        helps = docstring_options(fn.__doc__ or "")
        options = OptionTable()
        for p in sig.parameters.values():
            if p.name in INPUTS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            ann, help_text = _annotated(hints.get(p.name, Any))
            options[p.name] = Option(p.name, ann, p.default, help_text or helps.get(p.name, ""),
                                     _cli_type(ann))
        _REGISTRY[name] = MergeMethod(name, fn, summary, options, needs_base, needs_data,
                                      min_models, kernel, returns_info, convert, params)
        return fn

    return register


def _annotated(ann: Any) -> tuple[Any, str | None]:
    """(the type, its help) of ``Annotated[type, "help"]``; other annotations have no help."""
    if typing.get_origin(ann) is typing.Annotated:
        base, *extras = typing.get_args(ann)
        return base, next((e for e in extras if isinstance(e, str)), None)
    return ann, None


def docstring_options(doc: str) -> dict[str, str]:
    """``name: help`` lines of an ``Options:`` section (continuation lines indented deeper)."""
    lines = inspect.cleandoc(doc).splitlines()
    out: dict[str, str] = {}
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Options:")
    except StopIteration:
        return out
    indent, current = None, None
    for line in lines[start + 1:]:
        if not line.strip():
            break
        level = len(line) - len(line.lstrip())
        m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*):\s*(.*)", line)
        if m and (indent is None or level == indent):
            indent, current = level, m.group(1)
            out[current] = m.group(2).strip()
        elif current is not None and indent is not None and level > indent:
            out[current] += " " + line.strip()
        else:
            break
    return out


def all_methods() -> list[MergeMethod]:
    """Every registered method: data-free ones first, then those around a base, then the
    data-using ones (registration order within each group)."""
    import basinmerge.merge  # noqa: F401  (importing the package registers every method)

    order = list(_REGISTRY.values())
    return sorted(order, key=lambda m: (m.needs_data is not None, m.needs_base, order.index(m)))


def methods() -> list[str]:
    return [m.name for m in all_methods()]


def registry() -> dict[str, MergeMethod]:
    all_methods()
    return _REGISTRY


def get_method(name: str) -> MergeMethod:
    all_methods()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown merge method '{name}'; choose one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def merge(models: Sequence[Any], method: str, *, base: Any = None, data: Any = None,
          names: Sequence[str] | None = None, return_info: bool = False, **options: Any):
    """Merge `models` with the method named `method`.

    `base` is the shared starting point of the task-vector methods; `data` is what a
    data-using method needs (`MergeMethod.needs_data`); `names` label the models in error
    messages and records. Other keyword arguments are the method's options (its function's
    keyword parameters). Returns the merged state_dict, or ``(state, info)`` with
    `return_info` (info: greedy soup's choices, AdaMerging's lambdas, soft merging's
    ``gates`` table)."""
    m = get_method(method)
    count = len(models) if isinstance(models, (list, tuple)) else None
    opts = m.check(options, has_base=base is not None, has_data=data is not None, num_models=count)
    state, info = m.run(models, base=base, data=data, names=names, **opts)
    return (state, info) if return_info else state


# --------------------------------------------------------------------------- option types


def _args(ann: Any) -> tuple[Any, ...]:
    return typing.get_args(ann)


def _is_union(ann: Any) -> bool:
    return typing.get_origin(ann) in (typing.Union, types.UnionType)


def _members(ann: Any) -> list[Any]:
    return [a for a in _args(ann) if a is not type(None)] if _is_union(ann) else [ann]


def _optional(ann: Any) -> bool:
    return _is_union(ann) and type(None) in _args(ann)


def _is_seq(ann: Any) -> bool:
    origin = typing.get_origin(ann)
    return origin in (list, tuple, Sequence, typing.Sequence) or ann in (list, tuple)


def _cli_type(ann: Any) -> bool:
    """Whether the command line can give a value of this type (numbers, text, flags, lists of
    them, or anything-goes `Any`)."""
    if ann is Any:
        return True
    simple = (int, float, str, bool)
    for a in _members(ann):
        if a in simple or typing.get_origin(a) is typing.Literal:
            continue
        if _is_seq(a) and all(x in simple or x is Ellipsis for x in _args(a) or (str,)):
            continue
        return False
    return True


def _coerce(ann: Any, value: Any) -> Any:
    if ann is Any:
        return value
    if value is None:
        if _optional(ann):
            return None
        raise ValueError("None is not allowed")
    errors = []
    for a in _members(ann):
        try:
            return _coerce_one(a, value)
        except (TypeError, ValueError) as e:
            errors.append(e)
    raise ValueError(str(errors[0]) if errors else "no type matches")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ValueError("a boolean")


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("a number, not a boolean")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("an integer")
    return int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError("a number, not a boolean")
    return float(value)


def _to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("text")
    return value


_SCALARS: dict[Any, Callable[[Any], Any]] = {bool: _to_bool, int: _to_int, float: _to_float,
                                             str: _to_str}


def _coerce_one(a: Any, value: Any) -> Any:
    if typing.get_origin(a) is typing.Literal:
        if value not in _args(a):
            raise ValueError(f"one of {_args(a)}")
        return value
    if a in _SCALARS:
        return _SCALARS[a](value)
    if _is_seq(a):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError("a list")
        inner = (_args(a) or (Any,))[0]
        return [_coerce(inner, v) for v in value]
    if isinstance(a, type) and not isinstance(value, a):
        raise TypeError(f"a {a.__name__}")
    return value


def _type_name(ann: Any) -> str:
    if ann is Any:
        return "any"
    parts = []
    for a in _members(ann):
        if typing.get_origin(a) is typing.Literal:
            parts.append("|".join(map(str, _args(a))))
        elif _is_seq(a):
            parts.append(f"list of {_type_name((_args(a) or (Any,))[0])}")
        else:
            parts.append(getattr(a, "__name__", str(a)))
    name = " or ".join(parts)
    return f"{name} or None" if _optional(ann) else name


def jsonable(v: Any) -> Any:
    """`v` with everything JSON cannot hold turned into plain values (one-element tensors) or
    their repr (modules, state_dicts): for option records and summaries."""
    if isinstance(v, Mapping):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    item = getattr(v, "item", None)
    if callable(item) and getattr(v, "numel", lambda: 0)() == 1:
        return item()
    return repr(v)
