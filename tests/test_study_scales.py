"""The studies' scale configs (`experiments.common.StudyScale`) and the merging study's rows,
derived from the merge registry."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from basinmerge import merge as M
from basinmerge.errors import ConfigError
from basinmerge.experiments import (
    common,
    demo,
    federated,
    merging,
    mode_connectivity,
    rebasin,
    transformers,
    wsa_defaults,
)
from basinmerge.merge.registry import _REGISTRY, merge_method

STUDIES = {"demo": demo, "merging": merging, "mode_connectivity": mode_connectivity,
           "rebasin": rebasin, "federated": federated, "wsa_defaults": wsa_defaults,
           "transformers": transformers}


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_every_study_scale_resolves(name):
    cls = common.studies()[name]
    assert cls is STUDIES[name].ScaleConfig and cls.study == name
    scales = cls.defined()
    expected = ["quick", "smoke"] if name == "demo" else sorted(common.SCALES)
    assert sorted(scales) == expected
    for scale, cfg in scales.items():
        assert common.config_for(name, scale) == cfg == cls.at(scale)
        assert isinstance(cfg, cls) and dataclasses.is_dataclass(cfg)
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.study_field = 1  # type: ignore[attr-defined]


def test_overrides_replace_fields_and_convert_lists_and_ints():
    cfg = merging.ScaleConfig.at("quick", seeds=7, scales=[1, 0.5], test_limit=None)
    base = merging.ScaleConfig.at("quick")
    assert cfg.seeds == 7 and cfg.scales == (1.0, 0.5) and all(isinstance(s, float) for s in cfg.scales)
    assert cfg.test_limit == base.test_limit  # None keeps the scale's value
    assert dataclasses.replace(cfg, seeds=base.seeds, scales=base.scales) == base
    assert merging.ScaleConfig.at("quick") == base  # the defined config is unchanged


@pytest.mark.parametrize("overrides, field", [
    ({"widht": 3}, "widht"),            # unknown field
    ({"width": "wide"}, "width"),       # wrong type
    ({"width": 2.5}, "width"),          # a float for an int
    ({"scales": ["a"]}, "scales"),      # wrong item type
    ({"seeds": True}, "seeds"),         # a bool is not a count
])
def test_a_bad_override_is_one_error_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=f"merging study.*'{field}'|'{field}'.*merging"):
        merging.ScaleConfig.at("quick", **overrides)


def test_value_checks_name_the_setting():
    with pytest.raises(ConfigError, match="seeds must be >= 1, got 0"):
        merging.ScaleConfig.at("smoke", seeds=0)
    with pytest.raises(ConfigError, match=r"seeds \(pairs of models\) must be >= 1"):
        rebasin.ScaleConfig.at("smoke", pairs=0)
    with pytest.raises(ConfigError, match="unknown variant .nope.; choose from: none, kl"):
        wsa_defaults.ScaleConfig.at("smoke", variants=["nope"])
    with pytest.raises(ConfigError, match="models must be among mlp, vgg, got resnet"):
        federated.settings("quick", models=["resnet"])


def test_unknown_scale_and_study_are_named():
    with pytest.raises(ConfigError, match="unknown scale 'huge' for the merging study; choose one "
                                          "of smoke, quick, full"):
        common.config_for("merging", "huge")
    with pytest.raises(ConfigError, match="unknown scale 'full' for the demo study; choose one "
                                          "of quick, smoke"):
        demo.ScaleConfig.at("full")
    with pytest.raises(ConfigError, match="unknown study 'nope'"):
        common.config_for("nope", "quick")


def test_federated_settings_is_the_config_object():
    s = federated.settings("full", methods=["FedProx", "FedAvg"], rounds=3)
    assert isinstance(s, federated.ScaleConfig)
    assert s.methods == ("FedAvg", "FedProx")  # run in METHODS order
    assert s.models == ("mlp", "vgg") and s.rounds == 3
    assert s.alphas == federated.ScaleConfig.at("full").alphas


# --------------------------------------------------------------------------- merging rows


def test_merging_rows_cover_every_registered_method():
    registered = set(M.registry())
    ran = {r.method for r in merging.study_rows()}
    assert ran | set(merging.SKIPPED) == registered
    assert not ran & set(merging.SKIPPED)
    rows = merging.method_rows()
    assert rows == list(merging.BASELINES) + [r.row for r in merging.study_rows()]
    assert len(set(rows)) == len(rows)
    # each variant is a row of its own
    assert [r.row for r in merging.study_rows() if r.method == "soft"] == [
        "soft (tensor units)", "soft (module units)"]


def test_merging_tables_name_registered_methods_options_and_scale_fields():
    fields = {f.name for f in dataclasses.fields(merging.ScaleConfig)}
    for table in (merging.STUDY_OPTIONS, merging.SCALE_OPTIONS, merging.VARIANTS,
                  merging.SKIPPED):
        assert set(table) <= set(M.METHODS)
    assert merging.PER_MEMBER_DATA <= set(M.METHODS)
    for name, opts in merging.STUDY_OPTIONS.items():
        assert set(opts) <= set(M.METHODS[name].options)
    for name, opts in merging.SCALE_OPTIONS.items():
        assert set(opts) <= set(M.METHODS[name].options) and set(opts.values()) <= fields
    for name, (option, _, _) in merging.VARIANTS.items():
        assert option in M.METHODS[name].options


def test_merging_plan_follows_what_each_method_declares():
    cfg = merging.ScaleConfig.at("smoke")
    net = torch.nn.Linear(2, 2)
    plan = {row.row: (row, opts) for row, opts in merging.study_plan(net, cfg, seed=5)}
    for row, opts in plan.values():
        m = M.METHODS[row.method]
        # every option is one the method has, with a value of its type
        m.check(opts, has_base=m.needs_base, has_data=m.needs_data is not None)
        assert ("model" in opts) == ("model" in m.options)
        assert opts.get("seed", 5) == 5
        assert row.tune == ("scale" in m.options)
        assert (row.data is None) == (m.needs_data is None)
    assert plan["regmean"][0].data == "shards" and plan["fisher"][0].data == "shards"
    assert plan["greedy_soup"][0].data == "merge set"
    assert plan["adamerging (layer)"][0].data == "merge inputs"
    assert plan["adamerging (layer)"][1]["steps"] == cfg.ada_steps
    assert plan["soft (module units)"][1]["steps"] == cfg.soft_steps
    assert plan["regmean"][1]["num_examples"] == cfg.regmean_examples
    assert plan["dare"][1]["drop"] == 0.5 and plan["ties"][0].tune
    assert not plan["model_stock"][0].tune


def test_a_newly_registered_method_joins_the_merging_study():
    @merge_method("_study_probe", summary="test only", needs_base=True)
    def _probe(models, base, scale: float = 1.0, seed: int = 0):
        """Options:
            scale: factor
            seed: seed
        """
        return dict(base)

    try:
        (row,) = [r for r in merging.study_rows() if r.method == "_study_probe"]
        assert row.row == "_study_probe" and row.tune and row.data is None
        assert "_study_probe" in merging.method_rows()  # a row of the accuracy table
        (opts,) = [o for r, o in merging.study_plan(torch.nn.Linear(1, 1),
                                                    merging.ScaleConfig.at("smoke"), 3)
                   if r.method == "_study_probe"]
        assert opts == {"seed": 3}
    finally:
        _REGISTRY.pop("_study_probe", None)
