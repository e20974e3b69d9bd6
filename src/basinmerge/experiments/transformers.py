"""The transformers study: barriers between independently trained transformers, before and
after alignment (shared/REFERENCE.md §8).

- **ViT** (HF ``ViTForImageClassification``, patch 7 on Fashion-MNIST; 4 blocks of width 128
  at the quick scale): pairs trained from different seeds (initialization and batch order).
- **GPT-2-style LM** (HF ``GPT2LMHeadModel``, tied embeddings) trained byte-level on a code
  corpus read offline from the Python standard library's source (`stdlib_corpus`; the last
  10% of the bytes are the test split).
- **BERT-style masked LM** (HF ``BertForMaskedLM``, post-LN, tied decoder; the family of
  Verma & Elbayad 2024) trained byte-level on the same corpus: 15% of the bytes of each window
  are chosen (80% replaced by a mask token, 10% by a random byte, 10% kept) and predicted;
  loss and accuracy count the chosen bytes only.

For each pair, model B is aligned to A by: no alignment (``naive``), weight matching from the
identity (``weight``), weight matching with random restarts (``weight+restarts``), activation
matching (``activation``), weight matching started from activation matching
(``act->weight``), and activation matching followed by an orthogonal map of the residual stream
(``orthogonal``, after Theus et al. 2025; LayerNorms folded first, see
`basinmerge.align.orthogonal`; not for the post-LN BERT, whose LayerNorms sit on the residual
stream itself: their per-channel gain and the mean subtraction act on the stream, not on a
branch input, so they cannot be folded into the layers that read it and an orthogonal map of
the stream does not commute with them), and activation matching followed by REPAIR's
LayerNorm counterpart on every point of the path (``activation+ln-repair``: each LayerNorm's
output channels get the interpolated statistics of the endpoints'; ``activation+repair``: the
MLP hidden units as well; `basinmerge.align.repair`). The linear path between A and aligned B is evaluated on train
and test subsets; barriers follow Git Re-Basin's definition (`connectivity.barriers`).
MergeMany merges four ViTs. WSA: a ViT trained with SGD next to one trained with Adam (the
scope mismatch, symmetric KL), then the SGD run repeated under the WSA penalty toward the
Adam run's scope; its barrier to the Adam run is compared with the plain SGD run's.

Scales: ``smoke`` (tiny models, seconds; for tests), ``quick`` (4-block width-128 ViTs on 4,000
images for 2 epochs, 4-block width-64 LMs and MLMs for 300 steps; ~15-20 min on 2 idle CPU
cores), ``full`` (all of Fashion-MNIST for 12 epochs at batch 256, 6-block width-256 LMs and
MLMs for 3,000 steps, 3 pairs; for a GPU, not measured).
"""

from __future__ import annotations

import copy
import math
import sysconfig
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from basinmerge import adapter, plots
from basinmerge import data as data_mod
from basinmerge.align import align, merge_many
from basinmerge.align.repair import Repair
from basinmerge.connectivity import BARRIER_COLUMNS, Curve, barriers
from basinmerge.console import progress_task
from basinmerge.errors import ConfigError
from basinmerge.experiments.common import (
    ExperimentResult,
    StudyScale,
    Table,
    cpu_threads,
    mean_std,
)
from basinmerge.scope import symmetric_kl, weight_scope
from basinmerge.state import as_state_dict, lerp, weighted_average

METHODS = ("naive", "weight", "weight+restarts", "activation", "act->weight", "orthogonal",
           "activation+ln-repair", "activation+repair")
# Methods that REPAIR every point of the path: (alignment, REPAIR mode).
REPAIRED = {"activation+ln-repair": ("activation", "layernorm"),
            "activation+repair": ("activation", "both")}
# Orthogonal alignment folds pre-LN LayerNorms; BERT is post-LN (see the module docstring).
SKIPPED = {"bert-mlm": ("orthogonal",)}
FAMILIES = ("vit", "gpt2-lm", "bert-mlm")
MASK_ID, PAD_ID = 256, 257  # the MLM's extra tokens after the 256 bytes


@dataclass(frozen=True)
class ScaleConfig(StudyScale, study="transformers"):
    vit_blocks: int
    vit_dim: int
    vit_heads: int
    vit_mlp: int
    train_limit: int | None
    epochs: int
    eval_limit: int
    stats_examples: int
    lm_blocks: int
    lm_dim: int
    lm_heads: int
    lm_ctx: int
    corpus_bytes: int
    lm_steps: int
    lm_eval_windows: int
    num_points: int
    restarts: int
    pairs: int
    mlm_blocks: int = 4
    mlm_dim: int = 64
    mlm_heads: int = 4
    mlm_mlp: int = 256
    mlm_steps: int = 300
    mlm_mask_prob: float = 0.15
    merge_models: int = 4
    wsa_lambda: float = 1.0
    batch_size: int = 64
    lr: float = 1e-3
    lm_batch_size: int = 64


ScaleConfig.define("smoke", vit_blocks=2, vit_dim=32, vit_heads=4, vit_mlp=64, train_limit=256,
                    epochs=1, eval_limit=128, stats_examples=64, lm_blocks=2, lm_dim=32,
                    lm_heads=4, lm_ctx=32, corpus_bytes=60_000, lm_steps=20,
                    lm_eval_windows=32, num_points=3, restarts=1, pairs=1, merge_models=3,
                    mlm_blocks=2, mlm_dim=32, mlm_heads=4, mlm_mlp=64, mlm_steps=20)
ScaleConfig.define("quick", vit_blocks=4, vit_dim=128, vit_heads=4, vit_mlp=256, train_limit=4000,
                    epochs=2, eval_limit=1000, stats_examples=256, lm_blocks=4, lm_dim=64,
                    lm_heads=4, lm_ctx=64, corpus_bytes=1_000_000, lm_steps=300,
                    lm_eval_windows=128, num_points=7, restarts=2, pairs=1,
                    lm_batch_size=32)
ScaleConfig.define("full", vit_blocks=4, vit_dim=128, vit_heads=4, vit_mlp=512, train_limit=None,
                    epochs=12, eval_limit=5000, stats_examples=2000, lm_blocks=6,
                    lm_dim=256, lm_heads=8, lm_ctx=128, corpus_bytes=20_000_000,
                    lm_steps=3000, lm_eval_windows=1024, num_points=13, restarts=5, pairs=3,
                    batch_size=256, lm_batch_size=64, mlm_blocks=6, mlm_dim=256,
                    mlm_heads=8, mlm_mlp=1024, mlm_steps=3000)
SCALE_CONFIGS = ScaleConfig.defined()


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the hf extra is installed in development
        raise ConfigError("the transformers study needs the 'transformers' package "
                          "(pip install 'basinmerge[hf]')") from e
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    return transformers


# --------------------------------------------------------------------------- models and data
# Tasks: "image" (ViT classification), "clm" (next byte), "mlm" (masked bytes).


def build_vit(cfg: ScaleConfig, image_shape, num_classes: int, seed: int) -> nn.Module:
    tf = _transformers()
    c, h, _ = image_shape
    patch = 7 if h % 7 == 0 else 4 if h % 4 == 0 else 1
    torch.manual_seed(seed)
    return tf.ViTForImageClassification(tf.ViTConfig(
        hidden_size=cfg.vit_dim, num_hidden_layers=cfg.vit_blocks,
        num_attention_heads=cfg.vit_heads, intermediate_size=cfg.vit_mlp, image_size=h,
        patch_size=patch, num_channels=c, num_labels=num_classes, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))


def build_lm(cfg: ScaleConfig, seed: int) -> nn.Module:
    tf = _transformers()
    torch.manual_seed(seed)
    return tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=256, n_embd=cfg.lm_dim, n_layer=cfg.lm_blocks, n_head=cfg.lm_heads,
        n_positions=cfg.lm_ctx, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0))


def build_mlm(cfg: ScaleConfig, seed: int) -> nn.Module:
    """A byte-level BERT masked LM (post-LN, decoder tied to the word embedding)."""
    tf = _transformers()
    torch.manual_seed(seed)
    return tf.BertForMaskedLM(tf.BertConfig(
        vocab_size=PAD_ID + 1, hidden_size=cfg.mlm_dim, num_hidden_layers=cfg.mlm_blocks,
        num_attention_heads=cfg.mlm_heads, intermediate_size=cfg.mlm_mlp,
        max_position_embeddings=cfg.lm_ctx, type_vocab_size=1, pad_token_id=PAD_ID,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def stdlib_corpus(max_bytes: int) -> torch.Tensor:
    """Bytes of the Python standard library's ``.py`` files (sorted paths, so the corpus is
    the same on every run of one Python), at most `max_bytes`, as a uint8 tensor."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if total >= max_bytes:
            break
        try:
            b = path.read_bytes()
        except OSError:
            continue
        chunks.append(b[:max_bytes - total])
        total += len(chunks[-1])
    if total < 1000:
        raise ConfigError(f"the standard library source under {root} is missing or too small "
                          "for the language-model corpus")
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()


def _windows(stream: torch.Tensor, n: int, ctx: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - ctx - 1, (n,), generator=gen)
    return torch.stack([stream[s:s + ctx + 1] for s in starts.tolist()])


def mask_windows(windows: torch.Tensor, prob: float,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of byte windows: (inputs, labels). Each byte is chosen with probability
    `prob` (at least one per window); of the chosen, 80% become the mask token, 10% a random
    byte, 10% stay. Labels are the chosen bytes, -100 elsewhere (ignored)."""
    chosen = torch.rand(windows.shape, generator=gen) < prob
    chosen[torch.arange(len(windows)), torch.randint(0, windows.shape[1], (len(windows),),
                                                     generator=gen)] = True
    how = torch.rand(windows.shape, generator=gen)
    inputs = windows.clone()
    inputs[chosen & (how < 0.8)] = MASK_ID
    noise = chosen & (how >= 0.8) & (how < 0.9)
    inputs[noise] = torch.randint(0, 256, (int(noise.sum()),), generator=gen)
    return inputs, torch.where(chosen, windows, torch.full_like(windows, -100))


def _logits(model: nn.Module, x: torch.Tensor, task: str) -> torch.Tensor:
    return adapter.forward(model, {"pixel_values": x} if task == "image" else {"input_ids": x})


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, task: str) -> tuple:
    """(summed loss, correct predictions, count) of one batch; clm: next-token on x; mlm: the
    bytes whose label is not -100."""
    if task == "clm":
        logits = _logits(model, x[:, :-1], task)
        flat, tgt = logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)
    elif y is None:
        raise ValueError(f"{task} batches need labels")
    elif task == "mlm":
        logits = _logits(model, x, task)
        flat, tgt = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        keep = tgt != -100
        flat, tgt = flat[keep], tgt[keep]
    else:
        flat, tgt = _logits(model, x, task), y
    loss = F.cross_entropy(flat, tgt, reduction="sum")
    return loss, (flat.argmax(-1) == tgt).sum(), tgt.numel()


@torch.no_grad()
def evaluate(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor | None, task: str,
             device: str, batch_size: int = 256) -> dict[str, float]:
    model.eval()
    total, correct, count = 0.0, 0, 0
    for i in range(0, xs.shape[0], batch_size):
        y = ys[i:i + batch_size].to(device) if ys is not None else None
        loss, c, n = _loss(model, xs[i:i + batch_size].to(device), y, task)
        total, correct, count = total + float(loss), correct + int(c), count + n
    return {"loss": total / count, "accuracy": correct / count}


def train(model: nn.Module, sampler, steps: int, task: str, device: str, lr: float,
          optimizer: str = "adam", penalty=None) -> nn.Module:
    """`steps` optimizer steps on batches from `sampler(step)` (AdamW or SGD with momentum);
    `penalty(model)` is added to the loss when given."""
    model.to(device).train()
    opt = (torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0) if optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=lr * 50, momentum=0.9))
    for step in range(steps):
        x, y = sampler(step)
        loss, _, n = _loss(model, x.to(device), y.to(device) if y is not None else None, task)
        loss = loss / n
        if penalty is not None:
            loss = loss + penalty(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


# --------------------------------------------------------------------------- alignment and paths


def _align(method: str, a: nn.Module, b: nn.Module, stats, cfg: ScaleConfig, seed: int):
    """(model A as used on the path, aligned B, seconds); orthogonal alignment returns both
    in RMSNorm form. A REPAIRed method aligns as its base method."""
    method = REPAIRED.get(method, (method, None))[0]
    t0 = time.perf_counter()
    if method == "naive":
        out = b
    elif method == "weight":
        out = align(a, b, "weight", seed=seed)
    elif method == "weight+restarts":
        out = align(a, b, "weight", seed=seed, restarts=cfg.restarts)
    elif method == "activation":
        out = align(a, b, "activation", stats, num_examples=cfg.stats_examples)
    elif method == "act->weight":
        out = align(a, b, "weight", stats, init="activation", num_examples=cfg.stats_examples,
                    seed=seed)
    elif method == "orthogonal":
        from basinmerge.align.orthogonal import orthogonal_align

        a, out = orthogonal_align(a, b, stats, num_examples=cfg.stats_examples)
    else:
        raise ConfigError(f"unknown method '{method}'")
    return a, out, time.perf_counter() - t0


def path_curve(a: nn.Module, b: nn.Module, splits: dict, task: str, device: str,
               num_points: int, label: str, repair: Repair | None = None) -> Curve:
    """Loss and accuracy along the linear path between the states of `a` and `b`; with
    `repair`, every point between the ends is REPAIRed first."""
    sa, sb = as_state_dict(a), as_state_dict(b)
    net = copy.deepcopy(a)
    ts = [i / (num_points - 1) for i in range(num_points)]
    metrics: dict[str, dict[str, list[float]]] = {s: {"loss": [], "accuracy": []} for s in splits}
    for t in ts:
        net.load_state_dict(lerp(sa, sb, t))
        point = repair(net, t) if repair is not None and 0 < t < 1 else net
        for s, (x, y) in splits.items():
            m = evaluate(point, x, y, task, device)
            metrics[s]["loss"].append(m["loss"])
            metrics[s]["accuracy"].append(m["accuracy"])
    return Curve(ts, metrics, 2, label)


def _barrier_rows(model: str, pair: int, curve: Curve, method: str, secs: float,
                  extra: dict | None = None) -> list[dict]:
    return [{"model": model, "pair": pair, "method": method, "align_seconds": secs,
             **(extra or {}), **{f"{s}_{k}": v for s, m in barriers(curve).items() for k, v in m.items()}}]


def _objective(a: nn.Module, b: nn.Module) -> float:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return float(sum(torch.dot(pa[k].detach().double().reshape(-1), pb[k].detach().double().reshape(-1))
                     for k in pa))


# --------------------------------------------------------------------------- the study


@dataclass
class _Family:
    """One model family of the study: how to train a model from a seed, the evaluation splits
    (name -> (inputs, labels)), the inputs for activation statistics and REPAIR, the task."""

    name: str
    make: Callable[[int], nn.Module]
    splits: dict
    stats: Any
    task: str

    def methods(self, methods) -> list[str]:
        return [m for m in methods if m not in SKIPPED.get(self.name, ())]


class _Study:
    """The data, samplers and model builders of one run."""

    def __init__(self, cfg: ScaleConfig, dataset: str, root: str | None, device: str):
        self.cfg, self.device = cfg, device
        train_ds = data_mod.load(dataset, "train", root)
        test_ds = data_mod.load(dataset, "test", root)
        if len(train_ds.input_shape) != 3:
            raise ConfigError(f"the transformers study needs an image dataset, '{dataset}' is not one")
        if cfg.train_limit is not None and cfg.train_limit < len(train_ds):
            train_ds = train_ds.subset(cfg.train_limit, seed=7)
        self.train_ds = train_ds
        corpus = stdlib_corpus(cfg.corpus_bytes)
        cut = int(len(corpus) * 0.9)
        self.lm_train, lm_test = corpus[:cut], corpus[cut:]
        g_eval = torch.Generator().manual_seed(1)
        self.vit_splits = {"train": (train_ds.x[:cfg.eval_limit], train_ds.y[:cfg.eval_limit]),
                           "test": (test_ds.x[:cfg.eval_limit], test_ds.y[:cfg.eval_limit])}
        self.lm_splits = {
            "train": (_windows(self.lm_train, cfg.lm_eval_windows, cfg.lm_ctx, g_eval), None),
            "test": (_windows(lm_test, cfg.lm_eval_windows, cfg.lm_ctx, g_eval), None)}
        g_mask = torch.Generator().manual_seed(2)
        self.mlm_splits = {s: mask_windows(x[:, :-1], cfg.mlm_mask_prob, g_mask)
                           for s, (x, _) in self.lm_splits.items()}
        self.vit_stats = train_ds.x[:cfg.stats_examples]
        self.steps_per_epoch = math.ceil(len(train_ds) / cfg.batch_size)

    def families(self) -> list[_Family]:
        cfg = self.cfg
        return [_Family("vit", self.vit, self.vit_splits, self.vit_stats, "image"),
                _Family("gpt2-lm", self.lm, self.lm_splits,
                        {"input_ids": self.lm_splits["train"][0][:cfg.stats_examples, :-1]}, "clm"),
                _Family("bert-mlm", self.mlm, self.mlm_splits,
                        {"input_ids": self.mlm_splits["train"][0][:cfg.stats_examples]}, "mlm")]

    def _vit_sampler(self, seed: int):
        cfg, ds, per_epoch = self.cfg, self.train_ds, self.steps_per_epoch
        gen = torch.Generator().manual_seed(10_000 + seed)
        order = torch.empty(0, dtype=torch.long)

        def sample(step: int):
            nonlocal order
            if step % per_epoch == 0:
                order = torch.randperm(len(ds), generator=gen)
            idx = order[(step % per_epoch) * cfg.batch_size:][:cfg.batch_size]
            return ds.x[idx], ds.y[idx]
        return sample

    def vit(self, seed: int, optimizer: str = "adam", penalty_from=None) -> nn.Module:
        cfg, ds = self.cfg, self.train_ds
        net = build_vit(cfg, ds.input_shape, ds.num_classes, seed)
        penalty = None
        if penalty_from is not None:
            from basinmerge.wsa import WSARegularizer

            penalty = WSARegularizer.from_reference(penalty_from, cfg.wsa_lambda)
        return train(net, self._vit_sampler(seed), cfg.epochs * self.steps_per_epoch, "image",
                     self.device, cfg.lr, optimizer, penalty)

    def lm(self, seed: int) -> nn.Module:
        cfg = self.cfg
        gen = torch.Generator().manual_seed(20_000 + seed)
        return train(build_lm(cfg, seed),
                     lambda step: (_windows(self.lm_train, cfg.lm_batch_size, cfg.lm_ctx, gen), None),
                     cfg.lm_steps, "clm", self.device, cfg.lr)

    def mlm(self, seed: int) -> nn.Module:
        cfg = self.cfg
        gen = torch.Generator().manual_seed(30_000 + seed)

        def sample(step: int):
            return mask_windows(_windows(self.lm_train, cfg.lm_batch_size, cfg.lm_ctx - 1, gen),
                                cfg.mlm_mask_prob, gen)
        return train(build_mlm(cfg, seed), sample, cfg.mlm_steps, "mlm", self.device, cfg.lr)


def _check_args(scale: str, seeds: int | None, methods, device: str) -> tuple[ScaleConfig, int]:
    cfg = ScaleConfig.at(scale, pairs=seeds)
    pairs = cfg.pairs
    if pairs < 1:
        raise ConfigError(f"seeds (pairs of models per family) must be >= 1, got {pairs}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ConfigError(f"unknown method '{bad[0]}'; choose from {', '.join(METHODS)}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: no CUDA device is available")
    _transformers()
    return cfg, pairs


def _pair_rows(fam: _Family, p: int, a: nn.Module, b: nn.Module, methods, cfg: ScaleConfig,
               device: str, advance) -> tuple[list[dict], dict[str, Curve]]:
    """Barrier rows and curves of one pair of a family, one per method."""
    rows: list[dict] = []
    curves: dict[str, Curve] = {}
    for method in fam.methods(methods):
        aa, bb, secs = _align(method, a, b, fam.stats, cfg, seed=p)
        mode = REPAIRED.get(method, (None, None))[1]
        fix = (Repair([aa, bb], fam.stats, num_examples=cfg.stats_examples, mode=mode)
               if mode is not None else None)
        curve = path_curve(aa, bb, fam.splits, fam.task, device, cfg.num_points,
                           f"{fam.name} {method}", fix)
        curves[curve.label] = curve
        info = getattr(bb, "alignment", {}) or {}
        rows += _barrier_rows(fam.name, p, curve, method, secs,
                              {"weight_objective": _objective(aa, bb), "sweeps": info.get("sweeps")})
        advance(step=f"{fam.name} {method}")
    return rows, curves


def _barrier_stage(study: _Study, pairs: int, methods, advance
                   ) -> tuple[list[dict], dict[str, Curve], dict[tuple[str, int], nn.Module]]:
    """Train each family's pairs and measure every method's path; the curves of pair 0."""
    rows: list[dict] = []
    curves: dict[str, Curve] = {}
    zoo: dict[tuple[str, int], nn.Module] = {}
    for fam in study.families():
        for p in range(pairs):
            for s in (2 * p, 2 * p + 1):
                zoo[(fam.name, s)] = fam.make(s)
                advance(step=f"{fam.name} seed {s}")
            pair_rows, pair_curves = _pair_rows(fam, p, zoo[(fam.name, 2 * p)],
                                                zoo[(fam.name, 2 * p + 1)], methods, study.cfg,
                                                study.device, advance)
            rows += pair_rows
            if p == 0:
                curves.update(pair_curves)
    return rows, curves, zoo


def _wsa_stage(study: _Study, vits: list[nn.Module], advance) -> list[list]:
    """SGD vs AdamW scope mismatch, and the SGD run under WSA toward the AdamW run's scope."""
    cfg = study.cfg
    adam = vits[0]
    sgd = study.vit(1, "sgd")
    advance(step="vit sgd")
    sgd_wsa = study.vit(1, "sgd", penalty_from=adam)
    advance(step="vit sgd+wsa")
    rows = []
    for label, other in (("seed 1 adam", vits[1]), ("seed 1 sgd", sgd),
                         ("seed 1 sgd + WSA", sgd_wsa)):
        sym = symmetric_kl(weight_scope(adam), weight_scope(other))
        for method in ("naive", "activation"):
            aa, bb, _ = _align(method, adam, other, study.vit_stats, cfg, seed=0)
            bar = barriers(path_curve(aa, bb, study.vit_splits, "image", study.device,
                                      cfg.num_points, label))
            rows.append([label, method, sym, bar["test"]["acc_b"], bar["test"]["loss_barrier"],
                         bar["test"]["acc_barrier"]])
    advance(step="wsa")
    return rows


def run(*, dataset: str = "fashion-mnist", scale: str = "quick", seeds: int | None = None,
        out=None, device: str = "cpu", root: str | None = None, threads: int | None = 1,
        progress: bool = True, methods=METHODS) -> ExperimentResult:
    """Run the study (see the module docstring). `seeds`: model pairs per family (default: the
    scale's); `threads`: torch CPU threads during the run, restored afterwards. `out` is
    unused (the CLI writes the result)."""
    del out
    cfg, pairs = _check_args(scale, seeds, methods, device)
    study = _Study(cfg, dataset, root, device)
    n_jobs = sum(pairs * (2 + len(f.methods(methods))) for f in study.families()) \
        + cfg.merge_models + 4
    with cpu_threads(threads, device):
        t_start = time.perf_counter()
        with progress_task("transformers", n_jobs, enabled=progress) as advance:
            rows, curves, zoo = _barrier_stage(study, pairs, methods, advance)
            vits = [zoo.get(("vit", s)) or study.vit(s) for s in range(cfg.merge_models)]
            advance(cfg.merge_models, step="vit zoo")
            merge_rows = _merge_rows(vits, study.vit_splits, device, study.vit_stats,
                                     cfg.stats_examples)
            advance(step="merge many")
            wsa_rows = _wsa_stage(study, vits, advance)
        seconds = time.perf_counter() - t_start
    return _result(study, scale, pairs, methods, rows, curves, merge_rows, wsa_rows, len(vits),
                   seconds)


def _result(study: _Study, scale: str, pairs: int, methods, rows: list[dict],
            curves: dict[str, Curve], merge_rows: list[list], wsa_rows: list[list],
            num_vits: int, seconds: float) -> ExperimentResult:
    cfg = study.cfg
    tables = {"barriers": _summary(rows, methods)}
    tables["mergemany"] = Table(["merge", "test loss", "test accuracy"], merge_rows,
                                f"{num_vits} ViTs from different seeds")
    tables["wsa"] = Table(["model B (A: seed 0 adam)", "alignment", "scope sym. KL",
                           "B test acc", "test loss barrier", "test acc barrier"], wsa_rows,
                          f"WSA (λ = {cfg.wsa_lambda}) toward the Adam run's scope")
    figures = {}
    for family in FAMILIES:
        fam = {k.split(" ", 1)[1]: c for k, c in curves.items() if k.startswith(family + " ")}
        if fam:
            figures[f"paths_{family}"] = plots.interpolation_curves(
                fam, title=f"{family}: linear paths after alignment")
    notes = []
    if cfg.train_limit is not None:
        notes.append(f"scale {scale}: ViTs trained on {len(study.train_ds)} examples for "
                     f"{cfg.epochs} epochs; LMs {cfg.lm_steps} steps and MLMs {cfg.mlm_steps} "
                     f"steps on {len(study.lm_train)} bytes")
    if "orthogonal" in methods:
        notes.append("bert-mlm: no orthogonal alignment (post-LN: the LayerNorms sit on the "
                     "residual stream and cannot be folded, so an orthogonal map of the stream "
                     "does not commute with them)")
    return ExperimentResult("transformers", {"scale": scale, "pairs": pairs,
                                             "device": study.device, "methods": list(methods),
                                             **asdict(cfg)},
                            tables, figures, {"records": rows}, notes, seconds=seconds)


def _summary(rows: list[dict], methods) -> Table:
    out = []
    for family in dict.fromkeys(r["model"] for r in rows):
        for method in methods:
            rs = [r for r in rows if r["model"] == family and r["method"] == method]
            if not rs:
                continue
            lb, _ = mean_std([r["test_loss_barrier"] for r in rs])
            ab, _ = mean_std([r["test_acc_barrier"] for r in rs])
            tb, _ = mean_std([r["train_loss_barrier"] for r in rs])
            mid, _ = mean_std([r["test_mid_acc"] for r in rs])
            ends, _ = mean_std([(r["test_acc_a"] + r["test_acc_b"]) / 2 for r in rs])
            secs, _ = mean_std([r["align_seconds"] for r in rs])
            out.append([family, method, len(rs), ends, mid, tb, lb, ab, secs])
    return Table(["model", "alignment", "pairs", "endpoint test acc", "midpoint test acc",
                  "train loss barrier", "test loss barrier", "test acc barrier", "align s"], out,
                 "barriers on the linear path between model A and aligned model B (Git Re-Basin's "
                 "definition); LM accuracy = next-byte accuracy, MLM accuracy = masked-byte accuracy")


def _merge_rows(vits: list[nn.Module], splits: dict, device: str, stats,
                num_examples: int) -> list[list]:
    x, y = splits["test"]
    rows = []
    for i, m in enumerate(vits):
        e = evaluate(m, x, y, "image", device)
        rows.append([f"model {i}", e["loss"], e["accuracy"]])
    net = copy.deepcopy(vits[0])
    net.load_state_dict(weighted_average([as_state_dict(m) for m in vits]))
    e = evaluate(net, x, y, "image", device)
    rows.append(["naive average", e["loss"], e["accuracy"]])
    merged, _ = merge_many(vits)
    net.load_state_dict(merged)
    e = evaluate(net, x, y, "image", device)
    rows.append(["MergeMany (weight matching)", e["loss"], e["accuracy"]])
    anchored = [as_state_dict(vits[0])] + [
        as_state_dict(align(vits[0], m, "activation", stats, num_examples=num_examples))
        for m in vits[1:]]
    net.load_state_dict(weighted_average(anchored))
    e = evaluate(net, x, y, "image", device)
    rows.append(["all aligned to model 0 (activation matching), averaged", e["loss"],
                 e["accuracy"]])
    return rows


__all__ = ["FAMILIES", "METHODS", "SCALE_CONFIGS", "BARRIER_COLUMNS", "build_lm", "build_mlm",
           "build_vit", "mask_windows", "run", "stdlib_corpus"]
