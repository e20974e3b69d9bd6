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
from basinmerge.merge._common import (
    TensorSource,
    coordinate_median,
    is_bn_statistic,
    row_blocks,
    work_dtype,
)

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
# finished layers are reduced together once they hold this many coordinates per member
BATCH = 65_536


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
    coordinates (or its sample's) are gathered as its blocks pass; once its last block is
    seen it waits with the other finished layers until they hold `BATCH` coordinates, and
    all of them are reduced together (one coordinate-wise median, one float64 conversion:
    per layer, a handful of sums). The result does not depend on how the layers were cut
    into blocks or batched."""

    def __init__(self, source: TensorSource, sample: int | None = SAMPLE):
        self.names = list(source.names)
        self.num_models = k = source.num_models
        self.keys = guard_keys(source) if k >= 2 else []
        self._stride: dict[str, int] = {}
        self._row: dict[str, int] = {}
        self._left: dict[str, int] = {}  # coordinates of the sample not seen yet
        self._parts: dict[str, list[torch.Tensor]] = {}
        self._done: dict[str, torch.Tensor] = {}  # finished layers' coordinates, not reduced yet
        self._done_size = 0
        self._stats: dict[str, dict[str, torch.Tensor]] = {}
        self._scratch: dict[str, torch.Tensor] = {}  # reused buffers (`_batch_statistics`)
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
            self._finish(key)
            if self._done_size >= BATCH:
                self._reduce_done()

    def _finish(self, key: str) -> None:
        """Move a layer's gathered coordinates to the finished layers."""
        parts = self._parts.pop(key)
        raw = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        self._done[key] = raw
        self._done_size += raw.shape[1]

    def _reduce_done(self) -> None:
        """Reduce every finished layer, a batch per dtype."""
        by_dtype: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
        for key, raw in self._done.items():
            by_dtype.setdefault(raw.dtype, []).append((key, raw))
        self._done, self._done_size = {}, 0
        for items in by_dtype.values():
            self._stats.update(_batch_statistics(items, self._scratch))

    def statistics(self, key: str) -> dict[str, torch.Tensor]:
        """Per member (a length-K float64 vector each): ``mu``, ``sigma`` (population std, as
        `basinmerge.scope.layer_stats`) and ``cosine`` to the members' coordinate-wise median
        (of what was observed of `key`)."""
        if key not in self._stats:
            if key not in self._done:
                if not self._parts.get(key):
                    raise ConfigError(f"the member guard saw nothing of layer '{key}'")
                self._finish(key)
            self._reduce_done()
        return self._stats[key]

    def report(self, threshold: float = THRESHOLD) -> GuardReport:
        """Compare the members layer by layer (see the module) and report."""
        k = self.num_models
        distance = [0.0] * k
        worst: list[str | None] = [None] * k
        flags: list[LayerFlag] = []
        if not self.keys:
            return GuardReport(self.names, distance, worst, flags, 0, threshold)
        st = {s: torch.stack([self.statistics(key)[s] for key in self.keys])
              for s in ("mu", "sigma", "cosine")}  # (layers, K) each
        sigma_med = st["sigma"].median(dim=1, keepdim=True).values  # the lower middle, as before
        stats = {
            "log_sigma": st["sigma"].clamp(min=1e-300).log(),
            "mu": torch.where(sigma_med > 0, st["mu"] / sigma_med, st["mu"]),
            "cosine": st["cosine"],
        }
        # per statistic: its values, medians and z-scores as lists (layers x members)
        table: list[tuple[str, list, list, list]] = []
        for stat, values in stats.items():
            z, med = robust_z(values, FLOORS[stat])
            if stat == "cosine":
                z = (-z).clamp(min=0)  # only a member pointing away from the others
            table.append((stat, values.tolist(), med.tolist(), z.tolist()))
        for li, key in enumerate(self.keys):
            for stat, vals, meds, zs in table:
                for i in range(k):
                    zi = abs(zs[li][i])
                    if zi > distance[i]:
                        distance[i], worst[i] = zi, key
                    if k >= MIN_MEMBERS and zi > threshold:
                        flags.append(LayerFlag(self.names[i], key, stat, vals[li][i], meds[li],
                                               zs[li][i] if stat != "cosine" else -zi))
        return GuardReport(self.names, distance, worst, flags, len(self.keys), threshold)


def _batch_statistics(items: list[tuple[str, torch.Tensor]], scratch: dict[str, torch.Tensor]
                      ) -> dict[str, dict[str, torch.Tensor]]:
    """`GuardStats.statistics` of several finished layers of one dtype at once: each layer's
    (K, n) coordinates side by side in reused buffers (`scratch`: a merge allocates and frees
    megabytes per block, and fresh big buffers here cost more in page faults than the
    arithmetic), one coordinate-wise median (in the work dtype: exact for bf16/fp16/fp32
    members) and one float64 copy; the sums per layer in float64."""
    k = items[0][1].shape[0]
    size = sum(r.shape[1] for _, r in items)
    dt = work_dtype(items[0][1].dtype)
    work = _buffer(scratch, "work", dt, (k, size))
    start = 0
    for _, r in items:
        work[:, start:start + r.shape[1]].copy_(r)
        start += r.shape[1]
    x = _buffer(scratch, "x", torch.float64, (k, size))
    x.copy_(work)
    med = _buffer(scratch, "med", torch.float64, (size,))
    med.copy_(coordinate_median(list(work), overwrite=True))  # `work` is spent
    xx = torch.mul(x, x, out=_buffer(scratch, "xx", torch.float64, (k, size)))
    sums, squares, dots, med_norms, counts = [], [], [], [], []
    start = 0
    for _, r in items:
        n = r.shape[1]
        xs, ms = x[:, start:start + n], med[start:start + n]
        sums.append(xs.sum(dim=1))
        squares.append(xx[:, start:start + n].sum(dim=1))
        dots.append(xs @ ms)
        med_norms.append(ms @ ms)
        counts.append(max(n, 1))
        start += n
    n_ = torch.tensor(counts, dtype=torch.float64)
    mu = torch.stack(sums, dim=1) / n_  # (K, layers)
    s2 = torch.stack(squares, dim=1)
    sigma = (s2 / n_ - mu * mu).clamp(min=0).sqrt()
    norms = s2.sqrt() * torch.stack(med_norms).sqrt()
    dot = torch.stack(dots, dim=1)
    cosine = torch.where(norms > 0, dot / norms.clamp(min=1e-300), torch.ones_like(dot))
    return {key: {"mu": mu[:, j], "sigma": sigma[:, j], "cosine": cosine[:, j]}
            for j, (key, _) in enumerate(items)}


def _buffer(scratch: dict[str, torch.Tensor], name: str, dtype: torch.dtype,
            shape: tuple[int, ...]) -> torch.Tensor:
    """A `shape` view of the reused buffer `name` (grown when too small)."""
    n = math.prod(shape)
    buf = scratch.get(name)
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        buf = scratch[name] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


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


def robust_z(values: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(z-scores against the median with spread max(1.4826 MAD, floor), the median), along
    the last axis (the members; one row per layer): for an even count the median is the mean
    of the two middle values, the MAD the lower middle one."""
    n = values.shape[-1]
    s = values.sort(dim=-1).values
    med = s[..., n // 2] if n % 2 else (s[..., n // 2 - 1] + s[..., n // 2]) / 2
    mad = (values - med.unsqueeze(-1)).abs().sort(dim=-1).values[..., (n - 1) // 2]
    return (values - med.unsqueeze(-1)) / (1.4826 * mad).clamp(min=floor).unsqueeze(-1), med


def check_members(source: TensorSource, *, threshold: float = THRESHOLD,
                  block_bytes: int | None = None, sample: int | None = SAMPLE) -> GuardReport:
    """Compare the members of `source` layer by layer (see the module) and report, reading the
    blocks from `source` (a merge with a per-key kernel feeds a `GuardStats` instead)."""
    return observe_all(GuardStats(source, sample), source, block_bytes).report(threshold)
