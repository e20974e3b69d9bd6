"""The strategy registry and the registered strategies against hand computations on two clients:
SCAFFOLD's control variates, FedDyn's linear term and server state, MOON's contrastive term,
FedBN keeping BatchNorm local."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from basinmerge import fl
from basinmerge.errors import ConfigError
from basinmerge.fl.client import LocalTraining, client_update
from basinmerge.fl.strategies.fedbn import FedBN, batchnorm_keys
from basinmerge.fl.strategies.moon import ContrastiveTerm, features
from basinmerge.fl.strategies.scaffold import effective_steps
from basinmerge.fl.strategy import make_strategy, strategy_names
from basinmerge.models import build
from basinmerge.state import with_state

pytestmark = pytest.mark.usefixtures("one_thread")

LR = 0.1
ONE_STEP = LocalTraining(epochs=1, batch_size=1000, lr=LR, momentum=0.0)  # full batch: 1 step


def _clients(n_features=3, classes=2):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(6, n_features, generator=g), torch.tensor([0, 1, 0, 1, 1, 0])),
            (torch.randn(4, n_features, generator=g) + 1.0, torch.tensor([1, 1, 0, 1]))]


def _grads(model, state, data, extra=None):
    """∇ of the mean cross-entropy (+ `extra(net)`) at `state`, by autograd."""
    net = with_state(model, state)
    x, y = data
    loss = F.cross_entropy(net(x), y)
    if extra is not None:
        loss = loss + extra(net)
    names = [k for k, _ in net.named_parameters()]
    gs = torch.autograd.grad(loss, [p for _, p in net.named_parameters()])
    return dict(zip(names, gs, strict=True))


def _round(strategy, model, state, data, server_round, training=ONE_STEP):
    clients = strategy.sample(server_round, len(data))
    instr = strategy.instructions(server_round, state)
    ups = [client_update(model, state, data[c], training, strategy.client_instructions(instr, c),
                         client=c, seed=0) for c in clients]
    return ups, strategy.aggregate(server_round, state, ups)


def _close(a, b, atol=1e-6):
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol), k


# --------------------------------------------------------------------------- registry


def test_registry_lists_every_strategy_and_checks_options():
    assert strategy_names() == ("fedavg", "fedprox", "wsa", "scaffold", "feddyn", "moon", "fedbn")
    assert make_strategy("fedprox", {"mu": "0.5"}).mu == 0.5  # parsed from CLI text
    with pytest.raises(ConfigError, match=r"strategy 'fedprox' has no option 'lambda' \(its "
                                          r"options: mu\)"):
        make_strategy("fedprox", {"lambda": 1})
    with pytest.raises(ConfigError, match="strategy 'wsa' option 'target' must be one of"):
        make_strategy("wsa", {"target": "nearest"})
    with pytest.raises(ConfigError, match="strategy 'feddyn' option 'alpha' must be > 0"):
        make_strategy("feddyn", {"alpha": 0})
    with pytest.raises(ConfigError, match="strategy 'moon' option 'temperature' must be float"):
        make_strategy("moon", {"temperature": "warm"})
    with pytest.raises(ConfigError, match="unknown strategy 'fedsgd'"):
        make_strategy("fedsgd")
    with pytest.raises(ConfigError, match="strategy 'scaffold' has no option 'mu'"):
        fl.FLConfig(dataset="digits", strategy="scaffold", strategy_options={"mu": 1})
    with pytest.raises(ConfigError, match="'scaffold' needs optimizer 'sgd'"):
        fl.FLConfig(dataset="digits", strategy="scaffold", optimizer="adam")
    # one default: the WSA lambda of the strategy is the library's
    from basinmerge.wsa import DEFAULT_LAMBDA

    assert make_strategy("wsa").lam == DEFAULT_LAMBDA


def test_legacy_flat_options_are_read_into_strategy_options():
    cfg = fl.FLConfig.from_dict({"strategy": "wsa", "wsa_lambda": 3.0, "mu": 0.2})
    assert cfg.strategy_options == {"lambda": 3.0}


# --------------------------------------------------------------------------- SCAFFOLD


def test_effective_steps_is_heavy_ball_displacement():
    for beta in (0.0, 0.5, 0.9):
        for k in (1, 3, 10):
            v = pos = 0.0
            for _ in range(k):  # torch's SGD: v = β v + g; w -= lr v (g = 1, lr = 1)
                v = beta * v + 1.0
                pos += v
            assert effective_steps(k, beta) == pytest.approx(pos)


def test_scaffold_control_variates_by_hand():
    model = build("mlp", (3,), 2, seed=0, depth=0)
    data = _clients()
    s = make_strategy("scaffold", fraction=1.0)
    x0 = {k: v.clone() for k, v in model.state_dict().items()}
    ups, out = _round(s, model, x0, data, 1)
    g0 = [_grads(model, x0, d) for d in data]
    # round 1: c = c_i = 0, so y_i = x − η∇L_i(x) and Δc_i = (x − y_i)/η = ∇L_i(x)
    for u, g in zip(ups, g0, strict=True):
        _close(u.extras["delta_c"], g)
        _close(u.state, {k: x0[k] - LR * g[k] for k in g})
    c = {k: (g0[0][k] + g0[1][k]) / 2 for k in g0[0]}  # N = 2 clients
    _close(s.store.groups["c"], c)
    _close(s.store.clients[0], g0[0])
    x1 = out.state
    _close(x1, {k: (ups[0].state[k] + ups[1].state[k]) / 2 for k in x0})  # x + mean Δy_i
    # round 2: the correction −c_i + c enters the step; Δc_i = ∇L_i(x1) − c_i
    ups2, _ = _round(s, model, x1, data, 2)
    for i, u in enumerate(ups2):
        g = _grads(model, x1, data[i])
        _close(u.state, {k: x1[k] - LR * (g[k] - g0[i][k] + c[k]) for k in g})
        _close(u.extras["delta_c"], {k: g[k] - g0[i][k] for k in g}, atol=1e-5)


def test_scaffold_state_survives_a_checkpoint():
    model = build("mlp", (3,), 2, seed=0, depth=0)
    s = make_strategy("scaffold", fraction=1.0)
    _round(s, model, model.state_dict(), _clients(), 1)
    t = make_strategy("scaffold", fraction=1.0)
    t.load_state_tensors(s.state_tensors())
    _close(t.store.groups["c"], s.store.groups["c"])
    _close(t.store.clients[1], s.store.clients[1])


# --------------------------------------------------------------------------- FedDyn


def test_feddyn_linear_term_and_server_state_by_hand():
    alpha = 0.1
    model = build("mlp", (3,), 2, seed=0, depth=0)
    data = _clients()
    s = make_strategy("feddyn", {"alpha": alpha}, fraction=1.0)
    t0 = {k: v.clone() for k, v in model.state_dict().items()}
    ups, out = _round(s, model, t0, data, 1)
    g0 = [_grads(model, t0, d) for d in data]  # the quadratic term has no gradient at θ^0
    for u, g in zip(ups, g0, strict=True):
        _close(u.state, {k: t0[k] - LR * g[k] for k in g})
        _close(u.extras["grad"], {k: -alpha * (u.state[k] - t0[k]) for k in g})
    h = {k: -alpha / 2 * sum(u.state[k] - t0[k] for u in ups) for k in t0}
    _close(s.store.groups["h"], h)
    t1 = out.state
    _close(t1, {k: (ups[0].state[k] + ups[1].state[k]) / 2 - h[k] / alpha for k in t0})
    # round 2: the step follows ∇L_i(θ) − g_i + α(θ − θ^1); at θ^1 the last term is 0
    ups2, _ = _round(s, model, t1, data, 2)
    for i, u in enumerate(ups2):
        g = _grads(model, t1, data[i])
        gi = ups[i].extras["grad"]
        _close(u.state, {k: t1[k] - LR * (g[k] - gi[k]) for k in g})


# --------------------------------------------------------------------------- MOON


def test_moon_contrastive_term_by_hand():
    mu, tau = 0.7, 0.5
    model = build("mlp", (3,), 2, seed=0, width=4, depth=1)
    glob = build("mlp", (3,), 2, seed=1, width=4, depth=1)
    prev = build("mlp", (3,), 2, seed=2, width=4, depth=1)
    x, y = _clients()[0]
    term = ContrastiveTerm(model, glob, prev, mu, tau)
    model(x)  # the forward pass the trainer makes; the term reads what it saw
    value = term(model)
    term.close()

    def z(net):  # the representation: relu(layer(x)), the input of the head
        return torch.relu(net.layers[0](x))

    with torch.no_grad():
        zl, zg, zp = z(model), z(glob), z(prev)
    expected = 0.0
    for i in range(x.shape[0]):
        a = F.cosine_similarity(zl[i:i + 1], zg[i:i + 1]).item() / tau
        b = F.cosine_similarity(zl[i:i + 1], zp[i:i + 1]).item() / tau
        expected += -math.log(math.exp(a) / (math.exp(a) + math.exp(b)))
    assert float(value.detach()) == pytest.approx(mu * expected / x.shape[0], rel=1e-5)
    assert torch.allclose(features(model, x), zl)
    assert not model._forward_pre_hooks and not model.head._forward_pre_hooks  # closed


def test_moon_round_by_hand():
    mu, tau = 1.0, 0.5
    model = build("mlp", (3,), 2, seed=0, width=4, depth=1)
    data = _clients()
    s = make_strategy("moon", {"mu": mu, "temperature": tau}, fraction=1.0)
    t0 = {k: v.clone() for k, v in model.state_dict().items()}
    ups, out = _round(s, model, t0, data, 1)
    # round 1: previous = global, the term is the constant log 2 and pulls nowhere
    for u, d in zip(ups, data, strict=True):
        g = _grads(model, t0, d)
        _close(u.state, {k: t0[k] - LR * g[k] for k in g})
    _close(s.store.clients[0], ups[0].state)
    t1 = out.state
    # round 2: the gradient of CE + μ ℓ_con(z, z_glob = z(θ^1), z_prev = z(client's round 1))
    ups2, _ = _round(s, model, t1, data, 2)
    acts = []
    for i, u in enumerate(ups2):
        x = data[i][0]
        glob, prev = with_state(model, t1).eval(), with_state(model, ups[i].state).eval()

        def con(net, glob=glob, prev=prev, x=x):
            with torch.no_grad():
                zg, zp = features(glob, x), features(prev, x)
            zl = features(net, x)
            pos = F.cosine_similarity(zl, zg) / tau
            neg = F.cosine_similarity(zl, zp) / tau
            return mu * (-(pos - torch.logsumexp(torch.stack([pos, neg]), 0))).mean()

        g = _grads(model, t1, data[i], extra=con)
        _close(u.state, {k: t1[k] - LR * g[k] for k in g}, atol=1e-5)
        plain = _grads(model, t1, data[i])
        acts.append(max(float((g[k] - plain[k]).abs().max()) for k in g))
    assert max(acts) > 1e-3  # the term acts


# --------------------------------------------------------------------------- FedBN


def test_fedbn_keeps_batchnorm_local():
    model = build("mlp", (3,), 2, seed=0, width=4, depth=1, norm="batch")
    bn = batchnorm_keys(model)
    assert set(bn) == {"norms.0.weight", "norms.0.bias", "norms.0.running_mean",
                       "norms.0.running_var", "norms.0.num_batches_tracked"}
    data = _clients()
    s = make_strategy("fedbn", fraction=1.0)
    t0 = {k: v.clone() for k, v in model.state_dict().items()}
    ups, out = _round(s, model, t0, data, 1)
    for u in ups:  # the server keeps each client's own BatchNorm entries
        _close(s.store.clients[u.client], {k: u.state[k] for k in bn})
    t1 = out.state
    fedavg = make_strategy("fedavg", fraction=1.0).aggregate(1, t0, ups).state
    _close(t1, fedavg)  # the other weights are FedAvg's (BN averaged for central evaluation)
    # round 2: client 0 starts from the global weights with its own BatchNorm put back
    instr = s.client_instructions(s.instructions(2, t1), 0)
    start = FedBN.client_state(t1, instr)
    for k in t1:
        assert torch.equal(start[k], ups[0].state[k] if k in bn else t1[k]), k
    upd = client_update(model, t1, data[0], ONE_STEP, instr, client=0, seed=0)
    x = data[0][0]
    h = F.linear(x, t1["layers.0.weight"], t1["layers.0.bias"])
    momentum = 0.1  # BatchNorm's default: running = 0.9 running + 0.1 batch statistic
    expected = (1 - momentum) * ups[0].state["norms.0.running_mean"] + momentum * h.mean(0)
    assert torch.allclose(upd.state["norms.0.running_mean"], expected, atol=1e-6)
    assert int(upd.state["norms.0.num_batches_tracked"]) == 2  # one step in each round


def test_new_strategies_resume_bit_identically(tmp_path):
    """A run stopped after round 2 and resumed ends where an uninterrupted run ends, with the
    strategies' per-client tensor state taken from the checkpoint."""
    for name in ("scaffold", "feddyn", "moon", "fedbn"):
        cfg = fl.FLConfig(dataset="digits", model="mlp",
                          model_options={"width": 8, "depth": 1, "norm": "batch"}, clients=3,
                          alpha=0.5, min_size=5, rounds=3, local_epochs=1, batch_size=32,
                          fraction=0.67, train_limit=150, test_limit=50, strategy=name,
                          momentum=0.5)
        train, test = fl.load_data(cfg)
        parts = fl.build_partitions(cfg, train)

        def run(rounds, resume=False, cfg=cfg, train=train, test=test, parts=parts, name=name):
            return fl.simulate(fl.build_model(cfg, train), train, test, parts,
                               cfg.make_strategy(), cfg.local_training(), rounds=rounds,
                               seed=0, progress=False, out=tmp_path / name, resume=resume,
                               config={**cfg.identity(), "rounds": None})

        full = fl.simulate(fl.build_model(cfg, train), train, test, parts, cfg.make_strategy(),
                           cfg.local_training(), rounds=3, seed=0, progress=False)
        run(2)
        resumed = run(3, resume=True)
        assert resumed.resumed_from == 2
        for k in full.state:
            assert torch.equal(full.state[k], resumed.state[k]), (name, k)
