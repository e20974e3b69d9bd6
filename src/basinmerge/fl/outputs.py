"""What a federated run writes, for both backends: the round record, ``rounds.json`` /
``rounds.csv``, the server checkpoint, ``final.safetensors`` and ``accuracy.png``.

`round_record` is the one builder of a round's record (round 0 = the initial model); the
checkpoint holds the global model, the strategy's tensor state (keys prefixed
``strategy::``), and as metadata the run's configuration, the strategy's JSON state and the
history. Everything is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import copy
import csv
import io as _io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from basinmerge import io
from basinmerge.errors import ConfigError
from basinmerge.state import StateDict

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_KIND = "basinmerge-fl-server"
STRATEGY_PREFIX = "strategy::"
CSV_COLUMNS = ("round", "test_accuracy", "test_loss", "train_loss", "scope_divergence",
               "clients", "accepted", "dropped", "rejected", "train_seconds", "eval_seconds",
               "other_seconds")
# Options that may change between a run and its resumption (they do not change any round).
RESUMABLE_CHANGES = ("rounds", "data_root")
RUN_FILES = (CHECKPOINT, "rounds.json", "final.safetensors")


def finite_or_none(x: float | None) -> float | None:
    """NaN/Inf become None, so the JSON outputs stay strict JSON."""
    return None if x is None or not math.isfinite(x) else float(x)


def round_record(server_round: int, metrics: Mapping, *, clients: Sequence[int] = (),
                 outcome=None, dropped: Mapping[int, str] | None = None,
                 train_seconds: float = 0.0, eval_seconds: float = 0.0,
                 warnings: Sequence[str] = ()) -> dict:
    """One round's record: test metrics, who took part, what was accepted, dropped (client
    failures) or rejected (bad updates), the aggregate training loss and scope divergence,
    and the time split. `outcome` is the strategy's `RoundOutcome` (None for round 0)."""
    rec = {"round": int(server_round), **dict(metrics), "clients": list(clients),
           "accepted": list(outcome.accepted) if outcome is not None else [],
           "dropped": dict(dropped or {}),
           "rejected": dict(outcome.rejected) if outcome is not None else {},
           "train_loss": finite_or_none(outcome.train_loss) if outcome is not None else None,
           "scope_divergence": (finite_or_none(outcome.scope_divergence)
                                if outcome is not None else None),
           "train_seconds": float(train_seconds), "eval_seconds": float(eval_seconds)}
    if warnings:
        rec["warnings"] = list(warnings)
    return rec


def total_timings(history: Sequence[Mapping]) -> dict:
    """Seconds spent in local training, evaluation and everything else, summed over rounds."""
    keys = ("train_seconds", "eval_seconds", "other_seconds")
    tot = {k: float(sum(r.get(k, 0.0) for r in history)) for k in keys}
    tot["total_seconds"] = sum(tot.values())
    return tot


def history_csv(history: Sequence[Mapping]) -> str:
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in history:
        row = []
        for c in CSV_COLUMNS:
            v = r.get(c, "")
            if isinstance(v, list | tuple | dict):
                v = " ".join(str(x) for x in v)
            row.append(v)
        w.writerow(row)
    return buf.getvalue()


def write_history(out: Path, history: Sequence[Mapping]) -> None:
    io.write_json(out / "rounds.json", list(history))
    io.write_text(out / "rounds.csv", history_csv(history))


def write_checkpoint(out: Path, state: Mapping[str, torch.Tensor], server_round: int,
                     config: Mapping, strategy, history: Sequence[Mapping]) -> Path:
    """The whole server state after `server_round`, written atomically (temp file + rename)."""
    meta = {"kind": CHECKPOINT_KIND, "round": server_round, "config": dict(config),
            "strategy": strategy.name, "strategy_state": strategy.state_dict(),
            "history": list(history)}
    tensors = {STRATEGY_PREFIX + k: v for k, v in strategy.state_tensors().items()}
    return io.save_state({**dict(state), **tensors}, out / CHECKPOINT, meta)


def read_run_config(folder: Path) -> dict:
    """The configuration a run folder's checkpoint was written under."""
    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"{folder}: no {CHECKPOINT} to resume from (was the run started with "
                          "its output folder there?)")
    meta = io.read_meta(path)
    if meta.get("kind") != CHECKPOINT_KIND:
        raise ConfigError(f"{path}: not a federated server checkpoint")
    return dict(meta.get("config", {}))


def config_difference(stored: Mapping, current: Mapping,
                      ignore: Sequence[str] = RESUMABLE_CHANGES) -> list[str]:
    """Every option whose value differs between two config dicts, as readable phrases."""
    out = []
    for k in sorted(set(stored) | set(current)):
        if k in ignore:
            continue
        a, b = stored.get(k, "<unset>"), current.get(k, "<unset>")
        if a != b:
            out.append(f"{k} = {a!r} there, {b!r} here")
    return out


def read_checkpoint(folder: Path, config: Mapping, strategy) -> tuple[StateDict, int, list]:
    """Load a server checkpoint for `resume`, refusing one made under another configuration."""
    path = Path(folder) / CHECKPOINT
    read_run_config(folder)
    state, meta = io.load_state(path)
    diff = config_difference(dict(meta.get("config", {})), dict(config))
    if diff:
        raise ConfigError(f"{folder}: the checkpoint belongs to another configuration "
                          f"({diff[0]}); resume with the same options or start a new output "
                          "folder")
    strategy.load_state_dict(meta.get("strategy_state", {}))
    strategy.load_state_tensors({k[len(STRATEGY_PREFIX):]: v for k, v in state.items()
                                 if k.startswith(STRATEGY_PREFIX)})
    model_state = {k: v for k, v in state.items() if not k.startswith(STRATEGY_PREFIX)}
    return model_state, int(meta["round"]), list(meta.get("history", []))


def finish_outputs(out: Path, model: nn.Module, state: Mapping[str, torch.Tensor],
                   history: Sequence[Mapping], meta: Mapping | None = None,
                   title: str = "") -> None:
    """Final model (``final.safetensors``), history files and the accuracy-vs-round plot."""
    from basinmerge.plots import fl_round_curves

    write_history(out, history)
    net = copy.deepcopy(model)
    net.load_state_dict(dict(state))
    last = history[-1]
    io.save(net, out / "final.safetensors",
            {**dict(meta or {}), "test_accuracy": last.get("test_accuracy"),
             "round": last.get("round")})
    curve = {title or "global model": [[r["test_accuracy"] for r in history]]}
    io.save_figure(fl_round_curves({"": curve}, "test accuracy"), out / "accuracy.png")
