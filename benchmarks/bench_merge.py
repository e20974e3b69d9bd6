"""Peak memory and time of `average` and `ties` over K = 8 checkpoints: streaming
(`basinmerge.merge.stream_merge`) vs loading every checkpoint and merging in memory.

Checkpoints of random float32 tensors (~200 MB each by default) are written to a temporary
folder. Every variant runs in a fresh worker process started by a small launcher process that
reads the worker's peak RSS with ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``, so the
numbers of different variants never mix. The worker times only the merge itself (reading,
merging, writing the output), not the Python / torch start-up; a worker that only imports
gives the start-up RSS that is subtracted in the "above start-up" column.

Run: ``.venv/bin/python -m benchmarks bench_merge`` (env: ``BENCH_MERGE_MB`` checkpoint size,
``BENCH_MERGE_K`` number of checkpoints).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = (
    "import resource, subprocess, sys\n"
    "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "sys.stderr.write(r.stderr)\n"
    "if r.returncode: sys.exit(r.returncode)\n"
    "print(r.stdout.strip())\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)
TENSOR_FLOATS = 2_500_000  # 10 MB float32 tensors


def make_checkpoints(folder: Path, k: int, size_mb: int) -> tuple[list[Path], Path, int]:
    """K random checkpoints and a base, each about `size_mb` MB; returns (paths, base, bytes)."""
    import torch

    from basinmerge.io import save_state

    n_tensors = max(1, round(size_mb * 1e6 / (TENSOR_FLOATS * 4)))
    paths = []
    for i in range(k + 1):
        g = torch.Generator().manual_seed(i)
        state = {f"layer{j}.weight": torch.randn(TENSOR_FLOATS, generator=g) * 0.02
                 for j in range(n_tensors)}
        state["step"] = torch.tensor(i)
        paths.append(save_state(state, folder / f"ckpt{i}.safetensors"))
        del state
    return paths[1:], paths[0], paths[1].stat().st_size


def worker(variant: str, method: str, out: str, base: str, paths: list[str]) -> None:
    """One measured run; prints the merge's wall seconds."""
    from basinmerge import io
    from basinmerge.merge import merge, stream_merge

    opts = {"density": 0.2} if method == "ties" else {}
    base_arg = base if method == "ties" else None
    t0 = time.perf_counter()
    if variant == "stream":
        stream_merge(paths, method, out, base=base_arg, **opts)
    elif variant == "load-all":
        states = [io.load_state(p)[0] for p in paths]
        b = io.load_state(base_arg)[0] if base_arg else None
        io.save_state(merge(states, method, base=b, **opts), out)
    print(f"{time.perf_counter() - t0:.4f}")


def measure(variant: str, method: str, out: Path, base: Path, paths: list[Path]) -> tuple[float, float]:
    """(seconds, peak RSS in bytes) of one variant in a fresh process."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}")
    cmd = [sys.executable, "-c", LAUNCHER, sys.executable, "-m", "benchmarks.bench_merge",
           "--worker", variant, method, str(out), str(base), *map(str, paths)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if r.returncode:
        raise RuntimeError(f"{variant}/{method} failed: {r.stderr.strip()[-2000:]}")
    seconds, maxrss_kb = r.stdout.split()[-2:]
    return float(seconds), int(maxrss_kb) * 1024


def run() -> str:
    k = int(os.environ.get("BENCH_MERGE_K", "8"))
    size_mb = int(os.environ.get("BENCH_MERGE_MB", "200"))
    rows = []
    results: dict[tuple[str, str], tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_merge_") as tmp:
        folder = Path(tmp)
        paths, base, size = make_checkpoints(folder, k, size_mb)
        _, startup = measure("import-only", "average", folder / "none", base, paths)
        for method in ("average", "ties"):
            for variant in ("load-all", "stream"):
                out = folder / f"out_{method}_{variant}.safetensors"
                results[(method, variant)] = measure(variant, method, out, base, paths)
                out.unlink(missing_ok=True)
        for method in ("average", "ties"):
            t_all, m_all = results[(method, "load-all")]
            for variant in ("load-all", "stream"):
                t, m = results[(method, variant)]
                rows.append([method, variant, f"{t:.1f}", f"{t / t_all:.2f}",
                             f"{m / 2**20:.0f}", f"{m / size:.2f}", f"{(m - startup) / size:.2f}",
                             f"{m / m_all:.2f}"])
    header = ["method", "variant", "seconds", "time vs load-all", "peak RSS (MiB)",
              "peak / checkpoint", "above start-up / checkpoint", "peak vs load-all"]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    lines = [
        "## Merging: streaming vs loading every checkpoint",
        "",
        "Command: `.venv/bin/python -m benchmarks bench_merge`",
        "",
        f"K = {k} checkpoints of {size / 1e6:.0f} MB each (random float32 tensors of "
        f"{TENSOR_FLOATS * 4 / 1e6:.0f} MB, plus a base for TIES, density 0.2 with the global "
        "per-model threshold), in the page cache (just written). Each variant runs in a fresh "
        "process; peak RSS is the worker's `ru_maxrss` (read as RUSAGE_CHILDREN by a launcher), "
        f"which counts touched pages of memory-mapped files. Start-up RSS (import only): "
        f"{startup / 2**20:.0f} MiB. 'load-all' reads every checkpoint with "
        "`basinmerge.io.load_state`, merges in memory and saves; 'stream' is "
        "`basinmerge.merge.stream_merge` with its default 1 MiB row blocks (per block: K slices "
        "in, one out, written as it goes; TIES finds each model's global threshold by radix "
        "selection over the same blocks, two reading passes per model).",
        "",
        *table,
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, variant, method, out, base, *paths = sys.argv
        if variant == "import-only":
            import basinmerge.merge  # noqa: F401  (the start-up cost alone)

            print("0.0")
        else:
            worker(variant, method, out, base, paths)
    else:
        print(run())
