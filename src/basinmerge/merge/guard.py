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

Everything is computed in one pass over the tensors, key by key and in row blocks (sums,
sums of squares and dot products), so it works on the files of a streaming merge as well as
on in-memory state_dicts (both are a `TensorSource`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from basinmerge.errors import IncompatibleModelsError
from basinmerge.merge._common import TensorSource, is_bn_statistic, row_blocks

THRESHOLD = 6.0
# floors of the robust spread: log sigma (about 5% of sigma), mu (in units of the median
# sigma), cosine to the median
FLOORS = {"log_sigma": 0.05, "mu": 0.02, "cosine": 0.05}
ROBUST_METHODS = ("median", "trimmed_mean", "soft")
MIN_MEMBERS = 3


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


def layer_statistics(source: TensorSource, key: str,
                     block_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Per member (a length-K float64 vector each): ``mu``, ``sigma`` (population std, as
    `basinmerge.scope.layer_stats`) and ``cosine`` to the members' coordinate-wise median of
    tensor `key`, accumulated over row blocks."""
    k = source.num_models
    n = 0
    s1 = torch.zeros(k, dtype=torch.float64)
    s2 = torch.zeros(k, dtype=torch.float64)
    dot = torch.zeros(k, dtype=torch.float64)
    med2 = torch.zeros((), dtype=torch.float64)
    for rows in row_blocks(source.shape(key), source.element_size(key), block_bytes):
        x = torch.stack([source.model_tensor(i, key, rows).reshape(-1).to(torch.float64)
                         for i in range(k)])
        med = x.median(dim=0).values if k % 2 else x.sort(dim=0).values[k // 2 - 1:k // 2 + 1].mean(0)
        n += x.shape[1]
        s1 += x.sum(dim=1)
        s2 += (x * x).sum(dim=1)
        dot += x @ med
        med2 += med @ med
    mu = s1 / max(n, 1)
    sigma = (s2 / max(n, 1) - mu * mu).clamp(min=0).sqrt()
    norms = s2.sqrt() * med2.sqrt()
    cosine = torch.where(norms > 0, dot / norms.clamp(min=1e-300), torch.ones_like(dot))
    return {"mu": mu, "sigma": sigma, "cosine": cosine}


def robust_z(values: torch.Tensor, floor: float) -> tuple[torch.Tensor, float]:
    """(z-scores against the median with spread max(1.4826 MAD, floor), the median)."""
    med = float(values.median()) if values.numel() % 2 else float(values.sort().values[
        values.numel() // 2 - 1:values.numel() // 2 + 1].mean())
    mad = float((values - med).abs().median())
    return (values - med) / max(1.4826 * mad, floor), med


def check_members(source: TensorSource, *, threshold: float = THRESHOLD,
                  block_bytes: int | None = None) -> GuardReport:
    """Compare the members of `source` layer by layer (see the module) and report."""
    names = list(source.names)
    k = len(names)
    distance = [0.0] * k
    worst: list[str | None] = [None] * k
    flags: list[LayerFlag] = []
    keys = guard_keys(source) if k >= 2 else []
    for key in keys:
        st = layer_statistics(source, key, block_bytes)
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
                    flags.append(LayerFlag(names[i], key, stat, float(values[i]), med,
                                           float(z[i]) if stat != "cosine" else -zi))
    return GuardReport(names, distance, worst, flags, len(keys), threshold)
