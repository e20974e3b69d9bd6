"""The main job end to end on tiny sizes: `basinmerge demo` and `basinmerge reproduce`."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest

from basinmerge.cli import main


def _run(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.mark.slow
def test_demo_smoke_writes_report_and_figures(tmp_path) -> None:
    out = tmp_path / "demo"
    assert _run(["-q", "demo", "--scale", "smoke", "--dataset", "digits", "--out", str(out)]) == 0
    res = json.loads((out / "result.json").read_text())
    tables = res["tables"]
    assert len(tables) == 5
    merging = next(t for name, t in tables.items() if name.startswith("4."))
    methods = [r[0] for r in merging["rows"]]
    assert {"average", "ties", "median", "soft"} <= set(methods)
    pairs = next(t for name, t in tables.items() if name.startswith("3."))
    assert [r[0] for r in pairs["rows"]] == ["naive", "WSA", "weight-aligned", "WSA + aligned"]
    for row in pairs["rows"]:
        assert 0.0 <= row[1] <= 1.0 and 0.0 <= row[2] <= 1.0
    md = (out / "report.md").read_text()
    for fig in res["figures"]:
        assert (out / fig).read_bytes()[:4] == b"\x89PNG"
        assert f"({fig})" in md


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v or "" for k, v in attrs if k in ("src", "href")]


@pytest.mark.slow
def test_reproduce_smoke_is_self_contained_and_reproducible(tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):  # every suite, twice
        assert _run(["-q", "reproduce", "--scale", "smoke", "--dataset", "digits", "--out", str(out)]) == 0
    html = (a / "report.html").read_text()
    p = _Refs()
    p.feed(html)
    assert p.refs and all(r.startswith(("#", "data:image/png;base64,")) for r in p.refs)
    md = (a / "report.md").read_text()
    assert "basinmerge experiment" in md or "basinmerge reproduce" in md
    from basinmerge.experiments import SUITES

    assert sorted(p.name for p in a.iterdir() if p.is_dir()) == sorted(SUITES)
    for suite in SUITES:
        ra = json.loads((a / suite / "result.json").read_text())
        rb = json.loads((b / suite / "result.json").read_text())
        assert _numbers(ra) == _numbers(rb), f"{suite}: a re-run gave different numbers"


def _numbers(result: dict) -> dict:
    """The result's tables without wall-time columns (the only thing a re-run may change)."""
    out = {}
    for name, t in result["tables"].items():
        keep = [i for i, c in enumerate(t["columns"])
                if "second" not in c and "time" not in c and not c.endswith(" s")]
        out[name] = [[row[i] for i in keep] for row in t["rows"]]
    return out
