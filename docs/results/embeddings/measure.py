"""Should weight scopes (and WSA) include nn.Embedding weights by default? A small measurement.

Two tiny GPT-2-style character LMs (2 blocks, width 32, 4 heads, context 32) on Python standard
library source (offline), one trained with SGD and one with Adam from the same initialization;
then the Adam run again with WSA toward the SGD run's final scope, with and without the
embedding layers in the target. Reports the Gaussian fit of embedding vs. other layers, the
scope mismatch, test loss and the linear-interpolation barrier to the SGD run.

    PYTHONPATH=src OMP_NUM_THREADS=1 python docs/results/embeddings/measure.py [OUT.json] [SEEDS]

SEEDS (default 3) runs the whole comparison for initializations 0..SEEDS-1 and reports each.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch


def main() -> None:
    seeds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    t0 = time.perf_counter()
    out = {"seeds": [one_seed(seed) for seed in range(seeds)]}
    keys = ["test_loss", "kl_to_sgd_embeddings", "kl_to_sgd_other", "barrier_to_sgd"]
    out["mean"] = {name: {k: sum(r["runs"][name][k] for r in out["seeds"]) / seeds for k in keys}
                   for name in out["seeds"][0]["runs"]}
    out["seconds"] = time.perf_counter() - t0
    out["loadavg"] = open("/proc/loadavg").read().split()[:3]
    text = json.dumps(out, indent=2)
    print(json.dumps(out["mean"], indent=2))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(text + "\n")


def one_seed(seed: int) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    from basinmerge.connectivity import barriers, interpolate
    from basinmerge.scope import divergence, fit_quality, weight_scope
    from basinmerge.train import evaluate, fit
    from basinmerge.wsa import WSARegularizer

    logging.set_verbosity_error()
    torch.set_num_threads(1)
    lib = os.path.dirname(os.__file__)
    text = "".join(open(os.path.join(lib, f), encoding="utf-8").read()
                   for f in ("argparse.py", "textwrap.py", "string.py"))
    chars = sorted(set(text))
    idx = {c: i for i, c in enumerate(chars)}
    ctx, n_train, n_test = 32, 2000, 400
    ids = torch.tensor([idx[c] for c in text[: (n_train + n_test) * ctx]]).view(-1, ctx)
    train, test = {"input_ids": ids[:n_train]}, {"input_ids": ids[n_train:]}
    cfg = GPT2Config(vocab_size=len(chars), n_positions=ctx, n_embd=32, n_layer=2, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                     eos_token_id=0)
    torch.manual_seed(seed)
    init = GPT2LMHeadModel(cfg)

    def run(optimizer: str, lr: float, penalties=()) -> GPT2LMHeadModel:
        net = GPT2LMHeadModel(cfg)
        net.load_state_dict(init.state_dict())
        fit(net, train, optimizer=optimizer, lr=lr, epochs=3, batch_size=32, seed=seed,
            penalties=list(penalties), progress=False)
        return net.eval()

    sgd = run("sgd", 0.2)
    adam = run("adam", 3e-3)
    target_all = weight_scope(sgd)
    target_no_emb = weight_scope(sgd, include_embeddings=False)
    runs = {"sgd": sgd, "adam": adam,
            "adam+wsa(with embeddings)": run("adam", 3e-3, [WSARegularizer(target_all, 1.0)]),
            "adam+wsa(without embeddings)": run("adam", 3e-3, [WSARegularizer(target_no_emb, 1.0)])}
    emb = {"transformer.wte.weight", "transformer.wpe.weight"}
    out: dict = {"seed": seed, "vocab": len(chars), "train_sequences": n_train, "runs": {}}
    for name, net in runs.items():
        d = divergence(weight_scope(net), target_all, "kl").per_layer
        fq = fit_quality(net)
        curve = interpolate(sgd, net, {"test": test}, num_points=5, progress=False)
        out["runs"][name] = {
            "test_loss": evaluate(net, test)["loss"],
            "kl_to_sgd_embeddings": sum(v for k, v in d.items() if k in emb) / len(emb),
            "kl_to_sgd_other": sum(v for k, v in d.items() if k not in emb) / (len(d) - len(emb)),
            "barrier_to_sgd": barriers(curve)["test"]["loss_barrier"] if name != "sgd" else 0.0,
            "ks_embeddings": {k: fq[k].ks for k in emb},
            "kurtosis_embeddings": {k: fq[k].excess_kurtosis for k in emb},
            "ks_other_median": float(torch.tensor([v.ks for k, v in fq.items() if k not in emb]).median()),
            "kurtosis_other_median": float(torch.tensor(
                [v.excess_kurtosis for k, v in fq.items() if k not in emb]).median()),
        }
    return out


if __name__ == "__main__":
    main()
