"""Cost of the WSA regularizer per training step, against the same step without it.

For each model a full SGD step (forward, cross-entropy, backward, optimizer step) is timed with
and without the penalty, interleaved (ABAB...) so that load from other processes hits both
alike; medians are reported. Times are the CPU time of the one torch thread
(`time.thread_time`, `torch.set_num_threads(1)`): on a shared machine wall-clock time mostly
measures the other processes. Also timed: the penalty alone (value + backward) and, for
comparison, the same penalty written naively with `torch.var_mean` and autograd (what the
closed-form backward of `basinmerge.wsa.LayerMoments` replaces).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

from basinmerge import models
from basinmerge.scope import divergence_terms, layer_stats
from basinmerge.wsa import WSARegularizer

COMMAND = ".venv/bin/python -m benchmarks bench_wsa"


def _interleaved(fns: dict[str, Callable[[], None]], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median thread-CPU seconds of each function, the calls interleaved round-robin."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(reps):
        order = names if i % 2 == 0 else names[::-1]
        for k in order:
            t0 = time.thread_time()
            fns[k]()
            times[k].append(time.thread_time() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


LAZY_EVERY = 8


def _case(name: str, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, reps: int,
          naive_step: bool = True) -> list:
    reg = WSARegularizer.from_init(net, lam=1.0)  # the CLI defaults: λ = 1, KL, mean
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    params = reg.bound_params(net)
    mu_t, sd_t = (t.to(torch.float32) for t in reg.target.tensors())

    def naive(model: torch.nn.Module) -> torch.Tensor:
        stats = [layer_stats(p) for p in params]
        mu, sd = torch.stack([m for m, _ in stats]), torch.stack([s for _, s in stats])
        return 1.0 * divergence_terms(mu, sd, mu_t, sd_t, "kl").mean()

    def step(penalty) -> Callable[[], None]:
        def run() -> None:
            loss = F.cross_entropy(net(x), y)
            if penalty is not None:
                loss = loss + penalty(net)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    def alone(penalty) -> Callable[[], None]:
        def run() -> None:
            penalty(net).backward()
            net.zero_grad(set_to_none=True)
        return run

    lazy = WSARegularizer(reg.target, lam=1.0, every=LAZY_EVERY)
    steps = {"plain": step(None), "wsa": step(reg), "lazy": step(lazy)}
    if naive_step:
        steps["naive"] = step(naive)
    t = _interleaved(steps, reps)
    # The penalty by itself is cheap: many more repetitions for a stable median.
    t.update(_interleaved({"reg": alone(reg), "naive_reg": alone(naive)}, 200))
    n_layers = len(reg.target)
    naive_ratio = f"{t['naive'] / t['plain']:.3f}" if naive_step else "—"
    return [name, n_layers, f"{t['plain'] * 1e3:.2f}", f"{t['wsa'] * 1e3:.2f}",
            f"{t['wsa'] / t['plain']:.3f}", f"{t['lazy'] / t['plain']:.3f}",
            f"{t['reg'] / t['plain']:.3f}", f"{t['reg'] / t['plain'] / LAZY_EVERY:.3f}", naive_ratio,
            f"{t['naive_reg'] / t['plain']:.3f}"]


def run() -> str:
    from basinmerge.console import markdown_table

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = _rows()
    finally:
        torch.set_num_threads(threads)
    cols = ["model (batch 128, CPU, 1 thread)", "scoped layers", "step ms", "step + WSA ms",
            "ratio (step + WSA) / step", f"ratio, lazy every={LAZY_EVERY}", "penalty alone / step",
            "lazy penalty per step / step", "naive: ratio",
            "naive: alone / step"]
    return "\n".join([
        "## WSA regularizer: cost per training step",
        "",
        f"Command: `{COMMAND}`",
        "",
        "One SGD step (forward, cross-entropy, backward, optimizer step) with and without "
        "`WSARegularizer` (KL, mean over layers, target = the initialization's scope), timed "
        "interleaved, medians of the thread's CPU time (one torch thread; wall-clock time on a "
        "shared machine mostly measures the other processes). *penalty alone*: the penalty's "
        "value and backward by itself, divided by the plain step. *naive*: the same penalty "
        "written with `torch.var_mean` and autograd, which `LayerMoments` (Σw and Σw² forward, "
        "one multiply-add backward) replaces.",
        "",
        markdown_table(cols, rows),
        "The step ratio carries a few percent of timing noise (a ratio below 1 is noise); the "
        "*penalty alone* column measures the added work directly. ResNet-20 meets the 2 % aim "
        "by far. The MLP does not: the penalty streams its 670k weights about four times (Σw, "
        "Σw², the closed-form gradient, its accumulation into `.grad`) while the step does "
        "little arithmetic per weight at batch 128, so on a memory-bound shared CPU the penalty "
        "costs a fifth of a step (the naive autograd version costs as much as the step itself). "
        f"With lazy regularization (`WSARegularizer(..., every={LAZY_EVERY})`: the penalty on one "
        f"step in {LAZY_EVERY}, scaled by {LAZY_EVERY}, the same gradient on average) the added "
        "work per step is the *penalty alone* cost divided by the interval, which brings the MLP "
        "within the 2–3 % range.",
    ])


def _rows() -> list[list]:
    g = torch.Generator().manual_seed(0)
    mlp = models.build("mlp", (1, 28, 28), 10, width=512, depth=2, seed=0)
    x_mlp = torch.randn(128, 1, 28, 28, generator=g)
    resnet = models.build("resnet20", (3, 32, 32), 10, width=1, seed=0)
    x_res = torch.randn(128, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (128,), generator=g)
    return [_case("MLP 784-512-512-10", mlp, x_mlp, y, reps=200),
            _case("ResNet-20 (×1, BN)", resnet, x_res, y, reps=11, naive_step=False)]
