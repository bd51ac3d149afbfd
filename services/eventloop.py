"""The event loop every Switchboard process runs on.

uvloop (libuv) when it is installed and SWITCHBOARD_EVENT_LOOP is not "asyncio": its transports,
callbacks and timers are C, where the standard loop's are Python, and every Switchboard process
spends much of its time there (Redis and Kafka round trips, gRPC calls; see benchmarks/RESULTS.md
for what it bought). grpc.aio supports it. SWITCHBOARD_EVENT_LOOP=asyncio keeps the standard loop
(an A/B, or a platform without uvloop wheels: it is an optional speed-up, not a requirement).
"""

from __future__ import annotations

import asyncio
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
