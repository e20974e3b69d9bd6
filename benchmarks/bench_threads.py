"""One torch thread or two: the demo's workloads on this machine, idle and next to a busy process.

Workloads: one epoch of the demo's MLP (784-256-256-10, 20,000 Fashion-MNIST images, SGD batch
128) plus its evaluation on 5,000 test images; one epoch of a VGG-BN ×0.25 on 2,000 images.
Each is timed with `torch.set_num_threads(1)` and `(2)` alternately in this one process (one
warm-up of each first), REPEATS rounds, medians of wall-clock and process CPU time. "no
neighbour started": as the machine is (idle only if nobody else is using it; see the load
average); "busy neighbour": the same, while a second process started by the benchmark multiplies 512×512
matrices on one thread without pause (what another training run, an FL client or another user's
job does to a 2-core machine). The ratio is wall(2 threads) / wall(1 thread): above 1, the
second thread costs time. The machine's load average (1 min) is reported before each condition;
other users' processes count in it.

This measurement chose `basinmerge.threads.DEFAULT_THREADS`.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from basinmerge import data, models
from basinmerge.console import markdown_table
from basinmerge.train import evaluate, fit

COMMAND = ".venv/bin/python -m benchmarks bench_threads"
REPEATS = 3
ALONE = "no neighbour started"
BUSY = ("import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\n"
        "while True:\n    a = torch.tanh(a @ a)\n")


def _workloads() -> dict[str, Callable[[], None]]:
    name = data.first_available(("fashion-mnist", "mnist1d"))
    train = data.load(name, "train")
    train = train.subset(min(20000, len(train)), seed=0)
    test = data.load(name, "test")
    test = test.subset(min(5000, len(test)), seed=0)
    small = train.subset(2000, seed=0)

    def mlp() -> None:
        net = models.build("mlp", train.input_shape, train.num_classes, seed=0, width=256, depth=2)
        fit(net, train, epochs=1, progress=False)
        evaluate(net, test)

    def vgg() -> None:
        net = models.build("vgg", small.input_shape, small.num_classes, seed=0, width=0.25,
                           norm="batch")
        fit(net, small, epochs=1, progress=False)

    out = {f"MLP 256×2, 1 epoch on {len(train)} + eval {len(test)} ({name})": mlp}
    if len(small.input_shape) == 3:
        out[f"VGG-BN ×0.25, 1 epoch on {len(small)}"] = vgg
    return out


def _time(fn: Callable[[], None]) -> dict[int, tuple[float, float]]:
    for t in (1, 2):
        torch.set_num_threads(t)
        fn()
    res: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    for r in range(REPEATS):
        for t in (1, 2) if r % 2 == 0 else (2, 1):
            torch.set_num_threads(t)
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            res[t].append((time.perf_counter() - w0, time.process_time() - c0))
    return {t: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
            for t, v in res.items()}


def _load() -> float:
    return os.getloadavg()[0]


def run() -> str:
    before = torch.get_num_threads()
    work = _workloads()
    rows = []
    try:
        for condition in (ALONE, "busy neighbour"):
            proc = None
            if condition != ALONE:
                proc = subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
                time.sleep(1.0)
            try:
                load = _load()
                for name, fn in work.items():
                    t = _time(fn)
                    rows.append([name, condition, f"{load:.2f}", f"{t[1][0]:.2f}", f"{t[2][0]:.2f}",
                                 f"{t[1][1]:.2f}", f"{t[2][1]:.2f}", f"{t[2][0] / t[1][0]:.2f}"])
            finally:
                if proc is not None:
                    proc.kill()
                    proc.wait()
    finally:
        torch.set_num_threads(before)
    table = markdown_table(["workload", "condition", "load avg (1 min) before", "wall s, 1 thread",
                            "wall s, 2 threads", "CPU s, 1 thread", "CPU s, 2 threads",
                            "wall ratio 2 / 1"], rows)
    return f"""## torch threads: one or two per process

Command: `{COMMAND}`. {__doc__.split(chr(10) + chr(10))[1]}

{table}
The CLI runs one torch thread per process unless `BASINMERGE_THREADS` (or `OMP_NUM_THREADS`)
says otherwise (`basinmerge/threads.py`).
"""
