"""Starting and stopping Switchboard's own processes (ingress, workers, analytics) as children."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.auth import ingress_channel
from services.settings import Settings

# Set by Child.start to its own pid: the child ties itself to that parent once it runs
# (`die_with_parent`, called first thing by the CLI). Not in a `preexec_fn`: calling into ctypes
# between fork and exec in a parent with threads (the runner's and the tests' gRPC threads) made a
# child die of SIGSEGV before exec now and then (seen twice in the soak).
PARENT_ENV = "SWITCHBOARD_DIE_WITH_PARENT"
_PR_SET_PDEATHSIG = 1


def tied_to_this_process(env: dict[str, str]) -> dict[str, str]:
    """`env` for a child that is to die with this process: the child calls `die_with_parent`."""
    return {**env, PARENT_ENV: str(os.getpid())}


def die_with_parent() -> None:
    """If started by a Child: SIGKILL this process when that parent dies (Linux PR_SET_PDEATHSIG).
    The variable is removed so this process's own children do not take it for theirs."""
    parent = os.environ.pop(PARENT_ENV, "")
    if not parent:
        return
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
    if prctl is None:  # not Linux: not tied
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(parent):
        # The parent died before the line above: nothing would signal this process.
        os._exit(1)


@dataclass
class Child:
    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it in a session of its own (a kill takes its whole group), tied to this process:
        if the parent dies, even by kill -9, the kernel kills the child too. Orphans of a killed
        `make run` would otherwise keep serving without a supervisor, and the next `make run`
        would start a second set next to them. Start children from the main thread: the tie is to
        the thread that starts them."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            # A crash in native code (a segfault) leaves the Python stacks in the child's log.
            env=tied_to_this_process({"PYTHONFAULTHANDLER": "1", **os.environ, **self.env}),
            start_new_session=True,
        )
        log.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: what a crash looks like. The whole process group goes (the child was started
        as a session leader), so a command that runs processes of its own, as `switchboard
        ingress` does, leaves none behind."""
        if self.proc is not None and self.alive:
            self._kill_group()
            self.proc.wait()

    def _kill_group(self) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            self.proc.send_signal(signal.SIGKILL)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or not self.alive:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill_group()
            self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def switchboard_children(settings: Settings, env: dict[str, str] | None = None) -> dict[str, Child]:
    logs = settings.data_dir / "logs"
    extra = env or {}
    return {
        "analytics": Child("analytics", ["analytics"], logs / "analytics.log", extra),
        "sessions": Child("sessions", ["worker", "sessions"], logs / "sessions.log", extra),
        "assistant": Child("assistant", ["worker", "assistant"], logs / "assistant.log", extra),
        # Closed segments of conversation-events into S3 (streams/archive).
        "archiver": Child("archiver", ["worker", "archiver"], logs / "archiver.log", extra),
        "ingress": Child("ingress", ["ingress"], logs / "ingress.log", extra),
    }


async def wait_for_ingress(settings: Settings, child: Child | None = None, within_s: float = 60.0) -> None:
    """Wait until the gRPC health service says SERVING."""
    deadline = time.monotonic() + within_s
    # TLS when the ingress has it (SWITCHBOARD_GRPC_TLS_CA); health needs no key.
    async with ingress_channel(settings, api_key="") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            _check_alive(child, deadline, "ingress")
            await asyncio.sleep(0.2)


async def wait_for_analytics(settings: Settings, child: Child | None = None, within_s: float = 90.0) -> None:
    """Wait until the query endpoint answers /ping (embedded mode only)."""
    import aiohttp

    if not settings.embedded_clickhouse:
        return
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"http://{settings.analytics_listen}/ping") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            _check_alive(child, deadline, "analytics")
            await asyncio.sleep(0.2)


def _check_alive(child: Child | None, deadline: float, name: str) -> None:
    if child is not None and not child.alive:
        raise RuntimeError(f"{name} exited during start-up; last log lines:\n{child.log_tail()}")
    if time.monotonic() > deadline:
        tail = child.log_tail() if child is not None else ""
        raise TimeoutError(f"{name} did not become ready in time; last log lines:\n{tail}")
