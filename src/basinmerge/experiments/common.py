"""What every study shares: scales, the result record, and writing it out (JSON, markdown, PNG).

A study returns an `ExperimentResult`: named tables (columns + rows), named matplotlib figures
and raw data. `write_result` writes ``result.json``, ``result.md`` and one PNG per figure into
the output folder (atomically) and `print_result` shows the tables on the terminal.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
