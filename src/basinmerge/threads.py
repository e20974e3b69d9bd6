"""How many CPU threads torch uses per process.

Default: one. Measured on the 2-core machine (docs/benchmarks.md, "torch threads"): the models
here are small, so a second intra-op thread buys little even on an idle machine and costs a lot
when the other core is busy (threads that wait on each other while another process holds a
core); FL and study runs also start several processes. ``BASINMERGE_THREADS=N`` (or
``OMP_NUM_THREADS=N``) chooses otherwise; ``BASINMERGE_THREADS=0`` keeps torch's own default
(one per core).
"""

from __future__ import annotations

import os
import sys

DEFAULT_THREADS = 1


def wanted() -> int | None:
    """The thread count to use: BASINMERGE_THREADS, else OMP_NUM_THREADS, else the default;
    None to leave torch's own choice."""
    for var in ("BASINMERGE_THREADS", "OMP_NUM_THREADS"):
        raw = os.environ.get(var, "").strip()
        if raw:
            try:
                n = int(raw)
            except ValueError:
                continue
            return None if n <= 0 and var == "BASINMERGE_THREADS" else max(1, n)
    return DEFAULT_THREADS


def apply_default() -> int | None:
    """Apply `wanted()` to this process (the CLI calls it first). Without importing torch when it
    is not loaded yet (the CLI starts fast): then OMP_NUM_THREADS is set for torch to read."""
    n = wanted()
    if n is None:
        return None
    torch = sys.modules.get("torch")
    if torch is not None:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    else:
        os.environ["OMP_NUM_THREADS"] = str(n)
    return n
