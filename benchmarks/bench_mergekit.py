"""basinmerge against mergekit on the same HF model folders: K = 8 Llama-shaped bf16 models
(`LlamaForCausalLM` from a small config, random weights, written by `save_pretrained`), merged
by `basinmerge merge DIR... --out DIR` (streaming, HF folder out) and by mergekit's `run_merge`
(linear, normalized: the average), and by TIES around a ninth model as the base (density 0.2,
trimmed per tensor: mergekit's convention, basinmerge's ``trim_mode=tensor``). Each run is a
fresh process with one torch thread; wall time, CPU time and peak RSS; interleaved rounds, best
of each. The outputs are compared tensor by tensor and the largest difference is reported.

mergekit is not a dependency of basinmerge: the benchmark runs when `import mergekit` works
(for example ``pip install --target DIR --no-deps mergekit accelerate immutables peft
sentencepiece`` and ``MERGEKIT_PATH=DIR``), and otherwise says so in one line and skips.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPEATS = int(os.environ.get("BENCH_MERGE_REPEATS", "2"))
K = int(os.environ.get("BENCH_MERGE_K", "8"))
LAUNCHER = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "w = time.perf_counter() - t\n"
    "sys.stderr.write(r.stderr[-3000:])\n"
    "if r.returncode: sys.exit(r.returncode)\n"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(w, u.ru_utime + u.ru_stime, u.ru_maxrss)\n"
)
MERGEKIT = textwrap.dedent("""
    import sys, torch, yaml
    torch.set_num_threads(1)
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    dtype, method, out, base, *models = sys.argv[1:]
    cfg = {"merge_method": method, "dtype": dtype,
           "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.2}} for m in models]}
    if method == "ties":
        cfg["base_model"] = base
    else:
        for m in cfg["models"]:
            del m["parameters"]["density"]
    run_merge(MergeConfiguration.model_validate(cfg), out,
              options=MergeOptions(cuda=False, copy_tokenizer=False, lazy_unpickle=True,
                                   low_cpu_memory=False, quiet=True))
""")


def _env() -> dict[str, str]:
    extra = os.environ.get("MERGEKIT_PATH", "")
    path = os.pathsep.join(p for p in (str(ROOT / "src"), extra) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", BASINMERGE_THREADS="1")


def available() -> bool:
    r = subprocess.run([sys.executable, "-c", "import mergekit.merge"], env=_env(),
                       capture_output=True, text=True, check=False)
    return r.returncode == 0


def make_models(folder: Path, k: int) -> tuple[list[Path], Path, int]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, vocab_size=32000,
                      tie_word_embeddings=False, dtype="bfloat16")
    paths = []
    for i in range(k + 1):  # the first is the base of TIES
        torch.manual_seed(i)
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
        paths.append(folder / f"m{i}")
        m.save_pretrained(paths[-1])
        del m
    size = sum(f.stat().st_size for f in paths[0].glob("*.safetensors"))
    return paths[1:], paths[0], size


def measure(cmd: list[str]) -> tuple[float, float, int]:
    r = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], env=_env(), cwd=ROOT,
                       capture_output=True, text=True, check=False)
    if r.returncode:
        raise RuntimeError(f"{cmd[:4]} failed: {r.stderr.strip()[-1500:]}")
    wall, cpu, rss_kb = r.stdout.split()[-3:]
    return float(wall), float(cpu), int(rss_kb) * 1024


class OutputMismatch(RuntimeError):
    """An output differs from its baseline's beyond what the documented conventions explain."""


def ties_fp32_check(folder: Path, paths: list[Path], base: Path) -> dict[str, float]:
    """TIES in float32 on both sides: mergekit with ``dtype: float32`` against basinmerge's
    per-tensor TIES on the same bf16 inputs computed in float32. Every coordinate where they
    differ must be one where some member's |tau| ties that member's trim threshold (basinmerge
    keeps every value tied at the threshold, mergekit exactly int(n * density) of them); any
    other difference raises `OutputMismatch`. Returns the counts."""
    import torch

    from basinmerge.io import load_state
    from basinmerge.merge import ties
    from basinmerge.merge.task import kth_rank

    out = folder / "mk32"
    r = subprocess.run([sys.executable, "-c", MERGEKIT, "float32", "ties", str(out), str(base),
                        *map(str, paths)], env=_env(), cwd=ROOT, capture_output=True, text=True,
                       check=False)
    if r.returncode:
        raise RuntimeError(f"mergekit ties (float32) failed: {r.stderr.strip()[-1500:]}")
    theirs = load_state(out)[0]
    b_state = load_state(base)[0]
    members = [load_state(p)[0] for p in paths]
    n = differ = outside = tied = 0
    worst = 0.0
    for key, b in b_state.items():
        b32 = b.float()
        ms = [m[key].float() for m in members]
        ours = ties({key: b32}, [{key: m} for m in ms], density=0.2, trim_mode="tensor")[key]
        diff = ours != theirs[key].float()
        tau = torch.stack([m - b32 for m in ms]).abs().reshape(len(ms), -1)
        cut = tau.kthvalue(kth_rank(tau.shape[1], 0.2), dim=1, keepdim=True).values
        at_cut = (tau == cut).any(dim=0).reshape(diff.shape)
        n += diff.numel()
        differ += int(diff.sum())
        tied += int(at_cut.sum())
        off = diff & ~at_cut
        outside += int(off.sum())
        if off.any():
            worst = max(worst, float((ours - theirs[key].float()).abs()[off].max()))
    if outside:
        raise OutputMismatch(f"bench_mergekit: TIES in float32 differs from mergekit's at "
                             f"{outside} coordinates that are not threshold ties (largest "
                             f"difference {worst:.3g})")
    return {"coordinates": n, "differ": differ, "tied": tied, "outside": outside}


def compare(a: Path, b: Path) -> float:
    """Largest |difference| between the two outputs' tensors (float32), over every key."""
    from basinmerge.io import load_state

    sa, sb = load_state(a)[0], load_state(b)[0]
    if set(sa) != set(sb):
        raise RuntimeError(f"bench_mergekit: the outputs hold different keys "
                           f"({sorted(set(sa) ^ set(sb))[:3]})")
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


def run() -> str:
    if not available():
        return ("## Merging: basinmerge vs mergekit\n\nNot run: `import mergekit` fails here "
                "(mergekit is not a dependency; see benchmarks/bench_mergekit.py for how to "
                "make it importable).")
    load_before = os.getloadavg()[0]
    best: dict[tuple[str, str], tuple[float, float, int]] = {}
    diffs: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench_mergekit_") as tmp:
        folder = Path(tmp)
        paths, base, size = make_models(folder, K)
        for method in ("average", "ties"):
            ours = ["merge", *map(str, paths), "--method", method, "--out", str(folder / "bm"),
                    "--force"]
            if method == "ties":
                ours += ["--base", str(base), "--opt", "density=0.2", "--opt", "trim_mode=tensor"]
            cmds = {
                "basinmerge": [sys.executable, "-m", "basinmerge", "--quiet", *ours],
                "mergekit": [sys.executable, "-c", MERGEKIT, "bfloat16",
                             "linear" if method == "average" else "ties", str(folder / "mk"),
                             str(base), *map(str, paths)],
            }
            for _ in range(REPEATS):
                for name, cmd in cmds.items():
                    t, c, m = measure(cmd)
                    old = best.get((method, name))
                    best[(method, name)] = ((min(t, old[0]), min(c, old[1]), max(m, old[2]))
                                            if old else (t, c, m))
            diffs[method] = compare(folder / "bm", folder / "mk")
            if method == "average" and diffs[method] != 0:
                raise OutputMismatch(f"bench_mergekit: the averages differ (largest difference "
                                     f"{diffs[method]:.3g})")
        fp32 = ties_fp32_check(folder, paths, base)
    load_after = os.getloadavg()[0]
    rows, verdicts = [], []
    for method in ("average", "ties"):
        base_t, base_c, base_m = best[(method, "mergekit")]
        for name in ("basinmerge", "mergekit"):
            t, c, m = best[(method, name)]
            rows.append(f"| {method} | {name} | {t:.2f} | {t / base_t:.2f} | {c:.2f} | "
                        f"{c / base_c:.2f} | {m / 2**20:.0f} | {m / base_m:.2f} |")
        t, c, m = best[(method, "basinmerge")]
        verdicts.append(f"{method}: basinmerge takes {t / base_t:.2f}x mergekit's wall time and "
                        f"{c / base_c:.2f}x its CPU time at {m / base_m:.2f}x its peak memory "
                        f"(aim: faster than mergekit: {'met' if t < base_t else 'not met'}); "
                        f"largest difference between the outputs {diffs[method]:.3g}.")
    return "\n".join([
        "## Merging: basinmerge vs mergekit",
        "",
        "Command: `MERGEKIT_PATH=DIR .venv/bin/python -m benchmarks bench_mergekit` (mergekit "
        "importable from DIR; skipped otherwise)",
        "",
        f"K = {K} `LlamaForCausalLM` folders and a base for TIES (8 layers, d = 512, MLP 1408, vocabulary 32000, "
        f"bf16, {size / 1e6:.0f} MB of weights each), averaged; fresh process per run, one torch "
        f"thread, best of {REPEATS} interleaved rounds; CPU = user + system of the whole process "
        "(start-up included). Load average "
        f"{load_before:.1f} before, {load_after:.1f} after.",
        "",
        "| method | tool | wall s | wall vs mergekit | CPU s | CPU vs mergekit | peak RSS (MiB) | "
        "peak vs mergekit |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *[f"- {v}" for v in verdicts],
        "",
        "**Why the TIES outputs differ.** mergekit computes in the models' dtype (`dtype: "
        "bfloat16`: task vectors, sums and means rounded to bf16 at every step); basinmerge "
        "computes in float32 and rounds once at the end. Run in float32 on both sides "
        "(mergekit `dtype: float32`, basinmerge's TIES on the float32 tensors), the outputs "
        f"differ at {fp32['differ']:,} of {fp32['coordinates']:,} coordinates "
        f"({fp32['differ'] / fp32['coordinates']:.2%}), and every one of them is a coordinate "
        "where some member's |tau| ties its trim threshold "
        f"({fp32['tied']:,} such coordinates; {fp32['outside']} differences elsewhere): "
        "basinmerge keeps every value tied at the threshold, mergekit exactly int(n * density) "
        "of them (bf16 weights tie often). A zero sum of the trimmed values elects + on both "
        "sides (docs/methods.md). The benchmark fails if the averages differ at all, or the "
        "float32 TIES outputs anywhere but at threshold ties.",
    ])


if __name__ == "__main__":
    print(run())
