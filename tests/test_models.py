"""Architectures: forward and backward for every norm option, deterministic initialization,
rebuilding from the stored config, ChannelLayerNorm, and bad configurations."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from basinmerge import models
from basinmerge.errors import ConfigError

# (name, input shape, options) -- small widths, every norm option of every model.
CASES = [
    ("mlp", (1, 8, 8), {"depth": 2, "width": 16, "norm": "none"}),
    ("mlp", (1, 8, 8), {"depth": 2, "width": 16, "norm": "batch"}),
    ("mlp", (1, 8, 8), {"depth": 2, "width": 16, "norm": "layer"}),
    ("mlp", (40,), {"depth": 1, "width": 8}),
    ("vgg", (1, 16, 16), {"width": 0.25, "norm": "none"}),
    ("vgg", (3, 16, 16), {"width": 0.25, "norm": "batch"}),
    ("vgg", (3, 16, 16), {"width": 0.25, "norm": "layer", "hidden": 32}),
    ("resnet20", (3, 16, 16), {"width": 1, "norm": "batch"}),
    ("resnet20", (1, 8, 8), {"width": 1, "norm": "layer"}),
]
IDS = [f"{n}-{c.get('norm', 'default')}-{'x'.join(map(str, s))}" for n, s, c in CASES]


def _bn_cancelled_biases(model: nn.Module) -> set[str]:
    """Names of Linear biases that feed straight into a BatchNorm1d: training-mode BN subtracts
    the batch mean, so their gradient is exactly zero in exact arithmetic (the mlp keeps these
    redundant biases; vgg and resnet20 drop them)."""
    if not isinstance(model, models.MLP):
        return set()
    return {f"layers.{i}.bias" for i, n in enumerate(model.norms) if isinstance(n, nn.BatchNorm1d)}


@pytest.mark.parametrize(("name", "in_shape", "cfg"), CASES, ids=IDS)
def test_forward_backward_every_norm(name, in_shape, cfg):
    model = models.build(name, in_shape, 10, seed=0, **cfg)
    x = torch.randn(6, *in_shape, generator=torch.Generator().manual_seed(1))
    y = torch.arange(6) % 10
    model.train()
    out = model(x)
    assert out.shape == (6, 10) and out.dtype == torch.float32 and torch.isfinite(out).all()
    F.cross_entropy(out, y).backward()
    cancelled = _bn_cancelled_biases(model)
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
        if pname in cancelled:
            assert p.grad.abs().max() < 1e-5, pname
        else:
            assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"
    # eval mode (running statistics for BN) gives finite outputs of the same shape
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 10)


@pytest.mark.parametrize(("name", "in_shape", "cfg"), CASES[::2], ids=IDS[::2])
def test_seed_determines_the_initialization(name, in_shape, cfg):
    rng_before = torch.get_rng_state()
    a = models.build(name, in_shape, 10, seed=3, **cfg).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before), "build must leave the global RNG alone"
    torch.manual_seed(12345)  # the global RNG plays no part
    b = models.build(name, in_shape, 10, seed=3, **cfg).state_dict()
    c = models.build(name, in_shape, 10, seed=4, **cfg).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    weights = [k for k in a if k.endswith("weight") and a[k].ndim > 1]
    assert weights and all(not torch.equal(a[k], c[k]) for k in weights)


@pytest.mark.parametrize(("name", "in_shape", "cfg"), CASES, ids=IDS)
def test_build_from_config_rebuilds_identical_weights(name, in_shape, cfg):
    model = models.build(name, in_shape, 7, seed=11, **cfg)
    config = json.loads(json.dumps(model.config))  # as stored in a checkpoint
    assert config["name"] == name and config["seed"] == 11 and config["num_classes"] == 7
    again = models.build_from_config(config)
    assert type(again) is type(model) and again.config == model.config
    sa, sb = model.state_dict(), again.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_mlp_layout():
    m = models.build("mlp", (1, 28, 28), 10, depth=2, width=512)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"layers.0.weight": (512, 784), "layers.0.bias": (512,),
                      "layers.1.weight": (512, 512), "layers.1.bias": (512,),
                      "head.weight": (10, 512), "head.bias": (10,)}
    assert models.num_parameters(m) == 784 * 512 + 512 + 512 * 512 + 512 + 5130


def test_resnet20_structure():
    m = models.build("resnet20", (3, 32, 32), 10, width=2)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    # stem + 3 stages x 3 blocks x 2 convs = 19 conv layers (+1 fc = 20), plus 2 projections
    assert len(convs) == 19 + 2
    assert m.fc.in_features == 128 and m.stem.out_channels == 32
    assert sum(isinstance(mod, nn.BatchNorm2d) for mod in m.modules()) == 21


def test_vgg_bias_only_without_norm():
    plain = models.build("vgg", (1, 16, 16), 10, width=0.25)
    normed = models.build("vgg", (1, 16, 16), 10, width=0.25, norm="batch")
    assert all(c.bias is not None for c in plain.convs)
    assert all(c.bias is None for c in normed.convs)
    assert [c.out_channels for c in plain.convs] == [8, 16, 32, 32]


def test_channel_layer_norm_matches_manual_normalization():
    g = torch.Generator().manual_seed(0)
    ln = models.ChannelLayerNorm(5)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(5, generator=g))
        ln.bias.copy_(torch.randn(5, generator=g))
    x = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float32) * 3 + 1
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, unbiased=False, keepdim=True)
    manual = (x - mean) / torch.sqrt(var + ln.eps) * ln.weight.view(1, -1, 1, 1) + ln.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(ln(x), manual, rtol=1e-5, atol=1e-5)
    # It commutes with a permutation of the channels (what permutation alignment relies on).
    perm = torch.randperm(5, generator=g)
    ln_p = models.ChannelLayerNorm(5)
    with torch.no_grad():
        ln_p.weight.copy_(ln.weight[perm])
        ln_p.bias.copy_(ln.bias[perm])
    torch.testing.assert_close(ln_p(x[:, perm]), ln(x)[:, perm], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("args", "kwargs", "match"), [
    (("transformer", (1, 8, 8), 10), {}, "unknown model 'transformer'"),
    (("mlp", (1, 8, 8), 10), {"norm": "group"}, "unknown norm 'group'"),
    (("vgg", (1, 16, 16), 10), {"norm": "group"}, "unknown norm 'group'"),
    (("resnet20", (3, 16, 16), 10), {"norm": "none"}, "resnet20 supports norm"),
    (("vgg", (40,), 10), {}, "vgg needs image input"),
    (("resnet20", (784,), 10), {}, "resnet20 needs image input"),
    (("vgg", (1, 4, 4), 10), {}, "too small"),
    (("vgg", (1, 16, 16), 10), {"width": 0}, "width > 0"),
    (("resnet20", (3, 16, 16), 10), {"width": 0}, "width >= 1"),
    (("resnet20", (3, 16, 16), 10), {"width": 1.5}, "must be an integer"),
    (("mlp", (1, 8, 8), 10), {"width": 0}, "width >= 1"),
    (("mlp", (1, 8, 8), 10), {"width": 2.5}, "must be integers"),
    (("mlp", (1, 8, 8), 10), {"dropout": 0.5}, "bad option for model 'mlp'.*dropout"),
])
def test_bad_configs(args, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        models.build(*args, **kwargs)


def test_build_from_config_needs_the_keys():
    with pytest.raises(ConfigError, match="lacks the key 'in_shape'"):
        models.build_from_config({"name": "mlp", "num_classes": 10})
