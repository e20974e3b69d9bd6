"""Transformer permutation specs and matching: function preserved under head-structured
permutations (attention mask, tied embeddings), planted permutations recovered by weight and
activation matching, MergeMany, the two-level head assignment against brute force, bad input."""

from __future__ import annotations

import copy
import itertools
import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from basinmerge.align import (
    activation_matching,
    align,
    apply_permutation,
    compose,
    inverse_permutation,
    merge_many,
    objective,
    random_permutation,
    resolve_spec,
    spec_for,
    transformer_spec,
    two_level_assignment,
    weight_matching,
)
from basinmerge.align.permute import (
    check_permutation,
    fill_derived,
    head_structured,
    permute_tensor,
)
from basinmerge.align.transformer import example_input, is_conv1d, outputs
from basinmerge.errors import ConfigError, IncompatibleModelsError

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

BERT = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=24, max_position_embeddings=16)
GPT2 = dict(vocab_size=40, n_embd=16, n_layer=2, n_head=4, n_positions=16, bos_token_id=0,
            eos_token_id=0)
VIT = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
           image_size=14, patch_size=7, num_channels=1, num_labels=3)


class Encoder(nn.Module):
    """A user's transformer on nn.TransformerEncoderLayer (pre- or post-LN)."""

    def __init__(self, norm_first: bool, width: int = 16, heads: int = 4):
        super().__init__()
        self.emb = nn.Embedding(30, width)
        self.pos = nn.Parameter(torch.randn(1, 8, width))
        layer = nn.TransformerEncoderLayer(width, heads, 24, dropout=0.1, batch_first=True,
                                           norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        return self.head(self.enc(self.emb(x) + self.pos[:, :x.shape[1]]).mean(1))


class PlainMHA(nn.Module):
    """nn.MultiheadAttention used directly (sequence-first), with a LayerNorm and an MLP."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.attn = nn.MultiheadAttention(16, 4)
        self.norm = nn.LayerNorm(16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.emb(x).transpose(0, 1)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = h + self.fc2(torch.relu(self.fc1(self.norm(h))))
        return self.out(h.mean(0))


def _bert_cls():
    return transformers.BertForSequenceClassification(transformers.BertConfig(**BERT))


def _bert_mlm():
    return transformers.BertForMaskedLM(transformers.BertConfig(**BERT))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2))


def _vit():
    return transformers.ViTForImageClassification(transformers.ViTConfig(**VIT))


FACTORIES = {"bert": _bert_cls, "bert-mlm-tied": _bert_mlm, "gpt2-tied": _gpt2, "vit": _vit,
             "encoder-postln": lambda: Encoder(False), "encoder-preln": lambda: Encoder(True),
             "mha": PlainMHA}
NAMES = list(FACTORIES)


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-default LayerNorm weights and biases (an unpermuted one would change the function)
    and weights of scale 1/sqrt(fan-in) (HF's 0.02 makes attention nearly uniform, so a
    wrong Q/K permutation would go unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        modules = dict(model.named_modules())
        for name, prm in model.named_parameters():
            owner = modules[name.rpartition(".")[0]]
            if name.endswith("weight") and (isinstance(owner, nn.Linear) or is_conv1d(owner)):
                fan_in = prm.shape[0] if is_conv1d(owner) else prm.shape[1]
                prm.copy_(torch.randn(prm.shape, generator=g) / fan_in ** 0.5)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model.eval()


_CACHE: dict[tuple[str, int], nn.Module] = {}


def _model(name: str, seed: int = 0) -> nn.Module:
    if (name, seed) not in _CACHE:
        torch.manual_seed(seed)
        _CACHE[(name, seed)] = _randomize(FACTORIES[name](), seed)
    return _CACHE[(name, seed)]


def _data(model: nn.Module, n: int = 64, seed: int = 0):
    """Inputs: ids with an attention mask (padding at the end of some rows), pixels, or ids."""
    g = torch.Generator().manual_seed(seed)
    if hasattr(model, "config") and hasattr(model.config, "image_size"):
        return torch.randn(n, 1, 14, 14, generator=g)
    ids = torch.randint(0, 30, (n, 6), generator=g)
    if not hasattr(model, "config"):
        return ids
    mask = torch.ones(n, 6, dtype=torch.long)
    mask[::3, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _permuted(model: nn.Module, spec, perm) -> nn.Module:
    out = copy.deepcopy(model)
    out.load_state_dict(apply_permutation(spec, perm, model.state_dict()))
    return out.eval()


def _spec(name: str):
    m = _model(name)
    return transformer_spec(m, _data(m, 2), check=False)


@pytest.mark.parametrize("name", NAMES)
def test_random_permutation_keeps_outputs(name):
    model = _model(name)
    spec = _spec(name)
    assert spec.heads and "P_res" in spec.sizes
    perm = random_permutation(spec, seed=1)
    assert not torch.equal(perm["P_res"], torch.arange(16))
    moved = _permuted(model, spec, perm)
    x = _data(model, 8)
    before, after = outputs(model, x), outputs(moved, x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    # The weights did move (not a vacuous check).
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                      moved.state_dict().values(), strict=True))
    if name.endswith("tied"):
        emb, dec = moved.get_input_embeddings().weight, moved.get_output_embeddings().weight
        assert emb is dec
        torch.testing.assert_close(emb, model.get_input_embeddings().weight[:, perm["P_res"]])


@pytest.mark.parametrize("name", ["bert", "gpt2-tied", "mha"])
def test_splitting_a_head_is_rejected_and_changes_the_function(name):
    model, spec = _model(name), _spec(name)
    qk = next(p for p in spec.heads if p.endswith(".qk"))
    perm = random_permutation(spec, 2)
    bad = {p: v.clone() for p, v in perm.items()}
    d = spec.heads[qk][1]
    bad[qk][[0, d]] = bad[qk][[d, 0]]  # one unit each of head slots 0 and 1 trade places
    with pytest.raises(ConfigError, match="splits an attention head"):
        check_permutation(spec, bad)
    fill_derived(spec, bad)
    state = {k: permute_tensor(spec, bad, k, v) for k, v in model.state_dict().items()}
    x = _data(model, 8)
    assert not torch.allclose(outputs(model, x, state), outputs(model, x), atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_weight_matching_recovers_planted_permutation(name):
    model, spec = _model(name), _spec(name)
    planted = random_permutation(spec, seed=5)
    b = _permuted(model, spec, planted)
    pa = {k: v.detach() for k, v in model.named_parameters()}
    pb = {k: v.detach() for k, v in b.named_parameters()}
    perm, trace = weight_matching(spec, pa, pb)
    back = apply_permutation(spec, perm, pb)
    assert trace.converged
    assert objective(pa, back) == pytest.approx(objective(pa, pa), rel=1e-6)
    for k in pa:
        torch.testing.assert_close(back[k], pa[k])


@pytest.mark.parametrize("name", NAMES)
def test_activation_matching_recovers_planted_permutation(name):
    model, spec = _model(name), _spec(name)
    planted = random_permutation(spec, seed=7)
    b = _permuted(model, spec, planted)
    perm = activation_matching(model, b, _data(model, 64), spec=spec)
    for p in spec.free_perms:
        torch.testing.assert_close(perm[p], torch.argsort(planted[p]), msg=p)


@pytest.mark.parametrize("name", ["bert", "gpt2-tied", "encoder-preln"])
def test_weight_matching_trace_is_the_exact_objective(name):
    """Unrelated models: many accepted steps, incremental cost-matrix updates; the objective
    the trace reports is the exact one of the returned permutation, and it only rises."""
    a, b = _model(name, 0), _model(name, 1)
    spec = _spec(name)
    pa = {k: v.detach() for k, v in a.named_parameters()}
    pb = {k: v.detach() for k, v in b.named_parameters()}
    perm, trace = weight_matching(spec, pa, pb, seed=3)
    assert trace.accepted > 0
    assert all(y >= x for x, y in zip(trace.objective, trace.objective[1:], strict=False))
    exact = objective(pa, apply_permutation(spec, perm, pb))
    assert trace.objective[-1] == pytest.approx(exact, rel=1e-5)
    assert exact > objective(pa, pb)


def test_two_models_different_seeds_align_end_to_end():
    a, b = _model("bert", 0), _model("bert", 1)
    data = _data(a, 32)
    aligned = align(a, b, "weight", data, restarts=1)
    info = aligned.alignment
    assert len(info["restart_objectives"]) == 2
    assert info["objective"][-1] == max(info["restart_objectives"])
    assert info["objective"][-1] >= info["objective"][0]
    torch.testing.assert_close(outputs(aligned, data), outputs(b, data), rtol=1e-4, atol=1e-5)
    act = align(a, b, "activation", data)
    torch.testing.assert_close(outputs(act, data), outputs(b, data), rtol=1e-4, atol=1e-5)
    started = align(a, b, "weight", data, init="activation")
    assert started.alignment["init"] == "activation"


def test_merge_many_of_permuted_copies_is_the_model():
    model = _model("gpt2-tied")
    spec = _spec("gpt2-tied")
    copies = [_permuted(model, spec, random_permutation(spec, s)) for s in (1, 2, 3)]
    merged, perms = merge_many(copies, spec)
    net = copy.deepcopy(model)
    net.load_state_dict(merged)
    x = _data(model, 8)
    torch.testing.assert_close(outputs(net, x), outputs(model, x), rtol=1e-4, atol=1e-5)
    assert net.lm_head.weight is net.transformer.wte.weight


def test_resolve_spec_and_spec_for_route_transformers():
    model = _model("gpt2-tied")
    assert resolve_spec(model) == spec_for(model, example_input(model)) == _spec("gpt2-tied")


def test_two_level_assignment_is_the_exact_optimum():
    rng = np.random.default_rng(0)
    h, d = 3, 2
    costs = [torch.as_tensor(rng.normal(size=(h * d, h * d))) for _ in range(2)]
    sigmas, gain, _ = two_level_assignment(costs, d)
    value = sum(float(c[torch.arange(h * d), s].sum()) for c, s in zip(costs, sigmas, strict=True))
    best = -np.inf
    inner = list(itertools.permutations(range(d)))
    for heads in itertools.permutations(range(h)):
        for wa in itertools.product(inner, repeat=h):
            sa = head_structured(torch.tensor(heads), [torch.tensor(w) for w in wa])
            va = float(costs[0][torch.arange(h * d), sa].sum())
            for wb in itertools.product(inner, repeat=h):
                sb = head_structured(torch.tensor(heads), [torch.tensor(w) for w in wb])
                best = max(best, va + float(costs[1][torch.arange(h * d), sb].sum()))
    assert value == pytest.approx(best)
    assert gain == pytest.approx(best - sum(float(c.trace()) for c in costs))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 10_000))
def test_structured_permutations_compose_and_invert(s1, s2):
    model, spec = _model("gpt2-tied"), _spec("gpt2-tied")
    p, q = random_permutation(spec, s1), random_permutation(spec, s2)
    for r in (compose(p, q), inverse_permutation(p)):
        checked = check_permutation(spec, r)  # still head-structured, derived consistent
        for k in r:
            assert torch.equal(checked[k], r[k])
    state = model.state_dict()
    back = apply_permutation(spec, inverse_permutation(p), apply_permutation(spec, p, state))
    for k in state:
        assert torch.equal(back[k], state[k])


# --------------------------------------------------------------------------- bad input


class OwnAttention(nn.Module):
    def __init__(self, width: int, heads: int, interleaved: bool = False):
        super().__init__()
        self.num_heads, self.interleaved = heads, interleaved
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        n, t, w = x.shape
        h = self.num_heads
        if self.interleaved:  # per-head [q k v] blocks: not the fused layout the builder reads
            q, k, v = self.qkv(x).view(n, t, h, 3, w // h).unbind(3)
        else:
            q, k, v = self.qkv(x).view(n, t, 3, h, w // h).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        y = torch.softmax(q @ k.transpose(-1, -2) / (w // h) ** 0.5, -1) @ v
        return self.proj(y.transpose(1, 2).reshape(n, t, w))


class OwnModel(nn.Module):
    def __init__(self, width=12, heads=3, interleaved=False):
        super().__init__()
        self.emb = nn.Embedding(20, width)
        self.norm = nn.LayerNorm(width)
        self.attn = OwnAttention(width, heads, interleaved)
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        h = self.emb(x)
        h = h + self.attn(self.norm(h))
        return self.head(h.mean(1))


def test_users_own_transformer_is_read():
    torch.manual_seed(0)
    model = OwnModel().eval()
    x = torch.randint(0, 20, (4, 5))
    spec = transformer_spec(model, x)
    assert spec.derived == {"P_attn.qkv": ("P_attn.qk", "P_attn.qk", "P_attn.vo")}
    moved = _permuted(model, spec, random_permutation(spec, 3))
    torch.testing.assert_close(moved(x), model(x), rtol=1e-4, atol=1e-5)


class Features(nn.Module):
    """Sequences of feature vectors: a linear input projection instead of an embedding."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.enc(self.inp(x))[:, 0])


def test_linear_input_projection_writes_the_stream():
    torch.manual_seed(0)
    model = Features().eval()
    x = torch.randn(4, 7, 5)
    spec = transformer_spec(model, x)
    assert spec.axes_to_perm["inp.weight"] == ("P_res", None)
    moved = _permuted(model, spec, random_permutation(spec, 1))
    torch.testing.assert_close(moved(x), model(x), rtol=1e-4, atol=1e-5)


class UnnamedAttention(nn.Module):
    """Projections named a, b, c, called value first: only the function check can tell which
    one is the value."""

    def __init__(self):
        super().__init__()
        self.num_heads = 3
        self.a, self.b, self.c, self.o = (nn.Linear(12, 12) for _ in range(4))

    def forward(self, h):
        n, t, w = h.shape
        v, q, k = (m(h).view(n, t, 3, 4).transpose(1, 2) for m in (self.a, self.b, self.c))
        y = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return self.o(y.transpose(1, 2).reshape(n, t, w))


class Unnamed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.attn = UnnamedAttention()
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        h = self.emb(x)
        return self.head((h + self.attn(h)).mean(1))


def test_unnamed_projections_in_any_order_are_read():
    torch.manual_seed(0)
    model = Unnamed().eval()
    x = torch.randint(0, 20, (4, 5))
    spec = transformer_spec(model, x)
    assert spec.axes_to_perm["attn.a.weight"][0] == spec.axes_to_perm["attn.o.weight"][1]  # value
    moved = _permuted(model, spec, random_permutation(spec, 2))
    torch.testing.assert_close(moved(x), model(x), rtol=1e-4, atol=1e-5)


def test_heads_that_do_not_divide_the_width():
    model = OwnModel(width=12, heads=3)
    with pytest.raises(ConfigError, match="attention 'attn' has 5 heads, which do not divide its width 12"):
        transformer_spec(model, torch.randint(0, 20, (2, 5)), num_heads={"attn": 5})


def test_unreadable_architecture_names_the_way_out():
    model = OwnModel(interleaved=True)
    with pytest.raises(ConfigError, match="does not preserve its outputs.*spec="):
        transformer_spec(model, torch.randint(0, 20, (2, 5)))


def test_no_example_for_a_model_without_config():
    with pytest.raises(ConfigError, match="example input"):
        transformer_spec(OwnModel())


def test_different_head_counts_are_one_error():
    a = _model("bert")
    b = transformers.BertForSequenceClassification(transformers.BertConfig(**{**BERT, "num_attention_heads": 2}))
    with pytest.raises(IncompatibleModelsError, match="attention 'bert.encoder.layer.0.attention.self' has 4 heads in model A and 2"):
        align(a, b, "weight")


def test_different_widths_are_one_error():
    a = _model("vit")
    b = transformers.ViTForImageClassification(transformers.ViTConfig(**{**VIT, "hidden_size": 24}))
    with pytest.raises(IncompatibleModelsError, match="vit"):
        align(a, b, "weight")


# --------------------------------------------------------------------------- orthogonal


@pytest.mark.parametrize("name", ["gpt2-tied", "vit"])
def test_folded_layernorms_keep_outputs_and_admit_rotations(name):
    from basinmerge.align.orthogonal import fold_layernorms, rotate_stream

    model = _model(name)
    x = _data(model, 8)
    folded = fold_layernorms(model, _data(model, 2))
    assert not any(isinstance(m, nn.LayerNorm) for m in folded.modules())
    torch.testing.assert_close(outputs(folded, x), outputs(model, x), rtol=1e-4, atol=1e-5)
    spec = transformer_spec(folded, _data(model, 2))
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64))
    rotated = rotate_stream(folded, spec, q)
    torch.testing.assert_close(outputs(rotated, x), outputs(model, x), rtol=1e-4, atol=1e-5)
    # A rotation of the stream without folding breaks the function: LayerNorm is not
    # rotation-invariant (its centering and per-feature weight).
    raw = rotate_stream(model, _spec(name), q)
    assert not torch.allclose(outputs(raw, x), outputs(model, x), atol=1e-3)


@pytest.mark.parametrize("name", ["gpt2-tied", "vit"])
def test_orthogonal_alignment_recovers_a_planted_rotation(name):
    from basinmerge.align.orthogonal import fold_layernorms, orthogonal_align, rotate_stream

    model = _model(name)
    x = _data(model, 32)
    folded = fold_layernorms(model, _data(model, 2))
    spec = transformer_spec(folded, _data(model, 2))
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(1),
                                       dtype=torch.float64))
    b = rotate_stream(folded, spec, q)
    a_out, b_out = orthogonal_align(folded, b, x)
    # The aligned B equals A on every direction the stream uses (the mean direction, which a
    # folded model never writes, is left free): the midpoint computes A's function, while the
    # midpoint with the unaligned B does not.
    mid = copy.deepcopy(a_out)
    mid.load_state_dict({k: (v + b_out.state_dict()[k]) / 2 for k, v in a_out.state_dict().items()})
    torch.testing.assert_close(outputs(mid, x), outputs(model, x), rtol=1e-4, atol=1e-4)
    naive = copy.deepcopy(a_out)
    naive.load_state_dict({k: (v + b.state_dict()[k]) / 2 for k, v in a_out.state_dict().items()})
    assert not torch.allclose(outputs(naive, x), outputs(model, x), atol=1e-2)
    assert b_out.alignment["trace_after"] > b_out.alignment["trace_before"]


def test_orthogonal_alignment_refuses_post_ln():
    from basinmerge.align.orthogonal import fold_layernorms

    model = _model("bert")
    with pytest.raises(ConfigError, match="pre-LN"):
        fold_layernorms(model, _data(model, 2))


def test_orthogonal_alignment_refuses_a_raw_stream_reader():
    from basinmerge.align.orthogonal import fold_layernorms

    model = _model("encoder-preln")  # its head reads the stream without a final LayerNorm
    with pytest.raises(ConfigError, match="layer 'head' reads the residual stream without a LayerNorm"):
        fold_layernorms(model, _data(model, 2))
