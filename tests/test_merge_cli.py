"""`basinmerge merge` and `basinmerge experiment merging` end to end on tiny models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from basinmerge import data as data_mod
from basinmerge import io, models
from basinmerge.cli import app, main
from basinmerge.merge import ties
from basinmerge.train import evaluate, fit

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    train = data_mod.load("digits", "train")
    net = models.build("mlp", train.input_shape, 10, seed=0, width=16)
    fit(net, train, epochs=1, lr=0.05, progress=False)
    base = io.save(net, d / "base.safetensors", {"dataset": "digits"})
    paths = []
    for i in range(3):
        m = copy.deepcopy(net)
        idx = torch.nonzero(train.y % 3 == i).flatten()
        fit(m, train.subset(idx), epochs=1, lr=0.05, seed=i, progress=False)
        paths.append(io.save(m, d / f"m{i}.safetensors", {"dataset": "digits"}))
    return d, base, paths


def test_cli_ties_streams_and_prints_accuracy(ckpts):
    d, base, paths = ckpts
    out = d / "ties.safetensors"
    res = runner.invoke(app, ["merge", *map(str, paths), "--method", "ties", "--base", str(base),
                              "--opt", "density=0.5", "-O", "scale=1", "--out", str(out),
                              "--dataset", "digits", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    merged, meta = io.load(out)
    assert meta["merge"]["streamed"] is True and meta["merge"]["options"] == {"density": 0.5, "scale": 1.0}
    ref = ties(io.load_state(base)[0], [io.load_state(p)[0] for p in paths], density=0.5, scale=1.0)
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in ref.items())
    test = data_mod.load("digits", "test")
    assert report["test_accuracy"]["merged (ties)"] == pytest.approx(evaluate(merged, test)["accuracy"])
    # the in-memory path writes the same tensors
    out2 = d / "ties_mem.safetensors"
    res = runner.invoke(app, ["merge", *map(str, paths), "--method", "ties", "--base", str(base),
                              "--opt", "density=0.5", "--out", str(out2), "--no-stream"])
    assert res.exit_code == 0, res.output
    mem, meta2 = io.load(out2)
    assert meta2["merge"]["streamed"] is False
    assert all(torch.equal(mem.state_dict()[k], v) for k, v in ref.items())


def test_cli_soft_writes_gate_table(ckpts):
    d, _, paths = ckpts
    out = d / "soft.safetensors"
    res = runner.invoke(app, ["merge", *map(str, paths), "--method", "soft", "--dataset", "digits",
                              "--opt", "steps=10", "--opt", "units=module", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "merged (soft)" in res.output
    gates = json.loads((d / "soft.gates.json").read_text())
    assert gates["units"] == ["layers.0", "layers.1", "head"]
    assert len(gates["gates"]) == 3 and len(gates["gates"][0]) == 3
    merged, meta = io.load(out)
    assert meta["merge"]["method"] == "soft" and meta["merge"]["options"]["units"] == "module"


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "ties"], "merge method 'ties' needs a base model (option 'base')"),
    (["--method", "average", "--opt", "density=0.2"], "merge method 'average' has no option 'density'"),
    (["--method", "fisher"], "merge method 'fisher' needs data (inputs) (option 'data')"),
    (["--method", "nope"], "unknown merge method 'nope'"),
    (["--method", "ties", "--base", "BASE", "--opt", "density=lots"],
     "merge method 'ties': option 'density' expects float, got 'lots'"),
    (["--method", "weighted"], "merge method 'weighted' needs option 'weights'"),
    (["--method", "fisher", "--opt", "fishers=1"], "option 'fishers' takes a Python object"),
    (["--method", "slerp", "--opt", "t=0.3"], "option 't' applies to two models"),
])
def test_cli_errors_are_one_line(ckpts, capsys, args, message):
    d, base, paths = ckpts
    args = [str(base) if a == "BASE" else a for a in args]
    with pytest.raises(SystemExit) as exc:
        main(["merge", *map(str, paths), *args, "--out", str(d / "x.safetensors")])
    assert exc.value.code == 1
    err = capsys.readouterr().err.replace("\n", "")
    assert message in err and "Traceback" not in err
    assert not (d / "x.safetensors").exists()


def test_cli_incompatible_checkpoints_name_the_key(ckpts, tmp_path, capsys):
    _, _, paths = ckpts
    other = io.save(models.build("mlp", (1, 8, 8), 10, seed=0, width=8), tmp_path / "o.safetensors")
    with pytest.raises(SystemExit):
        main(["merge", str(paths[0]), str(other), "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err.replace("\n", "")
    assert "models do not match: key '" in err and "o.safetensors has" in err


@pytest.mark.slow
def test_experiment_merging_smoke(tmp_path):
    from basinmerge.experiments import merging

    res = merging.run(dataset="digits", scale="smoke", seeds=1, progress=False)
    acc = res.tables["test accuracy"]
    methods = [r[0] for r in acc.rows]
    assert methods == merging.method_rows()
    guard = {r[0]: r[1] for r in res.tables["member guard"].rows}
    assert guard == {"clean": "1/1", "+x1000": "1/1", "+noise": "1/1", "+flip": "1/1"}
    assert acc.columns[1:5] == ["clean", "+x1000", "+noise", "+flip"]
    seed0 = res.data["per_seed"][0]
    # the ensemble and the best single model are measured on the same test set as the merges
    assert 0.0 <= seed0["clean"]["accuracy"]["ensemble"] <= 1.0
    # averaging in a x1000 member destroys the soup; the best single model is unaffected
    assert seed0["+x1000"]["accuracy"]["average"] < seed0["clean"]["accuracy"]["average"]
    assert seed0["+x1000"]["accuracy"]["best single"] == seed0["clean"]["accuracy"]["best single"]
    from basinmerge.experiments.common import write_result

    out = write_result(res, tmp_path / "merging")
    assert (out / "merging_accuracy.png").stat().st_size > 0
    assert json.loads((out / "result.json").read_text())["name"] == "merging"
