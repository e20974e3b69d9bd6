"""Streaming merges against loading every checkpoint: wall time and peak memory of `average` and
`ties` over K = 8 Llama-shaped bf16 checkpoints, for the API (`stream_merge`), the merge
engine the CLI calls (`merge_checkpoints`: the member guard and the atomic output on top) and
the CLI (`basinmerge merge`), with every output checked against the load-everything one.

Every variant runs in a fresh worker process started by a small launcher process that reads the
worker's peak RSS with ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``, so the numbers of
different variants never mix. The worker times only the merge itself (reading, merging, writing
the output; for the CLI, `basinmerge.cli.main` called in the worker after its imports), not
the Python / torch start-up. Variants are interleaved over `REPEATS` rounds and the best time of
each is kept. A streamed output that differs from the load-everything output by a single bit
stops the benchmark with a non-zero exit.

Run: ``.venv/bin/python -m benchmarks bench_merge`` (env: ``BENCH_MERGE_K`` number of
checkpoints, ``BENCH_MERGE_LAYERS`` decoder layers, default 8: 117 MB a checkpoint,
``BENCH_MERGE_REPEATS`` rounds, default 3).
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
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(u.ru_utime + u.ru_stime, u.ru_maxrss)\n"
)
REPEATS = int(os.environ.get("BENCH_MERGE_REPEATS", "3"))
DIM, FF, VOCAB = 512, 1408, 32000
VARIANTS = ("load-all", "stream", "engine", "cli")


class OutputMismatch(RuntimeError):
    """A fast path's output differs from its baseline's."""


def make_checkpoints(folder: Path, k: int, layers: int, dim: int = DIM, ff: int = FF,
                     vocab: int = VOCAB) -> tuple[list[Path], Path, int]:
    """K Llama-shaped bf16 checkpoints and a base (embedding, attention q/k/v/o, gated MLP,
    norms, output head); returns (paths, base, bytes of one)."""
    import torch

    from basinmerge.io import save_state

    d = dim
    paths = []
    for i in range(k + 1):
        g = torch.Generator().manual_seed(i)
        s = {"embed.weight": torch.randn(vocab, d, generator=g).bfloat16()}
        for layer in range(layers):
            for name, shape in (("q", (d, d)), ("k", (d, d)), ("v", (d, d)), ("o", (d, d)),
                                ("gate", (ff, d)), ("up", (ff, d)), ("down", (d, ff))):
                s[f"layers.{layer}.{name}.weight"] = (torch.randn(*shape, generator=g) * 0.02).bfloat16()
            s[f"layers.{layer}.norm.weight"] = torch.ones(d).bfloat16()
        s["lm_head.weight"] = torch.randn(vocab, d, generator=g).bfloat16()
        paths.append(save_state(s, folder / f"ckpt{i}.safetensors"))
        del s
    return paths[1:], paths[0], paths[1].stat().st_size


def worker(variant: str, method: str, out: str, base: str, paths: list[str]) -> None:
    """One measured run; prints the merge's wall and CPU seconds."""
    import torch

    from basinmerge import io
    from basinmerge.cli import main
    from basinmerge.merge import merge, stream_merge
    from basinmerge.merge.engine import merge_checkpoints

    torch.set_num_threads(1)
    opts = {"density": 0.2} if method == "ties" else {}
    base_arg = base if method == "ties" else None
    t0, c0 = time.perf_counter(), time.process_time()
    if variant == "stream":
        stream_merge(paths, method, out, base=base_arg, **opts)
    elif variant == "engine":  # what the CLI calls, with its options (guard, record, atomic output)
        merge_checkpoints(paths, method, base=base_arg, options=opts, out=out)
    elif variant == "cli":
        args = ["--quiet", "merge", *paths, "--method", method, "--out", out]
        args += ["--base", base, "--opt", "density=0.2"] if method == "ties" else []
        try:
            main(args)
        except SystemExit as e:
            if e.code:
                raise
    elif variant == "load-all":
        states = [io.load_state(p)[0] for p in paths]
        b = io.load_state(base_arg)[0] if base_arg else None
        io.save_state(merge(states, method, base=b, **opts), out)
    print(f"{time.perf_counter() - t0:.4f} {time.process_time() - c0:.4f}")


def measure(variant: str, method: str, out: Path, base: Path,
            paths: list[Path]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS in bytes) of one variant's merge in a fresh process."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", LAUNCHER, sys.executable, "-m", "benchmarks.bench_merge",
           "--worker", variant, method, str(out), str(base), *map(str, paths)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if r.returncode:
        raise RuntimeError(f"{variant}/{method} failed: {r.stderr.strip()[-2000:]}")
    seconds, cpu, _, maxrss_kb = r.stdout.split()[-4:]
    return float(seconds), float(cpu), int(maxrss_kb) * 1024


def same_tensors(a: Path, b: Path) -> bool:
    from basinmerge.io import load_state

    sa, sb = load_state(a)[0], load_state(b)[0]
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and sa[k].equal(sb[k]) for k in sa)


def _verdict(method: str, results: dict[tuple[str, str], tuple[float, float, float]]) -> str:
    """One line per method: the aims (stream against load-all; the CLI against the API,
    `stream_merge`) and where the CLI's extra time goes (engine against stream: the member
    guard and the record; CLI against engine: the command's own cost)."""
    t_all, c_all, m_all = results[(method, "load-all")]
    t_s, c_s, m_s = results[(method, "stream")]
    t_e, c_e, _ = results[(method, "engine")]
    t_c, c_c, _ = results[(method, "cli")]
    stream_aim = ("met" if max(t_s / t_all, c_s / c_all) <= 1 else "met on CPU time"
                  if c_s <= c_all else "not met")
    cli = max(t_c / t_s, c_c / c_s)
    cli_aim = ("met" if cli <= 1.1 else "met on CPU time only" if c_c / c_s <= 1.1
               else "met on wall time only" if t_c / t_s <= 1.1 else "not met")
    return (f"{method}: stream {t_s / t_all:.2f}x the wall time and {c_s / c_all:.2f}x the CPU "
            f"time (aim <= 1.0: {stream_aim}) at {m_s / m_all:.2f}x the peak memory (aim <= 0.3: "
            f"{'met' if m_s <= 0.3 * m_all else 'not met'}); CLI {t_c / t_s:.2f}x the API's wall "
            f"time, {c_c / c_s:.2f}x its CPU time (aim <= 1.1: {cli_aim}); of that, the engine "
            f"(guard, record) {t_e / t_s:.2f}x / {c_e / c_s:.2f}x the API and the command over "
            f"the engine {t_c / t_e:.2f}x / {c_c / c_e:.2f}x")


def run() -> str:
    k = int(os.environ.get("BENCH_MERGE_K", "8"))
    layers = int(os.environ.get("BENCH_MERGE_LAYERS", "8"))
    load_before = os.getloadavg()[0]
    results: dict[tuple[str, str], tuple[float, float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_merge_") as tmp:
        folder = Path(tmp)
        paths, base, size = make_checkpoints(folder, k, layers)
        _, _, startup = measure("import-only", "average", folder / "none", base, paths)
        for method in ("average", "ties"):
            outs = {v: folder / f"out_{method}_{v}.safetensors" for v in VARIANTS}
            for _ in range(REPEATS):
                for variant in VARIANTS:
                    t, c, m = measure(variant, method, outs[variant], base, paths)
                    old = results.get((method, variant))
                    results[(method, variant)] = ((min(t, old[0]), min(c, old[1]), max(m, old[2]))
                                                  if old else (t, c, m))
            for variant in VARIANTS[1:]:
                if not same_tensors(outs["load-all"], outs[variant]):
                    raise OutputMismatch(f"bench_merge: {method} {variant} output differs from load-all")
            for out in outs.values():
                out.unlink(missing_ok=True)
    load_after = os.getloadavg()[0]
    rows = []
    verdicts = []
    for method in ("average", "ties"):
        t_all, c_all, m_all = results[(method, "load-all")]
        t_api, c_api, _ = results[(method, "stream")]
        t_eng, c_eng, _ = results[(method, "engine")]
        for variant in VARIANTS:
            t, c, m = results[(method, variant)]
            rows.append([method, variant, f"{t:.2f}", f"{t / t_all:.2f}", f"{c:.2f}", f"{c / c_all:.2f}",
                         f"{m / 2**20:.0f}", f"{(m - startup) / size:.2f}", f"{m / m_all:.2f}",
                         f"{t / t_api:.2f} / {c / c_api:.2f}" if variant in ("engine", "cli") else "",
                         f"{t / t_eng:.2f} / {c / c_eng:.2f}" if variant == "cli" else "",
                         "yes" if variant != "load-all" else ""])
        verdicts.append(_verdict(method, results))
    header = ["method", "variant", "wall s", "wall vs load-all", "CPU s", "CPU vs load-all",
              "peak RSS (MiB)", "above start-up / checkpoint", "peak vs load-all",
              "vs stream (wall / CPU)", "CLI vs engine (wall / CPU)", "output = load-all"]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    lines = [
        "## Merging: streaming vs loading every checkpoint",
        "",
        "Command: `.venv/bin/python -m benchmarks bench_merge`",
        "",
        f"K = {k} Llama-shaped bf16 checkpoints of {size / 1e6:.0f} MB each ({layers} layers, "
        f"d = {DIM}, gated MLP {FF}, vocabulary {VOCAB}, untied head; plus a base for TIES, "
        "density 0.2 with the global per-model threshold), in the page cache (just written). "
        "Each variant runs in a fresh process with one torch thread; best of "
        f"{REPEATS} interleaved rounds (wall and CPU time, user + system, of the merge alone: "
        "on a busy shared machine the CPU time is the steadier measure); peak RSS is the worker's `ru_maxrss` (read as "
        f"RUSAGE_CHILDREN by a launcher). Start-up RSS (import only): {startup / 2**20:.0f} MiB. "
        "'load-all' reads every checkpoint with `basinmerge.io.load_state`, merges in memory "
        "and saves (the baseline); 'stream' is `basinmerge.merge.stream_merge` with its default "
        "1 MiB row blocks (per block: K contiguous `readinto` reads at the offsets of the "
        "safetensors header, one sum per block as the NaN/Inf check, the merged block written "
        "as it goes; TIES finds each model's global threshold by radix selection over the same "
        "blocks, two reading passes per model); 'engine' is `basinmerge.merge.engine."
        "merge_checkpoints`, what the CLI calls, with the CLI's options (it streams by default, "
        "feeding the member guard; atomic output); 'cli' is `basinmerge merge` on the same files "
        "(`basinmerge.cli.main` called in the worker after its imports). 'vs stream' is the "
        "aim's ratio for the CLI (the API is `stream_merge`); for the engine it is the cost of "
        "the guard; 'CLI vs engine' is the command's own cost. Every output is compared tensor by tensor with load-all's; a "
        "difference fails the benchmark. Load average (1 min) before / after: "
        f"{load_before:.1f} / {load_after:.1f} on {os.cpu_count()} cores.",
        "",
        *table,
        "",
        *[f"- {v}" for v in verdicts],
        "",
        "'engine' and 'cli' do more than 'stream': the member guard, fed by the merge itself "
        "(each block is read once; layers over 131,072 coordinates compared on a fixed sample "
        "of about 16,384; finished layers reduced together, about 65,536 coordinates at a time, "
        "in reused buffers: one in-place coordinate-wise median and one float64 copy per batch), "
        "and the CLI its recipe record and summary table. A plain command line is recorded "
        "without pydantic (`basinmerge.recipe_record.plain_record`, equal to the schema's record: "
        "tested), which saved about 60 ms of import; the rest of the CLI's own cost is typer "
        "building its commands (about 13 ms) and the table.",
        "",
        "History (same files): before issue 16, `stream_merge` took 3.3x the load-all time and "
        "the CLI 5.0x (`torch.isfinite(...).all()` on every 1 MiB block was 4.5 of 6.6 s; every "
        "file was reopened per key; the CLI reloaded its output). The guard then read every "
        "member a second time after the merge, with float64 medians over every coordinate; "
        "it now rides on the merge's reads and samples large layers. Before the engine variant "
        "and the changes above, the CLI took 1.29x the API's wall time and 1.33x its CPU time "
        "(guard about 0.07 s, pydantic 0.06 s). basinmerge against "
        "mergekit on HF folders: bench_mergekit.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, variant, method, out, base, *paths = sys.argv
        if variant == "import-only":
            import basinmerge.cli  # noqa: F401
            import basinmerge.merge  # noqa: F401  (the start-up cost alone)

            print("0.0 0.0")
        else:
            worker(variant, method, out, base, paths)
    else:
        print(run())
