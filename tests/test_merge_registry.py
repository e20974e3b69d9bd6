"""The merge-method registry and the methods added through it (SLERP, Model Stock, DELLA,
Model Breadcrumbs), each against its closed form or a hand computation on small tensors."""

from __future__ import annotations

import math
from typing import Annotated

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from basinmerge import io
from basinmerge.errors import ConfigError
from basinmerge.merge import (
    METHODS,
    breadcrumbs,
    della,
    merge,
    model_stock,
    slerp,
    stream_merge,
    streamable,
    ties,
)
from basinmerge.merge._common import StateSource, elementwise, prepare, run_kernel, stack_work
from basinmerge.merge.breadcrumbs import breadcrumbs_mask
from basinmerge.merge.della import della_delta_fn, della_drop_probabilities
from basinmerge.merge.model_stock import mean_pairwise_cosine, stock_ratio
from basinmerge.merge.registry import _REGISTRY, get_method, merge_method
from basinmerge.merge.slerp import slerp_tensors
from basinmerge.merge.task import ties_merge_deltas

pytestmark = pytest.mark.usefixtures("one_thread")


def _v(*values: float, dtype=torch.float64) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=dtype)}


# --------------------------------------------------------------------------- the registry


def test_options_come_from_the_signature_and_docstring():
    ties_m = get_method("ties")
    assert list(ties_m.options) == ["density", "scale", "trim_mode"]
    d = ties_m.options["density"]
    assert d.default == 0.2 and d.annotation is float and not d.required
    assert "fraction of each task vector kept" in d.help
    assert ties_m.needs_base and ties_m.streams and ties_m.needs_data is None
    assert get_method("weighted").options["weights"].required
    assert ties_m.options() == ["density", "scale", "trim_mode"]  # the older Method.options()
    assert get_method("soft").needs_data == "labeled" and get_method("soft").min_models == 2
    assert get_method("fisher").needs_data == "unlabeled"
    assert not get_method("fisher").options["model"].cli  # an nn.Module: library only
    assert set(streamable()) == {m.name for m in METHODS.values() if m.kernel is not None}


@pytest.mark.parametrize(("call", "message"), [
    (lambda: merge([_v(1), _v(2)], "average", density=0.2),
     "merge method 'average' has no option 'density'"),
    (lambda: merge([_v(1), _v(2)], "ties"), "merge method 'ties' needs a base model (option 'base')"),
    (lambda: merge([_v(1), _v(2)], "median", base=_v(0)),
     "merge method 'median' does not use a base model (option 'base')"),
    (lambda: merge([_v(1), _v(2)], "regmean"),
     "merge method 'regmean' needs data (inputs) (option 'data')"),
    (lambda: merge([_v(1), _v(2)], "greedy_soup"),
     "merge method 'greedy_soup' needs labeled data (option 'data')"),
    (lambda: merge([_v(1), _v(2)], "weighted"), "merge method 'weighted' needs option 'weights'"),
    (lambda: merge([_v(1), _v(2)], "ties", base=_v(0), density="most"),
     "merge method 'ties': option 'density' expects float, got 'most'"),
    (lambda: merge([_v(1)], "slerp"), "merge method 'slerp' needs at least 2 models, got 1"),
    (lambda: stream_merge([], "della", "x.safetensors", base="b.safetensors"),
     "merge method 'della' needs at least 1 model"),
])
def test_bad_requests_give_one_error_naming_method_and_option(call, message):
    with pytest.raises(ConfigError) as e:
        call()
    assert message in str(e.value)


def test_text_values_are_converted_to_the_option_types():
    m = get_method("dare")
    assert m.check({"drop": "0.5", "seed": "3", "then": "ties"}, has_base=True) == \
        {"drop": 0.5, "seed": 3, "then": "ties"}
    assert get_method("average").check({"weights": "1,2,3"}) == {"weights": [1.0, 2.0, 3.0]}
    assert get_method("soft").check({"reference": 1, "clip": None}, has_data=True) == \
        {"reference": 1, "clip": None}
    with pytest.raises(ConfigError, match="option 'seed' expects int"):
        m.check({"seed": 1.5}, has_base=True)
    with pytest.raises(ConfigError, match="option 'scale' expects float"):
        m.check({"scale": True}, has_base=True)


def test_a_method_added_in_one_place_merges_streams_and_validates(tmp_path):
    """The extension point: one decorated function (with a kernel) is a full method."""

    def maxabs_kernel(source, sign: float = 1.0):
        def kernel(key, tensors, base):
            s = stack_work(tensors)
            return sign * s.abs().max(dim=0).values
        return elementwise(kernel)

    @merge_method("maxabs_test", summary="largest magnitude (a test method)", kernel=maxabs_kernel)
    def maxabs(models, sign: float = 1.0, *, names=None):
        """Options:
            sign: factor on the result
        """
        states, _, names = prepare(models, "maxabs_test", names=names)
        src = StateSource(states, names=names)
        return run_kernel(src, maxabs_kernel(src, sign))

    try:
        a, b = _v(1.0, -4.0), _v(-3.0, 2.0)
        assert torch.equal(merge([a, b], "maxabs_test", sign=-1.0)["w"],
                           torch.tensor([-3.0, -4.0], dtype=torch.float64))
        assert "maxabs_test" in streamable()
        paths = [io.save_state(s, tmp_path / f"{i}.safetensors") for i, s in enumerate((a, b))]
        out = stream_merge(paths, "maxabs_test", tmp_path / "o.safetensors", sign=2.0)
        assert torch.equal(io.load_state(out)[0]["w"], torch.tensor([6.0, 8.0], dtype=torch.float64))
        with pytest.raises(ConfigError, match="'maxabs_test' has no option 'sgn'"):
            merge([a, b], "maxabs_test", sgn=1.0)
        assert get_method("maxabs_test").options["sign"].help == "factor on the result"

        @merge_method("annotated_test", summary="help from an annotation")
        def annotated(models, gain: Annotated[float, "a factor"] = 2.0, *, names=None):
            return {}

        opt = get_method("annotated_test").options["gain"]
        assert (opt.annotation, opt.help, opt.default) == (float, "a factor", 2.0)
    finally:
        _REGISTRY.pop("maxabs_test", None)
        _REGISTRY.pop("annotated_test", None)


# --------------------------------------------------------------------------- SLERP


@settings(max_examples=40, deadline=None)
@given(t=st.floats(0.0, 1.0), ra=st.floats(0.1, 10.0), rb=st.floats(0.1, 10.0),
       angle=st.floats(0.05, 3.0))
def test_slerp_matches_the_closed_form(t, ra, rb, angle):
    """For a at angle 0 and b at `angle` in a plane: the result is the closed form
    sin((1-t)w)/sin(w) a + sin(tw)/sin(w) b, and for equal norms it stays on the circle at
    angle t*w."""
    a = torch.tensor([ra, 0.0, 0.0], dtype=torch.float64)
    b = torch.tensor([rb * math.cos(angle), rb * math.sin(angle), 0.0], dtype=torch.float64)
    out = slerp_tensors(a, b, t)
    ref = (math.sin((1 - t) * angle) * a + math.sin(t * angle) * b) / math.sin(angle)
    assert torch.allclose(out, ref, atol=1e-10, rtol=1e-10)
    if ra == rb:
        assert torch.allclose(out, ra * torch.tensor([math.cos(t * angle), math.sin(t * angle), 0.0],
                                                     dtype=torch.float64), atol=1e-10)


def test_slerp_near_parallel_and_zero_vectors_fall_back_to_lerp():
    a = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    b = a * 2 + 1e-4  # cosine > 0.9995
    assert torch.equal(slerp_tensors(a, b, 0.25), 0.75 * a + 0.25 * b)
    z = torch.zeros(3, dtype=torch.float64)
    assert torch.equal(slerp_tensors(z, b, 0.5), 0.5 * z + 0.5 * b)
    assert torch.isfinite(slerp_tensors(a, -a, 0.5)).all()  # antiparallel: lerp, no 0/0


def test_slerp_two_models_t_and_the_chain():
    a, b, c = _v(1.0, 0.0), _v(0.0, 2.0), _v(-1.0, 1.0)
    assert torch.allclose(slerp([a, b], t=0.3)["w"], slerp_tensors(a["w"], b["w"], 0.3))
    assert torch.allclose(slerp([a, b])["w"], slerp_tensors(a["w"], b["w"], 0.5))
    chain = slerp_tensors(slerp_tensors(a["w"], b["w"], 0.5), c["w"], 1 / 3)
    assert torch.allclose(slerp([a, b, c])["w"], chain)
    same = [_v(1.0, 2.0), _v(2.0, 4.0), _v(3.0, 6.0)]  # parallel: the chain is the average
    assert torch.allclose(slerp(same)["w"], torch.tensor([2.0, 4.0], dtype=torch.float64))
    with pytest.raises(ConfigError, match="'t' applies to two models"):
        slerp([a, b, c], t=0.5)


# --------------------------------------------------------------------------- Model Stock


def test_model_stock_ratio_follows_the_paper():
    base = _v(1.0, 1.0)
    m1, m2 = _v(2.0, 1.0), _v(2.0, 2.0)  # tau = (1, 0), (1, 1): cos = 1/sqrt(2)
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    assert stock_ratio(c, 2) == pytest.approx(t)
    out = model_stock(base, [m1, m2])["w"]
    avg = torch.tensor([2.0, 1.5], dtype=torch.float64)
    assert torch.allclose(out, t * avg + (1 - t) * base["w"])
    # three models: the mean pairwise cosine
    m3 = _v(1.0, 2.0)  # tau = (0, 1)
    taus = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    cos3 = (c + 0.0 + c) / 3
    assert mean_pairwise_cosine(taus) == pytest.approx(cos3)
    t3 = 3 * cos3 / (1 + 2 * cos3)
    ref = t3 * torch.stack([m1["w"], m2["w"], m3["w"]]).mean(0) + (1 - t3) * base["w"]
    assert torch.allclose(model_stock(base, [m1, m2, m3])["w"], ref)


def test_model_stock_limits():
    base = _v(0.0, 0.0)
    assert torch.allclose(model_stock(base, [_v(1.0, 0.0), _v(0.0, 1.0)])["w"], base["w"])  # orthogonal
    assert torch.allclose(model_stock(base, [_v(1.0, 0.0), _v(-1.0, 0.1)])["w"], base["w"])  # apart
    assert torch.allclose(model_stock(base, [_v(1.0, 2.0), _v(2.0, 4.0)])["w"],
                          torch.tensor([1.5, 3.0], dtype=torch.float64))  # parallel: the average
    with pytest.raises(ConfigError, match="'model_stock' needs at least 2 models"):
        model_stock(base, [_v(1.0, 0.0)])


# --------------------------------------------------------------------------- DELLA


def test_della_drop_probabilities_are_ranked_by_magnitude():
    tau = torch.tensor([[0.1, -0.5, 0.3], [2.0, -1.0, 0.0]], dtype=torch.float64)
    p = della_drop_probabilities(tau, drop=0.5, epsilon=0.2)
    # row 1: |0.1| < |0.3| < |-0.5| -> ranks 0, 2, 1; row 2: |0| < |-1| < |2| -> 2, 1, 0
    assert torch.allclose(p, torch.tensor([[0.6, 0.4, 0.5], [0.4, 0.5, 0.6]], dtype=torch.float64))
    assert torch.allclose(p.mean(dim=1), torch.tensor([0.5, 0.5], dtype=torch.float64))
    one = della_drop_probabilities(torch.tensor([3.0]), 0.3, 0.2)
    assert one.tolist() == pytest.approx([0.3])


def test_della_pruning_is_unbiased_with_the_ranked_drop_rates():
    """Monte Carlo over seeds: each entry is kept with probability 1 - p_i and the rescaled
    task vector equals tau in expectation."""
    tau = torch.tensor([0.05, -0.2, 0.4, -1.0, 2.0], dtype=torch.float64)
    p = della_drop_probabilities(tau, 0.6, 0.4)
    n = 4000
    outs = torch.stack([della_delta_fn(0.6, 0.4, seed)("k", 0, tau) for seed in range(n)])
    kept = (outs != 0).double().mean(0)
    se = (p * (1 - p) / n).sqrt()
    assert ((kept - (1 - p)).abs() < 4 * se).all()
    mean = outs.mean(0)
    sd = (tau.abs() * (p / (1 - p)).sqrt()) / math.sqrt(n)
    assert ((mean - tau).abs() < 4 * sd).all()


def test_della_merge_is_elect_and_disjoint_mean_of_the_pruned_vectors():
    base = _v(0.0, 0.0, 0.0, 0.0)
    models = [_v(1.0, -2.0, 0.5, 3.0), _v(-1.0, -1.0, 1.5, 1.0), _v(2.0, 1.0, -0.5, 0.2)]
    out = della(base, models, drop=0.4, epsilon=0.2, scale=0.7, seed=5)["w"]
    fn = della_delta_fn(0.4, 0.2, 5)
    pruned = torch.stack([fn("w", k, m["w"] - base["w"]) for k, m in enumerate(models)])
    ref = base["w"] + 0.7 * ties_merge_deltas(pruned.clone(), torch.ones_like(pruned, dtype=torch.bool))
    assert torch.allclose(out, ref)
    # nothing dropped: TIES without trimming
    assert torch.allclose(della(base, models, drop=0.0, epsilon=0.0)["w"],
                          ties(base, models, density=1.0)["w"])
    with pytest.raises(ConfigError, match="'della': options 'drop' and 'epsilon'"):
        della(base, models, drop=0.05, epsilon=0.2)


# --------------------------------------------------------------------------- Breadcrumbs


def test_breadcrumbs_trims_both_ends_per_layer():
    tau = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.05, 1.0, 0.7, -0.2, 0.4, 3.0], dtype=torch.float64)
    keep = breadcrumbs_mask(tau, beta=0.1, gamma=0.3)  # drop the top 1 and the bottom 3
    assert tau[keep].tolist() == [0.3, 2.0, 1.0, 0.7, 0.4, 3.0]
    base = {"w": torch.zeros(10, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float64)}
    m1 = {"w": tau, "b": torch.tensor([1.5, 3.0], dtype=torch.float64)}
    m2 = {"w": -tau.flip(0), "b": torch.tensor([0.0, 1.0], dtype=torch.float64)}
    out = breadcrumbs(base, [m1, m2], beta=0.1, gamma=0.3, scale=0.5)
    t2 = -tau.flip(0)
    ref = 0.5 * (torch.where(keep, tau, 0.0) + torch.where(breadcrumbs_mask(t2, 0.1, 0.3), t2, 0.0))
    assert torch.allclose(out["w"], ref)
    # per layer: "b" has 2 entries, int(0.1 * 2) = 0 top and int(0.3 * 2) = 0 bottom dropped
    assert torch.allclose(out["b"], 1 + 0.5 * torch.tensor([0.5 - 1.0, 2.0 + 0.0], dtype=torch.float64))
    with pytest.raises(ConfigError, match="'breadcrumbs': options 'beta' and 'gamma'"):
        breadcrumbs(base, [m1], beta=0.5, gamma=0.5)
