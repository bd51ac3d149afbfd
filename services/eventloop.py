"""The event loop every Switchboard process runs on, and its heap once started.

uvloop (libuv) when it is installed and SWITCHBOARD_EVENT_LOOP is not "asyncio": its transports,
callbacks and timers are C, where the standard loop's are Python, and every Switchboard process
spends much of its time there (Redis and Kafka round trips, gRPC calls; see benchmarks/RESULTS.md
for what it bought). grpc.aio supports it. SWITCHBOARD_EVENT_LOOP=asyncio keeps the standard loop
(an A/B, or a platform without uvloop wheels: it is an optional speed-up, not a requirement).
"""

from __future__ import annotations

import asyncio
import gc
import linecache
import logging
import os
import signal
from types import FrameType

log = logging.getLogger(__name__)

# `kill -USR2 <pid>` logs what every task of the process is waiting on (see dump_tasks).
DUMP_SIGNAL = signal.SIGUSR2
DUMP_MARK = "asyncio tasks of pid"


def loop_name() -> str:
    """'uvloop' or 'asyncio': the loop `install()` makes asyncio.run use in this process."""
    if os.environ.get("SWITCHBOARD_EVENT_LOOP", "uvloop").strip().lower() == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def install() -> str:
    """Make every later asyncio.run() in this process use loop_name()'s loop; returns its name.
    Called once at the start of a command, before any loop exists."""
    name = loop_name()
    if name == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    signal.signal(DUMP_SIGNAL, dump_tasks)
    return name


def dump_tasks(signum: int = 0, frame: FrameType | None = None) -> None:
    """Log every task of the running loop with where it waits: a worker that processes nothing
    and logs nothing says why (an await on a server that does not answer, a lock, an event).
    A signal handler: it runs in the main thread between two bytecodes of the loop's callbacks."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        log.warning("%s %d: no event loop running", DUMP_MARK, os.getpid())
        return
    tasks = asyncio.all_tasks(loop)
    out = []
    for task in sorted(tasks, key=lambda t: t.get_name()):
        out.append(f"--- task {task.get_name()}")
        out += _await_chain(task.get_coro())
    log.warning("%s %d: %d tasks\n%s", DUMP_MARK, os.getpid(), len(tasks), "\n".join(out))


_ASYNCIO_DIR = os.path.dirname(asyncio.__file__)


def _await_chain(awaitable: object, depth: int = 40) -> list[str]:
    """Where a coroutine waits: each coroutine (or generator) it awaits, innermost last, then the
    object at the bottom (a future, a lock). Task.print_stack shows only the outermost frame."""
    lines = []
    for _ in range(depth):
        frame = next(
            (f for f in (getattr(awaitable, a, None) for a in ("cr_frame", "gi_frame", "ag_frame")) if f),
            None,
        )
        if frame is None:
            lines.append(f"  waiting on {awaitable!r:.300}")
            break
        code = frame.f_code
        if not code.co_filename.startswith(_ASYNCIO_DIR):  # asyncio's own waits say nothing
            lines.append(f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}')
            # f_lineno is None in some frames (a coroutine being closed, say).
            source = linecache.getline(code.co_filename, frame.f_lineno or 0).strip()
            if source:
                lines.append(f"    {source}")
        awaitable = next(
            (n for n in (getattr(awaitable, a, None) for a in ("cr_await", "gi_yieldfrom", "ag_await")) if n),
            None,
        )
        if awaitable is None:
            break
    return lines


def freeze_heap() -> None:
    """Once a server process has started (clients connected, models and indexes loaded): collect
    what start-up left for the cyclic collector, then move every surviving object out of its
    reach for good (`gc.freeze`).

    A full (generation 2) collection walks every tracked object of the process and stops the
    event loop meanwhile: in an ingress under 2-3k msg/s that was one collection every ~2.5 s
    taking ~50 ms of CPU (more wall time on a busy machine), i.e. every call in flight then waited
    50 ms more: the tail of the ack latency. Frozen, the same collections took ~4 ms. Frozen
    objects are still freed by reference counting; only cycles among them are never collected,
    and start-up's long-lived objects are not garbage anyway.
    """
    gc.collect()
    gc.freeze()
