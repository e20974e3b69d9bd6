"""Study suites. Each module exposes ``run(*, dataset, scale, seeds, out, device, ...) ->
ExperimentResult``; the CLI's ``mergescope experiment NAME`` and ``mergescope reproduce`` call it.

`SUITES` maps each suite's CLI name to its module, in the order `reproduce` runs them.
"""

SUITES: dict[str, str] = {
    "mode-connectivity": "mergescope.experiments.mode_connectivity",
    "rebasin": "mergescope.experiments.rebasin",
    "merging": "mergescope.experiments.merging",
    "federated": "mergescope.experiments.federated",
}
