"""Start, stop and inspect the local stack's servers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from services.settings import Settings
from services.stack._components import Component, components
from services.stack._install import install
from services.stack._layout import (
    Layout,
    StackError,
    check_ports_distinct,
    component_names,
    component_ports,
)
from services.stack._process import (
    is_running,
    port_holder,
    reap_exited,
    running_pid,
    spawn,
    stack_lock,
    tail,
    terminate,
)

log = logging.getLogger(__name__)

STOP_GRACE_S = 20.0


class ExitedWhileStarting(StackError):
    """The server's process ended before it answered."""


PORT_RELEASE_S = 10.0


def _component(settings: Settings, name: str) -> Component:
    names = component_names(settings)
    if name not in names:
        raise ValueError(f"unknown stack component {name!r}; expected one of {', '.join(names)}")
    return components(settings)[name]


async def up(settings: Settings) -> None:
    """Start every component that is not running and wait until each answers its own protocol."""
    check_ports_distinct(settings)
    await install(settings)
    async with stack_lock(Layout.of(settings).lock_path):
        await _all(settings, _start)


async def down(settings: Settings) -> None:
    """Stop every component (SIGTERM, then SIGKILL after a grace period); idempotent."""
    async with stack_lock(Layout.of(settings).lock_path):
        await _all(settings, lambda c: _stop(c, kill=False))


async def start_component(settings: Settings, name: str) -> None:
    """Start one component ("kafka", "redis", "s3", or "kafka-<i>" of a multi-broker Kafka) if it is
    not running; its data is kept."""
    component = _component(settings, name)
    check_ports_distinct(settings)
    # The lock covers the checks and the spawn, not the wait until it answers: Kafka may take
    # seconds to, and a Redis started again meanwhile (by `switchboard run`) must not wait for
    # that. The spawned process has its pid file before the lock is released.
    async with stack_lock(component.layout.lock_path):
        pid = await _spawn(component)

    async def again() -> int:
        async with stack_lock(component.layout.lock_path):
            return await _spawn(component)

    await _wait_started(component, pid, again)
    await component.after_start()


async def stop_component(settings: Settings, name: str, *, kill: bool = False) -> None:
    """Stop one component; `kill=True` sends SIGKILL at once (a crash, not a shutdown)."""
    component = _component(settings, name)
    async with stack_lock(component.layout.lock_path):
        await _stop(component, kill=kill)


async def status(settings: Settings) -> dict[str, dict[str, Any]]:
    """Per component: pid, alive (process running and answering its protocol), address, log."""

    async def one(c: Component) -> dict[str, Any]:
        pid = running_pid(c.pid_path, c.identity)
        alive = pid is not None and await c.healthy()
        return {"pid": pid, "alive": alive, "address": c.address, "log": str(c.log_path)}

    comps = components(settings)
    results = await asyncio.gather(*(one(c) for c in comps.values()))
    return dict(zip(comps, results, strict=True))


def gone(settings: Settings) -> dict[str, Path]:
    """The components whose process is not running (died, killed, never started), each with its log.

    Only the process is looked at, not its health: cheap enough to ask every second, and a server
    that is running but not answering yet is starting, not gone."""
    reap_exited()
    return {
        name: c.log_path
        for name, c in components(settings).items()
        if running_pid(c.pid_path, c.identity) is None
    }


def logs(settings: Settings, name: str | None = None, lines: int = 50) -> str:
    """The last `lines` lines of one component's log, or of each one's (name=None)."""
    layout = Layout.of(settings)
    names = component_names(settings)
    if name is not None:
        if name not in (*names, "install"):
            raise ValueError(f"unknown log {name!r}; expected one of {', '.join(names)}, install")
        return tail(layout.log_path(name), lines)
    parts = []
    for each in names:
        path = layout.log_path(each)
        parts.append(f"==> {path} <==\n{tail(path, lines)}")
    return "\n\n".join(parts)


async def _all(settings: Settings, action: Callable[[Component], Awaitable[None]]) -> None:
    """Run `action` on every component concurrently; let all finish, then report every failure."""
    comps = list(components(settings).values())
    results = await asyncio.gather(*(action(c) for c in comps), return_exceptions=True)
    failures = [(c, r) for c, r in zip(comps, results, strict=True) if isinstance(r, BaseException)]
    if len(failures) == 1:
        raise failures[0][1]
    if failures:
        raise StackError("\n\n".join(f"[{c.name}] {r}" for c, r in failures)) from failures[0][1]


async def _start(c: Component) -> None:
    pid = await _spawn(c)
    await _wait_started(c, pid, lambda: _spawn(c))
    await c.after_start()


async def _wait_started(c: Component, pid: int, spawn_again: Callable[[], Awaitable[int]]) -> None:
    """Wait until it answers; if it exited while starting with a start-up aid (Kafka's class-data
    archive), start it once more without: such an aid must never keep a server down."""
    try:
        await _wait_healthy(c, pid)
    except ExitedWhileStarting as exc:
        if not await c.drop_start_aid(str(exc)):
            raise
        # Killed, or the archive at fault: which one is not known here, so the archive is checked
        # (drop_start_aid) and this one start goes without it.
        log.warning(
            "%s exited while starting; starting it once more without its class-data archive, in case "
            "the archive was the cause",
            c.name,
        )
        await _wait_healthy(c, await spawn_again())


async def _spawn(c: Component) -> int:
    """Spawn the component unless it runs already (ours, maybe still starting); its pid."""
    pid = running_pid(c.pid_path, c.identity)
    if pid is not None:
        return pid
    taken = {
        port: holder
        for port in component_ports(c.settings)[c.name]
        if (holder := port_holder(port)) is not None
    }
    if taken:
        detail = "; ".join(f"{port}: {holder}" for port, holder in taken.items())
        raise StackError(
            f"cannot start {c.name}: port(s) already in use ({detail}). Stop that or change ports."
        )
    await c.prepare()
    pid = spawn(c.argv(), name=c.name, log_path=c.log_path, pid_path=c.pid_path, cwd=c.cwd)
    log.info("%s started on %s (pid %d)", c.name, c.address, pid)
    return pid


async def _wait_healthy(c: Component, pid: int) -> None:
    deadline = time.monotonic() + c.start_timeout_s
    while not await c.healthy():
        if not is_running(pid):
            c.pid_path.unlink(missing_ok=True)
            raise ExitedWhileStarting(
                f"{c.name} exited while starting; last lines of {c.log_path}:\n{tail(c.log_path, 40)}"
            )
        if time.monotonic() > deadline:
            raise StackError(
                f"{c.name} (pid {pid}) did not answer on {c.address} within {c.start_timeout_s:.0f}s; "
                f"it is left running for inspection. Last lines of {c.log_path}:\n{tail(c.log_path, 40)}"
            )
        await asyncio.sleep(0.2)


async def _stop(c: Component, *, kill: bool) -> None:
    pid = running_pid(c.pid_path, c.identity)
    if pid is not None:
        await terminate(pid, grace_s=STOP_GRACE_S, kill=kill)
        # A killed multi-threaded server shows as a zombie while its other threads still hold its
        # sockets; a start right away would find its ports taken. Wait until they are free.
        deadline = time.monotonic() + PORT_RELEASE_S
        while any(port_holder(p) for p in component_ports(c.settings)[c.name]):
            if time.monotonic() > deadline:
                log.warning("%s stopped (pid %d) but its ports are still in use", c.name, pid)
                break
            await asyncio.sleep(0.05)
        log.info("%s stopped (pid %d)", c.name, pid)
    c.pid_path.unlink(missing_ok=True)


__all__ = ["StackError", "down", "gone", "logs", "start_component", "status", "stop_component", "up"]
