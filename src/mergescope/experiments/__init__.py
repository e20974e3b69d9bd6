"""Study suites. Each module exposes ``run(*, dataset, scale, seeds, out, device, ...) ->
ExperimentResult``; the CLI's ``mergescope experiment NAME`` and ``mergescope reproduce`` call it."""
