"""Training and evaluation on in-memory tensors (no DataLoader workers).

`fit(model, data, ...)` trains in place and returns a `History`; `evaluate(model, data)`
returns ``{"loss", "accuracy"}``. Training is bit-reproducible on the CPU for a fixed seed: the
batch order comes from a private generator and nothing touches the global RNG.

`Trainer` is the same loop as an object whose `step()` can be called from outside, so several
models can be trained in lockstep (e.g. WSA targets that follow the fused scope of runs
trained side by side).

Models are fed and scored through `basinmerge.adapter` (tensor or dict batches, outputs as
tensors or objects with ``.logits``, classification or causal-LM loss): `data` is anything
`basinmerge.adapter.as_data` accepts (a Dataset, ``(x, y)``, a DataLoader, ...).

A *penalty* is any callable ``model -> scalar tensor`` added to the loss (WSA, proximal term);
one with an ``on_step(step, model)`` method is told about every optimizer step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from basinmerge import adapter
from basinmerge.adapter import Data, as_data, forward_hooks
from basinmerge.console import progress_task
from basinmerge.errors import ConfigError, NonFiniteError
from basinmerge.state import first_nonfinite, module_mode

Penalty = Callable[[nn.Module], torch.Tensor]
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)

    @property
    def final(self) -> dict:
        return self.epochs[-1] if self.epochs else {}

    def to_dict(self) -> dict:
        return {"epochs": self.epochs}


def make_optimizer(params: Iterable[torch.nn.Parameter], optimizer: str, lr: float,
                   momentum: float = 0.9, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if lr <= 0 or not math.isfinite(lr):
        raise ConfigError(f"learning rate must be positive, got {lr}")
    if momentum < 0 or not math.isfinite(momentum):
        raise ConfigError(f"momentum must be >= 0, got {momentum}")
    if weight_decay < 0 or not math.isfinite(weight_decay):
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer '{optimizer}'; choose one of {', '.join(OPTIMIZERS)}")


class Trainer:
    """One training run, stepped from outside (`step`) or run to the end (`run`)."""

    def __init__(self, model: nn.Module, data, *, optimizer: str = "sgd", lr: float = 0.05,
                 momentum: float = 0.9, weight_decay: float = 0.0, batch_size: int = 128,
                 epochs: int = 1, schedule: str = "constant", seed: int = 0,
                 penalties: Sequence[Penalty] = (), device: str | torch.device | None = None,
                 drop_last: bool = False, task: str | None = None,
                 allow_nonfinite: bool = False):
        if epochs < 0:
            raise ConfigError(f"epochs must be >= 0, got {epochs}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule '{schedule}'; choose one of {', '.join(SCHEDULES)}")
        self.device = torch.device(device) if device is not None else next(
            iter(model.parameters())).device
        self.model = model.to(self.device)
        d = as_data(data, "training data")
        self.data = Data(adapter.to_device(d.inputs, self.device),
                         None if d.labels is None else d.labels.to(self.device))
        with module_mode(model, False):
            self.task = adapter.check_labels(model, self.data, "training data", task)
        self.n = len(self.data)
        self.batch_size = min(batch_size, self.n)
        if not drop_last and self.n > 1 and self.n % self.batch_size == 1 and has_batchnorm(model):
            # A last batch of one example would make BatchNorm fail ("expected more than 1 value
            # per channel"); that example is skipped in each epoch instead.
            drop_last = True
        self.drop_last = drop_last
        self.epochs = epochs
        self.penalties = list(penalties)
        self.allow_nonfinite = allow_nonfinite
        self.opt = make_optimizer(model.parameters(), optimizer, lr, momentum, weight_decay)
        self.steps_per_epoch = (self.n // self.batch_size if drop_last
                                else math.ceil(self.n / self.batch_size))
        self.total_steps = self.steps_per_epoch * epochs
        self.sched = (torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, max(1, self.total_steps))
                      if schedule == "cosine" else None)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.step_count = 0
        self.epoch = 0
        self._order: torch.Tensor | None = None
        self._pos = 0
        self._acc = self._zero_stats()
        self.history = History()

    @staticmethod
    def _zero_stats() -> dict:
        return {"loss": 0.0, "penalty": 0.0, "correct": 0, "seen": 0, "t0": time.perf_counter()}

    def _next_batch(self) -> torch.Tensor:
        if self._order is None or self._pos >= self.steps_per_epoch:
            self._order = torch.randperm(self.n, generator=self.gen).to(self.device)
            self._pos = 0
        i = self._pos * self.batch_size
        self._pos += 1
        return self._order[i:i + self.batch_size]

    def step(self) -> float:
        """One optimizer step; returns the batch's task loss. A model in eval mode is put in
        train mode; submodules the caller froze in eval mode (under a training model) stay so."""
        if not self.model.training:
            self.model.train()
        batch = self.data.take(self._next_batch())
        logits = adapter.forward(self.model, batch.inputs)
        loss, correct, count = adapter.loss_terms(logits, batch.labels, batch.inputs, self.task,
                                                  "mean")
        total = loss
        pen_value = 0.0
        if self.penalties:
            pen = torch.stack([p(self.model) for p in self.penalties]).sum()
            total = loss + pen
            pen_value = float(pen.detach())
        lv = float(loss.detach())
        if not self.allow_nonfinite and not (math.isfinite(lv) and math.isfinite(pen_value)):
            what = "loss" if not math.isfinite(lv) else "penalty"
            raise NonFiniteError(f"training diverged: the {what} is "
                                 f"{lv if what == 'loss' else pen_value} at step "
                                 f"{self.step_count + 1} (epoch {self.epoch + 1}); a lower learning "
                                 "rate may help")
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        self.step_count += 1
        for p in self.penalties:
            hook = getattr(p, "on_step", None)
            if hook is not None:
                hook(self.step_count, self.model)
        b = count  # examples (classification) or predicted tokens (causal LM)
        a = self._acc
        a["loss"] += lv * b
        a["penalty"] += pen_value * b
        a["correct"] += int(correct)
        a["seen"] += b
        if self._pos >= self.steps_per_epoch:
            self._end_epoch()
        return lv

    def _end_epoch(self) -> None:
        if not self.allow_nonfinite:
            # The last step's update can overflow with a finite loss; caught once per epoch.
            bad = first_nonfinite(self.model.state_dict())
            if bad is not None:
                raise NonFiniteError(f"training diverged: '{bad[0]}' holds {bad[1]} values after "
                                     f"step {self.step_count} (epoch {self.epoch + 1}); a lower "
                                     "learning rate may help")
        a = self._acc
        self.epoch += 1
        rec = {"epoch": self.epoch, "loss": a["loss"] / max(1, a["seen"]),
               "accuracy": a["correct"] / max(1, a["seen"]), "seconds": time.perf_counter() - a["t0"]}
        if self.penalties:
            rec["penalty"] = a["penalty"] / max(1, a["seen"])
        self.history.epochs.append(rec)
        self._acc = self._zero_stats()

    def run(self, progress: bool = True, eval_data=None, description: str = "train") -> History:
        with progress_task(description, self.total_steps, enabled=progress) as advance:
            while self.step_count < self.total_steps:
                loss = self.step()
                if self._pos == self.steps_per_epoch and eval_data is not None:
                    self.history.epochs[-1].update(
                        {f"test_{k}": v for k, v in
                         evaluate(self.model, eval_data, task=self.task).items()})
                advance(1, epoch=self.epoch + (self._pos < self.steps_per_epoch), loss=loss)
        return self.history


def train_lockstep(trainers: Sequence[Trainer]) -> None:
    """Step several trainers until each has done its `total_steps`, always stepping the one
    furthest behind in relative progress (alternating when their step counts match), so that
    a target refreshed from all of them sees runs at the same stage of training."""
    while True:
        todo = [t for t in trainers if t.step_count < t.total_steps]
        if not todo:
            return
        min(todo, key=lambda t: t.step_count / t.total_steps).step()


def fit(model: nn.Module, data, *, optimizer: str = "sgd", lr: float = 0.05,
        momentum: float = 0.9, weight_decay: float = 0.0, batch_size: int = 128, epochs: int = 1,
        schedule: str = "constant", seed: int = 0, penalties: Sequence[Penalty] = (),
        eval_data=None, device: str | torch.device | None = None, progress: bool = True,
        description: str = "train", task: str | None = None,
        allow_nonfinite: bool = False) -> History:
    """Train `model` in place with the task's loss (cross-entropy, or next-token loss for a
    causal LM; see `basinmerge.adapter`) plus `penalties`; returns the per-epoch history
    (loss, accuracy, penalty, and test metrics when `eval_data` is given). A NaN or Inf loss
    (or weights, checked after each epoch) stops training with `NonFiniteError` naming the
    step and epoch, unless `allow_nonfinite`."""
    trainer = Trainer(model, data, optimizer=optimizer, lr=lr, momentum=momentum,
                      weight_decay=weight_decay, batch_size=batch_size, epochs=epochs,
                      schedule=schedule, seed=seed, penalties=penalties, device=device, task=task,
                      allow_nonfinite=allow_nonfinite)
    return trainer.run(progress=progress, eval_data=eval_data, description=description)


@torch.no_grad()
def batched_outputs(model: nn.Module, data, batch_size: int = 1000,
                    train_mode: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
    """Run `data` (inputs alone, or any form `adapter.as_data` accepts) through `model` batch
    by batch without gradients, in eval mode (or train mode), yielding ``(start index,
    logits)``; the model's mode is restored afterwards. The one forward loop behind
    evaluation, prediction and every statistics pass (hooks, BN)."""
    with module_mode(model, train_mode):
        for i, _, logits in adapter.batched_logits(model, data, batch_size):
            yield i, logits


def predict_logits(model: nn.Module, data, batch_size: int = 1000) -> torch.Tensor:
    return torch.cat([out for _, out in batched_outputs(model, data, batch_size)])


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int = 1000, task: str | None = None) -> dict[str, float]:
    """Mean loss and accuracy in eval mode (the model's mode is restored): per example for
    classification, per predicted token for a causal LM (`basinmerge.adapter`)."""
    with module_mode(model, False):
        return adapter.evaluate_data(model, data, batch_size, task)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _even_batches(n: int, batch_size: int) -> list[slice]:
    """Split range(n) into ceil(n / batch_size) contiguous batches whose sizes differ by at most
    one, so that no batch is much smaller than the others (a batch of one breaks BatchNorm)."""
    k = max(1, math.ceil(n / batch_size))
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


@torch.no_grad()
def reset_bn_stats(model: nn.Module, data, batch_size: int = 500,
                   num_examples: int | None = None) -> nn.Module:
    """Recompute every BatchNorm's running statistics in place from `data`; returns `model`.

    One pass over `data` in train mode (each BatchNorm normalizes with its batch statistics, as
    during training, so later layers see what they saw in training); the input of every
    BatchNorm is accumulated exactly over the whole pass, and afterwards its ``running_mean``
    and ``running_var`` are the per-channel mean and the unbiased variance of that input over
    all examples (not an average of batch statistics, which would weight a short last batch
    like a full one and miss the between-batch variance). The mode and momenta are restored.
    Models without BatchNorm are returned unchanged. Needed after interpolating or merging BN
    models (variance collapse). `data`: any form `adapter.as_data` accepts (labels unused)."""
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return model
    x = as_data(data, "BatchNorm reset data", limit=num_examples)
    if len(x) < 2:
        raise ConfigError(f"reset_bn_stats needs at least 2 examples, got {len(x)}")
    # Per module: (count, mean, sum of squared deviations) in float64, merged batch by batch
    # with Chan's parallel formula (stable, unlike a raw sum of squares).
    stats: dict[nn.Module, tuple[int, torch.Tensor, torch.Tensor]] = {}

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        t = inputs[0].detach().to(torch.float64)
        dims = [d for d in range(t.ndim) if d != 1]
        nb = t.numel() // t.shape[1]
        mb = t.mean(dims)
        m2b = ((t - mb.view([1, -1] + [1] * (t.ndim - 2))) ** 2).sum(dims)
        if module not in stats:
            stats[module] = (nb, mb, m2b)
            return
        na, ma, m2a = stats[module]
        n = na + nb
        delta = mb - ma
        stats[module] = (n, ma + delta * (nb / n), m2a + m2b + delta ** 2 * (na * nb / n))

    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    try:
        with forward_hooks([(m, record) for m in bns], pre=True), module_mode(model, True):
            for sl in _even_batches(len(x), batch_size):
                adapter.forward(model, x.take(sl).inputs)
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
    for m in bns:
        n, mean, m2 = stats[m]
        assert m.running_mean is not None and m.running_var is not None  # track_running_stats
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_((m2 / max(1, n - 1)).to(m.running_var.dtype))
    return model
