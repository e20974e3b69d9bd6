"""Training and evaluation: accuracy on digits, bit-reproducibility, penalties, hooks, the
cosine schedule, the history, evaluate, reset_bn_stats and bad options."""

from __future__ import annotations

import time

import pytest
import torch
from torch.nn import functional as F

from basinmerge import data, models
from basinmerge.errors import ConfigError
from basinmerge.train import (
    Trainer,
    evaluate,
    fit,
    has_batchnorm,
    predict_logits,
    reset_bn_stats,
)


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "train"), data.load("digits", "test")


@pytest.fixture(scope="module")
def small(digits):
    """300 training examples: enough to tell runs apart, cheap to train on."""
    return digits[0].subset(300, seed=0)


def _mlp(seed: int = 0, **cfg) -> torch.nn.Module:
    return models.build("mlp", (1, 8, 8), 10, seed=seed, **{"depth": 1, "width": 32, **cfg})


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_mlp_reaches_90_percent_on_digits_in_seconds(digits):
    train, test = digits
    model = models.build("mlp", (1, 8, 8), 10, depth=1, width=64, seed=0)
    t0 = time.perf_counter()
    hist = fit(model, train, optimizer="sgd", lr=0.05, batch_size=32, epochs=3, seed=0,
               progress=False)
    seconds = time.perf_counter() - t0
    res = evaluate(model, test)
    assert res["accuracy"] >= 0.90, res
    # About 1 s on an idle 2-core machine; the bound only catches a pathological slowdown (the
    # machine running the suite may be shared).
    assert seconds < 60, f"3 epochs on 1442 digits took {seconds:.1f} s"
    assert len(hist.epochs) == 3 and hist.epochs[-1]["loss"] < hist.epochs[0]["loss"]


def test_fit_is_bit_reproducible(small):
    runs = []
    for seed in (0, 0, 1):
        m = _mlp(seed=0)
        h = fit(m, small, optimizer="adam", lr=1e-3, batch_size=32, epochs=2, seed=seed, progress=False)
        runs.append((m, h))
    (a, ha), (b, hb), (c, _) = runs
    assert _same(a, b)
    assert [e["loss"] for e in ha.epochs] == [e["loss"] for e in hb.epochs]
    assert not _same(a, c)  # another seed, another batch order


def test_fit_leaves_global_rng_alone(small):
    before = torch.get_rng_state()
    fit(_mlp(), small, epochs=1, progress=False)
    assert torch.equal(torch.get_rng_state(), before)


def test_fit_equals_a_plain_loop(small):
    """fit is exactly randperm batching + cross-entropy + penalty + SGD: a hand-written loop with
    the same generator gives bit-identical weights."""
    coef = 1e-3

    def penalty(model):
        return coef * sum((p ** 2).sum() for p in model.parameters())

    a = _mlp()
    fit(a, small, lr=0.1, momentum=0.9, batch_size=64, epochs=2, seed=5, penalties=[penalty],
        progress=False)
    b = _mlp()
    opt = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        order = torch.randperm(len(small), generator=g)
        for i in range(0, len(small), 64):
            idx = order[i:i + 64]
            loss = F.cross_entropy(b(small.x[idx]), small.y[idx]) + penalty(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    assert _same(a, b)


def test_penalty_gradient_is_added(small):
    """A penalty c * ||w||^2 adds 2c * w to the gradient: with plain SGD that is weight decay 2c."""
    c = 0.05

    def l2(model):
        return c * sum((p ** 2).sum() for p in model.parameters())

    a, b, plain = _mlp(), _mlp(), _mlp()
    ha = fit(a, small, lr=0.1, momentum=0.0, epochs=1, batch_size=50, penalties=[l2], progress=False)
    fit(b, small, lr=0.1, momentum=0.0, epochs=1, batch_size=50, weight_decay=2 * c, progress=False)
    fit(plain, small, lr=0.1, momentum=0.0, epochs=1, batch_size=50, progress=False)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=1e-4, atol=1e-6)
    assert not _same(a, plain)
    assert ha.epochs[0]["penalty"] > 0 and "penalty" not in fit(_mlp(), small, progress=False).final


def test_on_step_hook_called_once_per_step(small):
    class Counting:
        def __init__(self):
            self.calls: list[int] = []
            self.lrs: list[float] = []

        def __call__(self, model):
            return torch.zeros(())

        def on_step(self, step, model):
            self.calls.append(step)

    pen = Counting()
    t = Trainer(_mlp(), small, lr=0.1, batch_size=64, epochs=3, schedule="cosine", penalties=[pen])
    lrs = []
    pen.on_step = lambda step, model, _f=pen.on_step: (_f(step, model),
                                                       lrs.append(t.opt.param_groups[0]["lr"]))
    t.run(progress=False)
    steps = 3 * 5  # ceil(300 / 64) = 5 batches per epoch
    assert t.steps_per_epoch == 5 and t.total_steps == steps
    assert pen.calls == list(range(1, steps + 1))
    # cosine: lr after step k is 0.1 * (1 + cos(pi k / K)) / 2, ending at 0
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(b < a for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[4] == pytest.approx(0.05 * (1 + torch.cos(torch.tensor(torch.pi * 5 / steps)).item()))


def test_history_per_epoch(small):
    t = Trainer(_mlp(), small, lr=0.1, batch_size=64, epochs=2, seed=0)
    losses, sizes = [], []
    while t.step_count < t.total_steps:
        pos = t._pos if t._pos < t.steps_per_epoch else 0
        sizes.append(min(64, len(small) - pos * 64))
        losses.append(t.step())
    hist = t.history
    assert [e["epoch"] for e in hist.epochs] == [1, 2]
    for e, (lo, hi) in zip(hist.epochs, [(0, 5), (5, 10)], strict=True):
        expect = sum(loss * n for loss, n in zip(losses[lo:hi], sizes[lo:hi], strict=True)) / len(small)
        assert e["loss"] == pytest.approx(expect, rel=1e-12)
        assert 0 <= e["accuracy"] <= 1 and e["seconds"] >= 0
    assert hist.final is hist.epochs[-1] and hist.to_dict() == {"epochs": hist.epochs}


def test_eval_data_is_evaluated_every_epoch(small, digits):
    m = _mlp()
    hist = fit(m, small, epochs=2, eval_data=digits[1], progress=False)
    assert all("test_accuracy" in e and "test_loss" in e for e in hist.epochs)
    assert hist.final["test_accuracy"] == evaluate(m, digits[1])["accuracy"]


def test_evaluate_matches_manual_and_restores_mode(small, digits):
    m = models.build("mlp", (1, 8, 8), 10, depth=1, width=16, norm="batch", seed=0)
    fit(m, small, epochs=1, progress=False)
    test = digits[1]
    with torch.no_grad():
        m.eval()
        logits = m(test.x)
        loss = F.cross_entropy(logits, test.y).item()
        acc = (logits.argmax(1) == test.y).float().mean().item()
    m.train()
    res = evaluate(m, test, batch_size=37)  # uneven batches
    assert m.training
    assert res["loss"] == pytest.approx(loss, rel=1e-5) and res["accuracy"] == pytest.approx(acc)
    m.eval()
    evaluate(m, test)
    assert not m.training
    torch.testing.assert_close(predict_logits(m, test.x, batch_size=50), logits)


def test_reset_bn_stats_gives_the_dataset_statistics():
    """MLP with BatchNorm after its first Linear layer: the first BN's input is x W^T + b, so its
    running statistics must be that tensor's per-unit mean and (unbiased) variance over the whole
    dataset, whatever the batching (1001 examples: uneven batches)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1001, 6, generator=g) * torch.linspace(0.5, 3, 6) + torch.arange(6.0)
    y = torch.zeros(1001, dtype=torch.long)
    m = models.build("mlp", (6,), 3, depth=2, width=5, norm="batch", seed=0)
    bn = m.norms[0]
    bn.momentum = 0.3
    m.eval()
    reset_bn_stats(m, (x, y), batch_size=250)
    with torch.no_grad():
        h = (x.double() @ m.layers[0].weight.double().T + m.layers[0].bias.double())
    torch.testing.assert_close(bn.running_mean, h.mean(0).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, h.var(0, unbiased=True).float(), rtol=1e-5, atol=1e-5)
    assert bn.momentum == 0.3 and not m.training  # restored
    # the second BN's statistics are those of its input (computed with batch-stat BN upstream)
    assert torch.all(m.norms[1].running_var > 0)
    # num_examples limits the pass
    reset_bn_stats(m, (x, y), num_examples=10)
    torch.testing.assert_close(bn.running_mean, h[:10].mean(0).float(), rtol=1e-5, atol=1e-5)


def test_reset_bn_stats_takes_bare_inputs_even_two_rows():
    """A bare tensor is the inputs (two rows must not be unpacked as an (x, y) pair), and gives
    the same statistics as the (x, y) pair; a frozen BN's mode survives the pass."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, generator=g)
    a = models.build("mlp", (6,), 3, depth=1, width=5, norm="batch", seed=0)
    b = models.build("mlp", (6,), 3, depth=1, width=5, norm="batch", seed=0)
    a.train()
    a.norms[0].eval()  # frozen by the caller
    reset_bn_stats(a, x)
    reset_bn_stats(b, (x, torch.zeros(2, dtype=torch.long)))
    assert torch.equal(a.norms[0].running_mean, b.norms[0].running_mean)
    assert torch.equal(a.norms[0].running_var, b.norms[0].running_var)
    assert a.training and not a.norms[0].training


def test_frozen_batchnorm_stays_frozen_through_training_and_evaluation(small):
    """A BN submodule put in eval mode under a training model keeps its running statistics
    through fit (which evaluates as it goes) and is still in eval mode afterwards."""
    m = _mlp(norm="batch")
    m.train()
    m.norms[0].eval()
    stats = (m.norms[0].running_mean.clone(), m.norms[0].running_var.clone())
    before = m.layers[0].weight.detach().clone()
    evaluate(m, small)
    assert m.training and not m.norms[0].training
    Trainer(m, small, batch_size=100, epochs=1).run(progress=False)
    assert not torch.equal(m.layers[0].weight, before)  # it did train
    assert torch.equal(m.norms[0].running_mean, stats[0])
    assert torch.equal(m.norms[0].running_var, stats[1])
    assert m.training and not m.norms[0].training


def test_reset_bn_stats_conv_channels():
    """BatchNorm2d after the first conv of a VGG: per-channel statistics over (N, H, W)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(33, 1, 8, 8, generator=g) + 0.5
    m = models.build("vgg", (1, 8, 8), 10, width=0.125, norm="batch", stages=(1, 1),
                     channels=(32, 64), seed=0)
    reset_bn_stats(m, (x, torch.zeros(33, dtype=torch.long)), batch_size=8)
    with torch.no_grad():
        h = F.conv2d(x.double(), m.convs[0].weight.double(), padding=1)
    bn = m.norms[0]
    torch.testing.assert_close(bn.running_mean, h.mean((0, 2, 3)).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, h.transpose(0, 1).flatten(1).var(1).float(),
                               rtol=1e-5, atol=1e-5)


def test_reset_bn_stats_without_bn_is_a_no_op(small):
    m = _mlp()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert not has_batchnorm(m)
    assert reset_bn_stats(m, small) is m
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_bn_model_trains_when_the_last_batch_would_have_one_example(small):
    """301 examples at batch 100: a last batch of one would crash BatchNorm1d; it is skipped."""
    sub = small.subset(list(range(300)) + [0])
    m = _mlp(norm="batch")
    t = Trainer(m, sub, batch_size=100, epochs=2)
    assert t.steps_per_epoch == 3
    t.run(progress=False)
    assert t.step_count == 6 and len(t.history.epochs) == 2
    reset_bn_stats(m, sub, batch_size=100)  # even batches: no batch of one here either


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
    ({"lr": 0.0}, "learning rate"),
    ({"lr": float("nan")}, "learning rate"),
    ({"momentum": -0.1}, "momentum"),
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"schedule": "step"}, "unknown schedule 'step'"),
    ({"epochs": -1}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_options(small, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        fit(_mlp(), small, progress=False, **kwargs)


def test_bad_data():
    m = _mlp()
    with pytest.raises(ConfigError, match="rows"):
        fit(m, (torch.zeros(5, 64), torch.zeros(4, dtype=torch.long)), progress=False)
    with pytest.raises(ConfigError, match="empty"):
        fit(m, (torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)), progress=False)
    with pytest.raises(ConfigError, match="Dataset or an"):
        fit(m, torch.zeros(5, 64), progress=False)
    with pytest.raises(ConfigError, match="empty"):
        evaluate(m, (torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)))
