"""A supervisor whose restart of a child fails to start a process tries again (real processes,
no servers needed).

A child that died was restarted by one watcher task per child. When the restart itself failed
(fork refused with EAGAIN under memory or process-count pressure, EMFILE, ...) the error ended
that watcher silently: the supervisor lived on, with that child never started again (an ingress
with one process fewer for good, a sessions member whose partitions nobody folds). Here the
first restart is refused the way fork refuses it; the children are harmless sleeping processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.ingress._supervisor import Supervisor
from services.settings import Settings
from streams.sessions import _processes
from tests.conftest import eventually


class Spawner:
    """asyncio.create_subprocess_exec as the supervisors call it, starting a sleeping process
    instead of the server; the call numbered `refuse` fails as fork does when it cannot."""

    def __init__(self, refuse: int) -> None:
        self.calls = 0
        self.refuse = refuse
        self.procs: list[asyncio.subprocess.Process] = []
        self._real = asyncio.create_subprocess_exec

    async def __call__(self, *args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        self.calls += 1
        if self.calls == self.refuse:
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        kwargs.pop("env", None)
        proc = await self._real(sys.executable, "-c", "import time; time.sleep(120)", **kwargs)
        self.procs.append(proc)
        return proc

    def running(self) -> int:
        return sum(1 for p in self.procs if p.returncode is None)

    async def state(self) -> tuple[int, int]:
        """(start calls, processes running)."""
        return self.calls, self.running()

    def kill_all(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()


def _free_listen() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
async def signals_restored() -> AsyncIterator[None]:
    # Async, so that its teardown runs on the tests' loop: a plain fixture's teardown found no
    # current event loop when the whole suite ran (asyncio.get_event_loop() raised).
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        loop = asyncio.get_running_loop()
        for sig, handler in handlers.items():
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
            signal.signal(sig, handler)


@pytest.mark.timeout(60)
async def test_the_ingress_supervisor_starts_a_child_again_after_a_refused_restart(
    monkeypatch: pytest.MonkeyPatch, signals_restored: None
) -> None:
    spawner = Spawner(refuse=2)
    monkeypatch.setattr(asyncio, "create_subprocess_exec", spawner)
    settings = Settings(grpc_listen=_free_listen(), ingress_drain_s=1.0, produce_timeout_s=1.0)
    supervisor = Supervisor(settings, 1)
    running = asyncio.ensure_future(supervisor.run())
    try:
        await eventually(spawner.state, lambda s: s == (1, 1), within_s=10, what="the first child")
        spawner.procs[0].kill()  # the child crashes; its restart is refused once
        # (calls, running): the refused start, then one more that runs.
        await eventually(spawner.state, lambda s: s == (3, 1), within_s=20, what="the child started again")
    finally:
        supervisor._stopping.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 20)
        spawner.kill_all()


@pytest.mark.timeout(60)
async def test_the_sessions_supervisor_starts_a_member_again_after_a_refused_restart(
    monkeypatch: pytest.MonkeyPatch, signals_restored: None
) -> None:
    spawner = Spawner(refuse=2)
    monkeypatch.setattr(asyncio, "create_subprocess_exec", spawner)
    supervising = asyncio.ensure_future(_processes.supervise(Settings(), 1))
    try:
        await eventually(spawner.state, lambda s: s == (1, 1), within_s=10, what="the first member")
        spawner.procs[0].kill()
        await eventually(spawner.state, lambda s: s == (3, 1), within_s=20, what="the member started again")
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # supervise() stops on it (its own handler)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(supervising, 20)
        spawner.kill_all()
