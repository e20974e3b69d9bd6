"""The speed work's behaviour: lazy imports, the trace cache, and (below) the fast paths giving
the same results as the plain ones. Speed itself is measured in benchmarks/, never here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from basinmerge import io
from basinmerge.align import spec as spec_mod
from basinmerge.errors import CheckpointError, ConfigError, IncompatibleModelsError
from basinmerge.merge import merge, stream_merge
from basinmerge.merge.stream import FileSource
from basinmerge.state import all_finite

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

    for _ in range(2):
        with pytest.raises(ConfigError):
            spec_mod.spec_for(Bad(), torch.randn(2, 4))


# --------------------------------------------------------------------------- streaming reads

SPECIALS = [0.0, 1.0, -2.5, 6e4, -6e4, 3e38, -3e38, float("nan"), float("inf"), float("-inf")]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(SPECIALS) | st.floats(-1e3, 1e3), min_size=0, max_size=40),
       st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
def test_all_finite_agrees_with_isfinite(values, dtype):
    """The cheap check (a sum, then the exact test only when the sum is not finite) gives the
    exact answer, including finite values whose sum overflows (6e4 in float16, 3e38)."""
    t = torch.tensor(values, dtype=torch.float64).to(dtype)
    assert all_finite(t) == bool(torch.isfinite(t).all())


def _bf16_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"emb": torch.randn(64, 8, generator=g).bfloat16(),
            "big": torch.full((40, 4), 6e4).half(),  # finite; its float16 sum would overflow
            "w": torch.randn(3, 5, generator=g), "n": torch.tensor(seed)}


def test_row_span_reads_equal_the_tensors(tmp_path):
    """FileSource's plain reads return exactly the stored tensors, whole and as row spans."""
    state = _bf16_state(1)
    path = io.save_state(state, tmp_path / "a.safetensors")
    with FileSource([path]) as src:
        for k, v in state.items():
            assert torch.equal(src.model_tensor(0, k), v) and src.model_tensor(0, k).dtype == v.dtype
        assert torch.equal(src.model_tensor(0, "emb", slice(10, 23)), state["emb"][10:23])
        assert torch.equal(src.model_tensor(0, "emb", slice(60, 64)), state["emb"][60:])


@pytest.mark.parametrize("block_mib", [1.0, 2e-4])
def test_streamed_bf16_merge_equals_in_memory(tmp_path, block_mib):
    paths = [io.save_state(_bf16_state(i), tmp_path / f"m{i}.safetensors") for i in range(3)]
    ref = merge([io.load_state(p)[0] for p in paths], "average")
    out = stream_merge(paths, "average", tmp_path / "o.safetensors", block_mib=block_mib,
                       device="cpu")
    got = io.load_state(out)[0]
    assert all(torch.equal(got[k], v) for k, v in ref.items())


@pytest.mark.parametrize(("where", "value", "kind"), [(0, float("inf"), "Inf"),
                                                      (63 * 8 + 7, float("nan"), "NaN")])
def test_bad_value_in_a_late_block_is_named(tmp_path, where, value, kind):
    """A bad value anywhere (here in the first or the last row block of a bf16 tensor read in
    blocks) stops the merge with the file and key, and leaves no output."""
    good = io.save_state(_bf16_state(1), tmp_path / "good.safetensors")
    bad = _bf16_state(2)
    bad["emb"].view(-1)[where] = value
    bad_path = io.save_state(bad, tmp_path / "bad.safetensors")
    out = tmp_path / "never.safetensors"
    with pytest.raises(IncompatibleModelsError, match=rf"bad\.safetensors: key 'emb' contains {kind}"):
        stream_merge([good, bad_path], "average", out, block_mib=2e-4)
    assert not out.exists()


def test_truncated_file_is_refused_naming_the_key(tmp_path):
    good = io.save_state(_bf16_state(1), tmp_path / "good.safetensors")
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: key '\w+' runs past the end"):
        stream_merge([good, cut], "average", tmp_path / "o.safetensors")


@pytest.mark.slow
def test_gpu_benchmark_tiny_on_cpu(tmp_path):
    """benchmarks/bench_gpu.py runs end to end in its CPU tiny mode: every part gives rows, none
    fails, the streamed merges equal the load-everything ones; without CUDA the default run
    skips with exit 0."""
    import json

    script = SRC.parent / "benchmarks" / "bench_gpu.py"
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script), "--device", "cpu", "--tiny", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "bench_gpu.json").read_text())["rows"]
    assert not [row for row in rows if "error" in row]
    assert {row["part"] for row in rows} == {"ceiling", "weight matching", "streaming merge",
                                             "training epoch"}
    assert all(row["same_output_as_baseline"] for row in rows if "same_output_as_baseline" in row)
    assert r.stdout.rstrip().splitlines()[-1].startswith("| ")  # the table comes last
    if not torch.cuda.is_available():
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                           timeout=600, env=env)
        assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 1


def test_cli_streams_bare_state_files_without_reloading(tmp_path):
    """`basinmerge merge` on plain state_dict files (no architecture in their metadata, as from
    any other library) streams them and writes the same bits as the API, without loading the
    merged output back as a model."""
    from basinmerge.cli import main

    paths = [io.save_state(_bf16_state(i), tmp_path / f"m{i}.safetensors") for i in range(3)]
    api = stream_merge(paths, "average", tmp_path / "api.safetensors")
    with pytest.raises(SystemExit) as e:
        main(["--quiet", "merge", *map(str, paths), "--out", str(tmp_path / "cli.safetensors")])
    assert e.value.code in (0, None)
    a, c = io.load_state(api)[0], io.load_state(tmp_path / "cli.safetensors")[0]
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
