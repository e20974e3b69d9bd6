"""GPU benchmark: one command, bounded to about 4 minutes on a data-centre GPU.

    PYTHONPATH=src python benchmarks/bench_gpu.py [--out DIR]     # on a machine with CUDA
    PYTHONPATH=src python benchmarks/bench_gpu.py --device cpu --tiny   # the same code, tiny, here

Without CUDA (and without ``--device cpu``) it prints one line and exits 0. It imports only
torch, numpy, scipy, safetensors and basinmerge's core (no dataset packages, no Flower), makes
its own random models, checkpoints and data, and measures on `--device` against the CPU in the
same process:

- ceilings: the float32 matmul rate and the copy bandwidth (device to device, host to device)
  of the device and of the CPU;
- weight matching of two ResNet-20 x16 (tiny: x2) and of a GPT-2-small-shaped MLP-only stand-in
  (12 pre-LN residual MLP blocks 768-3072-768, tied-size 50257 x 768 input and output layers;
  tiny: 2 blocks 64-256), CPU vs device (the LAP runs on the CPU in both), with the floor
  (LAP time + the cost-matrix FLOPs at the measured matmul rate);
- a streaming merge (`stream_merge`, average and TIES) of 8 Llama-shaped bf16 checkpoints with
  the kernels on the CPU vs on the device, against loading everything;
- one training epoch (`basinmerge.train.fit`) of an MLP 784-512-512-10 on 60,000 random
  examples against a bare PyTorch loop on the same device.

Each part is timed after a warm-up, runs under a time budget (later parts are skipped, and say
so, once it is spent) and never stops the others: an error is recorded in its row. The results
go to ``bench_gpu.json`` in ``--out`` (default ``$OUT``, else the current folder); a markdown
table is printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int = 1) -> float:
    """Best wall seconds of `repeats` calls (after one warm-up call)."""
    fn()
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


# --------------------------------------------------------------------------- ceilings


def matmul_rate(device: torch.device, n: int) -> float:
    """float32 FLOP/s of an n x n x n product."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    reps = 20 if device.type == "cuda" else 3
    s = _timed(lambda: [a @ b for _ in range(reps)], device, repeats=3)
    return 2.0 * n ** 3 * reps / s


def copy_bandwidth(device: torch.device, nbytes: int) -> dict:
    """GB/s of a device-to-device copy (bytes read + written) and, on a GPU, host-to-device
    from pinned memory."""
    x = torch.empty(nbytes // 4, device=device)
    y = torch.empty_like(x)
    s = _timed(lambda: y.copy_(x), device, repeats=5)
    out = {"device_copy_GBps": 2 * nbytes / s / 1e9}
    if device.type == "cuda":
        h = torch.empty(nbytes // 4).pin_memory()
        s = _timed(lambda: x.copy_(h, non_blocking=True), device, repeats=5)
        out["host_to_device_GBps"] = nbytes / s / 1e9
    return out


# --------------------------------------------------------------------------- weight matching


class MLPBlock(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, f)
        self.act = nn.GELU()
        self.proj = nn.Linear(f, d)

    def forward(self, x):
        return x + self.proj(self.act(self.fc(self.ln(x))))


class GPT2MLPStandIn(nn.Module):
    """GPT-2 small's shapes without attention: an input layer of the token embedding's size
    (vocab x d, as a linear map of one-hot-like inputs), 12 pre-LN residual MLP blocks, a final
    LayerNorm and an output layer of the same size. The residual stream carries one
    permutation, each block's hidden units another."""

    def __init__(self, vocab: int, d: int, f: int, layers: int):
        super().__init__()
        self.wte = nn.Linear(vocab, d, bias=False)
        self.blocks = nn.Sequential(*[MLPBlock(d, f) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, x):
        return self.head(self.ln_f(self.blocks(self.wte(x))))


def _perturb_norms(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
    return model


def matching_case(name: str, pair, spec, device: torch.device, rate_cpu: float, rate_dev: float,
                  max_iter: int) -> list[dict]:
    from basinmerge.align import weight_matching

    rows = []
    a, b = pair
    pa = {k: v.detach() for k, v in a.named_parameters()}
    pb = {k: v.detach() for k, v in b.named_parameters()}
    perms = {}
    places = [("cpu", rate_cpu)] + ([(str(device), rate_dev)] if device.type == "cuda" else [])
    for where, rate in places:
        da = {k: v.to(where) for k, v in pa.items()}
        db = {k: v.to(where) for k, v in pb.items()}
        _sync(torch.device(where))
        t0 = time.perf_counter()
        perm, tr = weight_matching(spec, da, db, max_iter=max_iter, seed=0)
        _sync(torch.device(where))
        wall = time.perf_counter() - t0
        perms[where] = perm
        floor = tr.lap_seconds + tr.cost_flops / rate
        rows.append({"part": "weight matching", "case": name, "where": where,
                     "seconds": wall, "sweeps": tr.sweeps, "laps": tr.laps,
                     "lap_seconds": tr.lap_seconds, "cost_seconds": tr.cost_seconds,
                     "update_seconds": tr.update_seconds, "setup_seconds": tr.setup_seconds,
                     "cost_gflop": tr.cost_flops / 1e9, "floor_seconds": floor,
                     "ratio_to_floor": wall / floor if floor > 0 else None,
                     "objective": tr.objective[-1]})
        del da, db
    if len(perms) == 2:
        same = all(torch.equal(perms["cpu"][p].cpu(), perms[str(device)][p].cpu()) for p in perms["cpu"])
        rows[-1]["same_permutation_as_cpu"] = same
        rows[-1]["speedup_vs_cpu"] = rows[0]["seconds"] / rows[-1]["seconds"]
    return rows


def matching_parts(device: torch.device, tiny: bool, rate_cpu: float, rate_dev: float) -> list[dict]:
    from basinmerge import models
    from basinmerge.align import builtin_spec, spec_for, weight_matching

    rows = []
    # Warm-up on every device (SciPy's import, CUDA context and kernels), not timed.
    warm = [models.build("mlp", (1, 4, 4), 3, seed=s, depth=2, width=16) for s in (0, 1)]
    for where in ("cpu", str(device)):
        pa = {k: v.detach().to(where) for k, v in warm[0].named_parameters()}
        pb = {k: v.detach().to(where) for k, v in warm[1].named_parameters()}
        weight_matching(builtin_spec(warm[0]), pa, pb)
    width = 2 if tiny else 16
    rn = [models.build("resnet20", (3, 32, 32), 10, seed=s, width=width) for s in (0, 1)]
    rows += matching_case(f"ResNet-20 x{width}", rn, builtin_spec(rn[0]), device, rate_cpu,
                          rate_dev, max_iter=100)
    vocab, d, f, layers = (512, 64, 256, 2) if tiny else (50257, 768, 3072, 12)
    gpt = [_perturb_norms(GPT2MLPStandIn(vocab, d, f, layers), s) for s in (0, 1)]
    for s, m in enumerate(gpt):
        torch.manual_seed(s)
        for p in m.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
    spec = spec_for(gpt[0], torch.randn(2, vocab))
    rows += matching_case(f"GPT-2-small-shaped MLP stand-in ({layers}x{d}-{f}, vocab {vocab}), "
                          "3 sweeps at most", gpt, spec, device, rate_cpu, rate_dev, max_iter=3)
    return rows


# --------------------------------------------------------------------------- streaming merge


def _llama_checkpoints(folder: Path, k: int, tiny: bool) -> tuple[list[Path], Path, int]:
    from benchmarks.bench_merge import make_checkpoints

    return make_checkpoints(folder, k, 2, 64, 176, 1000) if tiny else make_checkpoints(folder, k, 8)


def streaming_part(device: torch.device, tiny: bool) -> list[dict]:
    from basinmerge import io
    from basinmerge.merge import merge, stream_merge

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        folder = Path(tmp)
        paths, base, size = _llama_checkpoints(folder, 8, tiny)
        for method, opts in (("average", {}), ("ties", {"density": 0.2})):
            b = base if method == "ties" else None
            outs = {}
            ref_out = folder / f"ref_{method}.safetensors"

            def load_all(method=method, opts=opts, b=b, ref_out=ref_out):
                states = [io.load_state(p)[0] for p in paths]
                bs = io.load_state(b)[0] if b else None
                io.save_state(merge(states, method, base=bs, **opts), ref_out)

            t0 = time.perf_counter()
            load_all()
            rows.append({"part": "streaming merge", "case": f"{method}, 8 x {size / 1e6:.1f} MB bf16",
                         "where": "cpu, load everything (baseline)",
                         "seconds": time.perf_counter() - t0})
            for where in ("cpu", str(device)) if device.type == "cuda" else ("cpu",):
                out = folder / f"out_{method}_{where.replace(':', '_')}.safetensors"
                t0 = time.perf_counter()
                stream_merge(paths, method, out, base=b, device=where, **opts)
                _sync(torch.device(where))
                wall = time.perf_counter() - t0
                outs[where] = out
                rows.append({"part": "streaming merge", "case": f"{method}, 8 x {size / 1e6:.1f} MB bf16",
                             "where": f"{where}, stream_merge", "seconds": wall})
            ref = io.load_state(ref_out)[0]
            for where, out in outs.items():
                got = io.load_state(out)[0]
                same = all(torch.equal(got[k], v) for k, v in ref.items())
                for r in rows:
                    if r["case"].startswith(method) and r["where"] == f"{where}, stream_merge":
                        r["same_output_as_baseline"] = same
    base_rows = {r["case"]: r["seconds"] for r in rows if "baseline" in r["where"]}
    for r in rows:
        if "stream_merge" in r["where"]:
            r["ratio_to_baseline"] = r["seconds"] / base_rows[r["case"]]
    return rows


# --------------------------------------------------------------------------- training


def training_part(device: torch.device, tiny: bool) -> list[dict]:
    from basinmerge import models
    from basinmerge.train import fit

    n = 2000 if tiny else 60000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    rows = []
    for where in ("cpu", str(device)) if device.type == "cuda" else ("cpu",):
        dev = torch.device(where)

        def bare(dev=dev):
            net = models.build("mlp", (1, 28, 28), 10, seed=0, depth=2, width=512).to(dev)
            opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
            xd, yd = x.to(dev), y.to(dev)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(dev)
            for i in range(0, n, 128):
                idx = order[i:i + 128]
                loss = nn.functional.cross_entropy(net(xd[idx]), yd[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        def lib(dev=dev):
            net = models.build("mlp", (1, 28, 28), 10, seed=0, depth=2, width=512)
            fit(net, (x, y), lr=0.05, momentum=0.9, batch_size=128, epochs=1, device=dev,
                progress=False)

        t_bare = _timed(bare, dev, repeats=2)
        t_fit = _timed(lib, dev, repeats=2)
        rows.append({"part": "training epoch", "case": f"MLP 784-512-512-10, {n} examples, batch 128",
                     "where": f"{where}, bare loop", "seconds": t_bare})
        rows.append({"part": "training epoch", "case": f"MLP 784-512-512-10, {n} examples, batch 128",
                     "where": f"{where}, fit", "seconds": t_fit, "ratio_to_baseline": t_fit / t_bare})
    return rows


# --------------------------------------------------------------------------- main


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def table(rows: list[dict]) -> str:
    cols = ["part", "case", "where", "value", "seconds", "ratio_to_baseline", "speedup_vs_cpu", "floor_seconds",
            "ratio_to_floor", "sweeps", "laps", "lap_seconds", "cost_seconds", "cost_gflop",
            "same_permutation_as_cpu", "same_output_as_baseline", "error"]
    cols = [c for c in cols if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def section(info: dict, rows: list[dict]) -> str:
    """The docs/benchmarks.md section of one run."""
    where = info.get("gpu", "CPU only (tiny check)")
    return "\n".join([
        f"## GPU: {where}",
        "",
        "Command: `PYTHONPATH=src python benchmarks/bench_gpu.py` (on the GPU machine; "
        "`--device cpu --tiny` checks the script anywhere)",
        "",
        f"torch {info['torch']}, {info['cpu_cores']} CPU cores ({info['cpu_threads']} torch "
        f"threads), load average {info['load_avg']:.1f} at the start, TF32 matmul "
        f"{'on' if info['allow_tf32'] else 'off'}, {info['seconds']:.0f} s in all. Ceiling rows "
        "hold their rate in *value* (TFLOP/s or GB/s). Weight matching: *floor* = LAP time + the "
        "FLOPs of one full cost-matrix product per LAP solved at the measured matmul rate of "
        "that device; the LAP runs on the CPU either way. Streaming: 8 Llama-shaped bf16 "
        "checkpoints, ratio to loading everything and merging in memory on the CPU. Training: "
        "one epoch of `fit` against a bare PyTorch loop on the same device.",
        "",
        table(rows),
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="device to compare against the CPU (default cuda)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (a check that the script runs)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_gpu.json")
    ap.add_argument("--budget-s", type=float, default=240.0, help="time budget; parts that would "
                    "start after it are skipped")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; skipped (use --device cpu --tiny to test the script)")
        return 0
    torch.manual_seed(0)
    t_start = time.perf_counter()
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "cpu_cores": os.cpu_count(), "device": str(device), "tiny": args.tiny,
            "load_avg": os.getloadavg()[0],
            "allow_tf32": bool(getattr(torch.backends.cuda.matmul, "allow_tf32", False))}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    print(f"bench_gpu: {info}", flush=True)
    rows: list[dict] = []
    n_mm = 256 if args.tiny else 4096
    rate_cpu = matmul_rate(torch.device("cpu"), 256 if args.tiny else 2048)
    rate_dev = matmul_rate(device, n_mm) if device.type == "cuda" else rate_cpu
    rows.append({"part": "ceiling", "case": "float32 matmul TFLOP/s", "where": "cpu",
                 "value": rate_cpu / 1e12})
    if device.type == "cuda":
        rows.append({"part": "ceiling", "case": "float32 matmul TFLOP/s", "where": str(device),
                     "value": rate_dev / 1e12})
    for where in ("cpu", str(device)) if device.type == "cuda" else ("cpu",):
        bw = copy_bandwidth(torch.device(where), (16 if args.tiny else 1024) * 2**20)
        for k, v in bw.items():
            rows.append({"part": "ceiling", "case": k.replace("_GBps", " GB/s"), "where": where,
                         "value": v})
    parts = [("weight matching", lambda: matching_parts(device, args.tiny, rate_cpu, rate_dev)),
             ("streaming merge", lambda: streaming_part(device, args.tiny)),
             ("training epoch", lambda: training_part(device, args.tiny))]
    for name, fn in parts:
        if time.perf_counter() - t_start > args.budget_s:
            rows.append({"part": name, "error": f"skipped: the {args.budget_s:.0f} s budget was spent"})
            continue
        t0 = time.perf_counter()
        try:
            rows += fn()
        except Exception as e:  # noqa: BLE001 - one part's failure must not cost the others
            traceback.print_exc()
            rows.append({"part": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
        print(f"bench_gpu: {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
    info["seconds"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gpu.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2, default=str))
    (out / "bench_gpu.md").write_text(section(info, rows))
    print(f"bench_gpu: wrote {out / 'bench_gpu.json'} and bench_gpu.md (copy it to "
          f"benchmarks/results/ and run `python -m benchmarks --assemble`); {info['seconds']:.0f} s in all")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
    sys.exit(main())
