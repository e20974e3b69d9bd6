"""Merge operators over state_dicts (or models), one function per method, and `merge(...)`.

>>> from basinmerge.merge import merge, ties
>>> state = merge([a, b, c], "ties", base=base, density=0.2)     # by name
>>> state = ties(base, [a, b, c], density=0.2)                   # the same, directly

Methods (`METHODS` is the registry; `methods()` lists them):

- data-free: ``average``, ``weighted``, ``median``, ``trimmed_mean``, and around a shared base
  ``task_arithmetic``, ``ties``, ``dare``; these also stream over safetensors files
  (`stream_merge`), holding about K tensors at a time instead of K models;
- data-using: ``greedy_soup`` (labeled held-out data), ``fisher`` and ``regmean`` (inputs only),
  ``adamerging`` (unlabeled inputs, needs a base), ``soft`` (labeled data; gated Soft Merging).

Float tensors are merged; integer buffers (``num_batches_tracked``) come from the first model.
Every method returns a state_dict, except `soft`, which returns ``(model, GateTable)``.
Data-using methods recompute BatchNorm statistics on their data (``reset_bn=True``); after a
data-free merge of BatchNorm models, call `basinmerge.train.reset_bn_stats` yourself.
Bad input (no models, different architectures, NaN/Inf, a mismatching base) raises one
`ConfigError` / `IncompatibleModelsError` naming the model and key.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from basinmerge.errors import ConfigError
from basinmerge.merge._common import ModelLike
from basinmerge.merge.adamerging import adamerging, adamerging_info
from basinmerge.merge.basic import average, median, trimmed_mean, weighted
from basinmerge.merge.fisher import diagonal_fisher, fisher
from basinmerge.merge.regmean import regmean
from basinmerge.merge.soft import (
    GateTable,
    deterministic_gate,
    expected_l0,
    hard_concrete_sample,
    soft,
)
from basinmerge.merge.soup import greedy_soup, greedy_soup_info
from basinmerge.merge.stream import stream_merge, streamable
from basinmerge.merge.task import dare, task_arithmetic, ties
from basinmerge.state import StateDict

__all__ = [
    "METHODS", "Method", "merge", "methods", "average", "weighted", "median", "trimmed_mean",
    "greedy_soup", "fisher", "diagonal_fisher", "regmean", "task_arithmetic", "ties", "dare",
    "adamerging", "soft", "GateTable", "hard_concrete_sample", "expected_l0", "deterministic_gate",
    "stream_merge", "streamable",
]


@dataclass(frozen=True)
class Method:
    """A registered merge method: how to call it and what it needs."""

    name: str
    run: Callable[..., tuple[StateDict, dict]]  # (models, base, data, **options) -> (state, info)
    target: Callable[..., Any]  # the public function (its signature lists the options)
    needs_base: bool
    needs_data: str | None  # None, "inputs" or "labels"
    min_models: int
    summary: str

    @property
    def streams(self) -> bool:
        return self.name in streamable()

    def options(self) -> list[str]:
        skip = {"base", "models", "data", "unlabeled_data", "names"}
        return [p for p in inspect.signature(self.target).parameters if p not in skip]


def _soft(models, base, data, **o):
    model, gates = soft(models, data, **o)
    return {k: v.detach() for k, v in model.state_dict().items()}, {"gates": gates}


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("average", lambda ms, b, d, **o: (average(ms, **o), {}), average, False, None, 1,
           "uniform (or weighted) average: a model soup"),
    Method("weighted", lambda ms, b, d, **o: (weighted(ms, **o), {}), weighted, False, None, 1,
           "weighted average with weights=[...] (e.g. data sizes)"),
    Method("median", lambda ms, b, d, **o: (median(ms, **o), {}), median, False, None, 1,
           "coordinate-wise median"),
    Method("trimmed_mean", lambda ms, b, d, **o: (trimmed_mean(ms, **o), {}), trimmed_mean,
           False, None, 1, "coordinate-wise mean without the floor(trim*K) extremes at each end"),
    Method("greedy_soup", lambda ms, b, d, **o: greedy_soup_info(ms, d, **o), greedy_soup,
           False, "labels", 1, "greedy soup by held-out accuracy"),
    Method("fisher", lambda ms, b, d, **o: (fisher(ms, d, **o), {}), fisher, False, "inputs", 1,
           "Fisher-weighted average (diagonal Fisher from per-example gradients)"),
    Method("regmean", lambda ms, b, d, **o: (regmean(ms, d, **o), {}), regmean, False, "inputs", 1,
           "RegMean: per-Linear regression on input Gram matrices"),
    Method("task_arithmetic", lambda ms, b, d, **o: (task_arithmetic(b, ms, **o), {}),
           task_arithmetic, True, None, 1, "base + scale * sum of task vectors"),
    Method("ties", lambda ms, b, d, **o: (ties(b, ms, **o), {}), ties, True, None, 1,
           "TIES: trim, elect sign, disjoint mean"),
    Method("dare", lambda ms, b, d, **o: (dare(b, ms, **o), {}), dare, True, None, 1,
           "DARE: random drop and rescale, then task arithmetic or TIES"),
    Method("adamerging", lambda ms, b, d, **o: adamerging_info(b, ms, d, **o), adamerging_info, True,
           "inputs", 1, "AdaMerging: coefficients by entropy minimization on unlabeled data"),
    Method("soft", _soft, soft, False, "labels", 2,
           "Soft Merging: learned hard-concrete gates per (unit, model)"),
]}


def methods() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown merge method '{name}'; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def merge(models: Sequence[ModelLike], method: str, *, base: ModelLike | None = None,
          data: Any = None, names: Sequence[str] | None = None, return_info: bool = False,
          **options: Any):
    """Merge `models` with the method named `method`.

    `base` is the shared starting point for task_arithmetic / ties / dare / adamerging; `data`
    is what a data-using method needs (see `Method.needs_data`); `names` label the models in
    error messages and records. Other keyword arguments are the method's options. Returns the
    merged state_dict, or ``(state, info)`` with `return_info` (info: greedy soup's choices,
    AdaMerging's lambdas, soft merging's ``gates`` table)."""
    m = get_method(method)
    allowed = set(m.options())
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise ConfigError(f"merge method '{method}' has no option '{unknown[0]}'; options: "
                          f"{', '.join(sorted(allowed)) or 'none'}")
    if m.needs_base and base is None:
        raise ConfigError(f"merge method '{method}' needs a base model (base=...)")
    if not m.needs_base and base is not None:
        raise ConfigError(f"merge method '{method}' does not use a base model")
    if not m.needs_data and data is not None:
        raise ConfigError(f"merge method '{method}' does not use data")
    if m.needs_data and data is None:
        kind = "labeled data" if m.needs_data == "labels" else "data (inputs)"
        raise ConfigError(f"merge method '{method}' needs {kind} (data=...)")
    state, info = m.run(models, base, data, names=names, **options)
    return (state, info) if return_info else state
