"""Child processes of a Flower run: finding them in /proc and stopping them by pid (Linux;
elsewhere the lookups are empty). Used to make sure no Ray worker, SuperLink or SuperNode
outlives a run."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path


def _state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()[0]


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    s = _state(pid)
    return s is not None and s != "Z"


def descendant_pids(pid: int | None = None) -> set[int]:
    """Live descendants of a process (default: this one), read from /proc."""
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return set()
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(d.name))
    out: set[int] = set()
    stack = [root]
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in out:
                out.add(c)
                stack.append(c)
    return out


def reap(pids: Iterable[int], grace: float = 15.0) -> list[int]:
    """Wait up to `grace` seconds for the given processes to exit, then SIGTERM and SIGKILL
    the ones left (by pid). Returns the pids that had to be killed."""
    pids = set(pids)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    killed = [p for p in pids if alive(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in killed:
            if alive(p):
                try:
                    os.kill(p, sig)
                except OSError:
                    pass
        if sig == signal.SIGTERM:
            end = time.monotonic() + 3.0
            while time.monotonic() < end and any(alive(p) for p in killed):
                time.sleep(0.1)
    return killed
