"""The transformers study (`basinmerge experiment transformers`): its MLM pieces and a smoke run."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

from basinmerge.errors import ConfigError  # noqa: E402
from basinmerge.experiments import transformers as study  # noqa: E402


def test_mask_windows_follows_bert_masking():
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 256, (400, 64), generator=g)
    inputs, labels = study.mask_windows(windows, 0.15, g)
    chosen = labels != -100
    assert torch.equal(labels[chosen], windows[chosen])  # labels: the chosen bytes
    assert torch.equal(inputs[~chosen], windows[~chosen])  # the rest is untouched
    assert chosen.any(1).all()  # at least one byte per window
    assert 0.14 < chosen.float().mean() < 0.17
    masked = (inputs == study.MASK_ID) & chosen
    assert 0.75 < masked.sum() / chosen.sum() < 0.85
    assert 0.15 < (inputs[chosen] != study.MASK_ID).float().mean() < 0.25  # random or kept
    assert (inputs <= study.MASK_ID).all()  # no padding token in a full window


def test_mlm_loss_counts_only_the_chosen_bytes():
    cfg = study.SCALE_CONFIGS["smoke"]
    model = study.build_mlm(cfg, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    x, y = study.mask_windows(torch.randint(0, 256, (4, 16), generator=g), 0.15, g)
    loss, correct, n = study._loss(model, x, y, "mlm")
    assert n == int((y != -100).sum())
    logits = model(input_ids=x).logits
    keep = y != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], y[keep], reduction="sum")
    torch.testing.assert_close(loss, expected)
    assert int(correct) == int((logits[keep].argmax(-1) == y[keep]).sum())


def test_bad_arguments_fail_before_training():
    with pytest.raises(ConfigError, match="unknown method 'greedy'"):
        study.run(scale="smoke", methods=("naive", "greedy"), progress=False)
    with pytest.raises(ConfigError, match="pairs of models"):
        study.run(scale="smoke", seeds=0, progress=False)
    with pytest.raises(ConfigError, match="unknown scale"):
        study.run(scale="huge", progress=False)


@pytest.mark.slow
def test_study_smoke_end_to_end(tmp_path):
    from basinmerge.cli import main

    out = tmp_path / "tf"
    with pytest.raises(SystemExit) as e:
        main(["-q", "experiment", "transformers", "--scale", "smoke", "--out", str(out)])
    assert e.value.code in (0, None)
    result = json.loads((out / "result.json").read_text())
    rows = {(r[0], r[1]): r for r in result["tables"]["barriers"]["rows"]}
    expected = {(f, m) for f in study.FAMILIES for m in study.METHODS
                if m not in study.SKIPPED.get(f, ())}
    assert set(rows) == expected  # every family and method, BERT without orthogonal
    assert ("bert-mlm", "orthogonal") not in rows
    for family in study.FAMILIES:
        # Every alignment (and REPAIR, which leaves the ends alone) keeps the endpoints'
        # functions: their accuracy is the same for every method.
        ends = {rows[(family, m)][3] for m in study.METHODS if (family, m) in rows}
        assert max(ends) - min(ends) < 1e-9
        assert (out / f"paths_{family}.png").stat().st_size > 1000
    records = result["data"]["records"]
    assert len(records) == len(expected)
    for r in records:  # barriers are finite and the maximum is at least the ends' mean
        assert math.isfinite(r["test_loss_barrier"]) and r["test_loss_barrier"] >= -1e-9
    assert len(result["tables"]["mergemany"]["rows"]) == 3 + 3
    assert any("post-LN" in n for n in result["notes"])
