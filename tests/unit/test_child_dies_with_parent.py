"""A Switchboard process started by `switchboard run` (or a test's system) goes when its parent
dies, even by kill -9.

Seen (reading services/processes.py): children were started in their own session with nothing
tying them to the runner, so a `make run` killed with -9 left the ingress and every worker running
without a supervisor; the next `make run` then started a second set next to them (two ingress
servers sharing the port through SO_REUSEPORT, a second analytics that cannot open the chdb path
the orphan holds).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_child_is_killed_with_its_parent(tmp_path: Path) -> None:
    # The child: a sessions worker whose Kafka refuses connections, so it stays up retrying.
    parent_code = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from services.processes import Child
        child = Child(
            "sessions",
            ["worker", "sessions"],
            Path({str(tmp_path / "sessions.log")!r}),
            {{
                "SWITCHBOARD_KAFKA_BOOTSTRAP": "127.0.0.1:1",
                "SWITCHBOARD_REDIS_URL": "redis://127.0.0.1:2/0",
                "SWITCHBOARD_DATA_DIR": {str(tmp_path)!r},
            }},
        )
        child.start()
        print(child.proc.pid, flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True
    )
    child_pid = 0
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        assert psutil.pid_exists(child_pid) and not _gone(child_pid)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while not _gone(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child_pid), "the child outlived its parent's kill -9"
    finally:
        parent.kill()
        if child_pid and not _gone(child_pid):
            os.kill(child_pid, signal.SIGKILL)


def _children_of(pid: int, count: int, within_s: float = 30.0) -> list[int]:
    deadline = time.monotonic() + within_s
    while True:
        kids = [p.pid for p in psutil.Process(pid).children() if p.status() != psutil.STATUS_ZOMBIE]
        if len(kids) >= count or time.monotonic() > deadline:
            return kids
        time.sleep(0.05)


def assert_children_die_with(supervisor: subprocess.Popen[bytes], count: int, log: Path) -> None:
    """Kill -9 `supervisor` once it runs `count` children; every child must go with it. Whether
    the kill lands before or after a child has armed its tie, the child goes (one that finds its
    parent gone when it arms the tie exits)."""
    kids: list[int] = []
    try:
        kids = _children_of(supervisor.pid, count)
        assert len(kids) == count, log.read_text(errors="replace")
        os.kill(supervisor.pid, signal.SIGKILL)
        supervisor.wait(10)
        deadline = time.monotonic() + 10
        while not all(_gone(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(_gone(k) for k in kids), "a child outlived its supervisor's kill -9"
    finally:
        supervisor.kill()
        supervisor.wait()
        for k in kids:
            if not _gone(k):
                os.kill(k, signal.SIGKILL)


def test_the_sessions_processes_are_killed_with_their_supervisor(tmp_path: Path) -> None:
    """`switchboard worker sessions` with N processes: a kill -9 of the command takes them too."""
    env = {
        **os.environ,
        "SWITCHBOARD_SESSIONS_PROCESSES": "2",
        "SWITCHBOARD_KAFKA_BOOTSTRAP": "127.0.0.1:1",
        "SWITCHBOARD_REDIS_URL": "redis://127.0.0.1:2/0",
        "SWITCHBOARD_DATA_DIR": str(tmp_path),
    }
    env.pop("SWITCHBOARD_DIE_WITH_PARENT", None)
    log = tmp_path / "supervisor.log"
    with log.open("wb") as out:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "worker", "sessions"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    assert_children_die_with(supervisor, 2, log)
