"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny models train faster that way, and a second thread
    next to another busy process is many times slower. The thread count is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class CliResult:
    """What one in-process CLI call gave: its exit `code`, `out` and `err`; `error` is the
    single ``error:`` line of a failed call (asserted to be one line, with no traceback)."""

    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    @property
    def error(self) -> str:
        assert "Traceback" not in self.err, self.err
        lines = [ln for ln in self.err.splitlines() if ln.startswith("error")]
        assert len(lines) == 1, self.err
        return lines[0]


@pytest.fixture
def cli(capsys):
    """Run ``basinmerge ARGS...`` in-process (through `basinmerge.cli.main`, so errors are
    reported as on a terminal): ``cli("eval", path, "--data", "digits").code``."""
    from basinmerge.cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["-q", *map(str, args)])
        out, err = capsys.readouterr()
        return CliResult(int(e.value.code or 0), out, err)

    return run
