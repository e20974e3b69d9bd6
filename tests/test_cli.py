"""The foundation commands (`--version`, `datasets`, `train`, `eval`) and the CLI's error
contract: one `error:` line, a non-zero exit code, a traceback only with --debug."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import basinmerge
from basinmerge import data, io, train
from basinmerge.cli import main
from basinmerge.errors import CheckpointError

SRC = Path(basinmerge.__file__).resolve().parents[1]


def run_cli(args: list[str]) -> int:
    """Call the CLI in-process and return its exit code."""
    with pytest.raises(SystemExit) as e:
        main(args)
    code = e.value.code
    return 0 if code is None else int(code)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error")]


def test_version(capsys):
    assert run_cli(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"basinmerge {basinmerge.__version__}"


def test_datasets_lists_every_name(capsys):
    assert run_cli(["datasets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == data.names()
    by_name = {r["name"]: r for r in rows}
    assert by_name["digits"]["found"] == "scikit-learn (bundled)"
    assert all(r["how_to_get"] for r in rows)
    assert run_cli(["datasets"]) == 0
    table = capsys.readouterr().out
    assert all(n in table for n in data.names())


def test_train_then_eval(tmp_path, capsys):
    ckpt = tmp_path / "runs" / "a.safetensors"
    code = run_cli(["--quiet", "train", "--dataset", "digits", "--model", "mlp", "--width", "32",
                    "--depth", "1", "--optimizer", "adam", "--lr", "1e-2", "--epochs", "2",
                    "--seed", "0", "--out", str(ckpt)])
    assert code == 0
    out = capsys.readouterr().out
    assert f"saved {ckpt}" in out.replace("\n", "")
    model, meta = io.load(ckpt)
    assert meta["dataset"] == "digits" and meta["model"]["width"] == 32
    assert meta["training"]["optimizer"] == "adam" and meta["training"]["epochs"] == 2
    assert len(meta["history"]["epochs"]) == 2
    test_acc = meta["metrics"]["test"]["accuracy"]
    assert test_acc > 0.8

    assert run_cli(["eval", str(ckpt), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["dataset"] == "digits" and res["split"] == "test"
    assert res["accuracy"] == test_acc
    assert res["accuracy"] == train.evaluate(model, data.load("digits", "test"))["accuracy"]
    assert run_cli(["eval", str(ckpt), "--split", "train", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == meta["metrics"]["train"]["accuracy"]


def test_train_is_reproducible_from_the_cli(tmp_path, capsys):
    args = ["--quiet", "train", "-d", "digits", "--width", "16", "--depth", "1", "--epochs", "1",
            "--train-limit", "200", "--seed", "3"]
    assert run_cli(args + ["--out", str(tmp_path / "a.safetensors")]) == 0
    assert run_cli(args + ["--out", str(tmp_path / "b.safetensors")]) == 0
    sa, _ = io.load_state(tmp_path / "a.safetensors")
    sb, meta = io.load_state(tmp_path / "b.safetensors")
    assert all((sa[k] == sb[k]).all() for k in sa)
    assert meta["train_limit"] == 200 and meta["model"]["seed"] == 3


def test_missing_checkpoint_is_one_error_line(tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    assert run_cli(["eval", str(missing)]) == 1
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert len(lines) == 1 and str(missing) in lines[0] and "not found" in lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_debug_raises_and_does_not_stick(tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(CheckpointError, match="not found"):
        main(["--debug", "eval", str(missing)])
    # --debug applies to that call only: the next call reports one line again
    assert run_cli(["eval", str(missing)]) == 1
    assert len(error_lines(capsys.readouterr().err)) == 1


def test_long_error_stays_on_one_line(tmp_path, monkeypatch, capsys):
    """The missing-dataset message is longer than the 80 columns rich assumes off a terminal."""
    monkeypatch.delenv("BASINMERGE_DATA", raising=False)
    code = run_cli(["--quiet", "train", "-d", "cifar100", "--data-root", str(tmp_path),
                    "--out", str(tmp_path / "x.safetensors")])
    assert code == 1
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1 and len(lines[0]) > 120
    assert "cifar100" in lines[0] and "To get it:" in lines[0] and "downloaded" in lines[0]


def test_error_text_with_brackets_is_printed_verbatim(tmp_path, capsys):
    """rich markup must not eat bracketed text that comes from the user."""
    code = run_cli(["--quiet", "train", "-d", "digits", "--optimizer", "[bold]sgd[/bold]",
                    "--out", str(tmp_path / "a.safetensors")])
    assert code == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "unknown optimizer '[bold]sgd[/bold]'" in lines[0]


def test_bad_option_values(tmp_path, capsys):
    assert run_cli(["--quiet", "train", "-d", "digits", "--optimizer", "rmsprop",
                    "--out", str(tmp_path / "a.safetensors")]) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "unknown optimizer 'rmsprop'" in lines[0]
    assert not (tmp_path / "a.safetensors").exists()
    # a fractional width is refused, not truncated
    assert run_cli(["--quiet", "train", "-d", "digits", "--model", "mlp", "--width", "16.5",
                    "--out", str(tmp_path / "a.safetensors")]) == 1
    assert "must be integers" in error_lines(capsys.readouterr().err)[0]
    assert run_cli(["eval", str(tmp_path / "x.safetensors"), "--dataset", "nope"]) == 1
    # a usage error (unknown option) is click's, exit code 2
    assert run_cli(["train", "--no-such-option"]) == 2


def _subprocess_cli(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from basinmerge.cli import main; main(sys.argv[1:])"
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "BASINMERGE_QUIET": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.slow
def test_real_process_debug_traceback(tmp_path):
    """In a real process, --debug lets the exception escape: Python prints the traceback and
    exits with status 1 (the plain one-line path is covered in-process above)."""
    debug = _subprocess_cli("--debug", "eval", str(tmp_path / "missing.safetensors"))
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "CheckpointError" in debug.stderr and "missing.safetensors" in debug.stderr


HEAVY = ("flwr", "transformers", "scipy", "pydantic", "matplotlib", "yaml", "sklearn", "pandas")


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--help"], ["merge", "--method", "average"]])
def test_help_and_argument_errors_load_no_heavy_package(args):
    """`python -m basinmerge --help` and an argument error (exit 2) in a real process through
    the entry point: none of the heavy packages is imported (each loads on first use), and the
    garbage collector, held off during the imports, is on again with the imports frozen."""
    code = ("import atexit, gc, sys\n"
            "def report():\n"
            f"    print('LOADED', [m for m in {HEAVY!r} if m in sys.modules])\n"
            "    print('GC', gc.isenabled(), gc.get_freeze_count() > 0)\n"
            "atexit.register(report)\n"
            "from basinmerge.__main__ import run\n"
            "run()\n")
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "BASINMERGE_QUIET": "1"}
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == (0 if args == ["--help"] else 2), r.stderr
    assert "LOADED []" in r.stdout and "GC True True" in r.stdout, r.stdout
    assert ("Usage" in r.stdout + r.stderr) and ("merge" in r.stdout + r.stderr)
