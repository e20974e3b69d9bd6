"""Merge operators over state_dicts (or models), one file per method, and `merge(...)`.

>>> from basinmerge.merge import merge, ties
>>> state = merge([a, b, c], "ties", base=base, density=0.2)     # by name
>>> state = ties(base, [a, b, c], density=0.2)                   # the same, directly

Every method registers itself with `@merge_method` in its own file
(`basinmerge.merge.registry`): its options, whether it needs a base or data, and its per-key
kernel if it has one (then it also streams over safetensors files, `stream_merge`). `METHODS`
is that registry and `methods()` lists it:

- data-free: ``average``, ``weighted``, ``median``, ``trimmed_mean``, ``slerp``; around a shared
  base ``task_arithmetic``, ``ties``, ``dare``, ``della``, ``breadcrumbs``, ``model_stock``;
  all of them stream;
- data-using: ``greedy_soup`` (labeled held-out data), ``fisher`` and ``regmean`` (inputs only),
  ``adamerging`` (unlabeled inputs, needs a base), ``soft`` (labeled data; gated Soft Merging).

Float tensors are merged; integer buffers (``num_batches_tracked``) come from the first model.
BatchNorm running statistics are never task vectors: the base-using methods average the
members' statistics (see `basinmerge.merge._common.is_bn_statistic`); they are still not the
statistics of the merged weights, so reset them on data (`basinmerge.train.reset_bn_stats`,
or let `basinmerge.merge.engine.merge_checkpoints` do it). Data-using methods recompute them on
their data (``reset_bn=True``). Every method returns a state_dict, except `soft`, which returns
``(model, GateTable)``. Bad input (no models, different architectures, NaN/Inf, a mismatching
base, an unknown option) raises one `ConfigError` / `IncompatibleModelsError` naming the model,
key or option.

Files: `merge_checkpoints` (`basinmerge.merge.engine`) merges checkpoint files with any method:
loading, streaming, the member guard, BatchNorm handling and a summary.
"""

from __future__ import annotations

from basinmerge.merge.adamerging import adamerging, adamerging_info
from basinmerge.merge.basic import average, median, trimmed_mean, weighted
from basinmerge.merge.breadcrumbs import breadcrumbs
from basinmerge.merge.della import della
from basinmerge.merge.fisher import diagonal_fisher, fisher
from basinmerge.merge.model_stock import model_stock
from basinmerge.merge.registry import (
    MergeMethod,
    Option,
    get_method,
    merge,
    merge_method,
    methods,
    registry,
)
from basinmerge.merge.regmean import regmean
from basinmerge.merge.slerp import slerp
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

Method = MergeMethod  # the name older code used
METHODS = registry()

__all__ = [
    "METHODS", "Method", "MergeMethod", "Option", "merge", "merge_method", "methods",
    "get_method", "average", "weighted", "median", "trimmed_mean", "slerp", "greedy_soup",
    "fisher", "diagonal_fisher", "regmean", "task_arithmetic", "ties", "dare", "della",
    "breadcrumbs", "model_stock", "adamerging", "soft", "GateTable", "hard_concrete_sample",
    "expected_l0", "deterministic_gate", "stream_merge", "streamable", "greedy_soup_info",
    "adamerging_info",
]
