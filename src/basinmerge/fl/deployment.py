"""Flower deployments: an app folder that runs exactly this code, and a checked local run.

- `write_app(folder, config, out)`: a Flower app folder (``pyproject.toml``) whose only
  dependency is a wheel of *this* basinmerge, built into ``folder/wheels/`` and named by an
  absolute ``file://`` URL: a SuperLink or SuperNode that installs the app's dependencies
  installs exactly this code or fails; nothing is resolved by name from a package index. The
  run config carries ``code-hash`` (`code_hash`, over the package's source files): a ServerApp or
  ClientApp whose installed basinmerge differs refuses to run, also when runtime installation
  is disabled and the node uses what it has. ``out`` is written as an absolute path (the
  ServerApp runs in the SuperLink's working directory).
- `run_deployment(config, out)`: the whole thing on localhost: a SuperLink (with runtime
  dependency installation disabled in *its* environment), one SuperNode per client, ``flwr run``
  on the app, then the run's status from ``flwr ls``; a run that did not complete raises
  `FederatedError` with the ServerApp's error. Free loopback ports are found by binding port 0;
  every process started is stopped by its pid (with its children) on the way out, also on
  errors and Ctrl-C. Flower missing, a port in use, a SuperNode that never connects: one error,
  within ``connect_timeout`` seconds.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io as _io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import basinmerge
from basinmerge import io
from basinmerge.errors import ConfigError, FederatedError
from basinmerge.fl.config import UNSET, FLConfig
from basinmerge.fl.processes import descendant_pids, reap
from basinmerge.fl.simulator import SimulationResult

log = logging.getLogger("basinmerge.fl")

FEDERATION = "basinmerge-local"
APP_NAME = "basinmerge-fl"


# --------------------------------------------------------------------------- this code


def _package_files() -> list[Path]:
    root = Path(basinmerge.__file__).parent
    return sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and p.suffix not in (".pyc", ".pyo"))


def code_hash() -> str:
    """SHA-256 over the package's files (relative path and content), in path order."""
    root = Path(basinmerge.__file__).parent
    h = hashlib.sha256()
    for p in _package_files():
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


def check_code(expected: str | None) -> None:
    """Refuse to run app code whose basinmerge differs from the one the app was built from."""
    if expected and expected != code_hash():
        raise ConfigError(f"this node's basinmerge ({basinmerge.__file__}) is not the code the "
                          f"Flower app was built from (code-hash {expected[:12]}..., here "
                          f"{code_hash()[:12]}...); install the wheel in the app's wheels/ folder "
                          "on every machine, or rebuild the app with `basinmerge flower-app`")


def _requirements() -> list[str]:
    from importlib import metadata

    try:
        return list(metadata.requires("basinmerge") or [])
    except metadata.PackageNotFoundError:
        return []


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(dest: str | Path) -> Path:
    """A pure-Python wheel of the imported basinmerge (its files as they are now), written
    atomically into `dest`; needs no build tools and no network."""
    version = basinmerge.__version__
    name = f"basinmerge-{version}-py3-none-any.whl"
    info = f"basinmerge-{version}.dist-info"
    root = Path(basinmerge.__file__).parent
    reqs = _requirements()
    extras = sorted({r.split("extra ==")[1].strip().strip("'\"") for r in reqs if "extra ==" in r})
    meta = ["Metadata-Version: 2.1", "Name: basinmerge", f"Version: {version}",
            "Requires-Python: >=3.11", *[f"Provides-Extra: {e}" for e in extras],
            *[f"Requires-Dist: {r}" for r in reqs]]
    files: dict[str, bytes] = {f"basinmerge/{p.relative_to(root).as_posix()}": p.read_bytes()
                               for p in _package_files()}
    files[f"{info}/METADATA"] = ("\n".join(meta) + "\n").encode()
    files[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: basinmerge\n"
                              b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    files[f"{info}/entry_points.txt"] = b"[console_scripts]\nbasinmerge = basinmerge.__main__:run\n"
    record = "".join(f"{k},{_record_hash(v)},{len(v)}\n" for k, v in files.items())
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    buf = _io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for k, v in files.items():
            z.writestr(zipfile.ZipInfo(k, date_time=(1980, 1, 1, 0, 0, 0)), v)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(dest / name, suffix=".whl") as tmp:
        Path(tmp).write_bytes(buf.getvalue())
    return dest / name


# --------------------------------------------------------------------------- the app folder


def run_config(cfg: FLConfig, out: str | Path) -> dict[str, Any]:
    """`cfg` as Flower run-config keys (dashes; JSON strings for the option dicts; unset
    optional fields as `config.UNSET` writes them), with the absolute output folder and the code hash."""
    d: dict[str, Any] = {}
    for f in fields(FLConfig):
        v = getattr(cfg, f.name)
        if f.name in ("model_options", "strategy_options"):
            v = json.dumps(v, sort_keys=True)
        elif v is None:
            v = UNSET[f.name]
        d[f.name.replace("_", "-")] = v
    d["out"] = str(Path(out).resolve())
    d["connect-timeout"] = 120.0  # seconds the ServerApp waits for every SuperNode
    d["code-hash"] = code_hash()
    return d


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string


def write_app(folder: str | Path, cfg: FLConfig, out: str | Path, *, wheel: bool = True) -> Path:
    """Write the Flower app folder (see the module docstring); returns its pyproject.toml."""
    folder = Path(folder).resolve()
    dep = "basinmerge[flower]"
    if wheel:
        whl = build_wheel(folder / "wheels")
        dep = f"basinmerge[flower] @ {whl.as_uri()}"
    conf = "\n".join(f"{k} = {_toml_value(v)}" for k, v in run_config(cfg, out).items())
    text = f"""# Written by `basinmerge flower-app` (basinmerge {basinmerge.__version__}).
# The only dependency is the wheel of this basinmerge next to this file, by absolute path:
# nothing is installed by name from a package index. Copy the folder to the same absolute path
# on every machine, or install the wheel there and start the SuperLink with
# FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 (code-hash makes a different install refuse).
[project]
name = "{APP_NAME}"
version = "1.0.0"
dependencies = [{json.dumps(dep)}]

[tool.flwr.app]
publisher = "basinmerge"

[tool.flwr.app.components]
serverapp = "basinmerge.fl.flower_app:server_app"
clientapp = "basinmerge.fl.flower_app:client_app"

[tool.flwr.app.config]
{conf}
"""
    folder.mkdir(parents=True, exist_ok=True)
    return io.write_text(folder / "pyproject.toml", text)


# --------------------------------------------------------------------------- processes


def flower_executables() -> dict[str, str]:
    """The Flower commands next to this Python (else on PATH); an error when Flower is not
    installed."""
    here = Path(sys.executable).parent
    out = {}
    for name in ("flower-superlink", "flower-supernode", "flwr"):
        cand = here / name
        path = str(cand) if cand.is_file() else shutil.which(name)
        if path is None:
            raise FederatedError(f"Flower is not installed ('{name}' not found next to "
                                 f"{sys.executable} or on PATH); install basinmerge[flower]")
        out[name] = path
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bind port 0 and ask)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_port(port: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", int(port)))
        except OSError as e:
            raise FederatedError(f"port {port} on 127.0.0.1 is in use ({e.strerror}); choose "
                                 "another or leave the port unset to pick a free one") from None
    return int(port)


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _tail(path: Path, lines: int = 200) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _error_line(text: str) -> str | None:
    """The most telling error line of a log (the last exception line)."""
    cands = [ln.strip() for ln in text.splitlines()
             if ("Error" in ln or "Exception" in ln) and not ln.strip().startswith("File ")]
    return cands[-1] if cands else None


class _Processes:
    """Processes started here, stopped by pid (children first gathered from /proc)."""

    def __init__(self, logs: Path, env: Mapping[str, str]):
        self.logs, self.env = logs, dict(env)
        self.procs: dict[str, subprocess.Popen] = {}
        self.seen: set[int] = set()

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log_file = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed by the child
        try:
            p = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=self.env,
                                 cwd=self.logs, stdin=subprocess.DEVNULL)
        finally:
            log_file.close()
        self.procs[name] = p
        return p

    def watch(self) -> None:
        for p in self.procs.values():
            self.seen |= descendant_pids(p.pid)

    def died(self) -> str | None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                return name
        return None

    def stop(self) -> list[int]:
        self.watch()
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        killed = reap({p.pid for p in self.procs.values()} | self.seen, grace=5.0)
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        return killed

    def pids(self) -> list[int]:
        return sorted({p.pid for p in self.procs.values()} | self.seen)


@contextlib.contextmanager
def _started(logs: Path, env: Mapping[str, str]) -> Iterator[_Processes]:
    procs = _Processes(logs, env)
    try:
        yield procs
    finally:
        killed = procs.stop()
        if killed:
            log.info("stopped %d Flower process(es) by pid", len(killed))


def _flwr(exe: str, args: list[str], env: Mapping[str, str], cwd: Path,
          timeout: float) -> dict:
    """Run a ``flwr`` command with ``--format json`` and return its JSON answer."""
    try:
        res = subprocess.run([exe, *args, "--format", "json"], env=dict(env), cwd=cwd,
                             capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise FederatedError(f"`flwr {args[0]}` did not answer within {timeout:.0f} s") from None
    text = res.stdout.strip()
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        line = _error_line(res.stdout + res.stderr) or (res.stdout + res.stderr).strip()[-300:]
        raise FederatedError(f"`flwr {args[0]}` failed: {line}") from None


def run_deployment(cfg: FLConfig, out: str | Path, *, superlink_port: int | None = None,
                   connect_timeout: float = 120.0, run_timeout: float = 3600.0,
                   max_retries: int = 3, poll: float = 1.0,
                   supernodes: int | None = None) -> SimulationResult:
    """Run `cfg` through a local SuperLink, ``cfg.clients`` SuperNodes and ``flwr run``; see
    the module docstring. Returns the final state and history the ServerApp wrote to `out`;
    the app folder and the processes' logs are under ``out/flower/``. `supernodes` starts fewer
    SuperNodes than clients (to see the ServerApp give up after `connect_timeout`)."""
    exes = flower_executables()
    out = Path(out).resolve()
    work = out / "flower"
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    port = check_port(superlink_port) if superlink_port is not None else free_port()
    node_ports = [free_port() for _ in range(cfg.clients if supernodes is None else supernodes)]
    app = write_app(work / "app", cfg, out, wheel=False).parent
    home = work / "flwr-home"
    home.mkdir(exist_ok=True)
    io.write_text(home / "config.toml", f'[superlink]\ndefault = "{FEDERATION}"\n\n'
                  f'[superlink.{FEDERATION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    pythonpath = os.pathsep.join(p for p in [str(Path(basinmerge.__file__).parent.parent),
                                             os.environ.get("PYTHONPATH", "")] if p)
    bindir = str(Path(exes["flower-superlink"]).parent)  # flower-superexec, flwr-clientapp, ...
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "PATH": os.pathsep.join([bindir, os.environ.get("PATH", "")]),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONPATH": pythonpath,
           "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with _started(logs, env) as procs:
        procs.start("superlink", [exes["flower-superlink"], "--insecure", "--host", "127.0.0.1",
                                  "--port", str(port)])
        _wait(lambda: _listening(port), procs, connect_timeout, logs,
              f"the SuperLink did not listen on 127.0.0.1:{port}")
        for i, p in enumerate(node_ports):
            procs.start(f"supernode-{i}", [
                exes["flower-supernode"], "--insecure", "--superlink", f"127.0.0.1:{port}",
                "--host", "127.0.0.1", "--port", str(p), "--max-retries", str(max_retries),
                "--node-config", f"partition-id={i} num-partitions={cfg.clients}"])
        answer = _flwr(exes["flwr"], ["run", str(app), FEDERATION, "--run-config",
                                      f"connect-timeout={float(connect_timeout)}"],
                       env, work, timeout=max(180.0, connect_timeout))
        if not answer.get("success") or not answer.get("run-id"):
            raise FederatedError(f"`flwr run` did not start the run: {answer}")
        run_id = str(answer["run-id"])
        status = _wait_run(exes["flwr"], run_id, procs, env, work, run_timeout, poll)
        procs.watch()
        pids = procs.pids()
    if not status.startswith("finished:completed"):
        log_text = _server_log(exes["flwr"], run_id, env, work)
        reason = _error_line(log_text) or status
        raise FederatedError(f"the Flower run {run_id} ended '{status}': {reason} (logs in "
                             f"{logs})")
    state, meta = io.load_state(out / "final.safetensors")
    history = io.read_json(out / "rounds.json")
    return SimulationResult(state=dict(state), history=list(history),
                            timings={"total_seconds": time.perf_counter() - t0},
                            extra={"backend": "flower-deployment", "run_id": run_id,
                                   "pids": pids, "logs": str(logs)})


def _wait(ready, procs: _Processes, timeout: float, logs: Path, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        dead = procs.died()
        if dead is not None:
            tail = _tail(logs / f"{dead}.log")
            raise FederatedError(f"{what}: the {dead} exited "
                                 f"({_error_line(tail) or 'see ' + str(logs / dead) + '.log'})")
        if time.monotonic() > deadline:
            raise FederatedError(f"{what} within {timeout:.0f} s")
        time.sleep(0.2)


def _wait_run(flwr: str, run_id: str, procs: _Processes, env, cwd: Path, timeout: float,
              poll: float) -> str:
    """Poll ``flwr ls`` until the run has finished; returns its status text."""
    deadline = time.monotonic() + timeout
    while True:
        procs.watch()
        runs = _flwr(flwr, ["ls", "--run-id", run_id], env, cwd, timeout=180).get("runs", [])
        status = str(runs[0].get("status", "")) if runs else ""
        if status.startswith("finished"):
            details = runs[0].get("status-details") or ""
            return f"{status}{' (' + details + ')' if details else ''}"
        if procs.procs["superlink"].poll() is not None:
            return "superlink exited"
        if time.monotonic() > deadline:
            _flwr(flwr, ["stop", run_id], env, cwd, timeout=60)
            return f"timed out after {timeout:.0f} s"
        time.sleep(poll)


def _server_log(flwr: str, run_id: str, env, cwd: Path) -> str:
    try:
        res = subprocess.run([flwr, "log", run_id, "--show"], env=dict(env), cwd=cwd,
                             capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return ""
    return res.stdout + res.stderr


__all__ = ["build_wheel", "check_code", "code_hash", "free_port", "run_config",
           "run_deployment", "write_app"]
