"""Start and stop the external processes of the integration tests (Ray head, Flower SuperLink/SuperNodes).

Every process is stopped by PID: the tests never use ``ray stop`` or ``pkill`` by name, which
would also hit Ray or Flower processes that other runs on the same machine own.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

#: Executables of this interpreter's environment (the venv's ``ray``, ``flower-superlink``, ...).
BIN = Path(sys.executable).parent

#: Environment of every process the integration tests start.
QUIET_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_DATASETS_OFFLINE": "1",
}


def executable(name: str) -> Path | None:
    """``name`` in this environment's bin directory, or None."""
    path = BIN / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that are free right now. They are bound all at once: ports
    taken one after another can repeat, since the kernel may hand out a port just released."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until something listens on 127.0.0.1:``port`` (fails early if ``proc`` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with code {proc.returncode} before listening on port {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


def alive(pid: int) -> bool:
    """True when ``pid`` runs (a zombie waiting to be reaped counts as stopped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def pids_matching(pattern: str) -> set[int]:
    """PIDs whose command line contains ``pattern`` (``pgrep -f``), this process excluded."""
    out = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True).stdout.split()
    return {int(p) for p in out} - {os.getpid()}


def descendants(pid: int) -> set[int]:
    """All live descendants of ``pid``."""
    children: dict[int, list[int]] = {}
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    for line in out.splitlines():
        p, pp = (int(x) for x in line.split())
        children.setdefault(pp, []).append(p)
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def stop_pids(pids, grace: float = 10.0) -> set[int]:
    """SIGTERM ``pids``, SIGKILL whatever still runs after ``grace`` seconds; returns those still alive."""
    pids = {int(p) for p in pids if alive(int(p))}
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.2)
        pids = {p for p in pids if alive(p)}
        if not pids:
            break
    return pids


class ProcessGroup:
    """Processes started in their own sessions (``start_new_session=True``), stopped by process group.

    :meth:`stop` signals each leader's group and every descendant seen (SuperNodes spawn
    ``flower-superexec`` children, which spawn ``flwr-clientapp``), then SIGKILLs what is left.
    """

    def __init__(self, log_dir: Path, env: dict):
        self.log_dir, self.env = Path(log_dir), env
        self.procs: list[subprocess.Popen] = []
        self.seen: set[int] = set()

    def start(self, name: str, cmd: list) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")
        proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True, cwd=self.log_dir)
        log.close()
        self.procs.append(proc)
        self.seen.add(proc.pid)
        return proc

    def all_pids(self) -> set[int]:
        """The leaders and every descendant seen so far (call it while they run, too)."""
        for proc in self.procs:
            self.seen |= descendants(proc.pid)
        return set(self.seen)

    def log(self, name: str, tail: int = 3000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.is_file() else ""

    def stop(self, grace: float = 10.0) -> set[int]:
        """Stop everything; returns the PIDs still alive afterwards (should be empty)."""
        pids = self.all_pids()
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        left = stop_pids(pids, grace)
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        return {p for p in left | self.seen if alive(p)}
