"""`switchboard ingress` on every core: N server processes on one port, supervised.

Python runs one thread of Python at a time, so one ingress process uses one core. N processes
listen on the same address with SO_REUSEPORT and the kernel spreads *connections* over them (a
gRPC channel is one connection, so one client's calls all go to one process). They share nothing
in memory: each has its own Kafka producer, Redis pools and in-flight bound; everything that must
hold across processes (idempotency claims, the readiness gate, the conversation registry) is in
Redis, and order per conversation is the log's (see the README's design note).

The parent only supervises: it checks the port is free, starts the children, restarts one that
dies (with a back-off when it keeps dying), and on SIGTERM/SIGINT passes SIGTERM on, so that each
child drains (stops listening, lets in-flight calls finish, flushes its producer). Children die with
the parent (PR_SET_PDEATHSIG, armed by each child after exec), so a kill -9 of `switchboard
ingress` is a crash of all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import redis.asyncio as aioredis

from services.ingress._hotview import LEASE_RENEW_S, LEASE_S, end_lease, end_lease_if_stale, new_lease_id
from services.processes import tied_to_this_process
from services.settings import Settings

log = logging.getLogger(__name__)

# Set in a child's environment: its index; the child listens with SO_REUSEPORT.
CHILD_ENV = "SWITCHBOARD_INGRESS_CHILD"
# And the id of its lease in Redis (services/ingress/_hotview.py), new for every start: once the
# child exited, the parent ends it, so a retry of a message the child died writing is taken over
# at once instead of when the lease runs out (LEASE_S).
LEASE_ENV = "SWITCHBOARD_INGRESS_LEASE"
# How long the parent tries to end a dead child's lease (Redis away: it runs out by itself).
_END_LEASE_TIMEOUT_S = 3.0
# A child that lived shorter than this is restarted after a growing pause (up to the maximum).
_HEALTHY_AFTER_S = 10.0
_MAX_BACKOFF_S = 10.0


def _backoff_s(failures: int) -> float:
    """The pause before a child's next start after `failures` quick deaths or failed starts."""
    return min(_MAX_BACKOFF_S, 0.5 * (2**failures - 1)) if failures else 0.0


def process_count(settings: Settings) -> int:
    """settings.ingress_processes, or the cores this process may run on (its CPU affinity, which
    a container's cpuset narrows; a CPU quota does not: set the count explicitly then)."""
    if settings.ingress_processes:
        return settings.ingress_processes
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_port_free(listen: str, within_s: float = 10.0) -> None:
    """Bind the address without SO_REUSEPORT: fails while anything listens there, also another
    ingress's reuse-port sockets (which would otherwise silently share our port). Waits a little
    for the children of a supervisor that was just killed to go."""
    host, port = listen.rsplit(":", 1)
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + within_s
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            # SO_REUSEADDR: connections of a killed ingress linger in TIME_WAIT for a minute and
            # must not count as "in use"; a listener (reuse-port or not) still does.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, int(port)))
                sock.listen(1)
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cannot listen on {listen} (port in use?): {exc}") from exc
        time.sleep(0.2)


@dataclass
class _Child:
    index: int
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    failures: int = 0
    lease_id: str = ""


def leases_file(settings: Settings) -> Path:
    """Where a supervisor keeps its children's lease ids and pids (one file per listen address,
    on this host: a supervisor after it ends the leases of those that died with it)."""
    port = settings.grpc_listen.rsplit(":", 1)[-1]
    return settings.data_dir / "run" / f"ingress-leases-{port}.txt"


def dead_leases(path: Path) -> list[str]:
    """The lease ids in `path` whose process is gone (a line: lease id, pid, the process's start
    time). A pid alive again as another process (start time differs) counts as gone."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    dead = []
    for line in lines:
        parts = line.split()
        if len(parts) != 3:
            continue
        lease_id, pid, started = parts[0], int(parts[1]), float(parts[2])
        try:
            process = psutil.Process(pid)
            alive = process.status() != psutil.STATUS_ZOMBIE and abs(process.create_time() - started) < 1.0
        except psutil.NoSuchProcess:
            alive = False
        except psutil.Error:
            alive = True  # cannot tell (access denied): not taken for dead
        if not alive:
            dead.append(lease_id)
    return dead


def record_leases(settings: Settings, leases: list[tuple[str, int]]) -> None:
    """Write (lease id, pid) of the ingress processes serving now to leases_file (best effort)."""
    lines = []
    for lease_id, pid in leases:
        with contextlib.suppress(psutil.Error):
            lines.append(f"{lease_id} {pid} {psutil.Process(pid).create_time()}")
    path = leases_file(settings)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text("".join(f"{line}\n" for line in lines))
        partial.replace(path)


async def end_earlier_leases(settings: Settings, pending: list[str]) -> None:
    """Ingress processes of an earlier run on this address that are gone (a kill -9 of
    `switchboard run`, of a supervisor with its children, of a lone ingress): their leases are
    ended rather than left to run out, so their starts and closes are taken over, and a close need
    not wait for their unsettled messages (it waits for those of a process whose lease only ran
    out: it may be stalled, not dead). A lease is ended only once Redis has not seen it renewed
    for END_STALE_AFTER_S, whatever the pids say (a clock step moves a process's start time; a
    data directory may be shared): a live process renews every second. `pending`: dead_leases
    of the record, read before this run writes its own. Waits at most LEASE_S (past it, the lease
    has run out anyway); run it beside serving, not before."""
    pending = list(pending)
    deadline = time.monotonic() + LEASE_S
    redis = _lease_redis(settings)
    try:
        while pending:
            for lease_id in list(pending):
                outcome = await end_lease_if_stale(redis, lease_id)
                if outcome != 0:
                    pending.remove(lease_id)
                if outcome == 1:
                    log.info("ended the lease %s of an earlier ingress process that is gone", lease_id)
            if not pending or time.monotonic() > deadline:
                return
            await asyncio.sleep(LEASE_RENEW_S)
    except Exception as exc:
        log.warning("ending the leases of earlier ingress processes failed (%r); they run out", exc)
    finally:
        await redis.aclose()


def _lease_redis(settings: Settings) -> aioredis.Redis:
    """A short-lived client for ending leases: a Redis that does not answer lets them run out."""
    return aioredis.Redis.from_url(
        settings.redis_url, socket_timeout=_END_LEASE_TIMEOUT_S, socket_connect_timeout=_END_LEASE_TIMEOUT_S
    )


async def end_lease_of(settings: Settings, lease_id: str) -> None:
    """The process holding `lease_id` is dead (waited for): nothing it claimed can be written by
    it any more. Best effort: if Redis does not answer, the lease runs out by itself."""
    redis = _lease_redis(settings)
    try:
        await end_lease(redis, lease_id)
    except Exception as exc:
        log.warning("ending the ingress lease %s failed (%r); it runs out by itself", lease_id, exc)
    finally:
        await redis.aclose()


class Supervisor:
    def __init__(self, settings: Settings, count: int, log_level: str = "info") -> None:
        self._settings = settings
        self._count = count
        self._log_level = log_level
        self._children = [_Child(i) for i in range(count)]
        self._stopping = asyncio.Event()

    def _record_leases(self) -> None:
        record_leases(
            self._settings,
            [
                (c.lease_id, c.proc.pid)
                for c in self._children
                if c.proc is not None and c.proc.returncode is None and c.lease_id
            ],
        )

    async def _start(self, child: _Child) -> None:
        # Tied after exec (services.ingress.__main__ calls die_with_parent), not in a preexec_fn:
        # ctypes between fork and exec in a process with threads can crash the child.
        child.lease_id = new_lease_id()
        env = tied_to_this_process(
            {
                **os.environ,
                CHILD_ENV: str(child.index),
                LEASE_ENV: child.lease_id,
                "SWITCHBOARD_INGRESS_PROCESSES": "1",
            }
        )
        child.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.ingress",
            "--log-level",
            self._log_level,
            env=env,
        )
        child.started = time.monotonic()
        self._record_leases()
        log.info("ingress process %d started (pid %d)", child.index, child.proc.pid)

    async def _watch(self, child: _Child) -> None:
        """Keep one child running until the supervisor stops."""
        while not self._stopping.is_set():
            if child.proc is None:
                try:
                    await self._start(child)
                except Exception as exc:
                    # fork/exec refused for now (EAGAIN, ENOMEM, EMFILE): it ended this task, and
                    # the child was never started again while the supervisor lived on.
                    child.failures += 1
                    pause = _backoff_s(child.failures)
                    log.error(
                        "ingress process %d could not be started (%r); trying again in %.1fs",
                        child.index,
                        exc,
                        pause,
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), pause)
                    continue
            assert child.proc is not None
            code = await child.proc.wait()
            if self._stopping.is_set():
                return
            await self._end_lease(child)
            lived = time.monotonic() - child.started
            child.failures = 0 if lived > _HEALTHY_AFTER_S else child.failures + 1
            pause = _backoff_s(child.failures)
            log.warning(
                "ingress process %d (pid %d) exited with %s after %.1fs; restarting it%s",
                child.index,
                child.proc.pid,
                code,
                lived,
                f" in {pause:.1f}s" if pause else "",
            )
            child.proc = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), pause)

    async def run(self) -> None:
        check_port_free(self._settings.grpc_listen)
        ending = asyncio.ensure_future(
            end_earlier_leases(self._settings, dead_leases(leases_file(self._settings)))
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        watchers = [asyncio.ensure_future(self._watch(c)) for c in self._children]
        log.info(
            "ingress: %d processes on %s (SO_REUSEPORT), %d in-flight writes each",
            self._count,
            self._settings.grpc_listen,
            self._settings.max_inflight_produce,
        )
        try:
            await self._stopping.wait()
            log.info("stopping: each ingress process drains its in-flight calls")
        finally:
            self._stopping.set()
            await self._stop_children()
            for w in (*watchers, ending):
                w.cancel()
            await asyncio.gather(*watchers, ending, return_exceptions=True)

    async def _end_lease(self, child: _Child) -> None:
        """The child is dead (waited for): nothing it claimed can be written by it any more."""
        await end_lease_of(self._settings, child.lease_id)

    async def _stop_children(self) -> None:
        running = [c.proc for c in self._children if c.proc is not None and c.proc.returncode is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        # Each child waits up to the drain time for its calls, then flushes its producer.
        limit = self._settings.ingress_drain_s + self._settings.produce_timeout_s + 5
        if running:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in running], timeout=limit)
        for proc in running:
            if proc.returncode is None:
                log.warning("ingress process pid %d did not stop within %.0fs; killing it", proc.pid, limit)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        # A child that drained ended its lease itself; one killed here did not.
        await asyncio.gather(*(self._end_lease(c) for c in self._children if c.lease_id))
