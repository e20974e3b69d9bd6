"""The speed work's behaviour: lazy imports, the trace cache, and (below) the fast paths giving
the same results as the plain ones. Speed itself is measured in benchmarks/, never here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from basinmerge.align import spec as spec_mod

SRC = Path(__file__).resolve().parent.parent / "src"


def test_cli_import_leaves_heavy_packages_unloaded():
    """Importing the CLI (what `basinmerge --help` pays) loads neither matplotlib nor scipy nor
    the optional integrations; each is imported by the command that uses it."""
    heavy = ["matplotlib", "scipy", "sklearn", "transformers", "flwr", "mnist1d", "pandas"]
    code = ("import sys; import basinmerge.cli; "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


def test_cli_apps_live_in_app_module():
    """The typer apps are defined in `basinmerge.cli.app`; the package re-exports the same
    objects, and every command group is registered on them."""
    import basinmerge.cli as cli
    from basinmerge.cli import app as app_mod_app

    app_module = sys.modules["basinmerge.cli.app"]
    assert cli.app is app_module.app is app_mod_app
    names = {c.name for c in app_module.app.registered_commands}
    assert {"train", "merge", "align", "interpolate", "fl", "demo"} <= names
    assert {c.name for c in app_module.experiment_app.registered_commands} >= {"rebasin", "merging"}


class _Net(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, width), nn.Linear(width, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_trace_is_cached_per_class_and_shape(monkeypatch):
    spec_mod._TRACE_CACHE.clear()
    first = spec_mod.spec_for(_Net(5), torch.randn(2, 4))
    calls = []
    real = spec_mod.trace
    monkeypatch.setattr(spec_mod, "trace", lambda *a: calls.append(1) or real(*a))
    again = spec_mod.spec_for(_Net(5), torch.randn(7, 4))  # another instance, batch size
    assert again == first and not calls
    again.sizes["P_fc1"] = 99  # a caller mutating its copy does not reach the cache
    assert spec_mod.spec_for(_Net(5), torch.randn(2, 4)).sizes["P_fc1"] == 5
    wider = spec_mod.spec_for(_Net(6), torch.randn(2, 4))  # other shapes: traced anew
    assert calls == [1] and wider.sizes["P_fc1"] == 6
    spec_mod.spec_for(_Net(6), torch.randn(2, 4))
    assert calls == [1]
    spec_mod.trace_units(_Net(6), torch.randn(2, 4), cache=False)
    assert calls == [1, 1]


def test_trace_errors_are_not_cached():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return torch.cat([self.fc(x), x], dim=1)

    from basinmerge.errors import ConfigError

    for _ in range(2):
        with pytest.raises(ConfigError):
            spec_mod.spec_for(Bad(), torch.randn(2, 4))
