"""Re-measure the BatchNorm rows of the rebasin quick table (docs/results.md): the "+ fix"
(BN reset) barriers with the endpoints keeping their own statistics (the old behaviour) and
reset like every interior point (the default since `reset_endpoints` follows `bn_reset`).

Run from the repository root: ``PYTHONPATH=src python docs/results/rebasin_bn_endpoints.py``
(about 15 CPU-minutes, one thread). Prints one JSON line per (model, method) and writes
rebasin_bn_endpoints.json in the current folder.
"""

from __future__ import annotations

import json
import time

import torch

from basinmerge import data as data_mod
from basinmerge.connectivity import barriers, interpolate
from basinmerge.experiments import rebasin as rb

KEYS = ("loss_barrier", "linear_loss_barrier", "acc_barrier", "acc_a", "acc_b", "loss_a", "loss_b")


def main() -> None:
    torch.set_num_threads(1)
    cfg = rb.ScaleConfig.at("quick")
    train = data_mod.load("fashion-mnist", "train")
    test = data_mod.load("fashion-mnist", "test")
    splits = {"train": rb._limit(train, cfg.eval_limit, 1), "test": rb._limit(test, cfg.eval_limit, 2)}
    stats = rb._limit(train, cfg.stats_examples, 3)
    zoo = rb._Models(train, cfg, "cpu")
    t0 = time.perf_counter()
    out = []
    for arch in [a for a in rb._archs(cfg, True) if not a.is_mlp and a.cfg["norm"] == "batch"]:
        a, b = zoo.get(arch, 0), zoo.get(arch, 1)
        for method in ("naive", "weight", "activation"):
            bb, _ = rb._align(arch, method, a, b, stats, cfg, seed=0)
            row: dict = {"model": arch.label, "method": method}
            for tag, reset in (("kept", False), ("reset", None)):
                curve = interpolate(a, bb, splits, num_points=cfg.num_points, bn_reset=True,
                                    bn_data=stats, repair=True, progress=False,
                                    reset_endpoints=reset)
                row[tag] = {s: {k: v[k] for k in KEYS} for s, v in barriers(curve).items()}
            out.append(row)
            print(json.dumps(row), flush=True)
    print(f"seconds {time.perf_counter() - t0:.0f}")
    with open("rebasin_bn_endpoints.json", "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
