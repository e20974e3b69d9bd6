"""Split a labelled dataset among federated clients.

`partition(labels, num_clients, scheme, ...)` returns one sorted index tensor per client. The
parts are disjoint, together cover every example, and are a deterministic function of
``seed``.

Schemes:

- ``iid``: a random permutation cut into near-equal parts.
- ``dirichlet``: label skew (Hsu et al. 2019; the NIID-Bench recipe). For each class, the
  share of each client is drawn from Dir(α·1); α = 0.1 is strongly skewed, 0.5 moderate,
  ≥ 5 close to IID. As in NIID-Bench, a client that already holds n/N examples gets no more
  (keeps sizes from exploding at small α). The draw is repeated until every client has at
  least ``min_size`` examples (up to ``max_tries`` draws).
- ``shards``: the pathological split of McMahan et al. 2017: sort by label, cut into
  ``num_clients · classes_per_client`` equal shards, give each client ``classes_per_client``
  random shards. Each client holds essentially that many classes; a shard that straddles a
  class boundary adds a few examples of a neighbouring class (as in the original).

`class_histogram` and `summarize` describe a partition; `basinmerge.plots.partition_heatmap`
draws it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from basinmerge.errors import ConfigError

SCHEMES = ("iid", "dirichlet", "shards")


def _labels_array(labels: torch.Tensor | Sequence[int] | np.ndarray) -> np.ndarray:
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim != 1:
        raise ConfigError(f"labels must be a 1-D sequence, got shape {tuple(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"labels must be integers, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ConfigError("labels must be non-negative class indices")
    return arr.astype(np.int64)


def _check_args(n: int, num_clients: int, scheme: str, alpha: float, classes_per_client: int,
                min_size: int) -> None:
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown partition scheme '{scheme}'; choose one of {', '.join(SCHEMES)}")
    if num_clients < 1:
        raise ConfigError(f"the number of clients must be >= 1, got {num_clients}")
    if num_clients > n:
        raise ConfigError(f"more clients ({num_clients}) than training examples ({n}): every "
                          "client needs at least one example")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"the Dirichlet alpha must be > 0, got {alpha}")
    if min_size < 0:
        raise ConfigError(f"min_size must be >= 0, got {min_size}")
    if scheme == "dirichlet" and min_size * num_clients > n:
        raise ConfigError(f"min_size {min_size} x {num_clients} clients = {min_size * num_clients} "
                          f"exceeds the {n} training examples")
    if scheme == "shards":
        if classes_per_client < 1:
            raise ConfigError(f"classes_per_client must be >= 1, got {classes_per_client}")
        if num_clients * classes_per_client > n:
            raise ConfigError(f"{num_clients} clients x {classes_per_client} shards need at least "
                              f"{num_clients * classes_per_client} examples, there are {n}")


def _iid(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return np.array_split(rng.permutation(n), num_clients)


def _dirichlet_once(y: np.ndarray, num_clients: int, alpha: float,
                    rng: np.random.Generator) -> list[np.ndarray]:
    n = y.size
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    sizes = np.zeros(num_clients, dtype=np.int64)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        p = rng.dirichlet(np.full(num_clients, alpha))
        p = p * (sizes < n / num_clients)  # NIID-Bench balance: full clients get no more
        total = p.sum()
        p = p / total if total > 0 else np.full(num_clients, 1.0 / num_clients)
        cuts = (np.cumsum(p) * idx.size).astype(np.int64)[:-1]
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].append(chunk)
            sizes[k] += chunk.size
    return [np.concatenate(p) if p else np.zeros(0, dtype=np.int64) for p in parts]


def _shards(y: np.ndarray, num_clients: int, classes_per_client: int,
            rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(y.size)
    order = order[np.argsort(y[order], kind="stable")]  # by label, random within a label
    shards = np.array_split(order, num_clients * classes_per_client)
    assignment = rng.permutation(len(shards)).reshape(num_clients, classes_per_client)
    return [np.concatenate([shards[s] for s in row]) for row in assignment]


def partition(labels: torch.Tensor | Sequence[int] | np.ndarray, num_clients: int,
              scheme: str = "iid", alpha: float = 0.5, classes_per_client: int = 2,
              min_size: int = 10, seed: int = 0, max_tries: int = 1000) -> list[torch.Tensor]:
    """Split example indices among `num_clients`; returns one sorted int64 tensor per client.

    Disjoint and covering; a deterministic function of the arguments. See the module docstring
    for the schemes. `min_size` applies to ``dirichlet`` (the other schemes are balanced)."""
    y = _labels_array(labels)
    _check_args(y.size, num_clients, scheme, alpha, classes_per_client, min_size)
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = _iid(y.size, num_clients, rng)
    elif scheme == "shards":
        parts = _shards(y, num_clients, classes_per_client, rng)
    else:
        for _ in range(max_tries):
            parts = _dirichlet_once(y, num_clients, alpha, rng)
            if min(p.size for p in parts) >= max(min_size, 1):
                break
        else:
            raise ConfigError(f"no Dirichlet(alpha={alpha}) partition gave every one of "
                              f"{num_clients} clients >= {max(min_size, 1)} examples in "
                              f"{max_tries} draws; lower min_size or the number of clients, or "
                              "raise alpha")
    return [torch.from_numpy(np.sort(p)).long() for p in parts]


def class_histogram(labels: torch.Tensor | Sequence[int] | np.ndarray,
                    parts: Sequence[torch.Tensor], num_classes: int | None = None) -> torch.Tensor:
    """(clients, classes) counts: how many examples of each class each client holds."""
    y = _labels_array(labels)
    k = int(num_classes if num_classes is not None else (y.max() + 1 if y.size else 0))
    rows = [np.bincount(y[np.asarray(p, dtype=np.int64)], minlength=k)[:k] for p in parts]
    return torch.from_numpy(np.stack(rows)).long() if rows else torch.zeros(0, k, dtype=torch.long)


def summarize(labels: torch.Tensor | Sequence[int] | np.ndarray, parts: Sequence[torch.Tensor],
              num_classes: int | None = None) -> dict:
    """JSON-able description: sizes, the class histogram, classes held per client, and the mean
    total-variation distance between each client's label distribution and the global one (0 for
    a perfectly IID split, near 1 when clients hold disjoint classes)."""
    hist = class_histogram(labels, parts, num_classes).double()
    sizes = hist.sum(1)
    glob = hist.sum(0) / hist.sum().clamp_min(1)
    local = hist / sizes.clamp_min(1)[:, None]
    tv = 0.5 * (local - glob).abs().sum(1)
    return {
        "num_clients": len(parts),
        "sizes": [int(s) for s in sizes.tolist()],
        "min_size": int(sizes.min()) if len(parts) else 0,
        "max_size": int(sizes.max()) if len(parts) else 0,
        "classes_per_client": [int(c) for c in (hist > 0).sum(1).tolist()],
        "mean_tv_distance": float(tv.mean()) if len(parts) else 0.0,
        "histogram": hist.long().tolist(),
    }
