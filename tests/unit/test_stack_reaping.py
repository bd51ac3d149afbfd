"""Servers `switchboard run` started and that died are reaped, also when another process removed
their pid file first (a real process, killed; the stack's own spawn)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil

from services.stack import _process


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_killed_server_whose_pid_file_another_process_removed_is_reaped(tmp_path: Path) -> None:
    pid_path = tmp_path / "server.pid"
    pid = _process.spawn(
        ["sleep", "60"], name="server", log_path=tmp_path / "server.log", pid_path=pid_path, cwd=tmp_path
    )
    os.kill(pid, signal.SIGKILL)
    # `switchboard stack status` in another process found it dead and removed its pid file: the
    # runner's own look (running_pid) never sees that pid again.
    pid_path.unlink()
    assert _process.running_pid(pid_path, _process.Identity("sleep", ("60",))) is None
    deadline = time.monotonic() + 10
    while not _zombie(pid) and time.monotonic() < deadline:  # the kill lands asynchronously
        time.sleep(0.01)
    assert _zombie(pid)
    _process.reap_exited()
    assert not _zombie(pid)
