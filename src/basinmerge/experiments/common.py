"""What every study shares: scales, the result record, and writing it out (JSON, markdown, PNG).

A study declares its sizes as a `StudyScale` subclass (one frozen dataclass per study, one
`define` per scale) and reads them with ``.at(scale, **overrides)``. It returns an
`ExperimentResult`: named tables (columns + rows), named matplotlib figures and raw data.
`write_result` writes ``result.json``, ``result.md`` and one PNG per figure into the output
folder (atomically) and `print_result` shows the tables on the terminal.
"""

from __future__ import annotations

import dataclasses
import platform
import time
import types
import typing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import torch

from basinmerge import io
from basinmerge.console import console, table
from basinmerge.errors import ConfigError

SCALES = ("smoke", "quick", "full")


def check_scale(scale: str) -> str:
    if scale not in SCALES:
        raise ConfigError(f"unknown scale '{scale}'; choose one of {', '.join(SCALES)}")
    return scale


_STUDIES: dict[str, type[StudyScale]] = {}


@dataclass(frozen=True)
class StudyScale:
    """The sizes of a study at one scale: the base class of every study's scale config.

    A study subclasses it once, as a frozen dataclass whose fields are what a scale fixes, and
    names itself, which registers the class (`config_for`, `studies`)::

        @dataclass(frozen=True)
        class ScaleConfig(StudyScale, study="merging"):
            width: int
            epochs: int
            seeds: int = 3

        ScaleConfig.define("smoke", width=32, epochs=1, seeds=1)
        ScaleConfig.define("quick", width=256, epochs=3)

        cfg = ScaleConfig.at("quick", seeds=5)     # the scale, with fields replaced

    ``at`` checks the scale (an unknown one names the study's scales) and every override: an
    unknown field, or a value of the wrong type, is one `ConfigError` naming the study and the
    field; a None override keeps the scale's value (so a command line's unset options pass
    through); lists become tuples and ints floats where the field says so. A subclass may add
    value checks in `check` (called on every defined and overridden config).
    """

    study: ClassVar[str] = ""
    _defined: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, study: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if study is not None:
            cls.study = study
            cls._defined = {}
            _STUDIES[study] = cls

    @classmethod
    def define(cls, scale: str, **fields: Any) -> Self:
        """Declare the config of `scale` (one of `SCALES`); returns it."""
        check_scale(scale)
        try:
            cfg = cls(**{k: cls._conform(k, v) for k, v in fields.items()})
        except TypeError as e:  # a field missing
            raise ConfigError(f"{cls.study} study, scale '{scale}': {e}") from e
        cfg.check()
        cls._defined[scale] = cfg
        return cfg

    @classmethod
    def at(cls, scale: str, **overrides: Any) -> Self:
        """The config of `scale` with the fields in `overrides` replaced (None: keep)."""
        if scale not in cls._defined:
            raise ConfigError(f"unknown scale '{scale}' for the {cls.study} study; choose one of "
                              f"{', '.join(cls._defined)}")
        changes = {k: cls._conform(k, v) for k, v in overrides.items() if v is not None}
        cfg = dataclasses.replace(cls._defined[scale], **changes)
        cfg.check()
        return cfg

    @classmethod
    def defined(cls) -> dict[str, Self]:
        """Every scale's config, by scale name."""
        return dict(cls._defined)

    def check(self) -> None:
        """Value checks beyond the field types (override; raise `ConfigError` naming the field)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def _conform(cls, name: str, value: Any) -> Any:
        hints = typing.get_type_hints(cls)
        if name not in {f.name for f in dataclasses.fields(cls)}:
            raise ConfigError(f"the {cls.study} study has no setting '{name}'; settings: "
                              f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        try:
            return _conform(value, hints[name])
        except TypeError:
            raise ConfigError(f"{cls.study} study setting '{name}' expects "
                              f"{_hint_name(hints[name])}, got {value!r}") from None


def config_for(study: str, scale: str, **overrides: Any) -> StudyScale:
    """The scale config of the study named `study` (its module must be imported)."""
    if study not in _STUDIES:
        raise ConfigError(f"unknown study '{study}'; studies with scales: {', '.join(_STUDIES)}")
    return _STUDIES[study].at(scale, **overrides)


def studies() -> dict[str, type[StudyScale]]:
    """The registered scale configs by study name (those of the imported study modules)."""
    return dict(_STUDIES)


def _hint_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint)


def _conform(value: Any, hint: Any) -> Any:
    """`value` as a field annotated `hint` holds it (list -> tuple, int -> float), or TypeError."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _conform_any(value, typing.get_args(hint))
    if hint in (int, float) and isinstance(value, bool):
        raise TypeError(hint)
    if hint is float and isinstance(value, int):
        return float(value)
    if origin is tuple and isinstance(value, list | tuple):
        return _conform_tuple(value, typing.get_args(hint))
    kind = origin if origin is not None else hint
    if isinstance(kind, type) and isinstance(value, kind):  # NoneType included
        return value
    raise TypeError(hint)


def _conform_any(value: Any, hints: Sequence[Any]) -> Any:
    """`value` conformed to the first of `hints` it fits (a union)."""
    for hint in hints:
        try:
            return _conform(value, hint)
        except TypeError:
            continue
    raise TypeError(hints)


def _conform_tuple(value: Sequence[Any], args: Sequence[Any]) -> tuple:
    """A tuple of `value`'s items, conformed to ``tuple[X, ...]`` or ``tuple[X, Y]``."""
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_conform(v, args[0]) for v in value)
    if args and len(args) != len(value):
        raise TypeError(args)
    return tuple(_conform(v, a) for v, a in zip(value, args, strict=True)) if args else tuple(value)


@contextmanager
def cpu_threads(threads: int | None, device: str = "cpu") -> Iterator[None]:
    """Torch's intra-op threads set to `threads` while a study runs on the CPU (None or 0, or a
    GPU device: left alone), restored afterwards. One thread is fastest on a shared 2-core
    machine (docs/benchmarks.md, "torch threads")."""
    old = torch.get_num_threads()
    if threads and str(device).startswith("cpu"):
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""

    def to_dict(self) -> dict:
        return {"columns": self.columns, "rows": self.rows, "caption": self.caption}


@dataclass
class ExperimentResult:
    name: str
    config: dict
    tables: dict[str, Table] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)  # name -> matplotlib Figure
    data: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    command: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"name": self.name, "config": self.config, "command": self.command,
                "seconds": self.seconds, "environment": environment(), "notes": self.notes,
                "tables": {k: t.to_dict() for k, t in self.tables.items()}, "data": self.data,
                "figures": [f"{k}.png" for k in self.figures]}

    @classmethod
    def from_folder(cls, folder: str | Path) -> tuple[ExperimentResult, dict[str, bytes]]:
        """A result written by `write_result`, read back with its figures' PNG bytes (the
        figures themselves are not rebuilt: ``figures`` maps each name to None)."""
        folder = Path(folder)
        d = io.read_json(folder / "result.json")
        names = [f[:-4] if f.endswith(".png") else f for f in d.get("figures", [])]
        pngs = {}
        for n in names:
            try:
                pngs[n] = (folder / f"{n}.png").read_bytes()
            except OSError as e:
                raise ConfigError(f"{folder / (n + '.png')}: cannot read the figure of an "
                                  f"earlier run ({e.strerror or e})") from e
        res = cls(name=d["name"], config=d.get("config", {}),
                  tables={k: Table(t["columns"], t["rows"], t.get("caption", ""))
                          for k, t in d.get("tables", {}).items()},
                  figures={n: None for n in names}, data=d.get("data", {}),
                  notes=list(d.get("notes", [])), command=d.get("command", ""),
                  seconds=float(d.get("seconds", 0.0)))
        return res, pngs

    def markdown(self, figure_prefix: str = "") -> str:
        from basinmerge.report import result_markdown

        return result_markdown(self, level=1, figure_prefix=figure_prefix)


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "machine": platform.machine(), "threads": torch.get_num_threads(),
            "basinmerge": _version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _version() -> str:
    from basinmerge import __version__

    return __version__


def write_result(result: ExperimentResult, out: str | Path) -> Path:
    """Write result.json, result.md and the PNG figures into `out`; returns the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, fig in result.figures.items():
        io.save_figure(fig, out / f"{name}.png")
    io.write_json(out / "result.json", result.to_dict())
    io.write_text(out / "result.md", result.markdown())
    return out


def print_result(result: ExperimentResult) -> None:
    for name, t in result.tables.items():
        console.print(table(name, t.columns, t.rows))
    for note in result.notes:
        console.print(f"[dim]{note}[/]")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def fmt_mean_std(values: Sequence[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"
