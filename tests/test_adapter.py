"""The model adapter (feeding batches, reading logits and losses), data forms, tied parameters,
transformer layers in scopes and WSA, and every data-using method on tiny HF transformers."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from basinmerge import adapter, models
from basinmerge.adapter import Data, as_data
from basinmerge.connectivity import barriers, interpolate
from basinmerge.data import Dataset, DatasetInfo
from basinmerge.errors import ConfigError, IncompatibleModelsError
from basinmerge.merge import adamerging, diagonal_fisher, fisher, regmean, soft
from basinmerge.merge.adamerging import adamerging_info
from basinmerge.scope import live_input_masks, scope_keys, weight_scope
from basinmerge.state import module_params, param_keys, retie, tied_groups, with_state
from basinmerge.train import evaluate, fit, reset_bn_stats
from basinmerge.wsa import WSARegularizer

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- output types


class _Out(nn.Module):
    """A linear classifier whose forward returns its logits as a tensor, tuple, mapping or
    object with .logits."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(5, 3)
        self.kind = kind

    def forward(self, x):
        z = self.lin(x)
        if self.kind == "tuple":
            return (z, z.sum())
        if self.kind == "dict":
            return {"logits": z}
        if self.kind == "object":
            return SimpleNamespace(logits=z, loss=None)
        return z


@pytest.mark.parametrize("kind", ["tuple", "dict", "object"])
def test_every_output_type_gives_the_tensor_models_results(kind):
    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    want = evaluate(_Out("tensor"), (x, y))
    assert evaluate(_Out(kind), (x, y)) == want
    logits = _Out("tensor").lin(x)
    assert want["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)
    assert want["accuracy"] == pytest.approx(float((logits.argmax(1) == y).double().mean()))


def test_unreadable_output_is_one_clear_error():
    with pytest.raises(ConfigError, match="cannot read logits"):
        adapter.logits_of("text")


# --------------------------------------------------------------------------- input types


class _DictModel(nn.Module):
    """Mean-pools embeddings of the unmasked tokens: the mask must change the result."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        m = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        h = (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True)
        return self.head(h)


def _token_batch(n=16, t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[::2, 4:] = 0
    return ids, mask, torch.randint(0, 3, (n,), generator=g)


def test_dict_batches_are_passed_as_keywords_with_their_attention_mask():
    ids, mask, y = _token_batch()
    net = _DictModel()
    got = evaluate(net, {"input_ids": ids, "attention_mask": mask, "labels": y}, batch_size=5)
    want = F.cross_entropy(net(ids, mask), y)
    assert got["loss"] == pytest.approx(float(want), rel=1e-6)
    unmasked = evaluate(net, ({"input_ids": ids}, y))
    assert unmasked["loss"] != pytest.approx(got["loss"])


def test_every_data_form_gives_the_same_data():
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    ds = Dataset(x, y, DatasetInfo("toy", "train", (4,), 3, "test"))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    forms = [ds, (x, y), [x, y], {"x": x, "labels": y}, loader, Data(x, y)]
    for f in forms:
        d = as_data(f)
        got = d.inputs["x"] if isinstance(d.inputs, dict) else d.inputs
        assert torch.equal(got, x) and torch.equal(d.labels, y)
    bare = as_data(x)
    assert torch.equal(bare.inputs, x) and bare.labels is None


def test_a_loader_is_read_only_as_far_as_needed():
    x, y = torch.randn(100, 4), torch.randint(0, 3, (100,))
    reads = []

    class Counting(torch.utils.data.Dataset):
        def __len__(self):
            return 100

        def __getitem__(self, i):
            reads.append(i)
            return x[i], y[i]

    d = as_data(torch.utils.data.DataLoader(Counting(), batch_size=10), limit=25)
    assert len(d) == 25 and torch.equal(d.inputs, x[:25]) and len(reads) == 30


def test_dict_batches_from_a_loader_and_a_duck_typed_hf_dataset():
    ids, mask, y = _token_batch(12)
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": y[i]} for i in range(12)]
    d = as_data(torch.utils.data.DataLoader(rows, batch_size=5))
    assert torch.equal(d.inputs["input_ids"], ids) and torch.equal(d.labels, y)

    class FakeHF:  # what datasets.Dataset offers: column_names, with_format, slicing
        column_names = ["text", "input_ids", "attention_mask", "label"]

        def __len__(self):
            return 12

        def with_format(self, fmt):
            assert fmt == "torch"
            return self

        def __getitem__(self, sl):
            return {"text": ["a"] * 12, "input_ids": ids[sl], "attention_mask": mask[sl],
                    "label": y[sl]}

    h = as_data(FakeHF(), limit=8)
    assert set(h.inputs) == {"input_ids", "attention_mask"} and torch.equal(h.labels, y[:8])
    net = _DictModel()
    assert evaluate(net, FakeHF()) == evaluate(net, {"input_ids": ids, "attention_mask": mask,
                                                      "labels": y})


def test_a_real_hf_dataset_if_installed():
    datasets = pytest.importorskip("datasets")
    ids, mask, y = _token_batch(10)
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                                     "labels": y.tolist()})
    d = as_data(ds)
    assert torch.equal(d.inputs["input_ids"], ids) and torch.equal(d.labels, y)


def test_bad_data_is_one_clear_error():
    with pytest.raises(ConfigError, match="rows"):
        as_data({"input_ids": torch.zeros(3, 2), "attention_mask": torch.zeros(4, 2)})
    with pytest.raises(ConfigError, match="rows"):
        as_data((torch.zeros(3, 2), torch.zeros(4)))
    with pytest.raises(ConfigError, match="empty"):
        as_data(torch.zeros(0, 3))
    with pytest.raises(ConfigError, match="tokenize"):
        as_data({"text": ["a", "b"]})
    with pytest.raises(ConfigError, match="needs labeled data"):
        fit(_Out("tensor"), torch.randn(8, 5), progress=False)


# --------------------------------------------------------------------------- causal LM loss


def test_causal_lm_loss_against_a_hand_computation():
    g = torch.Generator().manual_seed(1)
    b, t, v = 3, 6, 9
    logits = torch.randn(b, t, v, generator=g)
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 4:] = 0
    labels = ids.clone()
    labels[2, 3] = -100
    inputs = {"input_ids": ids, "attention_mask": mask}
    terms, correct, count = [], 0, 0
    for i in range(b):
        for j in range(t - 1):
            target = int(labels[i, j + 1])
            if mask[i, j + 1] == 0 or target == -100:
                continue
            logp = torch.log_softmax(logits[i, j], -1)
            terms.append(-float(logp[target]))
            correct += int(logits[i, j].argmax() == target)
            count += 1
    s, c, n = adapter.loss_terms(logits, labels, inputs)
    assert n == count == 3 * 5 - 2 - 1  # two masked positions, one label -100
    assert float(s) == pytest.approx(sum(terms), rel=1e-6) and int(c) == correct
    # labels default to the input ids
    s2, _, n2 = adapter.loss_terms(logits, None, inputs)
    assert n2 == count + 1
    assert adapter.infer_task(logits) == "causal_lm"
    assert adapter.infer_task(logits, "classification") == "classification"
    rows, w = adapter.prediction_rows(logits, inputs)
    assert rows.shape == (b, t - 1, v) and float(w.sum()) == 3 * 5 - 2


# --------------------------------------------------------------------------- tied parameters


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.mid = nn.Linear(4, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.mid(self.emb(ids))))


def test_tied_groups_param_keys_and_retie():
    net = _Tied()
    assert tied_groups(net) == [["emb.weight", "out.weight"]]
    assert tied_groups(net.state_dict()) == [["emb.weight", "out.weight"]]
    assert "out.weight" not in param_keys(net) and "out.weight" not in param_keys(net.state_dict())
    assert set(module_params(net, net.state_dict())) == {"emb.weight", "mid.weight", "mid.bias"}
    s = {k: v.clone() for k, v in net.state_dict().items()}
    s["out.weight"] = torch.zeros(7, 4)
    tied = retie(s, tied_groups(net), prefer={"out.weight"})
    assert tied["emb.weight"] is tied["out.weight"] and float(tied["emb.weight"].abs().sum()) == 0
    assert scope_keys(net) == ["emb.weight", "mid.weight"]
    assert scope_keys(net, include_embeddings=False) == ["mid.weight", "emb.weight"]  # via out
    assert scope_keys(net.state_dict()) == scope_keys(net)
    with pytest.raises(IncompatibleModelsError, match="mid.bias"):
        module_params(net, {"emb.weight": s["emb.weight"], "mid.weight": s["mid.weight"]})


def test_embeddings_are_an_option_for_scopes():
    net = _DictModel()
    assert scope_keys(net) == ["emb.weight", "head.weight"]
    assert scope_keys(net, include_embeddings=False) == ["head.weight"]


def test_multihead_attention_in_scopes_and_live_masks():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    keys = scope_keys(layer)
    assert keys == ["self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight",
                    "linear2.weight"]
    sc = weight_scope(layer)
    assert sc["self_attn.in_proj_weight"].count == 3 * 8 * 8
    w = layer.self_attn.in_proj_weight.detach().double()
    assert sc["self_attn.in_proj_weight"].std == pytest.approx(float(w.std(correction=0)))
    assert scope_keys(layer.state_dict()) == keys
    masks = live_input_masks(layer, torch.randn(4, 5, 8))
    assert masks["self_attn.in_proj_weight"].shape == (1, 8)
    # linear2 reads the ReLU outputs of linear1: units dead on every input are masked out
    layer.linear1.bias.data[:4] = -100.0
    masks = live_input_masks(layer, torch.randn(4, 5, 8))
    assert masks["linear2.weight"].shape == (1, 16) and not masks["linear2.weight"][0, :4].any()
    WSARegularizer.from_init(layer, 1.0).check(layer)


# --------------------------------------------------------------------------- AdaMerging on BN


@pytest.mark.parametrize("arch,cfg", [("resnet20", {}), ("vgg", {"norm": "batch", "stages": (1, 1),
                                                                  "channels": (8, 16), "hidden": 16})])
def test_adamerging_on_batchnorm_models(arch, cfg):
    x = torch.randn(64, 1, 8, 8)
    base = models.build(arch, (1, 8, 8), 3, seed=0, **cfg)
    reset_bn_stats(base, x)
    members = []
    for i in range(2):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        members.append(m)
    state, info = adamerging_info(base, members, x, steps=8, lr=0.05, batch_size=16,
                                  progress=False)
    lam = list(info["lambdas"].values())
    assert any(abs(v - 0.3) > 1e-3 for v in lam) and all(0 <= v <= 1 for v in lam)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    # running statistics were recomputed for the merged weights, not interpolated
    merged = with_state(base, state)
    want = copy.deepcopy(merged)
    reset_bn_stats(want, x)
    for k, v in want.state_dict().items():
        if k.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(state[k], v)
    # the members' own buffers are untouched (BN runs in train mode during the search)
    key = next(k for k in state if k.endswith("running_mean"))
    assert torch.equal(members[0].state_dict()[key], base.state_dict()[key])


# --------------------------------------------------------------------------- Conv1D in RegMean


def test_regmean_merges_a_conv1d_as_its_linear_transpose():
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

    def pair(kind, seed):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        if kind == "conv":  # the second layer as a Conv1D: its inputs differ between models
            conv = Conv1D(3, 4)
            conv.weight.data.copy_(net[2].weight.data.T)
            conv.bias.data.copy_(net[2].bias.data)
            net[2] = conv
        return net

    x = torch.randn(40, 5)
    lin = regmean([pair("linear", 0), pair("linear", 1)], x, alpha=0.5)
    conv = regmean([pair("conv", 0), pair("conv", 1)], x, alpha=0.5)
    torch.testing.assert_close(conv["2.weight"], lin["2.weight"].T)
    torch.testing.assert_close(conv["0.weight"], lin["0.weight"])
    avg = 0.5 * (pair("conv", 0)[2].weight + pair("conv", 1)[2].weight)
    assert not torch.allclose(conv["2.weight"], avg, atol=1e-3)  # it really was regressed


# --------------------------------------------------------------------------- tiny HF models


def _hf():
    return pytest.importorskip("transformers")


def _quiet(tf):
    tf.utils.logging.set_verbosity_error()


def gpt2(seed: int):
    tf = _hf()
    _quiet(tf)
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(vocab_size=24, n_positions=8, n_embd=16, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(cfg).eval()


def bert(seed: int):
    tf = _hf()
    _quiet(tf)
    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=24, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=8, num_labels=3)
    return tf.BertForSequenceClassification(cfg).eval()


def vit(seed: int):
    tf = _hf()
    _quiet(tf)
    torch.manual_seed(seed)
    cfg = tf.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                       num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       num_labels=3)
    return tf.ViTForImageClassification(cfg).eval()


def _lm_batch(n=8):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 24, (n, 6), generator=g)
    mask = torch.ones(n, 6, dtype=torch.long)
    mask[::3, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _cls_batch(n=8):
    return {**_lm_batch(n), "labels": torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(4))}


def _img_batch(n=8):
    g = torch.Generator().manual_seed(5)
    return {"pixel_values": torch.randn(n, 1, 8, 8, generator=g),
            "labels": torch.randint(0, 3, (n,), generator=g)}


FAMILIES = {"gpt2": (gpt2, _lm_batch), "bert": (bert, _cls_batch), "vit": (vit, _img_batch)}


def test_gpt2_evaluate_equals_the_models_own_loss():
    net, batch = gpt2(0), _lm_batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        own = net(**batch, labels=labels).loss
    got = evaluate(net, batch)
    assert got["loss"] == pytest.approx(float(own), rel=1e-5)
    assert 0 <= got["accuracy"] <= 1


def test_bert_and_vit_evaluate_equal_the_models_own_loss():
    for make, batch in [(bert, _cls_batch()), (vit, _img_batch())]:
        net = make(0)
        with torch.no_grad():
            own = net(**batch).loss
        assert evaluate(net, batch)["loss"] == pytest.approx(float(own), rel=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_interpolating_a_transformer_with_itself_is_flat(family):
    make, batch = FAMILIES[family]
    a, b = make(0), make(1)
    data = batch()
    curve = interpolate(a, copy.deepcopy(a), {"train": data}, num_points=3, progress=False)
    assert barriers(curve)["train"]["loss_barrier"] == pytest.approx(0.0, abs=1e-6)
    curve = interpolate(a, b, {"train": data}, num_points=3, progress=False)
    ends = curve.metrics["train"]["loss"]
    assert ends[0] == pytest.approx(evaluate(a, data)["loss"], rel=1e-6)
    assert ends[-1] == pytest.approx(evaluate(b, data)["loss"], rel=1e-6)


def _assert_state_close(state, model, atol=1e-5):
    for k, v in model.state_dict().items():
        torch.testing.assert_close(state[k].float(), v.float(), atol=atol, rtol=1e-4, msg=k)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_data_using_merges_of_identical_transformers_return_the_model(family):
    make, batch = FAMILIES[family]
    a = make(0)
    data = batch()
    twins = [a, copy.deepcopy(a)]
    _assert_state_close(fisher(twins, data, num_examples=4), a)
    _assert_state_close(regmean(twins, data), a)
    merged, _ = soft(twins, data, steps=2, progress=False)
    _assert_state_close(merged.state_dict(), a)
    _assert_state_close(adamerging(a, twins, data, steps=2, progress=False), a)


def test_gpt2_tied_weights_are_merged_once_and_stay_tied():
    a, b = gpt2(0), gpt2(1)
    data = _lm_batch()
    sa, sb = a.state_dict(), b.state_dict()
    wte, head = "transformer.wte.weight", "lm_head.weight"
    # Fisher with given Fisher estimates: the hand-merged value
    fa = {k: torch.rand(v.shape, generator=torch.Generator().manual_seed(7)) + 0.1
          for k, v in a.named_parameters()}
    fb = {k: torch.rand(v.shape, generator=torch.Generator().manual_seed(8)) + 0.1
          for k, v in a.named_parameters()}
    out = fisher([a, b], None, fishers=[fa, fb])
    want = (fa[wte] * sa[wte] + fb[wte] * sb[wte]) / (fa[wte] + fb[wte])
    torch.testing.assert_close(out[wte], want)
    assert out[head] is out[wte]
    # soft merging with no training steps: equal open gates, the plain average
    merged, _ = soft([a, b], data, steps=0, progress=False)
    assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(merged.lm_head.weight.detach(), 0.5 * (sa[wte] + sb[wte]))
    # AdaMerging with no steps: base + 0.3 * sum of task vectors, on the one tied tensor
    c = gpt2(2)
    out = adamerging(a, [b, c], data, steps=0, progress=False)
    want = sa[wte] + 0.3 * ((sb[wte] - sa[wte]) + (c.state_dict()[wte] - sa[wte]))
    torch.testing.assert_close(out[head], want)
    assert out[head] is out[wte]
    # RegMean merges the tied tensor by its Linear role (lm_head) and re-ties it
    out = regmean([a, b], data)
    assert out[head] is out[wte]
    assert not torch.allclose(out[wte], 0.5 * (sa[wte] + sb[wte]))
    # Fisher computed from data keys the tied tensor once
    fis = diagonal_fisher(a, sa, data, num_examples=2)
    assert wte in fis and head not in fis and float(fis[wte].sum()) > 0


def test_gpt2_weight_scope_counts_every_conv1d_layer():
    net = gpt2(0)
    d, v, pos = 16, 24, 8
    sc = weight_scope(net)
    want = {"transformer.wte.weight": v * d, "transformer.wpe.weight": pos * d}
    for i in range(2):
        p = f"transformer.h.{i}."
        want.update({p + "attn.c_attn.weight": d * 3 * d, p + "attn.c_proj.weight": d * d,
                     p + "mlp.c_fc.weight": d * 4 * d, p + "mlp.c_proj.weight": 4 * d * d})
    assert {k: s.count for k, s in sc.items()} == want
    assert weight_scope(net.state_dict()) == sc
    w = net.transformer.h[1].mlp.c_fc.weight.detach().double()
    assert sc["transformer.h.1.mlp.c_fc.weight"].std == pytest.approx(float(w.std(correction=0)))
    assert "transformer.wpe.weight" not in weight_scope(net, include_embeddings=False)
    assert "transformer.wte.weight" in weight_scope(net, include_embeddings=False)  # the lm_head


def test_wsa_on_gpt2_with_its_tied_lm_head():
    net, other = gpt2(0), gpt2(1)
    reg = WSARegularizer.from_reference(other.state_dict(), 1.0).check(net)
    with torch.no_grad():
        other.lm_head.weight.mul_(3.0)  # the target's (tied) output layer is three times wider
    reg = WSARegularizer.from_reference(other, 1.0).check(net)
    net.zero_grad()
    reg(net).backward()
    assert net.transformer.wte.weight.grad is not None
    assert float(net.transformer.wte.weight.grad.abs().sum()) > 0
    hist = fit(net, _lm_batch(), epochs=3, batch_size=4, lr=0.05, progress=False, penalties=[reg])
    assert hist.epochs[-1]["penalty"] < hist.epochs[0]["penalty"]


def test_fit_trains_a_causal_lm_on_dict_batches():
    net = gpt2(0)
    data = _lm_batch(8)
    before = evaluate(net, data)["loss"]
    fit(net, data, epochs=10, batch_size=4, lr=0.1, optimizer="adam", progress=False)
    assert evaluate(net, data)["loss"] < before - 0.5
    assert math.isfinite(before)


def test_gpt2_fisher_against_autograd_per_position():
    """Diagonal Fisher of a causal LM with an attention mask (the per-example loop, since HF's
    mask code refuses vmap) against a plain autograd loop over positions and tokens."""
    net = gpt2(0)
    data = {k: v[:2, :5].clone() for k, v in _lm_batch().items()}
    data["attention_mask"][1, 3:] = 0
    got = diagonal_fisher(net, net.state_dict(), data)
    key = "transformer.h.1.mlp.c_fc.bias"
    param = dict(net.named_parameters())[key]
    want = torch.zeros_like(param, dtype=torch.float64)
    ids, mask = data["input_ids"], data["attention_mask"]
    for i in range(2):
        logits = net(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits[0]
        for t in range(ids.shape[1] - 1):
            if not (mask[i, t] and mask[i, t + 1]):
                continue
            logp = torch.log_softmax(logits[t], -1)
            for y in range(logp.shape[0]):
                (g,) = torch.autograd.grad(logp[y], param, retain_graph=True)
                want += float(logp[y].exp()) * g.double() ** 2
    torch.testing.assert_close(got[key], want / 2, rtol=1e-4, atol=1e-10)


def test_fisher_loop_fallback_equals_vmap(monkeypatch):
    import importlib

    fisher_mod = importlib.import_module("basinmerge.merge.fisher")

    net, data = vit(0), _img_batch(4)
    fast = diagonal_fisher(net, net.state_dict(), data)

    def refuse(*a, **k):
        def f(*args):
            raise RuntimeError("vmap: data-dependent control flow")
        return f

    monkeypatch.setattr(fisher_mod, "vmap", refuse)
    slow = diagonal_fisher(net, net.state_dict(), data)
    for k in fast:
        torch.testing.assert_close(slow[k], fast[k], rtol=1e-4, atol=1e-9)


def test_forward_hooks_are_removed_even_on_error():
    net = _Out("tensor")
    seen = []
    with pytest.raises(RuntimeError, match="boom"):
        with adapter.forward_hooks([(net.lin, lambda m, a, out: seen.append(out.shape)),
                                    (net.lin, lambda m, a: seen.append("pre"), True)]):
            net(torch.randn(2, 5))
            raise RuntimeError("boom")
    assert seen == ["pre", (2, 3)]
    assert not net.lin._forward_hooks and not net.lin._forward_pre_hooks


def test_token_id_lists_are_tensors_and_loaders_work_in_interpolate():
    ids, mask, y = _token_batch(10)
    d = as_data({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "label": y.tolist()})
    assert torch.equal(d.inputs["input_ids"], ids) and torch.equal(d.labels, y)
    a, b = _DictModel(), _DictModel()
    with torch.no_grad():
        b.head.weight.mul_(-1.0)
    loader = torch.utils.data.DataLoader(
        [{"input_ids": ids[i], "attention_mask": mask[i], "labels": y[i]} for i in range(10)],
        batch_size=4)
    curve = interpolate(a, b, {"test": loader}, num_points=3, progress=False)
    mid = with_state(a, {k: 0.5 * (v + b.state_dict()[k]) for k, v in a.state_dict().items()})
    assert curve.metrics["test"]["loss"][1] == pytest.approx(
        evaluate(mid, {"input_ids": ids, "attention_mask": mask, "labels": y})["loss"], rel=1e-6)


def test_gpt2_live_input_masks_fit_the_conv1d_layout():
    net = gpt2(0)
    with torch.no_grad():  # kill half of block 0's MLP units: c_fc pre-activation -> very negative
        net.transformer.h[0].mlp.c_fc.bias[:32] = -1e4
    masks = live_input_masks(net, _lm_batch())
    m = masks["transformer.h.0.mlp.c_proj.weight"]  # Conv1D weight (in=64, out=16)
    assert m.shape == (64, 1)
    # GELU(-1e4) is exactly 0: the dead units' rows are masked, the others kept
    assert not m[:32].any() and m[32:].all()
    assert "transformer.wte.weight" in masks  # the tied lm_head reads the final hidden states
    sc = weight_scope(net, input_masks=masks)
    assert sc["transformer.h.0.mlp.c_proj.weight"].count == 32 * 16


def test_bert_masked_lm_two_tied_groups_per_token_task():
    tf = _hf()
    _quiet(tf)

    def mlm(seed):
        torch.manual_seed(seed)
        cfg = tf.BertConfig(vocab_size=24, hidden_size=16, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=32, max_position_embeddings=8)
        return tf.BertForMaskedLM(cfg).eval()

    a, b = mlm(0), mlm(1)
    assert tied_groups(a) == [["bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"],
                              ["cls.predictions.bias", "cls.predictions.decoder.bias"]]
    ids = torch.randint(1, 24, (6, 6), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    masked = ids.clone()
    masked[:, 2] = 0
    data = {"input_ids": masked, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        own = float(a(**data).loss)
    assert evaluate(a, data, task="classification")["loss"] == pytest.approx(own, rel=1e-5)
    merged, _ = soft([a, b], data, steps=0, progress=False, task="classification")
    dec = merged.cls.predictions.decoder
    assert dec.weight.data_ptr() == merged.bert.embeddings.word_embeddings.weight.data_ptr()
    assert dec.bias.data_ptr() == merged.cls.predictions.bias.data_ptr()
    torch.testing.assert_close(dec.bias.detach(), 0.5 * (a.cls.predictions.bias + b.cls.predictions.bias).detach())


def test_a_retied_merge_saves_and_loads(tmp_path):
    from basinmerge import io

    a, b = _Tied(), _Tied()
    out = fisher([a, b], None, fishers=[{k: torch.ones_like(v) for k, v in a.named_parameters()}] * 2)
    assert out["out.weight"] is out["emb.weight"]
    io.save_state(out, tmp_path / "m.safetensors")
    state, _ = io.load_state(tmp_path / "m.safetensors")
    assert len(state) == len(out) - 1            # the tied tensor is stored once
    net = io.load_into(_Tied(), state)           # and its partner is filled in: still tied
    assert net.out.weight.data_ptr() == net.emb.weight.data_ptr()
    torch.testing.assert_close(net.emb.weight.detach(), 0.5 * (a.emb.weight + b.emb.weight).detach())


def _normal_equations(template, states, data, layer, w_attr, transposed):
    """Σ_k G_k (W* − W_k)ᵀ for RegMean's α = 1 solution W* (zero at the least-squares fit)."""
    from basinmerge.merge.regmean import linear_grams

    merged = regmean([with_state(template, s) for s in states], data, alpha=1.0)
    key = f"{layer}.{w_attr}"
    orient = (lambda w: w.T) if transposed else (lambda w: w)
    total = 0
    for s in states:
        g = linear_grams(template, s, data)[layer]
        total = total + g @ (orient(merged[key]) - orient(s[key])).T.double()
    scale = max(float(orient(s[key]).abs().max()) for s in states)
    return total.abs().max() / scale, merged, key


def test_regmean_solves_its_normal_equations_for_mha_and_conv1d():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    net = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    states = []
    for i in range(2):
        torch.manual_seed(10 + i)
        states.append({k: v + 0.3 * torch.randn_like(v) for k, v in net.state_dict().items()})
    x = torch.randn(64, 5, 8)
    err, merged, key = _normal_equations(net, states, x, "layers.1.self_attn", "in_proj_weight", False)
    assert err < 1e-4
    avg = 0.5 * (states[0][key] + states[1][key])
    assert not torch.allclose(merged[key], avg, atol=1e-3)
    a, b = gpt2(0), gpt2(1)
    data = _lm_batch(16)
    err, merged, key = _normal_equations(a, [a.state_dict(), b.state_dict()], data,
                                         "transformer.h.1.mlp.c_proj", "weight", True)
    assert err < 1e-4


def test_unknown_task_is_one_clear_error_before_training():
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    with pytest.raises(ConfigError, match="unknown task 'lm'"):
        fit(_Out("tensor"), (x, y), task="lm", progress=False)
