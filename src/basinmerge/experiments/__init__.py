"""Study suites. Each module exposes ``run(*, dataset, scale, seeds, out, device, ...) ->
ExperimentResult``; the CLI's ``basinmerge experiment NAME`` and ``basinmerge reproduce`` call it.

`SUITES` maps each suite's CLI name to its module, in the order `reproduce` runs them.
"""

SUITES: dict[str, str] = {
    "mode-connectivity": "basinmerge.experiments.mode_connectivity",
    "rebasin": "basinmerge.experiments.rebasin",
    "merging": "basinmerge.experiments.merging",
    "federated": "basinmerge.experiments.federated",
    "transformers": "basinmerge.experiments.transformers",
}
