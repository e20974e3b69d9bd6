"""Federated learning: partitions, aggregation, client update, strategies, simulator, CLI."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from basinmerge import data as data_mod
from basinmerge import fl
from basinmerge.errors import ConfigError
from basinmerge.fl.aggregate import (
    coordinate_median,
    fedavg,
    scope_spread,
    screen_updates,
    trimmed_mean,
)
from basinmerge.fl.client import (
    ClientTimeout,
    Instructions,
    LocalTraining,
    client_update,
)
from basinmerge.fl.partition import class_histogram, partition, summarize
from basinmerge.fl.simulator import simulate
from basinmerge.fl.strategy import WSA, FedAvg, FedProx
from basinmerge.models import build
from basinmerge.penalties import ProximalPenalty
from basinmerge.scope import divergence, fuse, std_ratios, weight_scope

TINY = dict(dataset="digits", model="mlp", model_options={"width": 16}, clients=5, alpha=0.5,
            min_size=5, rounds=3, local_epochs=1, batch_size=32, fraction=0.6, train_limit=500,
            test_limit=200)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    cfg = fl.FLConfig(**TINY)
    train, test = fl.load_data(cfg)
    return cfg, train, test


def _run(cfg, train, test, **kw):
    return simulate(fl.build_model(cfg, train), train, test, fl.build_partitions(cfg, train),
                    cfg.make_strategy(), cfg.local_training(), rounds=kw.pop("rounds", cfg.rounds),
                    seed=cfg.seed, progress=False, config=cfg.identity(), **kw)


# --------------------------------------------------------------------------- partitions


@settings(max_examples=30, deadline=None)
@given(n=st.integers(20, 300), k=st.integers(1, 10), clients=st.integers(1, 8),
       scheme=st.sampled_from(["iid", "dirichlet", "shards"]), seed=st.integers(0, 10_000),
       alpha=st.floats(0.05, 10))
def test_partition_disjoint_covering_deterministic(n, k, clients, scheme, seed, alpha):
    labels = torch.from_numpy(np.random.default_rng(seed).integers(0, k, n))
    parts = partition(labels, clients, scheme, alpha=alpha, min_size=1, seed=seed)
    assert len(parts) == clients
    allidx = torch.cat(parts)
    assert allidx.numel() == n and torch.equal(allidx.sort().values, torch.arange(n))
    assert all(p.numel() >= 1 for p in parts)
    assert all(torch.equal(p, p.sort().values) for p in parts)
    again = partition(labels, clients, scheme, alpha=alpha, min_size=1, seed=seed)
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))


def test_dirichlet_alpha_controls_skew_and_min_size():
    y = data_mod.load("digits", "train").y
    skewed = partition(y, 10, "dirichlet", alpha=0.1, min_size=20, seed=1)
    near_iid = partition(y, 10, "dirichlet", alpha=100.0, min_size=20, seed=1)
    assert min(p.numel() for p in skewed) >= 20
    tv_skewed = summarize(y, skewed)["mean_tv_distance"]
    tv_iid = summarize(y, near_iid)["mean_tv_distance"]
    assert tv_skewed > 0.4 > 0.1 > tv_iid
    assert any(p.numel() != skewed[0].numel() for p in skewed)  # unequal sizes at small alpha


def test_shards_limit_classes_and_histogram_counts():
    y = data_mod.load("digits", "train").y
    parts = partition(y, 10, "shards", classes_per_client=2, seed=3)
    hist = class_histogram(y, parts, 10)
    top2 = hist.sort(1, descending=True).values[:, :2].sum(1)
    assert (top2 >= 0.9 * hist.sum(1)).all()  # two classes, up to boundary-straddling shards
    assert torch.equal(hist.sum(0), torch.bincount(y, minlength=10))
    assert hist.sum(1).tolist() == [p.numel() for p in parts]


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_clients=51), "more clients"),
    (dict(num_clients=5, scheme="dirichlet", alpha=0.0), "alpha must be > 0"),
    (dict(num_clients=5, scheme="dirichlet", alpha=-1.0), "alpha must be > 0"),
    (dict(num_clients=5, scheme="dirichlet", min_size=20), "exceeds"),
    (dict(num_clients=5, scheme="bogus"), "unknown partition scheme"),
])
def test_partition_bad_input(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        partition(torch.arange(50) % 5, **kwargs)


def test_dirichlet_gives_up_with_clear_error():
    y = torch.zeros(40, dtype=torch.long)
    y[:2] = 1
    with pytest.raises(ConfigError, match="draws"):
        partition(y, 4, "dirichlet", alpha=0.01, min_size=10, seed=0, max_tries=20)


# --------------------------------------------------------------------------- aggregation


def _states(values):
    return [{"w": torch.tensor(v, dtype=torch.float32), "n": torch.tensor(7)} for v in values]


def test_fedavg_median_trimmed_mean_by_hand():
    s = _states([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [100.0, -50.0]])
    avg = fedavg(s, [1, 1, 2, 0])
    assert torch.allclose(avg["w"], torch.tensor([(1 + 2 + 6) / 4, (10 + 20 + 60) / 4]))
    med = coordinate_median(s)  # even count: mean of the two middle values
    assert torch.allclose(med["w"], torch.tensor([2.5, 15.0]))
    assert torch.allclose(coordinate_median(s[:3])["w"], torch.tensor([2.0, 20.0]))
    tm = trimmed_mean(s, 0.25)  # drop one at each end per coordinate
    assert torch.allclose(tm["w"], torch.tensor([2.5, 15.0]))
    assert torch.allclose(trimmed_mean(s, 0.0)["w"], fedavg(s)["w"])
    assert med["n"].item() == 7 and med["n"].dtype == torch.long


def test_robust_rules_resist_one_extreme_client():
    honest = [{"w": torch.randn(50, generator=torch.Generator().manual_seed(i)) * 0.01}
              for i in range(6)]
    attacker = {"w": torch.full((50,), 1e6)}
    assert fedavg(honest + [attacker])["w"].abs().max() > 1e4
    assert coordinate_median(honest + [attacker])["w"].abs().max() < 0.1
    assert trimmed_mean(honest + [attacker], 0.15)["w"].abs().max() < 0.1


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 7), seed=st.integers(0, 1000), trim=st.floats(0.0, 0.49))
def test_robust_rules_are_order_free_and_bounded(k, seed, trim):
    g = torch.Generator().manual_seed(seed)
    states = [{"w": torch.randn(4, 3, generator=g)} for _ in range(k)]
    stacked = torch.stack([s["w"] for s in states])
    perm = torch.randperm(k, generator=g).tolist()
    for rule in (coordinate_median, lambda s: trimmed_mean(s, trim)):
        out = rule(states)["w"]
        assert torch.allclose(out, rule([states[i] for i in perm])["w"])
        assert (out >= stacked.min(0).values - 1e-6).all() and (out <= stacked.max(0).values + 1e-6).all()


def test_strategy_uses_its_aggregator():
    g = build("mlp", (6,), 3, seed=0, width=5).state_dict()
    ups = [_update(c, 10 * (c + 1), c + 1) for c in range(4)]
    med = FedAvg(aggregator="median").aggregate(1, g, ups).state
    tm = FedAvg(aggregator="trimmed-mean", trim=0.25).aggregate(1, g, ups).state
    states = [u.state for u in ups]
    assert all(torch.equal(med[k], coordinate_median(states)[k]) for k in g)
    assert all(torch.equal(tm[k], trimmed_mean(states, 0.25)[k]) for k in g)
    with pytest.raises(ConfigError, match=r"trim must be a fraction in \[0, 0.5\)"):
        FedAvg(aggregator="trimmed-mean", trim=0.5)


def test_screen_updates_rejects_nan_and_mismatches():
    ref = {"w": torch.zeros(3)}
    accepted, rejected = screen_updates(ref, {
        0: {"w": torch.ones(3)}, 1: {"w": torch.tensor([1.0, float("nan"), 0.0])},
        2: {"w": torch.ones(4)}, 3: {"v": torch.ones(3)}})
    assert accepted == [0]
    assert "NaN" in rejected[1] and "shape" in rejected[2] and "lacks key 'w'" in rejected[3]


def test_scope_spread_zero_iff_identical():
    a = weight_scope(build("mlp", (4,), 3, seed=0, width=8))
    b = weight_scope(build("mlp", (4,), 3, seed=1, width=8, depth=2))
    assert scope_spread([a, a, a]) == pytest.approx(0.0, abs=1e-12)
    assert scope_spread([a, b]) > 0


# --------------------------------------------------------------------------- client update


def test_proximal_term_value_and_gradient():
    net = build("mlp", (5,), 3, seed=0, width=4)
    prox = ProximalPenalty(net, mu=0.3)
    anchor = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    value = prox(net)
    expected = 0.15 * sum(((p - a) ** 2).sum() for p, a in zip(net.parameters(), anchor, strict=True))
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    value.backward()
    for p, a in zip(net.parameters(), anchor, strict=True):
        assert torch.allclose(p.grad, 0.3 * (p - a).detach(), atol=1e-6)
    assert prox(net).item() == pytest.approx(value.item())  # the anchor list is reusable


def test_client_update_deterministic_and_penalties_act(digits):
    cfg, train, _ = digits
    net = fl.build_model(cfg, train)
    g = {k: v.clone() for k, v in net.state_dict().items()}
    data = train.subset(torch.arange(200))
    tr = LocalTraining(epochs=3, batch_size=32, lr=0.1)
    plain = client_update(net, g, data, tr, Instructions(round=1), client=2, seed=0)
    again = client_update(net, g, data, tr, Instructions(round=1), client=2, seed=0)
    other = client_update(net, g, data, tr, Instructions(round=1), client=3, seed=0)
    assert all(torch.equal(plain.state[k], again.state[k]) for k in g)
    assert any(not torch.equal(plain.state[k], other.state[k]) for k in g)
    assert all(torch.equal(net.state_dict()[k], g[k]) for k in g)  # the model is left alone
    assert plain.num_examples == 200 and plain.scope == weight_scope(plain.state)

    def dist(s):
        return sum(float((s[k] - g[k]).pow(2).sum()) for k in g)

    prox = client_update(net, g, data, tr, Instructions(round=1, mu=10.0), client=2, seed=0)
    assert dist(prox.state) < 0.5 * dist(plain.state)

    target = weight_scope(g)  # pull toward the starting scope
    wsa = client_update(net, g, data, tr, Instructions(round=1, wsa_lambda=10.0, target=target),
                        client=2, seed=0)
    assert divergence(wsa.scope, target).total < 0.5 * divergence(plain.scope, target).total


def test_client_update_deadline(digits):
    cfg, train, _ = digits
    net = fl.build_model(cfg, train)
    with pytest.raises(ClientTimeout, match="client 4"):
        client_update(net, net.state_dict(), train, LocalTraining(epochs=1), Instructions(round=1),
                      client=4, seed=0, deadline=time.perf_counter())


# --------------------------------------------------------------------------- strategies


def test_sampling_deterministic_and_fraction_checked():
    s = FedAvg(fraction=0.5, seed=7)
    a = s.sample(3, 20)
    assert a == FedAvg(fraction=0.5, seed=7).sample(3, 20) and len(a) == 10
    assert a == sorted(set(a)) and all(0 <= c < 20 for c in a)
    assert a != s.sample(4, 20)
    assert FedAvg(fraction=1.0).sample(1, 4) == [0, 1, 2, 3]
    assert len(FedAvg(fraction=0.01).sample(1, 20)) == 1
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="fraction"):
            FedAvg(fraction=bad)


def _update(cid, n, seed, scale=1.0):
    net = build("mlp", (6,), 3, seed=seed, width=5)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    return fl.ClientUpdate(client=cid, state=state, num_examples=n, scope=weight_scope(state),
                           metrics={"train_loss": 1.0})


def test_wsa_targets_and_nan_rejection():
    g = build("mlp", (6,), 3, seed=0, width=5).state_dict()
    ups = [_update(0, 10, 1), _update(1, 30, 2, scale=3.0), _update(2, 5, 3)]
    ups[2].state["head.weight"][0, 0] = float("nan")
    wsa = WSA(**{"lambda": 1.0}, target="fused")
    assert wsa.instructions(1, g).target == weight_scope(g)  # round 1: the global model's scope
    out = wsa.aggregate(1, g, ups)
    assert out.accepted == [0, 1] and "NaN" in out.rejected[2]
    expected = fedavg([ups[0].state, ups[1].state], [10, 30])
    assert all(torch.equal(out.state[k], expected[k]) for k in expected)
    fused = fuse([ups[0].scope, ups[1].scope], [10, 30])
    assert wsa.instructions(2, out.state).target == fused
    restored = WSA(**{"lambda": 1.0})
    restored.load_state_dict(json.loads(json.dumps(wsa.state_dict())))
    assert restored.target == fused
    glob = WSA(**{"lambda": 1.0}, target="global")
    glob.aggregate(1, g, ups)
    assert glob.instructions(2, out.state).target == weight_scope(out.state)
    assert FedProx(mu=0.5).instructions(1, g).mu == 0.5


def test_wsa_reports_a_collapsing_target_once_and_remembers_it(caplog):
    g = build("mlp", (6,), 3, seed=0, width=5).state_dict()

    def shrunk(factor: float) -> dict:
        return {k: v * factor if k == "head.weight" else v.clone() for k, v in g.items()}

    wsa = WSA(**{"lambda": 1.0}, target="global", collapse_ratio=0.25)
    with caplog.at_level("WARNING", logger="basinmerge.fl"):
        wsa.instructions(1, g)
        wsa.instructions(2, shrunk(0.5))  # σ ratio 0.5: no report
        assert wsa.collapse is None and wsa.round_warnings(2) == []
        wsa.instructions(3, shrunk(0.2))  # 0.2 < 0.25: reported, naming the layer
        wsa.instructions(4, shrunk(0.1))  # only once
    assert wsa.collapse["round"] == 3 and wsa.collapse["layer"] == "head.weight"
    assert wsa.collapse["ratio"] == pytest.approx(0.2, rel=1e-6)
    assert len(wsa.round_warnings(3)) == 1 and wsa.round_warnings(4) == []
    assert "head.weight" in wsa.round_warnings(3)[0]
    assert sum("WSA target's std" in r.message for r in caplog.records) == 1
    restored = WSA(**{"lambda": 1.0}, target="global")
    restored.load_state_dict(json.loads(json.dumps(wsa.state_dict())))
    assert restored.collapse == wsa.collapse and restored.first_target == weight_scope(g)
    quiet = WSA(**{"lambda": 1.0}, target="global", collapse_ratio=0.0)
    quiet.instructions(1, g)
    quiet.instructions(2, shrunk(0.01))
    assert quiet.collapse is None
    with pytest.raises(ConfigError, match="collapse_ratio"):
        WSA(**{"lambda": 1.0}, collapse_ratio=1.5)


def test_simulator_records_a_collapsing_wsa_target_in_the_round(digits):
    """Clients that shrink the classifier 10x make the global target collapse in round 2."""
    cfg, train, test = digits
    cfg = fl.FLConfig(**{**TINY, "fraction": 1.0, "rounds": 3, "strategy": "wsa",
                         "strategy_options": {"target": "global"}})

    def shrinking(*args, **kw):
        upd = client_update(*args, **kw)
        upd.state["head.weight"].mul_(0.1)
        return upd

    strat = cfg.make_strategy()
    res = simulate(fl.build_model(cfg, train), train, test, fl.build_partitions(cfg, train), strat,
                   cfg.local_training(), rounds=3, seed=cfg.seed, progress=False,
                   config=cfg.identity(), update_fn=shrinking)
    flagged = [r["round"] for r in res.history if "warnings" in r]
    assert flagged == [2] and "head.weight" in res.history[2]["warnings"][0]
    assert strat.collapse["round"] == 2


def test_std_ratios_per_layer():
    a = build("mlp", (6,), 3, seed=0, width=5).state_dict()
    b = {k: v * 3 for k, v in a.items()}
    r = std_ratios(weight_scope(b), weight_scope(a))
    assert set(r) == set(weight_scope(a)) and all(v == pytest.approx(3.0, rel=1e-5) for v in r.values())


def test_all_updates_bad_keeps_global():
    g = build("mlp", (6,), 3, seed=0, width=5).state_dict()
    bad = _update(0, 10, 1)
    bad.state["head.bias"][:] = float("inf")
    out = FedAvg().aggregate(1, g, [bad])
    assert out.accepted == [] and all(torch.equal(out.state[k], g[k]) for k in g)


# --------------------------------------------------------------------------- simulator


def test_resume_is_bit_identical(digits, tmp_path):
    base, train, test = digits
    cfg = fl.FLConfig(**{**TINY, "strategy": "wsa", "strategy_options": {"lambda": 1.0}})
    full = _run(cfg, train, test)

    def crash_in_round_3(*args, **kw):
        if args[4].round == 3:
            raise KeyboardInterrupt
        return client_update(*args, **kw)

    with pytest.raises(KeyboardInterrupt):
        _run(cfg, train, test, out=tmp_path, update_fn=crash_in_round_3)
    resumed = _run(cfg, train, test, out=tmp_path, resume=True)
    assert resumed.resumed_from == 2
    assert all(torch.equal(full.state[k], resumed.state[k]) for k in full.state)
    assert full.accuracy_curve() == resumed.accuracy_curve()
    rows = json.loads((tmp_path / "rounds.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [r["test_accuracy"] for r in rows] == full.accuracy_curve()
    csv_lines = (tmp_path / "rounds.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("round,test_accuracy")

    other = fl.FLConfig(**{**TINY, "strategy": "wsa", "strategy_options": {"lambda": 2.0}})
    with pytest.raises(ConfigError, match=r"strategy_options = \{'lambda': 1.0\} there, \{'lambda': 2.0\} here"):
        _run(other, train, test, out=tmp_path, resume=True)
    with pytest.raises(ConfigError, match="no checkpoint.safetensors"):
        _run(cfg, train, test, out=tmp_path / "empty", resume=True)


def test_failing_timed_out_and_nan_clients_are_dropped(digits, caplog):
    cfg, train, test = digits
    cfg = fl.FLConfig(**{**TINY, "fraction": 1.0, "rounds": 2})

    def flaky(*args, **kw):
        c = kw["client"]
        if c == 1:
            raise RuntimeError("disk on fire")
        if c == 2:
            raise ClientTimeout("client 2 passed the round deadline")
        upd = client_update(*args, **kw)
        if c == 3:
            upd.state["head.weight"][0, 0] = float("nan")
        return upd

    with caplog.at_level("WARNING", logger="basinmerge.fl"):
        res = _run(cfg, train, test, update_fn=flaky)
    for r in res.history[1:]:
        assert r["clients"] == [0, 1, 2, 3, 4] and r["accepted"] == [0, 4]
        assert "disk on fire" in r["dropped"][1]
        assert r["dropped"][2].startswith("timeout")
        assert "NaN" in r["rejected"][3]
    assert all(torch.isfinite(v).all() for v in res.state.values())
    assert "dropped client 1" in caplog.text and "rejected the update of client 3" in caplog.text
    # the same as a run where only clients 0 and 4 exist in each round
    strat = cfg.make_strategy()
    model = fl.build_model(cfg, train)
    parts = fl.build_partitions(cfg, train)
    state = model.state_dict()
    for rnd in (1, 2):
        ups = [client_update(model, state, train.subset(parts[c]), cfg.local_training(),
                             strat.instructions(rnd, state), client=c, seed=cfg.seed)
               for c in (0, 4)]
        state = strat.aggregate(rnd, state, ups).state
    assert all(torch.equal(state[k], res.state[k]) for k in state)


def test_single_client_round_equals_its_update(digits):
    _, train, test = digits
    cfg = fl.FLConfig(**{**TINY, "clients": 1, "fraction": 1.0, "rounds": 1, "scheme": "iid"})
    res = _run(cfg, train, test)
    model = fl.build_model(cfg, train)
    upd = client_update(model, model.state_dict(), train, cfg.local_training(),
                        Instructions(round=1), client=0, seed=cfg.seed)
    assert all(torch.equal(upd.state[k], res.state[k]) for k in upd.state)
    assert res.history[1]["scope_divergence"] == pytest.approx(0.0, abs=1e-12)


def test_federated_beats_initial_model_and_timings_split(digits):
    cfg, train, test = digits
    cfg = fl.FLConfig(**{**TINY, "rounds": 4, "local_epochs": 5, "lr": 0.1, "fraction": 1.0})
    res = _run(cfg, train, test)
    assert res.final_accuracy > res.history[0]["test_accuracy"] + 0.3
    t = res.timings
    assert t["train_seconds"] > 0 and math.isclose(
        t["total_seconds"], t["train_seconds"] + t["eval_seconds"] + t["other_seconds"])


# --------------------------------------------------------------------------- CLI and study


def _cli(args):
    from basinmerge.cli import main

    try:
        main(args)
    except SystemExit as e:
        return e.code
    return 0


COMMON = ["-q", "fl", "--dataset", "digits", "--width", "16", "--clients", "4", "--min-size", "5",
          "--local-epochs", "1", "--train-limit", "300", "--test-limit", "100"]


@pytest.mark.parametrize("extra, message", [
    (["--fraction", "1.5"], "fraction must be in (0, 1]"),
    (["--fraction", "0"], "fraction must be in (0, 1]"),
    (["--alpha", "0"], "alpha must be > 0"),
    (["--clients", "400"], "more clients (400) than training examples (300)"),
    (["--strategy", "fedsgd"], "unknown strategy 'fedsgd'"),
    (["--backend", "grpc"], "unknown --backend"),
])
def test_cli_bad_input(extra, message, capsys):
    args = list(COMMON)
    if "--clients" in extra:
        i = args.index("--clients")
        del args[i:i + 2]
    assert _cli([*args, *extra, "--rounds", "1"]) == 1
    err = capsys.readouterr().err
    assert message in " ".join(err.split())


def test_cli_run_extend_and_mismatched_resume(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _cli([*COMMON, "--rounds", "3", "--strategy", "fedprox", "--out", str(a)]) == 0
    assert _cli([*COMMON, "--rounds", "2", "--strategy", "fedprox", "--out", str(b)]) == 0
    assert _cli([*COMMON, "--rounds", "3", "--strategy", "fedprox", "--resume", str(b)]) == 0
    from basinmerge.io import load_state

    sa, _ = load_state(a / "final.safetensors")
    sb, meta = load_state(b / "final.safetensors")
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and meta["round"] == 3
    summary = json.loads((a / "partition.json").read_text())
    assert sum(summary["sizes"]) == 300 and (a / "partition.png").stat().st_size > 0
    assert (a / "accuracy.png").stat().st_size > 0
    capsys.readouterr()
    assert _cli([*COMMON, "--rounds", "3", "--strategy", "wsa", "--resume", str(b)]) == 1
    assert "was run with other options (strategy = 'fedprox' there, 'wsa' here)" in \
        " ".join(capsys.readouterr().err.split())


def test_study_smoke():
    from basinmerge.experiments import federated

    res = federated.run(dataset="digits", scale="smoke", seeds=1, progress=False)
    rows = res.tables["accuracy"].rows
    assert [r[2] for r in rows] == list(federated.METHODS)
    assert len(res.data["runs"]) == len(federated.METHODS)
    for run in res.data["runs"]:
        assert 0 <= run["final_accuracy"] <= run["best_accuracy"] <= 1
        assert len(run["accuracy"]) == 3  # rounds 0..2
    assert {"accuracy_mlp", "scope_divergence_mlp", "partition_alpha0.5"} <= set(res.figures)


def test_cli_study_rejects_unknown_models(capsys):
    code = _cli(["experiment", "federated", "--dataset", "digits", "--scale", "smoke",
                 "--models", "mlp,resnet"])
    assert code == 1
    assert "must be among mlp, vgg, got mlp, resnet" in " ".join(capsys.readouterr().err.split())


def test_study_overrides_and_their_errors(capsys):
    from basinmerge.experiments import federated

    s = federated.settings("quick", methods=["WSA (fused)", "FedAvg"], alphas=[0.2], rounds=4)
    assert s.methods == ("FedAvg", "WSA (fused)") and s.alphas == (0.2,) and s.rounds == 4
    plan = list(federated.configs("digits", "quick", 2, methods=["FedAvg"], alphas=[0.2], rounds=4))
    assert len(plan) == 2 and all(p[4].rounds == 4 and p[4].alpha == 0.2 for p in plan)
    for kw, msg in ((dict(methods=["FedSGD"]), "methods must be among"),
                    (dict(alphas=[0.0]), "alphas must be positive"),
                    (dict(rounds=0), "rounds must be >= 1")):
        with pytest.raises(ConfigError, match=msg):
            federated.settings("quick", **kw)
    code = _cli(["experiment", "federated", "--dataset", "digits", "--scale", "smoke",
                 "--alphas", "0.5,abc"])
    assert code == 1 and "--alphas must be comma-separated numbers" in capsys.readouterr().err


def test_study_smoke_subset_without_fedavg_has_no_paired_column():
    from basinmerge.experiments import federated

    res = federated.run(dataset="digits", scale="smoke", seeds=1, progress=False,
                        methods=["WSA (fused)"], rounds=1)
    (row,) = res.tables["accuracy"].rows
    assert row[2] == "WSA (fused)" and row[5] == "-"
    assert len(res.data["runs"][0]["accuracy"]) == 2  # rounds 0..1


def test_study_model_choice():
    from basinmerge.experiments import federated

    assert federated.study_models("quick") == ["mlp"]
    assert federated.study_models("full") == ["mlp", "vgg"]
    plan = list(federated.configs("digits", "quick", 2, models=["vgg"]))
    assert {p[0] for p in plan} == {"vgg"} and len(plan) == 3 * len(federated.METHODS) * 2
    assert all(p[4].model == "vgg" and p[4].model_options == {"width": 0.25} for p in plan)
    with pytest.raises(ConfigError, match="must be among mlp, vgg, got resnet"):
        federated.study_models("quick", ["resnet"])
    with pytest.raises(ConfigError, match="got none"):
        federated.study_models("quick", [])


# --------------------------------------------------------------------------- nothing silently wrong


def test_a_round_where_every_client_failed_is_an_error(digits, tmp_path):
    from basinmerge.errors import FederatedError

    cfg, train, test = digits
    cfg = fl.FLConfig(**{**TINY, "fraction": 1.0, "rounds": 3})

    def broken_in_round_2(*args, **kw):
        if args[4].round == 2:
            raise RuntimeError("out of memory")
        return client_update(*args, **kw)

    with pytest.raises(FederatedError, match=r"round 2: every client failed, nothing to "
                                             r"aggregate \(client 0: RuntimeError: out of memory"):
        _run(cfg, train, test, out=tmp_path, update_fn=broken_in_round_2)
    rows = json.loads((tmp_path / "rounds.json").read_text())
    assert [r["round"] for r in rows] == [0, 1]  # the last good round stays checkpointed


def test_cli_lr_zero_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli([*COMMON, "--rounds", "1", "--lr", "0", "--out", str(out)]) == 1
    assert "learning rate must be > 0, got 0.0" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--aggregate", "foo"], "unknown aggregation 'foo'"),
    (["--strategy", "wsa", "--opt", "lambda=-1"], "strategy 'wsa' option 'lambda' must be > 0"),
    (["--strategy", "fedprox", "--opt", "lamda=1"], "strategy 'fedprox' has no option 'lamda'"),
    (["--clients", "400"], "more clients (400) than training examples (300)"),
])
def test_cli_bad_option_leaves_nothing_behind(extra, message, tmp_path, capsys):
    out = tmp_path / "run"
    args = [a for a in COMMON]
    if "--clients" in extra:
        i = args.index("--clients")
        del args[i:i + 2]
    assert _cli([*args, "--rounds", "1", *extra, "--out", str(out)]) == 1
    assert message in " ".join(capsys.readouterr().err.split())
    assert not out.exists()


def test_cli_refuses_to_overwrite_a_run_unless_forced(tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli([*COMMON, "--rounds", "1", "--out", str(out)]) == 0
    first = (out / "final.safetensors").read_bytes()
    capsys.readouterr()
    assert _cli([*COMMON, "--rounds", "1", "--seed", "1", "--out", str(out)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "already holds a run" in err and f"--resume {out}" in err and "--force" in err
    assert (out / "final.safetensors").read_bytes() == first
    assert _cli([*COMMON, "--rounds", "1", "--seed", "1", "--out", str(out), "--force"]) == 0
    assert (out / "final.safetensors").read_bytes() != first


def test_cli_resume_alone_takes_the_options_from_the_run(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    opts = ["--strategy", "wsa", "--opt", "lambda=2", "--alpha", "0.3", "--seed", "3"]
    assert _cli([*COMMON, *opts, "--rounds", "3", "--out", str(a)]) == 0
    assert _cli([*COMMON, *opts, "--rounds", "2", "--out", str(b)]) == 0
    assert _cli(["-q", "fl", "--resume", str(b), "--rounds", "3"]) == 0
    from basinmerge.io import load_state

    sa, _ = load_state(a / "final.safetensors")
    sb, _ = load_state(b / "final.safetensors")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    capsys.readouterr()
    assert _cli(["-q", "fl", "--resume", str(b), "--alpha", "0.5", "--opt", "lambda=3"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "alpha = 0.3 there, 0.5 here" in err
    assert "strategy_options = {'lambda': 2} there, {'lambda': 3} here" in err


def test_simulator_prints_a_plain_line_per_round_off_a_terminal(digits, capsys, monkeypatch):
    from basinmerge import console

    monkeypatch.setattr(console, "_quiet", False)  # an earlier in-process `-q` sets it
    cfg, train, test = digits
    cfg = fl.FLConfig(**{**TINY, "rounds": 2})
    simulate(fl.build_model(cfg, train), train, test, fl.build_partitions(cfg, train),
             cfg.make_strategy(), cfg.local_training(), rounds=2, seed=0, progress=True)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("round ")]
    assert [x.split(":")[0] for x in lines] == ["round 1/2", "round 2/2"]
    assert "test accuracy" in lines[0] and "clients accepted" in lines[0]


@pytest.mark.slow
def test_ctrl_c_then_resume_is_bit_identical(tmp_path):
    """SIGINT after round 1 is checkpointed: one line, exit 130; `--resume DIR` alone then ends
    with the weights of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys

    from basinmerge.io import load_state, read_meta

    run = tmp_path / "run"
    args = ["fl", "--dataset", "digits", "--width", "64", "--clients", "4", "--min-size", "5",
            "--local-epochs", "30", "--rounds", "6", "--strategy", "scaffold"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "from basinmerge.cli import main; main()",
                             *args, "--out", str(run)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        ckpt = run / "checkpoint.safetensors"
        while time.monotonic() < deadline and proc.poll() is None:
            if ckpt.is_file() and read_meta(ckpt).get("round", 0) >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted; round ")
    assert lines[0].endswith(f"resume with: basinmerge fl --resume {run}")
    done = read_meta(ckpt)["round"]
    assert 1 <= done < 6
    assert _cli(["-q", "fl", "--resume", str(run)]) == 0
    whole = tmp_path / "whole"
    assert _cli(["-q", *args, "--out", str(whole)]) == 0
    sa, _ = load_state(run / "final.safetensors")
    sb, _ = load_state(whole / "final.safetensors")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cli_runs_on_labelled_tensor_files_as_on_the_dataset(tmp_path, capsys):
    """Digits saved as x/y tensor files (train and test) give the same run, bit for bit, as the
    dataset by name: same partition, same model, same rounds."""
    from safetensors.torch import save_file

    from basinmerge import data as data_mod
    from basinmerge.io import load_state

    files = {}
    for split in ("train", "test"):
        ds = data_mod.load("digits", split)
        files[split] = tmp_path / f"digits-{split}.safetensors"
        save_file({"x": ds.x.contiguous(), "y": ds.y.contiguous()}, str(files[split]))
    args = [a for a in COMMON if a not in ("--dataset", "digits")] + ["--rounds", "2"]
    by_name, by_file = tmp_path / "name", tmp_path / "file"
    assert _cli([*args, "--dataset", "digits", "--out", str(by_name)]) == 0
    assert _cli([*args, "--dataset", str(files["train"]), "--test-data", str(files["test"]),
                 "--out", str(by_file)]) == 0
    sa, _ = load_state(by_name / "final.safetensors")
    sb, _ = load_state(by_file / "final.safetensors")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (json.loads((by_name / "partition.json").read_text())
            == json.loads((by_file / "partition.json").read_text()))
    # Resuming the file-based run extends it like any other.
    assert _cli([*args[:-2], "--rounds", "3", "--resume", str(by_file)]) == 0
    capsys.readouterr()
    # No held-out data: one error naming the file and the option, before any work.
    lone = tmp_path / "lone"
    assert _cli([*args, "--dataset", str(files["train"]), "--out", str(lone)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "digits-train.safetensors" in err and "--test-data" in err and not lone.exists()


@pytest.mark.parametrize("tensors, message", [
    ({"x": torch.zeros(20, 4), "y": torch.zeros(20)}, "labels must be one integer class index"),
    ({"x": torch.zeros(20, 4), "y": torch.zeros(20, 2, dtype=torch.long)},
     "labels must be one integer class index"),
    ({"x": torch.zeros(20, 4), "y": -torch.ones(20, dtype=torch.long)}, "class indices >= 0"),
    ({"input_ids": torch.zeros(20, 4, dtype=torch.long), "attention_mask": torch.ones(20, 4),
      "labels": torch.zeros(20, dtype=torch.long)}, "needs one input tensor x"),
])
def test_non_classification_data_is_refused_by_name(tmp_path, tensors, message):
    from safetensors.torch import save_file

    from basinmerge.fl import FLConfig, load_data

    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ConfigError, match=message) as err:
        load_data(FLConfig(dataset=str(path), test_data=str(path)))
    assert "bad.safetensors" in str(err.value)


def test_simulate_takes_in_memory_pairs_like_datasets(digits):
    """(x, y) pairs give the same rounds as the project's Dataset objects."""
    cfg, train, test = digits
    net, parts = fl.build_model(cfg, train), fl.build_partitions(cfg, train)

    def run(tr, te):
        return simulate(net, tr, te, parts, cfg.make_strategy(), cfg.local_training(),
                        rounds=2, seed=cfg.seed, progress=False)

    a, b = run(train, test), run((train.x, train.y), (test.x, test.y))
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert a.history[-1]["test_accuracy"] == b.history[-1]["test_accuracy"]
