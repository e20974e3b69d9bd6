"""`basinmerge.train.fit` against a bare PyTorch loop: one Fashion-MNIST epoch of an MLP
784-512-512-10 at batch 128 (SGD, momentum 0.9, lr 0.05), in the same process.

Both do the same work: the same initialization, the same `torch.randperm` batch order from a
generator seeded alike, cross-entropy, SGD; the final weights are checked to be bit-identical.
`fit` adds what a user sees: per-step loss/accuracy bookkeeping, the per-epoch history, and
(with ``progress=True``) a rich progress bar, drawn here as on a real terminal (a forced
terminal console writing to /dev/null), so its rendering cost is counted.

Timing: one warm-up run of each variant (the first optimizer a process builds imports
torch._dynamo, several seconds), then REPEATS rounds in rotating order; the median is reported,
as wall-clock seconds and as CPU seconds of the whole process (`time.process_time`, all
threads, the progress bar's refresh thread included). On a machine shared with other busy
processes the wall clock mostly measures the others; the CPU time of a single-threaded run (the
default; ``BASINMERGE_BENCH_THREADS=N`` sets another count) stays close to the work done. With
several torch threads the CPU time also counts OpenMP's spin-waiting, which grows under
contention, and the ratios turned to noise (0.82-1.03 on the quiet 2-core machine).

Memory: the process's peak resident set size (RSS high-water mark, ``resource.getrusage``
``ru_maxrss``) during each run. Linux lets a process reset that mark (writing 5 to
/proc/self/clear_refs), so each run's own peak is measured in this one process; "extra" is that
peak minus the RSS just before the run (the dataset, ~190 MB, is loaded before). tracemalloc
is not used: it sees only Python-level allocations, not torch's tensor memory.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

from basinmerge import console as console_mod
from basinmerge import data, models
from basinmerge.console import markdown_table
from basinmerge.train import fit

COMMAND = ".venv/bin/python -m benchmarks bench_train"
THREADS_ENV = "BASINMERGE_BENCH_THREADS"
REPEATS = 5
BATCH, LR, MOMENTUM, SEED = 128, 0.05, 0.9, 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _model() -> torch.nn.Module:
    return models.build("mlp", (1, 28, 28), 10, depth=2, width=512, seed=SEED)


def bare_epoch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """The loop one would write by hand."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    g = torch.Generator().manual_seed(SEED)
    model.train()
    n = x.shape[0]
    order = torch.randperm(n, generator=g)
    for i in range(0, n, BATCH):
        idx = order[i:i + BATCH]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _fit_epoch(ds: data.Dataset, progress: bool) -> Callable[[torch.nn.Module], None]:
    def run(model: torch.nn.Module) -> None:
        fit(model, ds, optimizer="sgd", lr=LR, momentum=MOMENTUM, batch_size=BATCH, epochs=1,
            seed=SEED, progress=progress)
    return run


def _terminal_progress():
    """Make progress bars render as on a terminal, into /dev/null; returns an undo function."""
    from rich.console import Console

    sink = open(os.devnull, "w")  # noqa: SIM115 - closed by the undo function
    old_console, old_quiet = console_mod.err_console, console_mod.is_quiet()
    console_mod.err_console = Console(file=sink, force_terminal=True, width=120)
    console_mod.set_quiet(False)

    def undo() -> None:
        console_mod.err_console = old_console
        console_mod.set_quiet(old_quiet)
        sink.close()

    return undo


def run() -> str:
    threads_env = os.environ.get(THREADS_ENV)
    threads = int(threads_env) if threads_env else 1  # one thread unless asked: see the docstring
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(f"{THREADS_ENV}={threads_env} {COMMAND}" if threads_env else COMMAND)
    finally:
        torch.set_num_threads(old_threads)


def _run(command: str) -> str:
    ds = data.load("fashion-mnist", "train")
    x, y = ds.x, ds.y
    variants: dict[str, Callable[[torch.nn.Module], None]] = {
        "bare PyTorch loop": lambda m: bare_epoch(m, x, y),
        "fit(progress=False)": _fit_epoch(ds, progress=False),
        "fit(progress=True)": _fit_epoch(ds, progress=True),
    }
    names = list(variants)
    undo = _terminal_progress()
    load_before = os.getloadavg()[0]
    try:
        # Warm-up on 2000 examples: imports, allocator, thread pool, rich.
        small = ds.subset(2000)
        bare_epoch(_model(), small.x, small.y)
        fit(_model(), small, batch_size=BATCH, progress=True)
        times: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        peaks: dict[str, list[float]] = {n: [] for n in names}
        extras: dict[str, list[float]] = {n: [] for n in names}
        finals: dict[str, dict[str, torch.Tensor]] = {}
        can_reset = True
        for r in range(REPEATS):
            for name in names[r % len(names):] + names[:r % len(names)]:
                model = _model()
                can_reset = _reset_peak_rss() and can_reset
                before = _rss_mb()
                t0, c0 = time.perf_counter(), time.process_time()
                variants[name](model)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                peaks[name].append(_peak_rss_mb())
                extras[name].append(_peak_rss_mb() - before)
                if r == 0:
                    finals[name] = {k: v.clone() for k, v in model.state_dict().items()}
    finally:
        undo()
    load_after = os.getloadavg()[0]

    ref = finals[names[0]]
    identical = all(all(torch.equal(ref[k], f[k]) for k in ref) for f in finals.values())
    steps = -(-len(ds) // BATCH)
    med = {n: statistics.median(times[n]) for n in names}
    med_cpu = {n: statistics.median(cpu[n]) for n in names}
    base, base_cpu = med[names[0]], med_cpu[names[0]]
    rows = [[name, f"{med[name]:.2f}", f"{med[name] / base:.3f}", f"{med_cpu[name]:.2f}",
             f"{med_cpu[name] / base_cpu:.3f}", f"{(med_cpu[name] - base_cpu) / steps * 1e6:+.0f}",
             f"{statistics.median(peaks[name]):.0f}", f"{statistics.median(extras[name]):.1f}"]
            for name in names]
    table = markdown_table(["variant", "wall s / epoch", "wall ratio", "CPU s / epoch",
                            "CPU ratio", "CPU overhead µs / step", "peak RSS MB",
                            "extra peak MB"], rows)
    spread = "; ".join(f"{n}: wall {min(times[n]):.2f}-{max(times[n]):.2f} s, CPU "
                       f"{min(cpu[n]):.2f}-{max(cpu[n]):.2f} s" for n in names)
    ratios = {n: (med[n] / base, med_cpu[n] / base_cpu) for n in names[1:]}
    verdict = ", ".join(f"`{n}` {w:.3f} wall / {c:.3f} CPU" for n, (w, c) in ratios.items())
    meets = all(c <= 1.1 for _, c in ratios.values())
    return f"""## Training loop: `fit` vs a bare PyTorch loop

Command: `{command}`

One epoch of Fashion-MNIST (60,000 examples, {steps} steps) for an MLP 784-512-512-10 at batch
{BATCH}, SGD (lr {LR}, momentum {MOMENTUM}), same initialization and batch order in every
variant; median of {REPEATS} interleaved runs after a warm-up; {torch.get_num_threads()} torch
thread(s). Final weights of `fit` and the bare loop bit-identical: {"yes" if identical else "NO"}.

{table}
Ratios to the bare loop: {verdict}. Target <= 1.1 on CPU time: {"met" if meets else "NOT met"}.
The progress bar is drawn as on a terminal (a forced rich terminal console writing to
/dev/null); its cost is its refresh thread (about 0.8 ms CPU per redraw, 4 redraws per second,
so it scales with wall time rather than with steps) plus a few µs per step.

Spread over the runs: {spread}.

Memory: "peak RSS" is the process's resident-set high-water mark (`resource.getrusage`
`ru_maxrss`) during that run, reset before each run through `/proc/self/clear_refs`
({"available" if can_reset else "NOT available here: peaks are cumulative"}); "extra peak" is
that peak minus the RSS just before the run. The normalized training tensors (~190 MB) are
loaded before the runs and counted in "peak RSS" but not in "extra". tracemalloc is not used:
it does not see torch's tensor allocations.

Load average (1 min) before / after: {load_before:.2f} / {load_after:.2f} on
{os.cpu_count()} cores. Above the core count the machine was shared with other busy processes:
read the CPU-time columns, the wall clock then mostly measures the others.
"""
