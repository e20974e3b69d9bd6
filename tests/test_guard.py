"""Nothing silently wrong (issue 17): bad values, data that does not fit the model, output paths
checked before any work, Ctrl-C and --resume, plain progress lines, the thread default.

Every CLI case checks the contract: exit code, one `error:` line naming the culprit, no
traceback, nothing left behind."""

from __future__ import annotations

import math
import sys
import tempfile
import types
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from basinmerge import checks, console, data, io, models, threads
from basinmerge.cli import main
from basinmerge.errors import ConfigError, NonFiniteError
from basinmerge.experiments import reproduce
from basinmerge.experiments.common import ExperimentResult, Table
from basinmerge.train import fit


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


def one_error(err: str) -> str:
    """The single `error:` line of a failed command (and no traceback)."""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(lines) == 1, err
    return lines[0]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two small digits checkpoints (one with BatchNorm buffers) and a trained-on record."""
    root = tmp_path_factory.mktemp("ckpts")
    train = data.load("digits", "train").subset(300, seed=0)
    out = {}
    for name, seed, norm in (("a", 0, "none"), ("b", 1, "none"), ("bn", 2, "batch")):
        net = models.build("mlp", train.input_shape, 10, seed=seed, width=16, depth=1, norm=norm)
        fit(net, train, epochs=1, seed=seed, progress=False)
        io.save(net, root / f"{name}.safetensors", {"dataset": "digits"})
        out[name] = root / f"{name}.safetensors"
    return out


def _poisoned(src: Path, dst: Path, key: str | None = None, value: float = math.nan) -> str:
    state, meta = io.load_state(src)
    key = key or next(k for k in state if k.endswith("weight"))
    t = state[key].clone()
    t.view(-1)[t.numel() // 2] = value
    state[key] = t
    io.save_state(state, dst, meta)
    return key


# --------------------------------------------------------------------------- bad values


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_single_nonfinite_value_in_any_tensor_of_any_input_file_is_named(ckpts, draw):
    """Property: one NaN/±Inf anywhere (any float tensor, BN buffers included, any element) in a
    safetensors or .pt file is refused on load with the file and that key named."""
    state, meta = io.load_state(ckpts["bn"])
    floats = [k for k, v in state.items() if v.is_floating_point()]
    key = draw.draw(st.sampled_from(floats), label="key")
    index = draw.draw(st.integers(0, state[key].numel() - 1), label="index")
    value = draw.draw(st.sampled_from([math.nan, math.inf, -math.inf]), label="value")
    suffix = draw.draw(st.sampled_from([".safetensors", ".pt"]), label="format")
    state[key] = state[key].clone()
    state[key].view(-1)[index] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"poisoned{suffix}"
        if suffix == ".pt":
            torch.save({"state_dict": state, "meta": meta}, path)
        else:
            io.save_state(state, path, meta)
        kind = "NaN" if math.isnan(value) else "Inf"
        for load in (checks.load_model, checks.load_state):
            with pytest.raises(NonFiniteError, match=f"{path.name}: key '{key}' contains {kind}"):
                load(path)
        assert checks.load_state(path, allow_nonfinite=True)[0].keys() == state.keys()


@pytest.mark.parametrize("command", ["eval", "interpolate", "align", "scope"])
def test_commands_refuse_a_nonfinite_checkpoint_naming_file_and_key(ckpts, tmp_path, capsys,
                                                                    command):
    bad = tmp_path / "bad.safetensors"
    key = _poisoned(ckpts["b"], bad)
    args = {"eval": ["eval", str(bad)],
            "interpolate": ["interpolate", str(ckpts["a"]), str(bad), "--points", "3"],
            "align": ["align", str(ckpts["a"]), str(bad), "--out", str(tmp_path / "x.safetensors")],
            "scope": ["scope", str(ckpts["a"]), str(bad)]}[command]
    code, _, err = run_cli(["-q", *args], capsys)
    assert code == 1
    line = one_error(err)
    assert "bad.safetensors" in line and f"key '{key}' contains NaN" in line
    assert files_under(tmp_path) == ["bad.safetensors"]


def test_nonfinite_loss_stops_training_naming_step_and_epoch():
    train = data.load("digits", "train").subset(200, seed=0)
    net = models.build("mlp", train.input_shape, 10, seed=0, width=16, depth=1)
    with pytest.raises(NonFiniteError, match=r"training diverged: .* step (\d+) \(epoch 1\)"):
        fit(net, train, lr=1e10, epochs=3, batch_size=32, progress=False)
    net = models.build("mlp", train.input_shape, 10, seed=0, width=16, depth=1)
    hist = fit(net, train, lr=1e10, epochs=1, batch_size=32, progress=False, allow_nonfinite=True)
    assert not math.isfinite(hist.final["loss"])


def test_train_cli_diverging_writes_no_checkpoint(tmp_path, capsys):
    out = tmp_path / "runs" / "x.safetensors"
    code, _, err = run_cli(["-q", "train", "-d", "digits", "--width", "16", "--depth", "1",
                            "--train-limit", "200", "--batch-size", "32", "--lr", "1e30", "--out", str(out)], capsys)
    assert code == 1
    assert "training diverged" in one_error(err) and "epoch 1" in one_error(err)
    assert files_under(tmp_path) == []


# --------------------------------------------------------------------------- data vs model


@pytest.mark.parametrize("command", ["eval", "interpolate", "align"])
def test_wrong_dataset_is_named_before_any_work(ckpts, tmp_path, capsys, command):
    args = {"eval": ["eval", str(ckpts["a"]), "--dataset", "mnist1d"],
            "interpolate": ["interpolate", str(ckpts["a"]), str(ckpts["b"]), "-d", "mnist1d"],
            "align": ["align", str(ckpts["a"]), str(ckpts["b"]), "--method", "activation",
                      "--data", "mnist1d", "--out", str(tmp_path / "x.safetensors")]}[command]
    code, _, err = run_cli(["-q", *args], capsys)
    assert code == 1
    line = one_error(err)
    assert "a.safetensors" in line and "(1, 8, 8)" in line and "(40,)" in line
    assert "trained on 'digits'" in line and "mat1" not in line
    assert files_under(tmp_path) == []


def test_check_data_fits_from_metadata_and_from_layers(ckpts):
    mnist1d = data.load("mnist1d", "test")
    digits = data.load("digits", "test")
    meta = io.read_meta(ckpts["a"])  # what a merge can check before loading any tensor
    checks.check_data_fits(meta, digits)
    with pytest.raises(ConfigError, match="trained on 'digits'"):
        checks.check_data_fits(meta, mnist1d, source="a.safetensors")
    # A model built elsewhere, without a record: its first and last layers decide.
    bare = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 10))
    checks.check_data_fits(bare, digits)
    with pytest.raises(ConfigError, match="first layer takes 64 input features"):
        checks.check_data_fits(bare, mnist1d)
    five = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))
    with pytest.raises(ConfigError, match="predicts 5 classes.* 10 classes"):
        checks.check_data_fits(five, digits)


# --------------------------------------------------------------------------- outputs first


@pytest.fixture
def no_data(monkeypatch):
    """Fail the test if a command loads any dataset: outputs must be checked before that."""
    def refuse(*a, **k):
        raise AssertionError("data was loaded before the output path was checked")
    monkeypatch.setattr(data, "load", refuse)


@pytest.mark.parametrize("case", ["empty", "under-file", "is-folder", "extension"])
def test_train_checks_its_output_before_loading_data(tmp_path, capsys, no_data, case):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.safetensors").mkdir()
    out, words = {"empty": ("", "path is empty"),
                  "under-file": (str(tmp_path / "afile" / "m.safetensors"), "is a file"),
                  "is-folder": (str(tmp_path / "adir.safetensors"), "is a folder"),
                  "extension": (str(tmp_path / "m.pt"), "must end in .safetensors")}[case]
    before = files_under(tmp_path)
    code, _, err = run_cli(["-q", "train", "-d", "digits", "--out", out], capsys)
    assert code == 1
    assert words in one_error(err)
    assert files_under(tmp_path) == before


def test_check_output_refuses_an_unwritable_folder(tmp_path, monkeypatch):
    import basinmerge.io as io_mod

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(io_mod.tempfile, "mkstemp", denied)
    with pytest.raises(ConfigError, match=r"new/m\.safetensors: cannot write in .*Permission denied"):
        io.check_output(tmp_path / "new" / "m.safetensors", suffixes=(".safetensors",))
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("command", [["demo", "--scale", "smoke"],
                                     ["reproduce", "--scale", "smoke"],
                                     ["experiment", "rebasin", "--scale", "smoke"],
                                     ["experiment", "mode-connectivity", "--scale", "smoke"],
                                     ["experiment", "wsa-defaults", "--scale", "smoke"]])
def test_run_folders_are_not_overwritten_without_force(tmp_path, capsys, no_data, command):
    (tmp_path / "result.json").write_text("{}")
    code, _, err = run_cli(["-q", *command, "--out", str(tmp_path)], capsys)
    assert code == 1
    line = one_error(err)
    assert str(tmp_path) in line and "earlier run (result.json)" in line and "--force" in line
    assert files_under(tmp_path) == ["result.json"]
    # --force passes the check and the command gets as far as loading data
    with pytest.raises(AssertionError, match="data was loaded"):
        main(["--debug", "-q", *command, "--out", str(tmp_path), "--force"])


def test_plot_and_align_outputs_are_checked_first(ckpts, tmp_path, capsys):
    code, _, err = run_cli(["-q", "interpolate", str(ckpts["a"]), str(ckpts["b"]), "--plot",
                            str(tmp_path / "curves.pdf")], capsys)
    assert code == 1 and "must end in .png" in one_error(err)
    code, _, err = run_cli(["-q", "scope", str(ckpts["a"]), "--plot", str(tmp_path)], capsys)
    assert code == 1 and "is a folder" in one_error(err)
    code, _, err = run_cli(["-q", "align", str(ckpts["a"]), str(ckpts["b"]), "--out",
                            str(tmp_path / "x.json")], capsys)
    assert code == 1 and "must end in .safetensors" in one_error(err)
    assert files_under(tmp_path) == []


# --------------------------------------------------------------------------- Ctrl-C, resume


def test_ctrl_c_in_train_says_nothing_was_saved_and_how_to_rerun(tmp_path, capsys, monkeypatch):
    import basinmerge.train as train_mod

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_mod, "fit", interrupted)
    out = tmp_path / "m.safetensors"
    args = ["-q", "train", "-d", "digits", "--width", "16", "--out", str(out)]
    code, _, err = run_cli(args, capsys)
    assert code == 130
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("interrupted; nothing was saved")
    assert lines[0].endswith("Run again: basinmerge " + " ".join(args))
    assert files_under(tmp_path) == []


def test_ctrl_c_in_the_demo_names_its_folder_and_the_command(tmp_path, capsys, monkeypatch):
    from basinmerge.experiments import demo

    def interrupted(**kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(demo, "run", interrupted)
    out = tmp_path / "demo"
    code, _, err = run_cli(["-q", "demo", "--scale", "smoke", "--out", str(out)], capsys)
    assert code == 130
    assert err.strip() == (f"interrupted; nothing was saved (the demo writes {out} when it ends). "
                           f"Run again: basinmerge -q demo --scale smoke --out {out}")
    assert not out.exists()


def _fake_suite(name: str, calls: dict, fail: dict) -> types.ModuleType:
    mod = types.ModuleType(f"fake_suite_{name}")

    def run(*, scale, device, out, seeds=None, seed=0):
        calls[name] = calls.get(name, 0) + 1
        if fail.pop(name, False):
            raise KeyboardInterrupt
        import matplotlib.pyplot as plt

        fig = plt.figure()
        return ExperimentResult(name=f"suite {name}", config={"scale": scale},
                                tables={"t": Table(["seed", "value"], [[seed, len(name)]])},
                                figures={"f": fig})
    mod.run = run
    return mod


def test_ctrl_c_then_resume_reuses_finished_suites(tmp_path, capsys, monkeypatch):
    calls: dict = {}
    fail = {"second": True}
    for n in ("first", "second"):
        monkeypatch.setitem(sys.modules, f"fake_suite_{n}", _fake_suite(n, calls, fail))
    monkeypatch.setattr(reproduce, "SUITES", {"first": "fake_suite_first",
                                              "second": "fake_suite_second"})
    out = tmp_path / "rep"
    code, _, err = run_cli(["-q", "reproduce", "--scale", "smoke", "--seed", "7", "--out",
                            str(out)], capsys)
    assert code == 130
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1
    assert f"suites first are saved under {out}" in lines[0]
    assert lines[0].endswith(f"Resume: basinmerge reproduce --resume {out}")
    assert calls == {"first": 1, "second": 1}
    # options given again must agree
    code, _, err = run_cli(["-q", "reproduce", "--resume", str(out), "--scale", "quick"], capsys)
    assert code == 1 and "scale: the run used 'smoke', given 'quick'" in one_error(err)
    # --resume alone takes every option from the folder and reuses the finished suite
    code, _, err = run_cli(["-q", "reproduce", "--resume", str(out)], capsys)
    assert code == 0, err
    assert calls == {"first": 1, "second": 2}
    md = (out / "report.md").read_text()
    assert "suite first" in md and "suite second" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2
    assert io.read_json(out / "second" / "result.json")["tables"]["t"]["rows"] == [[7, 6]]


# --------------------------------------------------------------------------- progress, threads


def test_plain_progress_lines_per_epoch_off_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(console, "_quiet", False)
    assert not console.err_console.is_terminal  # pytest captures stderr
    train = data.load("digits", "train")
    net = models.build("mlp", train.input_shape, 10, seed=0, width=8, depth=1)
    fit(net, train, epochs=3, batch_size=8, description="train", progress=True)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("train:")]
    steps = math.ceil(len(train) / 8)
    assert [ln.split()[1] for ln in lines] == [f"{e * steps}/{3 * steps}" for e in (1, 2, 3)]
    assert [ln.split()[2] for ln in lines] == ["epoch=1", "epoch=2", "epoch=3"]
    with console.progress_task("stages", 3) as advance:
        for i in range(3):
            advance(1, step=f"s{i}")
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split()[:3] for ln in lines] == [["stages:", f"{i + 1}/3", f"step=s{i}"]
                                               for i in range(3)]


@pytest.mark.parametrize("env,want", [({}, 1), ({"OMP_NUM_THREADS": "2"}, 2),
                                      ({"BASINMERGE_THREADS": "3", "OMP_NUM_THREADS": "2"}, 3),
                                      ({"BASINMERGE_THREADS": "0"}, None)])
def test_thread_default(monkeypatch, env, want):
    for var in ("BASINMERGE_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert threads.wanted() == want
    before = torch.get_num_threads()
    try:
        threads.apply_default()
        assert torch.get_num_threads() == (before if want is None else want)
    finally:
        torch.set_num_threads(before)
