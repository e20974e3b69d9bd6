"""Flower records for the federated messages, encoded once for every strategy.

- server -> client: the global weights (``ArrayRecord`` "arrays"), a ``ConfigRecord`` "config"
  with the round and the `Instructions`' scalars (``mu``, ``wsa-lambda``, ``divergence``,
  ``reduce``, ``strategy`` and the strategy's ``options`` as JSON), for WSA an ``ArrayRecord``
  "target-scope" (one ``[μ, σ, n]`` array per layer) and, when the strategy sends tensors, one
  ``ArrayRecord`` "instruction-arrays" holding them packed (``group::key``);
- client -> server: one ``ArrayRecord`` with the new weights and the strategy's extras packed
  under ``extra::group::key``, one ``MetricRecord`` (``num-examples``, ``train-loss``,
  ``client-id``, ``seconds`` and the client's scope as ``scope-mean`` / ``scope-std``) and a
  ``ConfigRecord`` "scope" naming the scope's layers.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from basinmerge.fl.client import ClientUpdate, Instructions
from basinmerge.fl.strategy import pack, unpack
from basinmerge.scope import LayerScope, Scope

SCOPE_RECORD = "target-scope"
ARRAYS_RECORD = "instruction-arrays"
EXTRA = "extra::"


def scope_to_record(scope: Scope) -> ArrayRecord:
    """A scope as an ArrayRecord: one float64 array ``[μ, σ, n]`` per layer, in layer order."""
    return ArrayRecord({k: Array(np.array([v.mean, v.std, float(v.count)], dtype=np.float64))
                        for k, v in scope.items()})


def scope_from_record(record: ArrayRecord) -> Scope:
    layers = {}
    for k, arr in record.items():
        m, s, n = arr.numpy().tolist()
        layers[k] = LayerScope(float(m), float(s), int(n))
    return Scope(layers)


def instructions_to_records(instr: Instructions) -> dict[str, Any]:
    """The records (by name) that carry `instr`; "config" is a plain dict to merge into the
    round's ConfigRecord."""
    out: dict[str, Any] = {"config": {
        "mu": instr.mu, "wsa-lambda": instr.wsa_lambda, "divergence": instr.divergence,
        "reduce": instr.reduce, "strategy": instr.strategy,
        "options": json.dumps(instr.options, sort_keys=True)}}
    if instr.target is not None:
        out[SCOPE_RECORD] = scope_to_record(instr.target)
    packed = pack(instr.arrays)
    if packed:
        out[ARRAYS_RECORD] = ArrayRecord(packed)
    return out


def instructions_from_content(content: RecordDict, server_round: int) -> Instructions:
    cfg: Any = content.config_records.get("config", ConfigRecord())
    target = content.array_records.get(SCOPE_RECORD)
    arrays = content.array_records.get(ARRAYS_RECORD)
    return Instructions(round=server_round, mu=float(cfg.get("mu", 0.0)),
                        wsa_lambda=float(cfg.get("wsa-lambda", 0.0)),
                        divergence=str(cfg.get("divergence", "kl")),
                        reduce=str(cfg.get("reduce", "mean")),
                        target=scope_from_record(target) if target is not None else None,
                        strategy=str(cfg.get("strategy", "fedavg")),
                        options=json.loads(str(cfg.get("options", "{}"))),
                        arrays=unpack(arrays.to_torch_state_dict()) if arrays is not None else {})


def update_to_content(upd: ClientUpdate) -> RecordDict:
    """A client's reply: weights (+ packed extras), metrics with the scope, layer names."""
    means, stds = upd.scope.tensors()
    metrics = MetricRecord({"num-examples": upd.num_examples, "client-id": upd.client,
                            "train-loss": upd.metrics["train_loss"],
                            "seconds": upd.metrics["seconds"],
                            "scope-mean": means.tolist(), "scope-std": stds.tolist()})
    layers = ConfigRecord({"layers": list(upd.scope.keys()),
                           "counts": [v.count for v in upd.scope.values()]})
    extras = {EXTRA + k: v for k, v in pack(upd.extras).items()}
    return RecordDict({"arrays": ArrayRecord({**upd.state, **extras}), "metrics": metrics,
                       "scope": layers})


def update_from_reply(msg: Message) -> ClientUpdate:
    """A `ClientUpdate` from a train reply (the inverse of `update_to_content`)."""
    content = msg.content
    metrics: Any = next(iter(content.metric_records.values()))
    layers: Any = content.config_records["scope"]
    scope = Scope({k: LayerScope(float(m), float(s), int(n)) for k, m, s, n in zip(
        layers["layers"], metrics["scope-mean"], metrics["scope-std"], layers["counts"],
        strict=True)})
    flat = next(iter(content.array_records.values())).to_torch_state_dict()
    state = {k: v for k, v in flat.items() if not k.startswith(EXTRA)}
    extras = unpack({k[len(EXTRA):]: v for k, v in flat.items() if k.startswith(EXTRA)})
    return ClientUpdate(client=int(metrics["client-id"]), state=dict(state),
                        num_examples=int(metrics["num-examples"]), scope=scope,
                        metrics={"train_loss": float(metrics["train-loss"]),
                                 "seconds": float(metrics["seconds"])}, extras=extras)
