"""The member guard: before merging, find a member whose weights are far outside the others'.

A merge of K members is only as good as its worst member: one member with weights x1000, sign
flipped or replaced by noise wrecks an average (and TIES, Fisher, DARE) silently. The guard
compares the members layer by layer, with the statistics this project measures, the weight
scope of `basinmerge.scope` (mean mu and population std sigma of each Linear/Conv weight,
`scope.scope_keys`), plus the direction of each member's layer:

- log sigma_k (a member scaled by c moves by log c),
- mu_k, in units of the members' median sigma,
- the cosine between theta_k and the members' coordinate-wise median (a sign-flipped member
  has cosine near -1, a noise member near 0; honest fine-tunes of one base near 1).

Each statistic is turned into a robust z-score against the members' median:
z = (v_k - median_j v_j) / max(1.4826 MAD_j(v_j), floor), with floors (`FLOORS`) so that
near-identical members (a tiny MAD) do not turn small honest differences into large z; the
cosine counts only downwards. A member is flagged when some layer has |z| > `threshold`
(default 6). Its *scope distance* is its largest |z| over layers and statistics. With fewer
than 3 members there is no majority to compare against: distances are reported, nothing is
flagged.

Everything is accumulated block by block (sums, sums of squares and dot products) by a
`GuardStats`, fed either by the merge itself (``merged_items(observe=...)``,
``stream_merge(observe=...)``: each block of each member is read once, for the merge and the
guard together) or by `check_members`, which reads the blocks itself (methods without a
per-key kernel). Both work on files and on in-memory state_dicts (a `TensorSource`).

A layer of more than `SAMPLE` (131,072) coordinates is compared on a fixed systematic sample of
about `SAMPLE_SIZE` (16,384) of them, not on all: every s-th coordinate in memory order, s the
smallest stride >= numel / 16,384 coprime with the row length (so that the sample visits every
column, not the same few), the same for every member and every run. A judgment call for speed:
the median of K members and the float64 sums on every coordinate cost more than the merge
itself (in a streamed K = 8 average of Llama-shaped models, about 2x the merge; sampled, a few
percent). The sampled sigma is within 1% of the exact one and mu within 3% of a sigma (tested),
below the floors above; the members are compared on the very same coordinates, so the
differences between them, which the z-scores use, are sharper still (within 0.5% of a sigma);
x1000, sign-flipped and noise members are flagged as before and honest ones are not
(tests/test_merge_engine.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from basinmerge.errors import ConfigError, IncompatibleModelsError
from basinmerge.merge._common import TensorSource, coordinate_median, is_bn_statistic, row_blocks

THRESHOLD = 6.0
# floors of the robust spread: log sigma (about 5% of sigma), mu (in units of the median
# sigma), cosine to the median
FLOORS = {"log_sigma": 0.05, "mu": 0.02, "cosine": 0.05}
ROBUST_METHODS = ("median", "trimmed_mean", "soft")
MIN_MEMBERS = 3
# a layer with more than SAMPLE coordinates is compared on a fixed sample of about
# SAMPLE_SIZE of them (module docstring)
SAMPLE = 131_072
SAMPLE_SIZE = 16_384


@dataclass
class LayerFlag:
    """One (member, layer, statistic) far from the members' median."""

    member: str
    layer: str
    stat: str  # "log_sigma", "mu" or "cosine"
    value: float
    median: float
    z: float

    def describe(self) -> str:
        if self.stat == "log_sigma":
            ratio = math.exp(self.value - self.median)
            what = f"sigma {ratio:.3g}x the members' median"
        elif self.stat == "mu":
            what = f"mean {self.value:+.3g} median sigmas from the members' median"
        else:
            what = (f"cosine {self.value:.3f} to the members' coordinate-wise median "
                    f"(median {self.median:.3f})")
        return f"layer '{self.layer}' has {what} (robust z {self.z:.3g})"

    def to_dict(self) -> dict:
        return {"member": self.member, "layer": self.layer, "stat": self.stat,
                "value": self.value, "median": self.median, "z": self.z}


@dataclass
class GuardReport:
    """The guard's findings: per member its scope distance and worst layer, and the flags."""

    names: list[str]
    distance: list[float]
    worst: list[str | None]
    flags: list[LayerFlag] = field(default_factory=list)
    layers: int = 0
    threshold: float = THRESHOLD

    @property
    def checked(self) -> bool:
        return len(self.names) >= MIN_MEMBERS

    def flagged(self) -> list[str]:
        """Flagged members, in input order."""
        bad = {f.member for f in self.flags}
        return [n for n in self.names if n in bad]

    def warnings(self) -> list[str]:
        """One line per flagged member: its worst layer and the advice."""
        out = []
        for name in self.flagged():
            mine = [f for f in self.flags if f.member == name]
            # the clearest symptom first: a scale, then a direction, then a shifted mean
            stat = next(s for s in ("log_sigma", "cosine", "mu") if any(f.stat == s for f in mine))
            worst = max((f for f in mine if f.stat == stat), key=lambda f: abs(f.z))
            more = len({f.layer for f in mine}) - 1
            out.append(f"member '{name}' is far outside the other members' weight scope: "
                       f"{worst.describe()}" + (f" and {more} more layer(s)" if more else "")
                       + f"; use a robust method ({', '.join(ROBUST_METHODS)}) or leave it out")
        return out

    def raise_if_flagged(self) -> None:
        warnings = self.warnings()
        if warnings:
            raise IncompatibleModelsError(warnings[0] + (f" (and {len(warnings) - 1} more member(s))"
                                                         if len(warnings) > 1 else ""))

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "layers": self.layers, "checked": self.checked,
                "members": [{"name": n, "scope_distance": d, "worst_layer": w}
                            for n, d, w in zip(self.names, self.distance, self.worst, strict=True)],
                "flagged": self.flagged(), "flags": [f.to_dict() for f in self.flags]}


def guard_keys(source: TensorSource) -> list[str]:
    """The layers the guard compares: the scoped weights of `basinmerge.scope.scope_keys`
    (decided from shapes alone); every other float tensor but BatchNorm statistics if there
    are none."""
    from basinmerge.scope import scope_keys

    shapes = {k: torch.empty(source.shape(k), device="meta") for k in source.keys() if source.is_float(k)}
    keys = scope_keys(shapes)
    if not keys:
        keys = [k for k, t in shapes.items() if not is_bn_statistic(k) and t.numel() > 1]
    return keys


class GuardStats:
    """The guard's statistics of the layers of `source` it compares (`guard_keys`), fed block
    by block with `observe` (the K members' tensors of one key, whole or a span of rows);
    `report` turns them into a `GuardReport`. Layers of more than `sample` coordinates are
    compared on a fixed sample of them (module docstring; None: every coordinate). A layer's
    coordinates (or its sample's) are gathered as its blocks pass and reduced once its last
    block is seen, so the result does not depend on how the layer was cut into blocks."""

    def __init__(self, source: TensorSource, sample: int | None = SAMPLE):
        self.names = list(source.names)
        self.num_models = k = source.num_models
        self.keys = guard_keys(source) if k >= 2 else []
        self._stride: dict[str, int] = {}
        self._row: dict[str, int] = {}
        self._left: dict[str, int] = {}  # coordinates of the sample not seen yet
        self._parts: dict[str, list[torch.Tensor]] = {}
        self._stats: dict[str, dict[str, torch.Tensor]] = {}
        for key in self.keys:
            shape = source.shape(key)
            numel = math.prod(shape)
            row = numel // shape[0] if shape and shape[0] else 1
            stride = (_stride(numel, row, min(sample, SAMPLE_SIZE))
                      if sample is not None and numel > sample else 1)
            self._row[key], self._stride[key] = row, stride
            self._left[key] = -(-numel // stride)
            self._parts[key] = []

    def observe(self, key: str, rows: slice | None, tensors: list[torch.Tensor]) -> None:
        """Take the K members' tensors of `key` (rows `rows` of it, None: whole) into account;
        keys the guard does not compare are ignored."""
        parts = self._parts.get(key)
        if parts is None:
            return
        stride = self._stride[key]
        offset = (rows.start or 0) * self._row[key] if rows is not None else 0
        first = -offset % stride  # the first coordinate of the sample in this block
        part = torch.stack([t.reshape(-1)[first::stride] for t in tensors]).cpu()
        parts.append(part)
        self._left[key] -= part.shape[1]
        if self._left[key] <= 0:
            self._reduce(key)

    def _reduce(self, key: str) -> None:
        raw = torch.cat(self._parts.pop(key), dim=1)
        # the median in the work dtype (exact for bf16/fp16/fp32 members), the sums in float64
        med = coordinate_median(list(raw)).to(torch.float64)
        x = raw.to(torch.float64)
        n = max(x.shape[1], 1)
        mu = x.sum(dim=1) / n
        s2 = (x * x).sum(dim=1)
        sigma = (s2 / n - mu * mu).clamp(min=0).sqrt()
        norms = s2.sqrt() * (med @ med).sqrt()
        dot = x @ med
        cosine = torch.where(norms > 0, dot / norms.clamp(min=1e-300), torch.ones_like(dot))
        self._stats[key] = {"mu": mu, "sigma": sigma, "cosine": cosine}

    def statistics(self, key: str) -> dict[str, torch.Tensor]:
        """Per member (a length-K float64 vector each): ``mu``, ``sigma`` (population std, as
        `basinmerge.scope.layer_stats`) and ``cosine`` to the members' coordinate-wise median
        (of what was observed of `key`)."""
        if key not in self._stats:
            if not self._parts.get(key):
                raise ConfigError(f"the member guard saw nothing of layer '{key}'")
            self._reduce(key)
        return self._stats[key]

    def report(self, threshold: float = THRESHOLD) -> GuardReport:
        """Compare the members layer by layer (see the module) and report."""
        k = self.num_models
        distance = [0.0] * k
        worst: list[str | None] = [None] * k
        flags: list[LayerFlag] = []
        for key in self.keys:
            st = self.statistics(key)
            sigma_med = float(st["sigma"].median())
            stats = {
                "log_sigma": st["sigma"].clamp(min=1e-300).log(),
                "mu": st["mu"] / sigma_med if sigma_med > 0 else st["mu"],
                "cosine": st["cosine"],
            }
            for stat, values in stats.items():
                z, med = robust_z(values, FLOORS[stat])
                if stat == "cosine":
                    z = (-z).clamp(min=0)  # only a member pointing away from the others
                for i in range(k):
                    zi = abs(float(z[i]))
                    if zi > distance[i]:
                        distance[i], worst[i] = zi, key
                    if k >= MIN_MEMBERS and zi > threshold:
                        flags.append(LayerFlag(self.names[i], key, stat, float(values[i]), med,
                                               float(z[i]) if stat != "cosine" else -zi))
        return GuardReport(self.names, distance, worst, flags, len(self.keys), threshold)


def _stride(numel: int, row: int, sample: int) -> int:
    """The stride of a layer's systematic sample (module docstring): the smallest s >=
    numel / sample coprime with the row length."""
    s = max(1, -(-numel // sample))
    while math.gcd(s, row) != 1:
        s += 1
    return s


def observe_all(stats: GuardStats, source: TensorSource, block_bytes: int | None = None) -> GuardStats:
    """Feed `stats` every block of the layers it compares, read from `source` (for a merge
    that does not feed it itself)."""
    for key in stats.keys:
        for rows in row_blocks(source.shape(key), source.element_size(key), block_bytes):
            stats.observe(key, rows, [source.model_tensor(i, key, rows)
                                      for i in range(source.num_models)])
    return stats


def layer_statistics(source: TensorSource, key: str, block_bytes: int | None = None,
                     sample: int | None = SAMPLE) -> dict[str, torch.Tensor]:
    """`GuardStats.statistics` of one layer of `source`, read in row blocks."""
    stats = GuardStats(source, sample)
    if key not in stats.keys:
        raise ConfigError(f"the member guard does not compare '{key}' (not a scoped weight)")
    stats.keys = [key]
    return observe_all(stats, source, block_bytes).statistics(key)


def robust_z(values: torch.Tensor, floor: float) -> tuple[torch.Tensor, float]:
    """(z-scores against the median with spread max(1.4826 MAD, floor), the median)."""
    med = float(values.median()) if values.numel() % 2 else float(values.sort().values[
        values.numel() // 2 - 1:values.numel() // 2 + 1].mean())
    mad = float((values - med).abs().median())
    return (values - med) / max(1.4826 * mad, floor), med


def check_members(source: TensorSource, *, threshold: float = THRESHOLD,
                  block_bytes: int | None = None, sample: int | None = SAMPLE) -> GuardReport:
    """Compare the members of `source` layer by layer (see the module) and report, reading the
    blocks from `source` (a merge with a per-key kernel feeds a `GuardStats` instead)."""
    return observe_all(GuardStats(source, sample), source, block_bytes).report(threshold)
