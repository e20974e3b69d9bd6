"""Weight and activation matching on transformer-sized models.

Models: HF ``GPT2LMHeadModel`` shaped like GPT-2 small (12 blocks, width 768, 12 heads, MLP
3072; vocabulary 1024 and 256 positions instead of 50257 / 1024, so that the embedding does
not dominate) and HF ``ViTForImageClassification`` shaped like ViT-S/16 (12 blocks, width 384,
6 heads, MLP 1536, 224x224 images), random initializations from seeds 0 and 1 (weight
matching only sees the weights). One torch thread.

Weight matching: total time, sweeps, the time in LAPs (`scipy.optimize.linear_sum_assignment`;
for an attention module the two-level head assignment, H² small LAPs and one H x H LAP per
permutation), and the ratio of the total to that LAP-only floor (the LAPs solved x their mean
time = the LAP seconds). Activation matching: seconds per batch, against two plain forward
passes of the same batch (the floor: both models must run).
"""

from __future__ import annotations

import logging
import os
import time

import torch

COMMAND = ".venv/bin/python -m benchmarks bench_transformer_align"


def _models():
    import transformers

    logging.getLogger("transformers").setLevel(logging.ERROR)
    gpt = transformers.GPT2Config(vocab_size=1024, n_positions=256, n_embd=768, n_layer=12,
                                  n_head=12, bos_token_id=0, eos_token_id=0)
    vit = transformers.ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                 intermediate_size=1536, image_size=224, patch_size=16,
                                 num_labels=1000)

    def build(cls, cfg, seed):
        torch.manual_seed(seed)
        return cls(cfg).eval()

    g = torch.Generator().manual_seed(0)
    return [("GPT-2-small-shaped (vocab 1024)", [build(transformers.GPT2LMHeadModel, gpt, s) for s in (0, 1)],
             {"input_ids": torch.randint(0, 1024, (8, 128), generator=g)}, "8 x 128 tokens"),
            ("ViT-S/16-shaped", [build(transformers.ViTForImageClassification, vit, s) for s in (0, 1)],
             torch.randn(8, 3, 224, 224, generator=g), "8 images 224x224")]


def run() -> str:
    from basinmerge.align import resolve_spec, weight_matching
    from basinmerge.align.transformer import forward
    from basinmerge.align.transformer_matching import unit_correlations

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows, act_rows = [], []
    try:
        for name, (a, b), batch, batch_desc in _models():
            spec = resolve_spec(a)
            pa = {k: v.detach() for k, v in a.named_parameters()}
            pb = {k: v.detach() for k, v in b.named_parameters()}
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            _, trace = weight_matching(spec, pa, pb, seed=0)
            total = time.perf_counter() - t0
            solved = trace.sweeps * len(spec.free_perms) - trace.skipped
            n_params = sum(v.numel() for v in pa.values())
            rows.append([name, f"{n_params / 1e6:.0f}M", len(spec.free_perms), trace.sweeps,
                         f"{total:.1f}", f"{trace.setup_seconds:.1f}", f"{trace.cost_seconds:.1f}",
                         f"{trace.lap_seconds:.1f}", solved,
                         f"{trace.lap_seconds / max(solved, 1) * 1000:.0f}",
                         f"{trace.lap_seconds / total:.0%}", f"{total / trace.lap_seconds:.1f}x",
                         f"{load:.1f}"])
            # Activation matching: statistics of one batch, against two plain forward passes.
            load = os.getloadavg()[0]
            with torch.no_grad():
                t0 = time.perf_counter()
                for m in (a, b):
                    forward(m, batch)
                plain = time.perf_counter() - t0
            t0 = time.perf_counter()
            unit_correlations(a, b, spec, batch, num_examples=None, batch_size=8)
            act = time.perf_counter() - t0
            act_rows.append([name, batch_desc, f"{plain:.2f}", f"{act:.2f}", f"{act / plain:.2f}x",
                             f"{load:.1f}"])
            del a, b, pa, pb
    finally:
        torch.set_num_threads(threads)
    head = ["model", "params", "permutations", "sweeps", "total s", "setup s", "cost s", "LAP s",
            "LAPs solved", "ms per LAP", "LAP share", "total / LAP floor", "load"]
    lines = ["## Transformer weight and activation matching", "",
             f"Command: `{COMMAND}` (one torch thread). " + __doc__.split("\n\n")[1].replace("\n", " "),
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    lines += ["", "Activation matching, statistics of every permutation over one batch:", "",
              "| model | batch | two forward passes s | activation statistics s | ratio | load |",
              "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in act_rows]
    lines += ["", "`cost s` is the time in cost-matrix products (float32, kept current with "
              "low-rank updates between LAPs); `load` is the 1-minute load average when the "
              "run started (the machine is shared; times scale with it)."]
    return "\n".join(lines)
