"""The report module: Markdown and a self-contained HTML page from study results."""

from __future__ import annotations

import base64
from html.parser import HTMLParser

from basinmerge import plots
from basinmerge.experiments.common import ExperimentResult, Table
from basinmerge.report import figure_png, html_report, markdown_report


def _result() -> ExperimentResult:
    fig, axes = plots.new_figure()
    axes[0, 0].plot([0, 1], [1, 0])
    return ExperimentResult(
        name="toy <study>", config={"a": 1},
        tables={"barriers": Table(["method", "barrier"], [["plain", 0.25], ["wsa & co", 0.125]])},
        figures={"curve": fig}, notes=["a note with <html> characters"], command="basinmerge x --y 1",
        seconds=3.0)


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.refs: list[str] = []
        self.text: list[str] = []
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in ("meta", "img", "br", "hr"):
            self.stack.append(tag)
        for k, v in attrs:
            if k in ("src", "href"):
                self.refs.append(v or "")

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> after {self.stack[-3:]}"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def test_figure_png_is_png() -> None:
    fig, _ = plots.new_figure()
    png = figure_png(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 500


def test_html_is_balanced_self_contained_and_escaped() -> None:
    page = html_report("Report", [_result()], header={"seed": 0})
    p = _Collector()
    p.feed(page)
    p.close()
    assert p.stack == [], f"unclosed tags: {p.stack}"
    assert "table" in p.tags and "img" in p.tags
    # every reference is an in-page anchor or an inlined image: nothing loads from outside
    assert p.refs and all(r.startswith("#") or r.startswith("data:image/png;base64,") for r in p.refs)
    for r in p.refs:
        if r.startswith("data:"):
            assert base64.b64decode(r.split(",", 1)[1])[:4] == b"\x89PNG"
    assert "<script" not in page and "<link" not in page
    text = "".join(p.text)
    assert "toy <study>" in text and "a note with <html> characters" in text and "wsa & co" in text
    assert "0.125" in text


def test_markdown_has_tables_commands_and_figure_links() -> None:
    md = markdown_report("Report", [_result()], header={"seed": 0}, figure_dirs={"toy <study>": "toy"})
    assert "| method | barrier |" in md and "| plain | 0.25 |" in md
    assert "`basinmerge x --y 1`" in md
    assert "![curve](toy/curve.png)" in md
    assert "- **seed**: 0" in md
