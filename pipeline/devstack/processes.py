"""The stack's child processes and the file that records them.

Each process starts in its own session, so a stop can take its whole process group, and is recorded by pid *and*
start time: a pid the kernel has given to someone else since is never ours to signal. The record (the stack's
state file) is rewritten atomically after every change, so a `down` from another shell sees what runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import psutil

from pipeline.devstack import netns
from pipeline.devstack.errors import StackError

# psutil is imported where it is used: `vitpipe --help` imports this package and need not pay for it.

__all__ = ["BIN", "Proc", "spawn", "alive", "stop", "kill_pid", "kill_matching", "wait_for", "write_state"]

BIN = Path(sys.executable).parent  # the venv's programs (ray, mlflow, python): what every node runs
_CHILDREN: dict[int, subprocess.Popen] = {}  # Popen objects of this process, reaped on stop (no zombies)


@dataclass
class Proc:
    """One process the stack started; pid and start time together say it is still that process."""

    name: str
    pid: int
    create_time: float
    cmd: list[str]
    log: str
    namespace: str | None = None


def spawn(name: str, cmd: list[str], *, logfile: Path, cwd: str, env: dict[str, str] | None = None,
          ns: str | None = None) -> Proc:
    """Starts `cmd` in its own session (inside network namespace `ns` if given), output appended to `logfile`."""
    full = netns.exec_prefix(ns) + cmd
    with open(logfile, "ab") as out:
        popen = subprocess.Popen(
            full, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )
    _CHILDREN[popen.pid] = popen
    return Proc(name, popen.pid, psutil.Process(popen.pid).create_time(), full, str(logfile), ns)


def alive(proc: Proc) -> bool:
    popen = _CHILDREN.get(proc.pid)
    if popen is not None and popen.poll() is not None:
        return False
    try:
        p = psutil.Process(proc.pid)
        return abs(p.create_time() - proc.create_time) < 0.5 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop(proc: Proc, grace_s: float = 20.0) -> bool:
    """SIGTERM the process (Ray's `--block` parent then stops its children), wait, then SIGKILL its group and
    any descendants. Only touches the process if it is still the one we started (pid + start time)."""
    if not alive(proc):
        _reap(proc.pid)
        return False
    try:
        parent = psutil.Process(proc.pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.Error:
        family = []
    try:
        os.kill(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and alive(proc):
        time.sleep(0.1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for p in family:
        try:
            p.kill()
        except psutil.Error:
            pass
    _reap(proc.pid)
    return True


def _reap(pid: int) -> None:
    popen = _CHILDREN.pop(pid, None)
    if popen is not None:
        try:
            popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def kill_matching(marker: str) -> None:
    """Last sweep: processes whose command line names this stack's private temp dir (Ray workers that left
    their session) are ours."""
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(marker in arg for arg in p.info["cmdline"] or []):
            kill_pid(p.info["pid"])


def wait_for(check: Callable[[], bool], deadline: float, what: str, logfile: Path | None = None,
             procs: Sequence[Proc] = ()) -> None:
    """Polls `check` until it holds; fails early (with the log's tail) when a process it depends on exits."""
    died = None
    while time.monotonic() < deadline:
        if check():
            return
        died = next((p for p in procs if not alive(p)), None)
        if died is not None:
            break
        time.sleep(0.5)
    reason = f"{died.name} exited while waiting for {what}" if died else f"timed out waiting for {what}"
    tail = ""
    if logfile and logfile.is_file():
        tail = "\n  last log lines (" + str(logfile) + "):\n    " + "\n    ".join(
            logfile.read_text(errors="replace").splitlines()[-15:]
        )
    raise StackError(f"{reason}{tail}")


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Replaces the state file in one step: a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)
