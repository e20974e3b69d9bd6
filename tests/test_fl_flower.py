"""The Flower backend: record conversions, and 2 clients x 2 rounds through Flower's simulation
engine (Ray) against the embedded simulator."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")
pytestmark = pytest.mark.flower

from basinmerge import fl  # noqa: E402
from basinmerge.errors import ConfigError  # noqa: E402
from basinmerge.fl.client import Instructions  # noqa: E402
from basinmerge.fl.codec import (  # noqa: E402
    instructions_from_content,
    instructions_to_records,
    scope_from_record,
    scope_to_record,
)
from basinmerge.fl.flower_app import config_from_run_config, run_flower  # noqa: E402
from basinmerge.fl.processes import alive as _alive  # noqa: E402
from basinmerge.fl.processes import descendant_pids  # noqa: E402
from basinmerge.models import build  # noqa: E402
from basinmerge.scope import weight_scope  # noqa: E402

CFG = dict(dataset="digits", model="mlp", model_options={"width": 16}, clients=2, alpha=0.5,
           min_size=5, rounds=2, local_epochs=2, batch_size=32, fraction=1.0, lr=0.1,
           strategy="wsa", strategy_options={"lambda": 1.0}, train_limit=600, test_limit=300)


def test_scope_and_instructions_survive_the_records():
    from flwr.app import ConfigRecord, RecordDict

    scope = weight_scope(build("mlp", (7,), 3, seed=0, width=5))
    assert scope_from_record(scope_to_record(scope)) == scope
    instr = Instructions(round=4, mu=0.5, wsa_lambda=2.0, divergence="w2", reduce="sum",
                         target=scope)
    records = instructions_to_records(instr)
    content = RecordDict({**records, "config": ConfigRecord(records["config"])})
    assert instructions_from_content(content, 4) == instr


def test_config_from_run_config():
    cfg = config_from_run_config({"clients": 4, "local-epochs": 3, "strategy": "wsa",
                                  "model-options": '{"width": 64}', "train-limit": 0,
                                  "out": "runs/x"})
    assert (cfg.clients, cfg.local_epochs, cfg.strategy) == (4, 3, "wsa")
    assert cfg.model_options == {"width": 64} and cfg.train_limit is None
    with pytest.raises(ConfigError, match="unknown federated option 'colour'"):
        config_from_run_config({"colour": "red"})


@pytest.mark.slow
def test_flower_simulation_matches_embedded(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same as the Ray workers
    try:
        cfg = fl.FLConfig(**CFG)
        train, test = fl.load_data(cfg)
        emb = fl.simulate(fl.build_model(cfg, train), train, test, fl.build_partitions(cfg, train),
                          cfg.make_strategy(), cfg.local_training(), rounds=cfg.rounds,
                          seed=cfg.seed, progress=False)
        before = descendant_pids()
        res = run_flower(cfg, out=tmp_path / "out", progress=False, num_cpus=2)
    finally:
        torch.set_num_threads(threads)
    # Every Flower/Ray process the run started is gone (run_flower stops them; check it did).
    assert res.extra["worker_pids"], "no Ray worker was seen during the run"
    assert not [p for p in res.extra["worker_pids"] if _alive(p)]
    assert not (descendant_pids() - before)
    assert [r["round"] for r in res.history] == [0, 1, 2]
    assert all(r["clients"] == [0, 1] == r["accepted"] for r in res.history[1:])
    assert emb.accuracy_curve()[0] == res.accuracy_curve()[0]  # the same initial model
    assert res.final_accuracy > emb.history[0]["test_accuracy"] + 0.2  # it learned something
    assert abs(res.final_accuracy - emb.final_accuracy) <= 0.02
    diff = max(float((res.state[k] - emb.state[k]).abs().max()) for k in emb.state)
    assert diff < 1e-4
    assert (tmp_path / "out" / "final.safetensors").is_file()
    assert (tmp_path / "out" / "rounds.json").is_file()
