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
from collections.abc import Mapping, Sequence
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


def result_markdown(r: Any, level: int = 2, figure_prefix: str = "") -> str:
    """One result as Markdown: a heading of `level`, its command, time and notes, its tables
    one level down, and its figures (PNG files under `figure_prefix`)."""
    h = "#" * level
    lines = [f"{h} {r.name}\n"]
    if r.command:
        lines.append(f"Command: `{r.command}`  ")
    lines.append(f"Time: {r.seconds:.0f} s\n")
    for note in r.notes:
        lines.append(f"> {note}\n")
    for name, t in r.tables.items():
        lines.append(f"{h}# {name}\n")
        if t.caption:
            lines.append(t.caption + "\n")
        lines.append(markdown_table(t.columns, t.rows))
    prefix = figure_prefix.rstrip("/") + "/" if figure_prefix else ""
    for name in r.figures:
        lines.append(f"![{name}]({prefix}{name}.png)\n")
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
        out.append(f'<section id="r{i}"><h2>{e(r.name)}</h2>')
        if r.command:
            out.append(f"<p>Command: <code>{e(r.command)}</code></p>")
        out.append(f"<p>Time: {r.seconds:.0f} s</p>")
        for note in r.notes:
            out.append(f"<blockquote>{e(note)}</blockquote>")
        for name, t in r.tables.items():
            out.append(f"<h3>{e(name)}</h3>")
            if t.caption:
                out.append(f"<p>{e(t.caption)}</p>")
            out.append("<table><thead><tr>" + "".join(f"<th>{e(str(c))}</th>" for c in t.columns)
                       + "</tr></thead><tbody>")
            for row in t.rows:
                out.append("<tr>" + "".join(f"<td>{e(_cell(v))}</td>" for v in row) + "</tr>")
            out.append("</tbody></table>")
        given = (figures or {}).get(r.name, {})
        for name, fig in r.figures.items():
            png = given.get(name) or figure_png(fig)
            b64 = base64.b64encode(png).decode("ascii")
            out.append(f'<figure><img alt="{e(name)}" src="data:image/png;base64,{b64}">'
                       f"<figcaption>{e(name)}</figcaption></figure>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
