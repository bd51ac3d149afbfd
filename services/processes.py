"""Starting and stopping Switchboard's own processes (ingress, workers, analytics) as children."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.settings import PROJECT_ROOT, Settings

# Set by Child.start to its own pid: the child ties itself to that parent once it runs
# (`die_with_parent`, called first thing by the CLI). Not in a `preexec_fn`: calling into ctypes
# between fork and exec in a parent with threads (the runner's and the tests' gRPC threads) made a
# child die of SIGSEGV before exec now and then (seen twice in the soak).
PARENT_ENV = "SWITCHBOARD_DIE_WITH_PARENT"
# Set by Child.start_spare: the CLI imports what its command runs, then waits for a line on stdin
# before running it (`services.cli._stand_by`).
STANDBY_ENV = "SWITCHBOARD_STANDBY"
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
    # host:port it listens on once it serves (the runner's sign it is not crash-looping); "": none.
    ready_address: str = ""
    proc: subprocess.Popen[bytes] | None = None
    # A warm spare (`start_spare`): the same command, imported and waiting to take over.
    spare: subprocess.Popen[bytes] | None = None
    _spare_code: int = 0

    def start(self) -> None:
        """Start it in a session of its own (a kill takes its whole group), tied to this process:
        if the parent dies, even by kill -9, the kernel kills the child too. Orphans of a killed
        `make run` would otherwise keep serving without a supervisor, and the next `make run`
        would start a second set next to them. Start children from the main thread: the tie is to
        the thread that starts them."""
        self.proc = self._spawn(standby=False)

    def start_spare(self) -> None:
        """Start a warm spare: the same command, which imports what it runs and then waits
        (holding no port, no consumer, no file) until `take_over` tells it to run."""
        self._spare_code = code_fingerprint()
        self.spare = self._spawn(standby=True)

    @property
    def spare_is_stale(self) -> bool:
        """The code changed since the spare imported it (an edit, a `git pull`): what it would run
        is not what a new process runs, and half of it (modules imported later) would be new."""
        return self.spare is not None and code_fingerprint() != self._spare_code

    @property
    def spare_alive(self) -> bool:
        return self.spare is not None and self.spare.poll() is None

    def take_over(self) -> bool:
        """The warm spare becomes this child's process and runs the command: True if there was a
        live spare and it got the word (else start() is the way)."""
        spare, self.spare = self.spare, None
        if spare is None:
            return False
        if spare.poll() is not None or spare.stdin is None:
            _close_stdin(spare)
            return False
        try:
            spare.stdin.write(b"run\n")
            spare.stdin.flush()
        except OSError:  # it died just now (a broken pipe)
            _kill_group(spare)
            spare.wait()
            return False
        finally:
            _close_stdin(spare)
        self.proc = spare
        return True

    def stop_spare(self) -> None:
        """End the spare at once: it holds nothing, and one still importing would not see its
        stdin close for seconds (that held a stop up)."""
        spare, self.spare = self.spare, None
        if spare is None:
            return
        _close_stdin(spare)
        if spare.poll() is None:
            _kill_group(spare)
        spare.wait()

    def _spawn(self, *, standby: bool) -> subprocess.Popen[bytes]:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "services.cli", *self.args],
                stdin=subprocess.PIPE if standby else None,
                stdout=log,
                stderr=subprocess.STDOUT,
                # A crash in native code (a segfault) leaves the Python stacks in the child's log.
                env=tied_to_this_process(
                    {
                        "PYTHONFAULTHANDLER": "1",
                        **os.environ,
                        **self.env,
                        **({STANDBY_ENV: "1"} if standby else {}),
                    }
                ),
                start_new_session=True,
            )

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
        _kill_group(self.proc)

    def stop(self, timeout: float = 20.0) -> None:
        self.stop_spare()
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


def code_fingerprint() -> int:
    """The project's code and schemas as they are on disk: each file's path, modification time and
    size (~1 ms: ~160 files). An edit, a `git pull`, a file removed or added changes it."""
    seen = []
    for top in ("services", "streams", "schemas", "proto"):
        for folder, _, files in os.walk(PROJECT_ROOT / top):
            for name in files:
                if name.endswith((".py", ".sql", ".proto")):
                    path = os.path.join(folder, name)
                    with contextlib.suppress(OSError):  # removed under us: the next look sees it
                        st = os.stat(path)
                        seen.append((path, st.st_mtime_ns, st.st_size))
    return hash(tuple(sorted(seen)))


def _close_stdin(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.send_signal(signal.SIGKILL)


def switchboard_children(settings: Settings, env: dict[str, str] | None = None) -> dict[str, Child]:
    logs = settings.data_dir / "logs"
    extra = env or {}
    return {
        "analytics": Child(
            "analytics", ["analytics"], logs / "analytics.log", extra, settings.analytics_listen
        ),
        "sessions": Child(
            "sessions", ["worker", "sessions"], logs / "sessions.log", extra, settings.sessions_metrics_listen
        ),
        "assistant": Child(
            "assistant",
            ["worker", "assistant"],
            logs / "assistant.log",
            extra,
            settings.assistant_metrics_listen,
        ),
        # Closed segments of conversation-events into S3 (streams/archive).
        "archiver": Child("archiver", ["worker", "archiver"], logs / "archiver.log", extra),
        "ingress": Child("ingress", ["ingress"], logs / "ingress.log", extra, settings.grpc_listen),
    }


async def wait_for_ingress(settings: Settings, child: Child | None = None, within_s: float = 60.0) -> None:
    """Wait until the gRPC health service says SERVING."""
    # Here, not at the top: every process imports this module first thing (die_with_parent), and
    # most commands have no use for gRPC's client or the auth module.
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.auth import ingress_channel

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
