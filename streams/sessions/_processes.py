"""`switchboard worker sessions` as N processes: the topic's partitions are the unit of scale.

Each process is a member of the sessions consumer group with its own static membership id
(`<instance id>-<i>`), so a restarted process takes its partitions back at once, and the group
spreads the partitions over the processes (more processes than partitions leaves some idle).
They share nothing in memory: each keeps the states of its own partitions, and everything
shared (states, positions, claims) is in Redis, written per partition by its owner only.

The parent only supervises: it starts the children, restarts one that dies (same id, a growing
pause when it keeps dying) and passes SIGTERM/SIGINT on, so each finishes its batch in hand.
Children die with the parent (PR_SET_PDEATHSIG, armed by each child after exec).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time

from services.processes import tied_to_this_process
from services.settings import Settings
from streams._consumer import instance_id

log = logging.getLogger(__name__)

_HEALTHY_AFTER_S = 10.0
_MAX_BACKOFF_S = 10.0


def member_ids(settings: Settings, count: int) -> list[str]:
    """One static membership id per process, stable across restarts."""
    base = instance_id(settings, "sessions")
    return [f"{base}-{i}" for i in range(count)]


async def supervise(settings: Settings, count: int, log_level: str = "info") -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    procs: dict[str, asyncio.subprocess.Process] = {}

    async def keep(member: str) -> None:
        failures = 0
        while not stopping.is_set():
            # The child arms the tie after exec (services.cli calls die_with_parent).
            env = tied_to_this_process(
                {
                    **os.environ,
                    "SWITCHBOARD_WORKER_INSTANCE_ID": member,
                    "SWITCHBOARD_SESSIONS_PROCESSES": "1",
                }
            )
            started = time.monotonic()
            try:
                proc = procs[member] = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "services.cli",
                    "worker",
                    "sessions",
                    "--log-level",
                    log_level,
                    env=env,
                )
            except Exception as exc:
                # fork/exec refused for now (EAGAIN, ENOMEM, EMFILE): it ended this task, and the
                # member was never started again (its partitions unfolded) while this lived on.
                failures += 1
                pause = min(_MAX_BACKOFF_S, 0.5 * (2**failures - 1))
                log.error(
                    "sessions process %s could not be started (%r); trying again in %.1fs", member, exc, pause
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), pause)
                continue
            log.info("sessions process %s started (pid %d)", member, proc.pid)
            code = await proc.wait()
            if stopping.is_set():
                return
            lived = time.monotonic() - started
            failures = 0 if lived > _HEALTHY_AFTER_S else failures + 1
            pause = min(_MAX_BACKOFF_S, 0.5 * (2**failures - 1))
            log.warning("sessions process %s exited with %s after %.1fs; restarting it", member, code, lived)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), pause)

    members = member_ids(settings, count)
    log.info("sessions: %d processes (%s)", count, ", ".join(members))
    keepers = [asyncio.ensure_future(keep(m)) for m in members]
    await stopping.wait()
    for proc in procs.values():
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    await asyncio.gather(*(p.wait() for p in procs.values()))
    for keeper in keepers:
        keeper.cancel()
    await asyncio.gather(*keepers, return_exceptions=True)
