"""The Git Re-Basin study: how much of the loss barrier between independently trained models is
permutation symmetry, and how much of the rest do BatchNorm reset / REPAIR remove?

For each architecture (MLPs over a range of widths; a small VGG and ResNet-20 with BatchNorm and
with LayerNorm) pairs of models are trained from different seeds (different initializations and
batch orders). Model B of each pair is aligned to A by no alignment ("naive"), weight matching,
activation matching (correlation) and STE matching; the linear path between A and the aligned
B is evaluated on train and test subsets without and with the correction (BatchNorm models:
recomputed BN statistics; the others: REPAIR). Barriers follow Git Re-Basin's definition
(`connectivity.barriers`). Finally MergeMany merges four MLPs.

Scales: ``smoke`` (seconds, for tests), ``quick`` (the default; about 15 minutes on 2 CPU
cores: fewer widths, training subsets and short training; the notes of the result say which),
``full`` (all widths, full training data, longer training, 3 pairs; for a GPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from torch import nn

from basinmerge import data as data_mod
from basinmerge import models, plots
from basinmerge.align import Repair, align, apply_permutation, merge_many, permuted_copy
from basinmerge.align.spec import resolve_spec
from basinmerge.connectivity import Curve, barriers, interpolate
from basinmerge.console import progress_task
from basinmerge.data import Dataset
from basinmerge.errors import ConfigError
from basinmerge.experiments.common import (
    ExperimentResult,
    StudyScale,
    Table,
    cpu_threads,
    mean_std,
)
from basinmerge.state import weighted_average, with_state
from basinmerge.train import evaluate, fit, has_batchnorm, reset_bn_stats

METHODS = ("naive", "weight", "activation", "ste")


@dataclass(frozen=True)
class ScaleConfig(StudyScale, study="rebasin"):
    """What a scale fixes: the MLP widths and conv nets, their training, the evaluation sizes
    and the number of model pairs (`pairs`; conv nets at most `conv_pairs`)."""

    mlp_widths: tuple[int, ...]
    mlp_depth: int
    train_limit: int | None       # MLP training subset (None: all)
    epochs: int
    conv: tuple[tuple[str, str, float], ...]  # (architecture, norm, width)
    conv_train_limit: int | None
    conv_epochs: int
    eval_limit: int | None        # examples per split on the interpolation path
    stats_examples: int           # BN reset, REPAIR and activation statistics
    num_points: int
    ste_steps: int
    ste_on_conv: bool
    pairs: int
    conv_pairs: int
    merge_width: int
    batch_size: int = 128
    lr: float = 1e-3
    conv_optimizer: str = "adam"   # conv nets; MLPs use Adam (the paper's MNIST MLP recipe)
    conv_weight_decay: float = 0.0
    conv_schedule: str = "constant"

    def check(self) -> None:
        if self.pairs < 1:
            raise ConfigError(f"seeds (pairs of models) must be >= 1, got {self.pairs}")


ScaleConfig.define("smoke", mlp_widths=(16, 32), mlp_depth=2, train_limit=300, epochs=1,
                   conv=(("vgg", "batch", 0.125), ("resnet20", "layer", 1)),
                   conv_train_limit=100, conv_epochs=1, eval_limit=100, stats_examples=100,
                   num_points=3, ste_steps=2, ste_on_conv=True, pairs=1, conv_pairs=1,
                   merge_width=16)
ScaleConfig.define("quick", mlp_widths=(128, 512, 1024), mlp_depth=3, train_limit=10000, epochs=2,
                   conv=(("vgg", "batch", 0.25), ("vgg", "layer", 0.25),
                         ("resnet20", "batch", 1), ("resnet20", "layer", 1)),
                   conv_train_limit=4000, conv_epochs=3, eval_limit=1000,
                   stats_examples=1000, num_points=7, ste_steps=20, ste_on_conv=False,
                   pairs=2, conv_pairs=1, merge_width=512)
ScaleConfig.define("full", mlp_widths=(128, 256, 512, 1024, 2048), mlp_depth=3, train_limit=None,
                   epochs=10, conv=(("vgg", "batch", 1.0), ("vgg", "layer", 1.0),
                                    ("resnet20", "batch", 1), ("resnet20", "layer", 1),
                                    ("resnet20", "batch", 4), ("resnet20", "layer", 4)),
                   conv_train_limit=None, conv_epochs=20, eval_limit=None,
                   stats_examples=5000, num_points=25, ste_steps=300, ste_on_conv=True,
                   pairs=3, conv_pairs=3, merge_width=512, conv_optimizer="adamw",
                   conv_weight_decay=0.05, conv_schedule="cosine")


@dataclass(frozen=True)
class Arch:
    label: str
    name: str
    cfg: dict
    width: float
    is_mlp: bool


def _archs(cfg: ScaleConfig, image: bool) -> list[Arch]:
    out = [Arch(f"mlp-{w}", "mlp", {"depth": cfg.mlp_depth, "width": w}, w, True)
           for w in cfg.mlp_widths]
    if image:
        for name, norm, width in cfg.conv:
            w = int(width) if name == "resnet20" else float(width)
            out.append(Arch(f"{name}-{'bn' if norm == 'batch' else 'ln'}-x{width:g}", name,
                            {"norm": norm, "width": w}, float(width), False))
    return out


class _Models:
    """Trains models on demand and keeps them (one per architecture and seed)."""

    def __init__(self, train: Dataset, cfg: ScaleConfig, device: str):
        self.train, self.cfg, self.device = train, cfg, device
        self.cache: dict[tuple[str, int], nn.Module] = {}
        self.seconds = 0.0

    def epochs(self, arch: Arch) -> int:
        """The scale's epochs, raised for a training set smaller than the scale's subset so
        that every dataset gets the same number of examples seen (MNIST-1D has 4,000)."""
        epochs = self.cfg.epochs if arch.is_mlp else self.cfg.conv_epochs
        limit = self.cfg.train_limit if arch.is_mlp else self.cfg.conv_train_limit
        if limit is None or limit <= len(self.train):
            return epochs
        return math.ceil(epochs * limit / len(self.train))

    def get(self, arch: Arch, seed: int) -> nn.Module:
        key = (arch.label, seed)
        if key not in self.cache:
            t0 = time.perf_counter()
            limit = self.cfg.train_limit if arch.is_mlp else self.cfg.conv_train_limit
            data = self.train if limit is None or limit >= len(self.train) else \
                self.train.subset(limit, seed=1000 + seed)
            net = models.build(arch.name, self.train.input_shape, self.train.num_classes,
                               seed=seed, **arch.cfg).to(self.device)
            c = self.cfg
            if arch.is_mlp:
                fit(net, data, optimizer="adam", lr=c.lr, batch_size=c.batch_size,
                    epochs=self.epochs(arch), seed=seed, progress=False)
            else:
                fit(net, data, optimizer=c.conv_optimizer, lr=c.lr, batch_size=c.batch_size,
                    epochs=self.epochs(arch), weight_decay=c.conv_weight_decay,
                    schedule=c.conv_schedule, seed=seed, progress=False)
            net.eval()
            self.cache[key] = net
            self.seconds += time.perf_counter() - t0
        return self.cache[key]


def _limit(ds: Dataset, n: int | None, seed: int) -> Dataset:
    return ds if n is None or n >= len(ds) else ds.subset(n, seed=seed)


def _align(arch: Arch, method: str, a: nn.Module, b: nn.Module, stats: Dataset,
           cfg: ScaleConfig, seed: int) -> tuple[nn.Module, float]:
    t0 = time.perf_counter()
    if method == "naive":
        return b, 0.0
    if method == "weight":
        out = align(a, b, "weight", seed=seed)
    elif method == "activation":
        out = align(a, b, "activation", stats, num_examples=cfg.stats_examples)
    else:
        out = align(a, b, "ste", stats, steps=cfg.ste_steps, lr=1e-3, seed=seed,
                    batch_size=cfg.batch_size)
    return out, time.perf_counter() - t0


def _pair_rows(arch: Arch, pair: int, a: nn.Module, b: nn.Module, splits: dict, stats: Dataset,
               cfg: ScaleConfig, methods: Sequence[str]) -> tuple[list[dict], dict[str, Curve]]:
    rows, curves = [], {}
    fix_name = "BN reset" if has_batchnorm(a) else "REPAIR"
    for method in methods:
        bb, secs = _align(arch, method, a, b, stats, cfg, seed=pair)
        for fixed in (False, True):
            # The fix: BatchNorm statistics recomputed, REPAIR for hidden layers without BN.
            curve = interpolate(a, bb, splits, num_points=cfg.num_points, bn_reset=fixed,
                                bn_data=stats, repair=fixed, progress=False,
                                label=method + (f" + {fix_name}" if fixed else ""))
            curves[curve.label] = curve
            bar = barriers(curve)
            rows.append({"model": arch.label, "width": arch.width, "pair": pair, "method": method,
                         "fix": fix_name if fixed else "none",
                         "align_seconds": secs,
                         **{f"{s}_{k}": v for s, m in bar.items() for k, v in m.items()}})
    return rows, curves


def _merge_many_rows(archs_models: list[nn.Module], stats: Dataset, test: Dataset,
                     seed: int) -> tuple[list[list], dict]:
    """MergeMany of the given models vs the naive average and aligning all to model 0."""
    first = archs_models[0]
    spec = resolve_spec(first)
    k = len(archs_models)
    weights = [1.0 / k] * k
    indiv = [evaluate(m, test) for m in archs_models]

    def finish(states, endpoints):
        net = with_state(first, weighted_average(states))
        if has_batchnorm(net):
            reset_bn_stats(net, stats)
        plain = evaluate(net, test)
        fixed = Repair(endpoints, stats)(net, weights=weights) if endpoints else None
        return plain, (evaluate(fixed, test) if fixed is not None else None)

    naive_plain, naive_fixed = finish([m.state_dict() for m in archs_models], archs_models)
    t0 = time.perf_counter()
    to_first = [first] + [align(first, m, "weight", seed=seed) for m in archs_models[1:]]
    t_first = time.perf_counter() - t0
    first_plain, first_fixed = finish([m.state_dict() for m in to_first], to_first)
    t0 = time.perf_counter()
    _, perms = merge_many(archs_models, spec, seed=seed)
    t_mm = time.perf_counter() - t0
    permuted = [permuted_copy(m, spec, p) for m, p in zip(archs_models, perms, strict=True)]
    mm_plain, mm_fixed = finish([apply_permutation(spec, p, m.state_dict())
                                 for m, p in zip(archs_models, perms, strict=True)], permuted)
    mean_acc = sum(r["accuracy"] for r in indiv) / k
    mean_loss = sum(r["loss"] for r in indiv) / k
    rows = [["individual models (mean)", mean_loss, mean_acc, "", "", 0.0],
            ["naive average", naive_plain["loss"], naive_plain["accuracy"],
             naive_fixed["loss"], naive_fixed["accuracy"], 0.0],
            ["weight-match all to model 0, average", first_plain["loss"], first_plain["accuracy"],
             first_fixed["loss"], first_fixed["accuracy"], t_first],
            ["MergeMany", mm_plain["loss"], mm_plain["accuracy"], mm_fixed["loss"],
             mm_fixed["accuracy"], t_mm]]
    raw = {"individual": indiv, "naive": [naive_plain, naive_fixed],
           "to_first": [first_plain, first_fixed], "merge_many": [mm_plain, mm_fixed],
           "seconds": {"to_first": t_first, "merge_many": t_mm}}
    return rows, raw


def _fmt(values: Sequence[float]) -> str | float:
    m, s = mean_std(values)
    return f"{m:.3f} ± {s:.3f}" if len(values) > 1 else round(m, 4)


def _summary(records: list[dict], archs: list[Arch], methods: Sequence[str]) -> Table:
    cols = ["model", "method", "endpoint test acc", "test loss barrier", "+ fix",
            "over chord", "+ fix", "test acc barrier", "+ fix", "train loss barrier", "+ fix",
            "midpoint test acc + fix", "align s"]
    rows = []
    for arch in archs:
        for method in methods:
            sel = {f: [r for r in records if r["model"] == arch.label and r["method"] == method
                       and (r["fix"] == "none") == (f == "none")] for f in ("none", "fix")}
            if not sel["none"]:
                continue

            def get(f: str, k: str, sel=sel) -> list[float]:
                return [r[k] for r in sel[f]]

            endpoint = [(r["test_acc_a"] + r["test_acc_b"]) / 2 for r in sel["none"]]
            rows.append([arch.label, method, _fmt(endpoint)]
                        + [_fmt(get(f, k)) for k in ("test_loss_barrier", "test_linear_loss_barrier",
                                                     "test_acc_barrier", "train_loss_barrier")
                           for f in ("none", "fix")]
                        + [_fmt(get("fix", "test_mid_acc")),
                           round(mean_std(get("none", "align_seconds"))[0], 2)])
    caption = ("Loss barrier = max over the path of the loss minus the mean endpoint loss (Git "
               "Re-Basin's definition; unequal endpoints alone make it positive); over chord = "
               "max of the loss minus the straight line between the endpoint losses (0 when the "
               "path never rises above it); acc barrier = mean endpoint accuracy minus the lowest "
               "accuracy on the path. '+ fix' = with BatchNorm statistics recomputed (BN models; "
               "VGG's BN-free hidden linear layer gets REPAIR) or REPAIR (others). Mean ± std "
               "over pairs (a single value when there is one pair); align s = wall seconds of "
               "the matching.")
    return Table(cols, rows, caption)


def run(*, dataset: str = "fashion-mnist", scale: str = "quick", seeds: int | None = None,
        out=None, device: str = "cpu", root: str | None = None, threads: int | None = 1,
        progress: bool = True) -> ExperimentResult:
    """Run the study (see the module docstring). `seeds`: number of model pairs per MLP width
    (conv nets use at most the scale's conv_pairs); `threads`: torch CPU threads during the run
    (1 is fastest on a shared 2-core machine), restored afterwards. `out` is unused (the CLI
    writes the result)."""
    del out
    cfg = ScaleConfig.at(scale, pairs=seeds)
    pairs = cfg.pairs
    train = data_mod.load(dataset, "train", root)
    test = data_mod.load(dataset, "test", root)
    image = len(train.input_shape) == 3
    archs = _archs(cfg, image)
    splits = {"train": _limit(train, cfg.eval_limit, 1), "test": _limit(test, cfg.eval_limit, 2)}
    stats = _limit(train, cfg.stats_examples, 3)

    t_start = time.perf_counter()
    records: list[dict] = []
    example_curves: dict[str, Curve] = {}
    zoo = _Models(train, cfg, device)
    example_width = cfg.merge_width if cfg.merge_width in cfg.mlp_widths else max(cfg.mlp_widths)
    with cpu_threads(threads, device):
        jobs = [(arch, p) for arch in archs for p in range(pairs if arch.is_mlp else min(pairs, cfg.conv_pairs))]
        with progress_task("rebasin", len(jobs) + 1, enabled=progress) as advance:
            for arch, p in jobs:
                a, b = zoo.get(arch, 2 * p), zoo.get(arch, 2 * p + 1)
                methods = [m for m in METHODS if m != "ste" or arch.is_mlp or cfg.ste_on_conv]
                rows, curves = _pair_rows(arch, p, a, b, splits, stats, cfg, methods)
                records += rows
                if p == 0 and arch.is_mlp and arch.width == example_width:
                    example_curves = {f"{arch.label} {k}": c for k, c in curves.items()}
                advance(1, model=arch.label, pair=p)
            mm_arch = Arch(f"mlp-{cfg.merge_width}", "mlp",
                           {"depth": cfg.mlp_depth, "width": cfg.merge_width}, cfg.merge_width, True)
            mm_models = [zoo.get(mm_arch, s) for s in range(4)]
            mm_rows, mm_raw = _merge_many_rows(mm_models, stats, splits["test"], seed=0)
            advance(1, model="merge-many")
    seconds = time.perf_counter() - t_start

    result = ExperimentResult("rebasin", {"dataset": dataset, "scale": scale, "pairs": pairs,
                                          "device": device, **asdict(cfg)})
    result.tables["barriers"] = _summary(records, archs, METHODS)
    result.tables["merge_many"] = Table(
        ["merge of 4 models", "test loss", "test acc", "+ fix loss", "+ fix acc", "align s"], mm_rows,
        f"Four {mm_arch.label} models (seeds 0-3); '+ fix' = REPAIR toward the mean of the "
        "(aligned) models' unit statistics (BN models: BN reset).")
    mlp_archs = [a for a in archs if a.is_mlp]
    for key, fig_name, what in (("test_loss_barrier", "barrier_vs_width", "loss barrier"),
                                ("test_linear_loss_barrier", "chord_barrier_vs_width",
                                 "loss barrier over the chord")):
        result.figures[fig_name] = plots.barrier_vs_width(
            _width_series(records, mlp_archs, key), ylabel=f"test {what}",
            title=f"MLP ({cfg.mlp_depth} hidden layers) on {dataset}: {what} vs width")
    if example_curves:
        shown = {k: Curve(c.t, {"test": c.metrics["test"]}, c.num_models, c.label, c.info)
                 for k, c in example_curves.items() if " + " not in k or "naive" in k or "weight" in k}
        result.figures["curves"] = plots.interpolation_curves(
            shown, title="linear path A → aligned B, test split (pair 0)")
    result.data = {"records": records, "merge_many": mm_raw,
                   "curves": {k: c.to_dict() for k, c in example_curves.items()},
                   "train_seconds": zoo.seconds}
    n_train = min(cfg.train_limit or len(train), len(train))
    mlp_epochs = zoo.epochs(archs[0])
    result.notes += [
        f"{dataset}: pairs from seeds (2i, 2i+1): different initializations and batch orders; "
        f"{pairs} pair(s) per MLP width, {min(pairs, cfg.conv_pairs)} per conv net.",
        f"MLPs: {cfg.mlp_depth} hidden layers, widths {', '.join(map(str, cfg.mlp_widths))}, Adam "
        f"lr {cfg.lr}, {mlp_epochs} epoch(s) on {n_train} training examples.",
        f"Barriers on {len(splits['train'])} train / {len(splits['test'])} test examples, "
        f"{cfg.num_points} points on the path; BN reset, REPAIR and activation statistics from "
        f"{len(stats)} training examples.",
    ]
    if image:
        result.notes.append(f"Conv nets: {cfg.conv_optimizer} lr {cfg.lr} (weight decay "
                            f"{cfg.conv_weight_decay:g}, {cfg.conv_schedule} schedule), "
                            f"{cfg.conv_epochs} epoch(s) on "
                            f"{cfg.conv_train_limit or len(train)} training examples"
                            + ("" if cfg.ste_on_conv else "; STE matching on the MLPs only at this scale")
                            + ".")
    else:
        result.notes.append(f"{dataset} inputs are not images: MLPs only.")
    result.seconds = seconds
    return result


def _width_series(records: list[dict], mlp_archs: list[Arch], key: str) -> dict:
    series = {}
    for method in METHODS:
        for fix in ("none", "fix"):
            xs, ms, ss = [], [], []
            for arch in mlp_archs:
                vals = [r[key] for r in records if r["model"] == arch.label
                        and r["method"] == method and (r["fix"] == "none") == (fix == "none")]
                if vals:
                    m, s = mean_std(vals)
                    xs.append(arch.width)
                    ms.append(m)
                    ss.append(s)
            if xs:
                series[method + (" + REPAIR" if fix == "fix" else "")] = (xs, ms, ss)
    return series
