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
import os


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
    return name


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
