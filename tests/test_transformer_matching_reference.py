"""Weight matching on transformer specs against a plain float64 reference of the loop.

The reference below is the matching loop written the obvious way: for each step, every member
tensor of B is gathered with all other permutations applied and the cost matrix is summed from
float64 products; a plain permutation takes one LAP, an attention module's head-structured
permutations one two-level assignment; a new assignment is kept when it raises the objective by
more than the tolerance. The optimized code (cached per-group partial products, float32 with
rounding bounds, low-rank updates, skipped LAPs, chunked float64 objective) must find the same
permutations, sweeps and objective on small random GPT-2 / ViT / BERT-shaped models, and both
must recover a planted permutation.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from basinmerge.align import apply_permutation, objective, random_permutation, weight_matching
from basinmerge.align.matching import ACCEPT_TOL, unit_matrix
from basinmerge.align.permute import fill_derived, identity_permutation, permute_tensor
from basinmerge.align.transformer import transformer_spec
from basinmerge.align.transformer_matching import head_groups, split_view, two_level_assignment

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

CONFIGS = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_embd=24, n_layer=3, n_head=4, n_positions=16, bos_token_id=0,
        eos_token_id=0)),
    "vit": lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=24, num_hidden_layers=3, num_attention_heads=3, intermediate_size=40,
        image_size=14, patch_size=7, num_channels=1, num_labels=5)),
    "bert": lambda: transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=50, hidden_size=24, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=40, max_position_embeddings=16)),
}


def _params(name: str, seed: int) -> tuple[dict[str, torch.Tensor], object]:
    """Parameters of a random model (weights of scale 1/sqrt(fan-in), random LayerNorms, so
    that no permutation is favoured by HF's small init) and its spec."""
    torch.manual_seed(seed)
    model = CONFIGS[name]().eval()
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for prm in model.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) / max(prm.shape[-1], 1) ** 0.5)
    return {k: v.detach() for k, v in model.named_parameters()}, model


def _spec(model):
    return transformer_spec(model, check=False)


def reference_matching(spec, pa, pb, max_iter: int = 100, seed: int = 0):
    """The plain loop: float64, every cost matrix rebuilt from the permuted tensors."""
    view = split_view(spec)
    keys = [k for k, v in pa.items() if v.is_floating_point()]
    a = {k: v.double() for k, v in view.split({k: pa[k] for k in keys}).items()}
    b = {k: v.double() for k, v in view.split({k: pb[k] for k in keys}).items()}
    plain = view.spec
    perm = identity_permutation(plain)
    active = [p for p, axes in plain.perm_to_axes.items() if any(k in a for k, _ in axes)]

    def cost(p):
        n = plain.sizes[p]
        c = torch.zeros(n, n, dtype=torch.float64)
        for key, axis in plain.perm_to_axes[p]:
            if key not in a:  # a tied duplicate (GPT-2's lm_head): not a parameter of its own
                continue
            # B with every permutation but p applied, then p's current one on its own axis.
            others = permute_tensor(plain, perm, key, b[key], except_axis=axis)
            mine = unit_matrix(others, plain, key, axis).index_select(0, perm[p])
            c += unit_matrix(a[key], plain, key, axis) @ mine.T
        return c

    def plain_step(p):
        c = cost(p).numpy()
        _, cols = linear_sum_assignment(c, maximize=True)
        gain = c[np.arange(len(cols)), cols].sum() - np.trace(c)
        if gain <= ACCEPT_TOL:
            return False
        perm[p] = perm[p][torch.as_tensor(cols)]
        return True

    def head_step(members):
        d = plain.heads[members[0]][1]
        sigmas, gain, scale = two_level_assignment([cost(p) for p in members], d)
        if gain <= max(ACCEPT_TOL, 1e-6 * scale):
            return False
        for p, s in zip(members, sigmas, strict=True):
            perm[p] = perm[p][s]
        return True

    steps = [lambda p=p: plain_step(p) for p in active if p not in plain.heads]
    steps += [lambda ms=ms: head_step(ms) for ms in head_groups(plain, active).values()]
    rng = np.random.default_rng(seed)
    sweeps = 0
    for _ in range(max_iter):
        sweeps += 1
        progress = False
        for i in rng.permutation(len(steps)):
            progress |= steps[i]()
        if not progress:
            break
    out = fill_derived(spec, {p: perm[p] for p in spec.free_perms})
    return out, sweeps


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("overlap", [False, True], ids=["one-thread", "overlap"])
def test_optimized_matching_equals_the_plain_float64_loop(name, seed, overlap):
    pa, model = _params(name, 0)
    pb, _ = _params(name, 1)
    spec = _spec(model)
    ref, ref_sweeps = reference_matching(spec, pa, pb, seed=seed)
    fast, trace = weight_matching(spec, pa, pb, seed=seed, overlap=overlap)
    assert trace.accepted > 0 and trace.sweeps > 1
    assert (trace.queued > 0) == overlap  # cost matrices queued ahead for a second thread
    for p in spec.perms:
        assert torch.equal(fast[p], ref[p]), p
    assert trace.sweeps == ref_sweeps
    exact = objective({k: v.double() for k, v in pa.items()},
                      apply_permutation(spec, ref, {k: v.double() for k, v in pb.items()}))
    # The trace adds the gains as measured (float32 products, each within its rounding bound).
    assert trace.objective[-1] == pytest.approx(exact, rel=1e-6)
    assert exact > objective(pa, pb)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_planted_permutation_is_recovered_by_both(name):
    pa, model = _params(name, 0)
    spec = _spec(model)
    planted = random_permutation(spec, seed=11)
    pb = apply_permutation(spec, planted, pa)
    for found in (reference_matching(spec, pa, pb)[0], weight_matching(spec, pa, pb)[0]):
        back = apply_permutation(spec, found, pb)
        for k in pa:
            assert torch.equal(back[k], pa[k]), k
