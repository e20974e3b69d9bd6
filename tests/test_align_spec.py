"""Permutation specs and applying permutations: function preserved, inverses, traced == hand-written."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from basinmerge import models
from basinmerge.align import (
    apply_permutation,
    builtin_spec,
    compose,
    identity_permutation,
    inverse_permutation,
    random_permutation,
    spec_for,
    weight_matching,
)
from basinmerge.align.permute import check_permutation
from basinmerge.errors import ConfigError, IncompatibleModelsError

# (architecture, input shape, config): tiny widths, every norm of every built-in model.
CASES = [
    ("mlp", (1, 6, 6), {"depth": 1, "width": 8, "norm": "none"}),
    ("mlp", (1, 6, 6), {"depth": 3, "width": 8, "norm": "none"}),
    ("mlp", (1, 6, 6), {"depth": 2, "width": 8, "norm": "batch"}),
    ("mlp", (1, 6, 6), {"depth": 2, "width": 8, "norm": "layer"}),
    ("vgg", (1, 8, 8), {"width": 0.125, "norm": "none"}),
    ("vgg", (1, 8, 8), {"width": 0.125, "norm": "batch"}),
    ("vgg", (1, 8, 8), {"width": 0.125, "norm": "layer"}),
    ("resnet20", (3, 8, 8), {"width": 1, "norm": "batch"}),
    ("resnet20", (3, 8, 8), {"width": 1, "norm": "layer"}),
]
IDS = [f"{n}-{c.get('norm')}-{c.get('depth', c.get('width'))}" for n, _, c in CASES]


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-default norm parameters and BatchNorm running statistics (so an unpermuted buffer
    changes the function), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 2 + 0.2)
            if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.LayerNorm):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model.eval()


_MODELS: dict[int, nn.Module] = {}


def _model(i: int) -> nn.Module:
    if i not in _MODELS:
        name, shape, cfg = CASES[i]
        _MODELS[i] = _randomize(models.build(name, shape, 5, seed=i, **cfg), seed=i)
    return _MODELS[i]


def _outputs(model: nn.Module, state, x: torch.Tensor) -> torch.Tensor:
    net = models.build_from_config(model.config)
    net.load_state_dict(state)
    with torch.no_grad():
        return net.eval()(x)


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_traced_spec_equals_hand_written(i):
    name, shape, _ = CASES[i]
    model = _model(i)
    assert spec_for(model, torch.randn(2, *shape)) == builtin_spec(model)


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_random_permutation_preserves_the_function(i, seed):
    name, shape, _ = CASES[i]
    model = _model(i)
    spec = builtin_spec(model)
    perm = random_permutation(spec, seed)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(seed))
    state = model.state_dict()
    permuted = apply_permutation(spec, perm, state)
    torch.testing.assert_close(_outputs(model, permuted, x), _outputs(model, state, x),
                               atol=2e-5, rtol=1e-4)
    # The permutation really moved every tensor it tags (all tensors here are random).
    for p, v in perm.items():
        if not torch.equal(v, torch.arange(len(v))):
            for key, _ in spec.perm_to_axes[p]:
                assert not torch.equal(permuted[key], state[key]), key


def test_bn_running_stats_and_last_stream_are_permuted():
    """The two bugs of existing tools (shared/REFERENCE.md §7) are covered by the spec, and the
    function test above would catch them: leaving either out changes the outputs."""
    model = _model(7)  # ResNet-20 with BatchNorm
    spec = builtin_spec(model)
    last = spec.axes_to_perm["fc.weight"][1]
    assert last is not None and spec.axes_to_perm["layer3.2.conv2.weight"][0] == last
    assert spec.axes_to_perm["layer3.2.norm2.running_mean"] == (last,)
    assert spec.axes_to_perm["layer3.0.shortcut.1.running_var"] == (last,)
    assert spec.axes_to_perm["fc.weight"][0] is None and spec.axes_to_perm["fc.bias"] == (None,)
    perm = random_permutation(spec, 1)
    x = torch.randn(4, 3, 8, 8)
    state = model.state_dict()
    good = apply_permutation(spec, perm, state)
    reference = _outputs(model, state, x)
    no_stats = {k: (state[k] if k.endswith(("running_mean", "running_var")) else v)
                for k, v in good.items()}
    no_last = dict(good, **{"fc.weight": state["fc.weight"]})
    assert (_outputs(model, no_stats, x) - reference).abs().max() > 1e-3
    assert (_outputs(model, no_last, x) - reference).abs().max() > 1e-3


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), i=st.sampled_from([1, 5, 8]))
def test_inverse_permutation_restores_the_state_exactly(seed, i):
    model = _model(i)
    spec = builtin_spec(model)
    perm = random_permutation(spec, seed)
    state = model.state_dict()
    back = apply_permutation(spec, inverse_permutation(perm), apply_permutation(spec, perm, state))
    assert all(torch.equal(back[k], state[k]) for k in state)
    twice = apply_permutation(spec, perm, apply_permutation(spec, perm, state))
    once = apply_permutation(spec, compose(perm, perm), state)
    assert all(torch.equal(twice[k], once[k]) for k in state)


def test_vgg_flatten_expands_the_channel_permutation_over_the_spatial_block():
    model = _model(4)
    spec = builtin_spec(model)
    p = spec.axes_to_perm["fc.weight"][1]
    channels = model.convs[-1].out_channels
    assert spec.sizes[p] == channels and spec.block("fc.weight", 1) == model.fc.in_features // channels
    assert spec.axes_to_perm["convs.3.weight"][0] == p


class ResidualMLP(nn.Module):
    """Not a library model: a residual stream through square layers, a Flatten module, a view
    and a BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.flat = nn.Flatten()
        self.inp = nn.Linear(12, 6)
        self.block1 = nn.Linear(6, 5)
        self.block2 = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)
        self.mix = nn.Linear(6, 6)  # reads and writes the stream: both axes share one permutation
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        x = self.inp(self.flat(x))
        x = x + self.block2(F.relu(self.block1(x)))
        x = F.relu(self.bn(x))
        x = x + self.mix(x)
        return self.out(x.view(x.shape[0], -1))


def test_traced_spec_of_a_custom_model_unifies_residual_streams():
    model = _randomize(ResidualMLP(), 0)
    x = torch.randn(5, 3, 4)
    spec = spec_for(model, x[:2])
    stream = spec.axes_to_perm["inp.weight"][0]
    assert spec.axes_to_perm["block2.weight"][0] == stream
    assert spec.axes_to_perm["bn.running_mean"] == (stream,)
    assert spec.axes_to_perm["mix.weight"] == (stream, stream)
    assert spec.axes_to_perm["out.weight"] == (None, stream)
    assert spec.axes_to_perm["inp.weight"][1] is None  # the input is never permuted
    assert len(spec.perms) == 2
    state = model.state_dict()
    permuted = apply_permutation(spec, random_permutation(spec, 3), state)
    with torch.no_grad():
        ref = model(x)
        model.load_state_dict(permuted)
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-4)
        model.load_state_dict(state)
    # A key carrying one permutation on both axes: weight matching stays monotone and recovers
    # a planted permutation's objective value.
    params = {k: v.detach() for k, v in model.named_parameters()}
    planted = apply_permutation(spec, random_permutation(spec, 7),
                                {k: v for k, v in state.items() if k in params})
    perm, trace = weight_matching(spec, params, planted)
    assert all(b >= a for a, b in zip(trace.objective, trace.objective[1:], strict=False))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, groups=2)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.conv(x), 1).flatten(1))


def test_unsupported_ops_name_the_node():
    with pytest.raises(ConfigError, match=r"node 'cat'.*not supported"):
        spec_for(Concat(), torch.randn(2, 4))
    with pytest.raises(ConfigError, match=r"node 'conv'.*grouped convolution"):
        spec_for(Grouped(), torch.randn(2, 4, 5, 5))


def test_mismatched_models_give_one_clear_error():
    mlp = _model(1)
    other = models.build("mlp", (1, 6, 6), 5, depth=3, width=9)
    spec = builtin_spec(mlp)
    with pytest.raises(IncompatibleModelsError, match=r"layers.0.weight.*\(9, 36\)"):
        apply_permutation(spec, identity_permutation(spec), other.state_dict())
    pa = dict(mlp.named_parameters())
    pb = dict(other.named_parameters())
    with pytest.raises(IncompatibleModelsError, match=r"models do not match: key 'layers.0.weight'"):
        weight_matching(spec, pa, pb)
    pb = {k: v for k, v in pa.items() if k != "head.bias"}
    with pytest.raises(IncompatibleModelsError, match=r"model B lacks key 'head.bias'"):
        weight_matching(spec, pa, pb)
    with pytest.raises(ConfigError, match=r"not a permutation of 8 units"):
        apply_permutation(spec, {p: torch.zeros(8, dtype=torch.long) for p in spec.perms},
                          mlp.state_dict())
    with pytest.raises(ConfigError, match="no hand-written permutation spec"):
        builtin_spec(Concat())


def test_check_permutation_rejects_missing_names():
    spec = builtin_spec(_model(0))
    with pytest.raises(ConfigError, match="lacks 'P_layers.0'"):
        check_permutation(spec, {})
