"""Detached server processes tracked by pid files, and the tails of their logs."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from services.stack._layout import LOOPBACK, StackError

# Processes started by this Python process: kept so that stopping one also reaps it (no zombie
# lingers while e.g. a test session goes on) and Popen does not warn that it is still running.
_children: dict[int, subprocess.Popen[bytes]] = {}

# A log past this size is moved to <name>.log.1 when its server next starts.
LOG_ROTATE_BYTES = 50 * 1024 * 1024


@dataclass(frozen=True)
class Identity:
    """What a pid must look like to be ours: its executable's name and strings in its command line.

    A pid file can outlive its process and the pid can be reused; a process that started after the
    pid file was written, or does not look like the server, is not ours.
    """

    executable: str
    markers: tuple[str, ...]
    any_of: tuple[str, ...] = ()

    def matches(self, proc: psutil.Process, written_at: float, started_ticks: int | None = None) -> bool:
        """`started_ticks`: the start the pid file recorded (`start_ticks`), compared exactly;
        without it (a pid file of an earlier version, or no /proc), the process must have started
        by the file's time."""
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            cmdline = proc.cmdline()
            names = {proc.name(), *(os.path.basename(part) for part in cmdline[:1])}
            started = proc.create_time()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False
        joined = " ".join(cmdline)
        named = any(n == self.executable or n.startswith(self.executable + " ") for n in names)
        marked = all(m in joined for m in self.markers) and (
            not self.any_of or any(m in joined for m in self.any_of)
        )
        if started_ticks is not None and (ticks := start_ticks(proc.pid)) is not None:
            return named and marked and ticks == started_ticks
        return named and marked and started <= written_at + 2.0


def start_ticks(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (/proc/<pid>/stat, field 22); None
    without /proc. A step of the wall clock does not move it, unlike psutil's `create_time` (the
    boot time, which Linux reports as the wall clock minus the uptime, plus this): after a ~22 s
    step under `make run`, every server was taken for another process while it served. Two
    processes with one pid never share it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        return int(stat.rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def read_pid_record(pid_path: Path) -> tuple[int, float, int | None] | None:
    """(pid, the file's time, the start recorded with it or None)."""
    try:
        fields = pid_path.read_text().split()
        pid = int(fields[0])
        ticks = int(fields[1]) if len(fields) > 1 else None
        return pid, pid_path.stat().st_mtime, ticks
    except (FileNotFoundError, ValueError, IndexError):
        return None


def read_pid(pid_path: Path) -> tuple[int, float] | None:
    record = read_pid_record(pid_path)
    return None if record is None else record[:2]


def running_pid(pid_path: Path, identity: Identity) -> int | None:
    """The pid in `pid_path` if that process is alive and is the expected server; else clean up."""
    found = read_pid_record(pid_path)
    if found is None:
        pid_path.unlink(missing_ok=True)
        return None
    pid, written_at, ticks = found
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        proc = None
    if proc is not None and identity.matches(proc, written_at, ticks):
        return pid
    pid_path.unlink(missing_ok=True)
    _reap(pid)
    return None


def spawn(argv: Sequence[str], *, name: str, log_path: Path, pid_path: Path, cwd: Path) -> int:
    """Start a server in its own session (it outlives us), output appended to its log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pid_path.parent.mkdir(parents=True, exist_ok=True)
    if log_path.exists() and log_path.stat().st_size > LOG_ROTATE_BYTES:
        log_path.replace(log_path.with_name(log_path.name + ".1"))
    with log_path.open("ab") as log:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"\n===== {stamp} starting {name}: {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    _children[proc.pid] = proc
    _wait_exec_done(proc)
    ticks = start_ticks(proc.pid)  # the child's own: it exists from fork on
    tmp = pid_path.with_suffix(".pid.tmp")
    tmp.write_text(f"{proc.pid}\n" if ticks is None else f"{proc.pid} {ticks}\n")
    tmp.replace(pid_path)
    return proc.pid


def _wait_exec_done(proc: subprocess.Popen[bytes], timeout_s: float = 2.0) -> None:
    """Wait until the kernel shows the new program's command line. Popen returns once exec has
    closed its close-on-exec pipe, a moment before the kernel sets up the new command line:
    /proc/<pid>/cmdline read right after Popen came back empty in 60 of 500 spawns here (1,882 of
    2,000 under load), and a server checked in that instant (`running_pid`) looked like another
    process and lost its pid file. Bounded: a child that exits or never shows one is left to the
    caller's own checks."""
    path = Path(f"/proc/{proc.pid}/cmdline")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if path.read_bytes():
                return
        except OSError:
            return
        time.sleep(0.0005)


def is_running(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def terminate(pid: int, *, grace_s: float, kill: bool) -> None:
    """SIGTERM (or SIGKILL right away), wait up to `grace_s`, then SIGKILL; reap if it is our child."""
    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    except psutil.NoSuchProcess:
        _reap(pid)
        return
    deadline = time.monotonic() + grace_s
    while is_running(pid):
        if time.monotonic() > deadline:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                break
            deadline = time.monotonic() + 10.0
            kill = True
        await asyncio.sleep(0.05)
    _reap(pid)


def reap_exited() -> None:
    """Reap every server this process started that has exited. Its pid file is not always there to
    lead `running_pid` to it: another process (`switchboard stack status`) that found it dead
    removed the file first, and the killed server stayed a zombie of `switchboard run` for good."""
    for pid, child in list(_children.items()):
        if child.poll() is not None:
            _children.pop(pid, None)


def _reap(pid: int) -> None:
    child = _children.pop(pid, None)
    if child is not None:
        try:
            child.wait(timeout=0.5)
        except subprocess.TimeoutExpired:  # still alive: keep tracking it
            _children[pid] = child


def port_holder(port: int) -> str | None:
    """Who already listens on 127.0.0.1:`port` (or all interfaces), or None if it is free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
            return None
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return f"unusable ({exc})"
    try:
        for conn in psutil.net_connections("inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                proc = psutil.Process(conn.pid)
                return f"pid {conn.pid} ({' '.join(proc.cmdline())[:160]})"
    except (psutil.Error, OSError):
        pass
    return "another process"


def tail(path: Path, lines: int) -> str:
    if lines <= 0 or not path.exists():
        return ""
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        chunk = min(size, max(64 * 1024, lines * 512))
        fh.seek(size - chunk)
        data = fh.read()
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


@asynccontextmanager
async def stack_lock(lock_path: Path, timeout_s: float = 300.0) -> AsyncIterator[None]:
    """One supervisor at a time per data directory (two `up`s racing would start servers twice)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StackError(
                        f"another switchboard stack command holds {lock_path} for over {timeout_s:.0f}s"
                    ) from None
                await asyncio.sleep(0.1)
        yield
    finally:
        os.close(fd)  # closing releases the lock
