"""Reports: one Markdown document and one self-contained HTML page from study results.

Pure functions from `ExperimentResult`s (and their matplotlib figures) to strings; the caller
writes them with `basinmerge.io`. The HTML page inlines every figure as a base64 PNG and loads
nothing from outside (no scripts, stylesheets or remote images), so it can be mailed or archived
as one file.
"""

from __future__ import annotations

import base64
import html
import io as _bytesio
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from basinmerge.console import markdown_table


def figure_png(fig, dpi: int = 110) -> bytes:
    """Render a matplotlib figure to PNG bytes (the figure is left open)."""
    buf = _bytesio.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _parts(r: Any) -> Iterator[tuple[str, str, Any]]:
    """A result's parts in report order, as (kind, name, value): its command (if any), time,
    notes, tables and figures. Each report format renders every kind."""
    if r.command:
        yield "command", "", r.command
    yield "time", "", r.seconds
    for note in r.notes:
        yield "note", "", note
    for name, t in r.tables.items():
        yield "table", name, t
    for name, fig in r.figures.items():
        yield "figure", name, fig


def result_markdown(r: Any, level: int = 2, figure_prefix: str = "") -> str:
    """One result as Markdown: a heading of `level`, its command, time and notes, its tables
    one level down, and its figures (PNG files under `figure_prefix`)."""
    h = "#" * level
    prefix = figure_prefix.rstrip("/") + "/" if figure_prefix else ""

    def table(name: str, t: Any) -> str:
        return "\n".join([f"{h}# {name}\n"] + ([t.caption + "\n"] if t.caption else [])
                         + [markdown_table(t.columns, t.rows)])

    render: dict[str, Callable[[str, Any], str]] = {
        "command": lambda _, v: f"Command: `{v}`  ",
        "time": lambda _, v: f"Time: {v:.0f} s\n",
        "note": lambda _, v: f"> {v}\n",
        "table": table,
        "figure": lambda name, _: f"![{name}]({prefix}{name}.png)\n",
    }
    lines = [f"{h} {r.name}\n"] + [render[kind](name, v) for kind, name, v in _parts(r)]
    return "\n".join(lines) + "\n"


def markdown_report(title: str, results: Sequence[Any], *, header: Mapping[str, Any] | None = None,
                    figure_dirs: Mapping[str, str] | None = None) -> str:
    """A Markdown report. `figure_dirs[result.name]` is the folder (relative to the report)
    holding that result's PNGs."""
    lines = [f"# {title}\n"]
    for k, v in (header or {}).items():
        lines.append(f"- **{k}**: {v}")
    lines.append("")
    for r in results:
        lines.append(result_markdown(r, 2, (figure_dirs or {}).get(r.name, "")))
    return "\n".join(lines) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3} tr:nth-child(even) td{background:#fafafa}
code{background:#f4f4f4;padding:.1em .3em;border-radius:3px}
blockquote{border-left:4px solid #ddd;margin:.5em 0;padding:.2em .8em;color:#555}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}
"""


def html_report(title: str, results: Sequence[Any], *, header: Mapping[str, Any] | None = None,
                figures: Mapping[str, Mapping[str, bytes]] | None = None) -> str:
    """A self-contained HTML page. `figures[result.name][figure name]` are PNG bytes; results'
    matplotlib figures are rendered when no bytes are given."""
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{e(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    if header:
        out.append("<dl>" + "".join(f"<dt>{e(str(k))}</dt><dd>{e(str(v))}</dd>" for k, v in header.items())
                   + "</dl>")
    out.append("<nav><ul>" + "".join(f'<li><a href="#r{i}">{e(r.name)}</a></li>'
                                     for i, r in enumerate(results)) + "</ul></nav>")
    for i, r in enumerate(results):
        out += _html_result(i, r, (figures or {}).get(r.name, {}))
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _html_table(name: str, t: Any) -> str:
    e = html.escape
    return "\n".join(
        [f"<h3>{e(name)}</h3>"] + ([f"<p>{e(t.caption)}</p>"] if t.caption else [])
        + ["<table><thead><tr>" + "".join(f"<th>{e(str(c))}</th>" for c in t.columns)
           + "</tr></thead><tbody>"]
        + ["<tr>" + "".join(f"<td>{e(_cell(v))}</td>" for v in row) + "</tr>" for row in t.rows]
        + ["</tbody></table>"])


def _html_result(i: int, r: Any, pngs: Mapping[str, bytes]) -> list[str]:
    """One result's section; a figure's PNG comes from `pngs` or is rendered."""
    e = html.escape

    def figure(name: str, fig: Any) -> str:
        b64 = base64.b64encode(pngs.get(name) or figure_png(fig)).decode("ascii")
        return (f'<figure><img alt="{e(name)}" src="data:image/png;base64,{b64}">'
                f"<figcaption>{e(name)}</figcaption></figure>")

    render: dict[str, Callable[[str, Any], str]] = {
        "command": lambda _, v: f"<p>Command: <code>{e(v)}</code></p>",
        "time": lambda _, v: f"<p>Time: {v:.0f} s</p>",
        "note": lambda _, v: f"<blockquote>{e(v)}</blockquote>",
        "table": _html_table,
        "figure": figure,
    }
    return ([f'<section id="r{i}"><h2>{e(r.name)}</h2>']
            + [render[kind](name, v) for kind, name, v in _parts(r)] + ["</section>"])
