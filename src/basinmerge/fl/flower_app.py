"""The same federated computation as a Flower app (Message API, flwr >= 1.41, < 1.43).

- `make_client_app(config)`: a `ClientApp` whose ``train`` handler runs `client_update` (the
  embedded simulator's function) on the node's partition (``partition-id`` from the node
  config) and replies with one ``ArrayRecord`` (the new weights), one ``MetricRecord``
  (``num-examples``, the training loss, the client id and its weight scope as ``scope-mean`` /
  ``scope-std`` lists) and a ``ConfigRecord`` naming the scope's layers. ``evaluate`` scores the
  global model on the local partition; ``query`` reports the partition id.
- `make_server_app(config)`: a `ServerApp` running `ScopeStrategy`, a subclass of Flower's
  `FedAvg` that delegates sampling, instructions and aggregation to a
  `basinmerge.fl.strategy.Strategy` (the same object the embedded simulator drives). Each
  train message carries the global model and the client's instructions, encoded by
  `basinmerge.fl.codec` (the same for every strategy). The global model is evaluated centrally
  every round; a round in which every client failed stops the run with an error.
- `run_flower(config)`: runs both in Flower's simulation engine (Ray) in this process.
- ``client_app`` / ``server_app``: module-level apps for ``flwr run`` and for deployments with
  ``flower-superlink`` / ``flower-supernode``; they read the configuration from the run config
  (``[tool.flwr.app.config]`` keys named like `FLConfig` fields with dashes, see
  docs/flower.md).

Determinism: Flower's own node sampling is random and node ids change every run, so the
strategy first asks every node for its partition id (a ``query`` message) and then samples
partition ids with `Strategy.sample`; replies are aggregated in client-id order. With the same
configuration and seed, a Flower run computes what the embedded simulator computes, up to
floating-point differences from thread counts (Ray workers use one thread each).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from basinmerge.console import progress_task
from basinmerge.errors import BasinmergeError, ConfigError
from basinmerge.fl.client import client_update
from basinmerge.fl.codec import (
    instructions_from_content,
    instructions_to_records,
    update_from_reply,
    update_to_content,
)
from basinmerge.fl.config import UNSET, FLConfig, build_model, build_partitions, load_data
from basinmerge.fl.outputs import finish_outputs, round_record, write_history
from basinmerge.fl.processes import descendant_pids, reap
from basinmerge.fl.simulator import SimulationResult, check_round, evaluate_state
from basinmerge.fl.strategy import Strategy
from basinmerge.train import evaluate

log = logging.getLogger("basinmerge.fl")

PARTITION_KEY = "partition-id"


# Run-config keys that are not `FLConfig` fields (read by the apps themselves).
APP_KEYS = ("out", "client_timeout", "code_hash", "connect_timeout")


def config_from_run_config(run_config: Mapping[str, Any]) -> FLConfig:
    """An `FLConfig` from Flower run-config keys (``clients = 20``, ``local-epochs = 2``, ...;
    ``model-options`` and ``strategy-options`` are JSON object strings; 0 or "" for
    an optional field such as ``train-limit`` or ``test-data`` means unset: `config.UNSET`). A ``code-hash`` key is checked
    against this node's basinmerge (`basinmerge.fl.deployment.check_code`)."""
    from basinmerge.fl.deployment import check_code

    check_code(run_config.get("code-hash"))
    d: dict[str, Any] = {}
    for key, value in run_config.items():
        name = str(key).replace("-", "_")
        if name in APP_KEYS:
            continue
        if name in ("model_options", "strategy_options"):
            value = json.loads(value) if isinstance(value, str) and value else dict(value or {})
        if name in UNSET and value in (UNSET[name], None):
            value = None
        d[name] = value
    return FLConfig.from_dict(d)


# --------------------------------------------------------------------------- client side


@lru_cache(maxsize=2)
def _client_env(config_json: str):
    """Data, partitions and model template of one configuration, built once per process."""
    cfg = FLConfig.from_dict(json.loads(config_json))
    train, _ = load_data(cfg)
    return cfg, build_model(cfg, train), train, build_partitions(cfg, train)


def _resolve_config(fixed: Mapping | None, context: Context) -> str:
    cfg = FLConfig.from_dict(dict(fixed)) if fixed is not None else \
        config_from_run_config(context.run_config)
    return json.dumps(cfg.to_dict(), sort_keys=True)


def _partition_id(context: Context, num_clients: int) -> int:
    if PARTITION_KEY not in context.node_config:
        raise ConfigError("the node config has no 'partition-id' (start the supernode with "
                          "--node-config \"partition-id=K num-partitions=N\")")
    pid = int(context.node_config[PARTITION_KEY])
    if not 0 <= pid < num_clients:
        raise ConfigError(f"partition-id {pid} is outside 0..{num_clients - 1}")
    return pid


def make_client_app(config: Mapping | None = None) -> ClientApp:
    """A ClientApp; `config` (an `FLConfig` dict) fixes the run, else the run config is read."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)  # workers share the machine's cores
        cfg, model, data, parts = _client_env(_resolve_config(config, context))
        cid = _partition_id(context, cfg.clients)
        content: Any = msg.content
        server_round = int(content["config"]["server-round"])
        instr = instructions_from_content(msg.content, server_round)
        global_state = content["arrays"].to_torch_state_dict()
        upd = client_update(model, global_state, data.subset(parts[cid]), cfg.local_training(),
                            instr, client=cid, seed=cfg.seed)
        return Message(update_to_content(upd), reply_to=msg)

    @app.evaluate()
    def evaluate_local(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        cfg, model, data, parts = _client_env(_resolve_config(config, context))
        cid = _partition_id(context, cfg.clients)
        net = copy.deepcopy(model)
        arrays: Any = msg.content["arrays"]
        net.load_state_dict(arrays.to_torch_state_dict())
        m = evaluate(net, data.subset(parts[cid]))
        return Message(RecordDict({"metrics": MetricRecord(
            {"num-examples": len(parts[cid]), "loss": m["loss"], "accuracy": m["accuracy"]})}),
            reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        cfg, _, _, parts = _client_env(_resolve_config(config, context))
        cid = _partition_id(context, cfg.clients)
        return Message(RecordDict({"info": ConfigRecord(
            {PARTITION_KEY: cid, "num-examples": len(parts[cid])})}), reply_to=msg)

    return app


# --------------------------------------------------------------------------- server side


class ScopeStrategy(FlowerFedAvg):
    """Flower's FedAvg with sampling, instructions (proximal μ, WSA target scope in an extra
    ArrayRecord) and aggregation delegated to a basinmerge `Strategy`."""

    def __init__(self, policy: Strategy, num_clients: int, query_timeout: float = 600.0,
                 connect_timeout: float | None = None):
        super().__init__(fraction_train=policy.fraction, fraction_evaluate=0.0,
                         min_train_nodes=1, min_evaluate_nodes=0,
                         min_available_nodes=num_clients)
        self.policy = policy
        self.num_clients = int(num_clients)
        self.query_timeout = query_timeout
        self.connect_timeout = connect_timeout
        self.node_of: dict[int, int] = {}
        self.global_state: dict[str, torch.Tensor] | None = None
        self.rounds: dict[int, dict] = {}

    def _map_nodes(self, grid: Grid) -> None:
        """Ask every node for its partition id (node ids are random per run), after waiting
        (up to `connect_timeout` seconds, if set) until all of them have connected."""
        if self.connect_timeout is not None:
            deadline = time.monotonic() + self.connect_timeout
            while len(list(grid.get_node_ids())) < self.num_clients:
                if time.monotonic() > deadline:
                    raise BasinmergeError(
                        f"only {len(list(grid.get_node_ids()))} of {self.num_clients} SuperNodes "
                        f"connected within {self.connect_timeout:g} s; start one per partition "
                        "(a SuperNode gives up after --max-retries failed connections and must "
                        "be restarted)")
                time.sleep(0.5)
        node_ids, _ = sample_nodes(grid, self.num_clients, self.num_clients)
        msgs = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
                for n in node_ids]
        for reply in grid.send_and_receive(msgs, timeout=self.query_timeout):
            if reply.has_error():
                raise BasinmergeError(f"node {reply.metadata.src_node_id} failed to report its "
                                      f"partition id: {reply.error.reason}")
            info: Any = reply.content["info"]
            pid = int(info[PARTITION_KEY])
            self.node_of[pid] = reply.metadata.src_node_id
        missing = sorted(set(range(self.num_clients)) - set(self.node_of))
        if missing:
            raise BasinmergeError(f"no node serves partition(s) {missing[:5]} of "
                                  f"{self.num_clients}; start one supernode per partition")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if not self.node_of:
            self._map_nodes(grid)
        clients = self.policy.sample(server_round, self.num_clients)
        self.global_state = dict(arrays.to_torch_state_dict())
        instr = self.policy.instructions(server_round, self.global_state)
        self.rounds[server_round] = {"clients": clients, "t0": time.perf_counter()}
        messages = []
        for c in clients:
            records = instructions_to_records(self.policy.client_instructions(instr, c))
            records[self.configrecord_key] = ConfigRecord(
                {**dict(config), **records.pop("config"), "server-round": server_round})
            records[self.arrayrecord_key] = arrays
            messages.append(Message(RecordDict(records), dst_node_id=self.node_of[c],
                                    message_type=MessageType.TRAIN))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, errors = self._check_and_log_replies(list(replies), is_train=True)
        partition_of = {n: p for p, n in self.node_of.items()}
        dropped = {partition_of.get(m.metadata.src_node_id, -1): str(m.error.reason)
                   for m in errors}
        for cid, reason in dropped.items():
            log.warning("round %d: dropped client %d (%s)", server_round, cid, reason)
        updates = [update_from_reply(m) for m in valid]
        outcome = self.policy.aggregate(server_round, self.global_state or {}, updates)
        check_round(server_round, outcome, dropped, None)
        info = self.rounds.setdefault(server_round, {})
        info.update({"outcome": outcome, "dropped": dropped,
                     "train_seconds": time.perf_counter() - info.get("t0", time.perf_counter())})
        metrics = MetricRecord({"train-loss": outcome.train_loss,
                                "scope-divergence": outcome.scope_divergence,
                                "accepted": len(outcome.accepted)})
        return ArrayRecord(outcome.state), metrics


def _server_main(grid: Grid, context: Context, fixed: Mapping | None, sink: dict | None,
                 out: str | Path | None, progress: bool, timeout: float) -> None:
    cfg = FLConfig.from_dict(dict(fixed)) if fixed is not None else \
        config_from_run_config(context.run_config)
    if out is None and fixed is None and context.run_config.get("out"):
        out = str(context.run_config["out"])
    # A relative `out` would land in the SuperLink's working directory: say where it goes.
    out_path = Path(out).resolve() if out is not None else None
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)
        log.info("the ServerApp writes to %s", out_path)
    connect = context.run_config.get("connect-timeout") if fixed is None else None
    train, test = load_data(cfg)
    model = build_model(cfg, train)
    policy = cfg.make_strategy()
    strategy = ScopeStrategy(policy, cfg.clients,
                             connect_timeout=float(connect) if connect else None)
    eval_net = copy.deepcopy(model)
    history: list[dict] = []

    with progress_task("federated (flower)", cfg.rounds, enabled=progress) as advance:
        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            t0 = time.perf_counter()
            metrics = evaluate_state(eval_net, arrays.to_torch_state_dict(), test)
            info = strategy.rounds.pop(server_round, {})
            record = round_record(server_round, metrics, clients=info.get("clients", []),
                                  outcome=info.get("outcome"), dropped=info.get("dropped"),
                                  train_seconds=info.get("train_seconds", 0.0),
                                  eval_seconds=time.perf_counter() - t0,
                                  warnings=policy.round_warnings(server_round)
                                  if server_round else ())
            history.append(record)
            if out_path is not None:
                write_history(out_path, history)
            if server_round > 0:
                advance(1, round=server_round, acc=metrics["test_accuracy"])
            return MetricRecord({"accuracy": metrics["test_accuracy"], "loss": metrics["test_loss"]})

        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                                num_rounds=cfg.rounds, timeout=timeout, evaluate_fn=evaluate_fn)
    state = dict(result.arrays.to_torch_state_dict())
    if sink is not None:  # Ray's workers, while they still hang below this process
        sink["pids"] = descendant_pids()
    if out_path is not None:
        finish_outputs(out_path, model, state, history,
                       {"federated": cfg.to_dict(), "backend": "flower"}, title=cfg.strategy)
    if sink is not None:
        sink["state"], sink["history"] = state, history


def make_server_app(config: Mapping | None = None, *, sink: dict | None = None,
                    out: str | Path | None = None, progress: bool = False,
                    timeout: float = 3600.0) -> ServerApp:
    """A ServerApp; `config` fixes the run (else the run config is read, with its ``out``
    key naming the output folder); the final state and history are put into `sink`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _server_main(grid, context, config, sink, out, progress, timeout)

    return app


# Module-level apps for `flwr run` and deployments (configured through the run config).
client_app = make_client_app()
server_app = make_server_app(progress=False)


def run_flower(config: FLConfig, *, out: str | Path | None = None, progress: bool = True,
               num_cpus: int | None = None, client_cpus: float = 1.0, verbose: bool = False,
               timeout: float = 3600.0) -> SimulationResult:
    """Run the configuration in Flower's simulation engine (Ray) and return what the embedded
    simulator returns. `timeout`: seconds the server waits for a round's replies (a client that
    misses it is dropped for the round). Ray is shut down afterwards, also on errors, and any
    Ray worker still alive after a grace period is killed by pid."""
    from flwr.simulation import run_simulation

    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    sink: dict = {}
    cfg_dict = config.to_dict()
    backend_config: Any = {
        "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": int(num_cpus or os.cpu_count() or 1),
                      "include_dashboard": False, "logging_level": "error",
                      "log_to_driver": verbose},
    }
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    t0 = time.perf_counter()
    before = descendant_pids()  # children that are not ours to stop
    try:
        run_simulation(server_app=make_server_app(cfg_dict, sink=sink, out=out,
                                                  progress=progress, timeout=timeout),
                       client_app=make_client_app(cfg_dict), num_supernodes=config.clients,
                       backend_config=backend_config, verbose_logging=verbose)
    finally:
        flwr_logger.setLevel(level)
        import ray

        pids = (sink.get("pids", set()) | descendant_pids()) - before
        if ray.is_initialized():
            ray.shutdown()
        killed = reap(pids)
        if killed:
            log.warning("killed %d Flower/Ray process(es) that outlived the run", len(killed))
    if "state" not in sink:
        raise BasinmergeError("the Flower run ended without a result (see Flower's log above)")
    return SimulationResult(state=sink["state"], history=sink["history"],
                            timings={"total_seconds": time.perf_counter() - t0},
                            extra={"backend": "flower", "worker_pids": sorted(pids),
                                   "killed_pids": killed})
