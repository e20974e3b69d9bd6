"""Flower across processes on localhost: the app folder, bad input, and (marked `deployment`,
minutes) a real SuperLink + 2 SuperNodes + `flwr run` against the embedded simulator."""

from __future__ import annotations

import dataclasses
import socket
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from basinmerge import fl  # noqa: E402
from basinmerge.errors import ConfigError, FederatedError  # noqa: E402
from basinmerge.fl import deployment  # noqa: E402
from basinmerge.fl.flower_app import config_from_run_config  # noqa: E402
from basinmerge.fl.processes import alive  # noqa: E402

CFG = dict(dataset="digits", model="mlp", model_options={"width": 16}, clients=2, alpha=0.5,
           min_size=5, rounds=2, local_epochs=1, batch_size=32, fraction=1.0, lr=0.1,
           strategy="scaffold", train_limit=600, test_limit=300)


def test_app_folder_depends_on_a_wheel_of_this_code_only(tmp_path):
    cfg = fl.FLConfig(**CFG)
    pyproject = deployment.write_app(tmp_path / "app", cfg, "rel/out")
    conf = tomllib.loads(pyproject.read_text())
    (dep,) = conf["project"]["dependencies"]
    name, _, url = dep.partition(" @ ")
    assert name == "basinmerge[flower]" and url.startswith("file:///")  # never by name alone
    wheel = tmp_path / "app" / "wheels" / url.rsplit("/", 1)[1]
    assert wheel.is_file()
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert "basinmerge/fl/deployment.py" in names
        assert z.read("basinmerge/fl/deployment.py") == open(deployment.__file__, "rb").read()
        record = z.read(next(n for n in names if n.endswith("RECORD"))).decode()
        assert "basinmerge/fl/strategy.py,sha256=" in record
    run = conf["tool"]["flwr"]["app"]["config"]
    assert run["out"] == str(Path("rel/out").resolve())  # absolute: the SuperLink's cwd differs
    assert run["code-hash"] == deployment.code_hash()
    assert config_from_run_config(run) == cfg  # the same run, read back by the apps
    # Every optional field, set or unset, survives the run config (which has no None).
    full = dataclasses.replace(cfg, train_limit=300, test_limit=100, data_root="/data",
                               test_data="/data/test.safetensors")
    assert config_from_run_config({**deployment.run_config(full, "out")}) == full
    with pytest.raises(ConfigError, match="is not the code the Flower app was built from"):
        config_from_run_config({**run, "code-hash": "0" * 64})


def test_cli_flower_app_checks_values_first(tmp_path, capsys):
    from basinmerge.cli import main

    with pytest.raises(SystemExit) as e:
        main(["flower-app", str(tmp_path / "app"), "--set", "strategy=fedsgd"])
    assert e.value.code == 1 and "unknown strategy 'fedsgd'" in capsys.readouterr().err
    assert not (tmp_path / "app").exists()
    with pytest.raises(SystemExit) as e:
        main(["flower-app", str(tmp_path / "app"), "--set", "clients=2", "--set", "strategy=wsa",
              "--set", 'strategy-options={"lambda": 2}'])
    assert e.value.code in (0, None)
    conf = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    assert conf["tool"]["flwr"]["app"]["config"]["strategy-options"] == '{"lambda": 2}'


def test_flower_missing_and_port_in_use_fail_before_starting_anything(tmp_path, monkeypatch):
    cfg = fl.FLConfig(**CFG)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(FederatedError, match=f"port {port} on 127.0.0.1 is in use"):
            deployment.run_deployment(cfg, tmp_path / "out", superlink_port=port)
    assert not (tmp_path / "out" / "flower" / "logs" / "superlink.log").exists()
    monkeypatch.setattr(deployment.sys, "executable", str(tmp_path / "nowhere" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FederatedError, match="Flower is not installed"):
        deployment.run_deployment(cfg, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


@pytest.mark.deployment
def test_real_deployment_matches_embedded(tmp_path):
    """SuperLink + 2 SuperNodes + `flwr run` on localhost, 2 rounds on digits: the final
    weights are the embedded simulator's, and every process started is gone afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = fl.FLConfig(**CFG)
        train, test = fl.load_data(cfg)
        emb = fl.simulate(fl.build_model(cfg, train), train, test, fl.build_partitions(cfg, train),
                          cfg.make_strategy(), cfg.local_training(), rounds=cfg.rounds,
                          seed=cfg.seed, progress=False)
    finally:
        torch.set_num_threads(threads)
    res = deployment.run_deployment(cfg, tmp_path / "out", connect_timeout=240, run_timeout=540)
    assert len(res.extra["pids"]) >= 3 and not [p for p in res.extra["pids"] if alive(p)]
    assert [r["round"] for r in res.history] == [0, 1, 2]
    assert res.accuracy_curve() == emb.accuracy_curve()
    assert all(torch.equal(res.state[k], emb.state[k]) for k in emb.state)


@pytest.mark.deployment
def test_deployment_with_a_missing_supernode_fails_with_the_serverapps_error(tmp_path):
    cfg = fl.FLConfig(**CFG)
    with pytest.raises(FederatedError, match=r"ended 'finished:failed.*only 1 of 2 SuperNodes "
                                             r"connected within 30 s"):
        deployment.run_deployment(cfg, tmp_path / "out", connect_timeout=30, run_timeout=400,
                                  supernodes=1)
    assert not (tmp_path / "out" / "final.safetensors").exists()
