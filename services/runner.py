"""`switchboard run`: the whole system on the embedded defaults, in the foreground."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil

from services import stack
from services.auth import issue_demo_key
from services.demo import load_demo_faq_indexed, play_assistant_demo, play_demo, show_landed
from services.kafka_topics import ensure_topics
from services.processes import Child, switchboard_children, wait_for_analytics, wait_for_ingress
from services.settings import Settings


def _banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def run_system(settings: Settings, demo: bool = True) -> int:
    # Until the system serves, SIGTERM interrupts start-up like Ctrl-C does, so whatever was
    # started is stopped again (the `finally` below). SIGHUP too: a closed terminal or a dropped
    # SSH session sends it, and its default (die at once) would SIGKILL every child (they die
    # with the runner) and leave the stack's servers running. Unless it is ignored (`nohup`):
    # then the runner is meant to outlive its terminal.
    hangup = signal.getsignal(signal.SIGHUP) != signal.SIG_IGN
    signal.signal(signal.SIGTERM, _interrupt)
    if hangup:
        signal.signal(signal.SIGHUP, _interrupt)
    children = switchboard_children(settings)
    stopping = threading.Event()

    def stop(*_: object) -> None:
        stopping.set()

    try:
        _banner("checking the servers are installed (the first run downloads them)")
        asyncio.run(stack.install(settings))
        _banner("starting the local stack: Kafka (KRaft), Redis, SeaweedFS")
        asyncio.run(stack.up(settings))
        created = asyncio.run(ensure_topics(settings))
        print(f"topics created: {', '.join(created) or 'none needed'}")
        # Keys are on from the first run: the demo presents one, as every client must.
        settings = settings.model_copy(update={"api_key": issue_demo_key(settings)})
        print(
            f"demo API key (tenant {settings.demo_tenant!r}; roles customer-app, agent, knowledge-admin): "
            f"{settings.api_key}\n  every gRPC call but health and reflection needs an API key "
            "from now on: send `authorization: Bearer <key>`"
        )
        _banner(
            "starting analytics (projector + ClickHouse query endpoint), sessions worker, assistant, archiver, ingress"
        )
        for child in children.values():
            child.start()
        asyncio.run(wait_for_analytics(settings, children["analytics"]))
        asyncio.run(wait_for_ingress(settings, children["ingress"]))
        print(f"gRPC API on {settings.grpc_listen}; ClickHouse HTTP endpoint on {settings.analytics_listen}")
        if demo:
            run_demo_step(settings)
        _banner("serving; Ctrl-C stops everything")
        print(
            f"  grpcurl -plaintext {settings.grpc_listen} list\n"
            f"  grpcurl -plaintext -H 'authorization: Bearer {settings.api_key}' -d '{{}}' "
            f"{settings.grpc_listen} switchboard.v1.KnowledgeService/ListDocuments\n"
            "  a key of your own tenant (created on first use; the secret alone on stdout):\n"
            "  KEY=$(.venv/bin/switchboard keys issue --tenant acme --role customer-app --role agent "
            "--role knowledge-admin)\n"
            '  .venv/bin/switchboard sql "SELECT type, count() FROM switchboard.events GROUP BY type"\n'
            f"  logs: {settings.data_dir / 'logs'}",
            flush=True,
        )
        signal.signal(signal.SIGTERM, stop)
        if hangup:
            signal.signal(signal.SIGHUP, stop)
        signal.signal(signal.SIGINT, stop)
        # The handlers only set the event (SIGINT is not asyncio.run's then, so no
        # KeyboardInterrupt lands inside a restart); `supervise` sees it within a tenth of a second.
        asyncio.run(supervise(settings, children, stopping))
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        # After a hangup the terminal refuses writes (EIO): that must not skip the stop itself.
        with contextlib.suppress(OSError):
            _banner("stopping")
        _stop_children(list(children.values()))
        asyncio.run(stack.down(settings))
        with contextlib.suppress(OSError):
            _banner(f"stopped; the data stays in {settings.data_dir} for the next run")


# A process that died is started again at once; one that dies again within STABLE_S of its start
# (or fails to start) waits RESTART_FIRST_S, then twice as long each time up to RESTART_CAP_S, so a
# process that cannot live neither spins nor fills the terminal. Up STABLE_S, or up SERVED_S with
# its own port listening (Child.ready_address, held by it or its children), it starts afresh: a
# process killed after serving is started again at once however often that happens (by lifetime
# alone, a worker killed every 10-15 s under load waited 1, 2, 4, 8, 16 s more each time:
# benchmarks/worker_restart.py).
RESTART_FIRST_S = 1.0
RESTART_CAP_S = 30.0
STABLE_S = 30.0
SERVED_S = 2.0
# How often the children and the stack's processes are looked at, and how often the stop event is.
# A look costs well under a millisecond (pid files, /proc); a Kafka killed waits for it before it
# is started again, on average half of this (benchmarks/kafka_restart.py).
CHECK_S = 0.25
STOP_POLL_S = 0.1
# A warm spare (Settings.warm_spares) is started this long after the system serves, and after its
# predecessor took over: its imports would otherwise take CPU from the start it is there to spare.
SPARE_AFTER_S = 5.0
# On a stop, how long a cancelled server restart may take to unwind (it releases the stack lock;
# whatever it spawned has its pid file, so `stack.down` stops it).
CANCEL_WAIT_S = 5.0


@dataclass
class Backoff:
    """When one process may be started again: pure, given the time (monotonic seconds)."""

    up_since: float | None = None  # started (or found running) then; None while down
    failures: int = 0  # deaths and failed starts since it last stayed up STABLE_S, or served
    next_at: float = 0.0
    # When it was first seen serving (its own port listening) since its start; None: not yet.
    served_at: float | None = None
    looked_at: float = 0.0  # when its port was last looked at

    def started(self, now: float) -> None:
        self.up_since = now
        self.served_at = None

    def failed(self, now: float) -> float:
        """It died or could not be started: the pause before the next start."""
        if self.up_since is not None and (
            now - self.up_since >= STABLE_S
            or (self.served_at is not None and now - self.served_at >= SERVED_S)
        ):
            self.failures = 0
        self.up_since = None
        self.served_at = None
        self.failures += 1
        pause = 0.0 if self.failures == 1 else min(RESTART_CAP_S, RESTART_FIRST_S * 2 ** (self.failures - 2))
        self.next_at = now + pause
        return pause

    def due(self, now: float) -> bool:
        return now >= self.next_at


async def supervise(settings: Settings, children: dict[str, Child], stopping: threading.Event) -> None:
    """Until `stopping` is set: every CHECK_S, start again each child that exited and each stack
    server (Kafka, Redis, SeaweedFS) whose process is gone, with its data; never raises for a
    process that cannot be started (it is tried again, with back-off).

    A server's start runs as a task of this loop, not inline and not in a thread: Kafka takes
    seconds to answer (up to its 90 s start timeout), during which the children are still looked
    after, and a stop cancels the task at its next await. That releases the stack lock at once,
    so the runner's `stack.down` does not wait for a start nobody wants any more (a thread could
    not be interrupted: `down` would wait for the lock until the start ended)."""
    now = time.monotonic()
    child_backoff = {name: Backoff(up_since=now) for name in children}
    spares = {name: Backoff(next_at=now + SPARE_AFTER_S) for name in children if name in settings.spare_roles}
    if settings.sessions_processes > 1:
        # Its processes are the supervisor's children, started cold whatever the supervisor's state.
        spares.pop("sessions", None)
    server_backoff: dict[str, Backoff] = {}
    starting: dict[str, asyncio.Task[None]] = {}
    try:
        while not stopping.is_set():
            now = time.monotonic()
            look_after_children(children, child_backoff, now, spares)
            look_after_spares(children, spares, now)
            starting = {name: task for name, task in starting.items() if not task.done()}
            try:
                gone = stack.gone(settings)
            except OSError as exc:  # a pid file it may not read: looked at again next time
                print(f"could not check the stack's processes ({exc})", flush=True)
                gone = {}
            for name, log_path in gone.items():
                if name in starting or stopping.is_set():
                    continue
                backoff = server_backoff.setdefault(name, Backoff(up_since=now))
                if backoff.up_since is not None:
                    pause = backoff.failed(now)
                    when = "" if pause == 0 else f" in {pause:.0f}s"
                    print(
                        f"{name} is gone; starting it again{when}, its data kept (log: {log_path})",
                        flush=True,
                    )
                if backoff.due(now):
                    starting[name] = asyncio.create_task(_start_server(settings, name, log_path, backoff))
            await _wait(stopping, CHECK_S)
    finally:
        # Stopping: no server is started any more; one being started is abandoned.
        for task in starting.values():
            task.cancel()
        if starting:
            await asyncio.wait(starting.values(), timeout=CANCEL_WAIT_S)


def look_after_children(
    children: dict[str, Child],
    backoffs: dict[str, Backoff],
    now: float,
    spares: dict[str, Backoff] | None = None,
) -> None:
    """Start again each child that exited, when its back-off allows: its warm spare takes over if
    it has one, else a new process starts; a start that fails (OSError: no memory, no file
    descriptors, its log not writable) is reported and tried again later."""
    for name, child in children.items():
        backoff = backoffs[name]
        if child.alive:
            _look_for_serving(child, backoff, now)
            continue
        if backoff.up_since is not None:
            lived = now - backoff.up_since
            pause = backoff.failed(now)
            code = child.proc.returncode if child.proc is not None else None
            when = "now" if pause == 0 else f"in {pause:.0f}s"
            print(
                f"{name} exited (code {code}, after {lived:.0f}s); starting it again {when} "
                f"(log: {child.log_path})",
                flush=True,
            )
        if not backoff.due(now):
            continue
        if spares is not None and name in spares:
            # The next spare after this start is under way: its imports would take CPU from it.
            spares[name].next_at = max(spares[name].next_at, now + SPARE_AFTER_S)
        if child.spare_is_stale:
            print(f"{name}: its warm spare was started on older code; starting a new process", flush=True)
            child.stop_spare()
        elif child.spare is not None and not child.spare_alive:
            print(
                f"{name}: its warm spare had exited (code {child.spare.returncode}); starting a new process",
                flush=True,
            )
            child.stop_spare()
        if child.take_over():
            assert child.proc is not None
            print(f"{name}: its warm spare (pid {child.proc.pid}) took over", flush=True)
            backoff.started(now)
            continue
        try:
            child.start()
        except OSError as exc:
            pause = backoff.failed(now)
            print(f"starting {name} failed ({exc}); next try in {pause:.0f}s", flush=True)
        else:
            backoff.started(now)


def _look_for_serving(child: Child, backoff: Backoff, now: float) -> None:
    """Note when the child first serves: its ready address's port listening in it or in one of its
    own processes (not merely answering: another program on that port is not the child), looked
    at once a second during its first STABLE_S (after that its lifetime says enough)."""
    if (
        backoff.served_at is not None
        or not child.ready_address
        or child.proc is None
        or backoff.up_since is None
        or now - backoff.up_since >= STABLE_S
        or now - backoff.looked_at < 1.0
    ):
        return
    backoff.looked_at = now
    port = int(child.ready_address.rsplit(":", 1)[1])
    try:
        top = psutil.Process(child.proc.pid)
        for proc in (top, *top.children(recursive=True)):
            with contextlib.suppress(psutil.NoSuchProcess):
                if any(
                    c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                    for c in proc.net_connections("tcp")
                ):
                    backoff.served_at = now
                    return
    except psutil.Error:  # gone, or not ours to read: looked at again next time
        return


def look_after_spares(children: dict[str, Child], spares: dict[str, Backoff], now: float) -> None:
    """Keep a warm spare beside each running child named in `spares`, when its back-off allows:
    one that exited while waiting (killed, or it could not import) is started again, with the same
    growing pause as a child that keeps dying."""
    for name, backoff in spares.items():
        child = children[name]
        if child.spare_alive or not child.alive:
            continue
        if child.spare is not None:
            code = child.spare.returncode
            child.stop_spare()  # reaped, its pipe closed
            pause = max(backoff.failed(now), SPARE_AFTER_S)
            backoff.next_at = now + pause
            print(f"{name}'s warm spare exited (code {code}); another in {pause:.0f}s", flush=True)
        if not backoff.due(now):
            continue
        try:
            child.start_spare()
        except OSError as exc:
            pause = max(backoff.failed(now), SPARE_AFTER_S)
            backoff.next_at = now + pause
            print(f"starting a warm spare of {name} failed ({exc}); next try in {pause:.0f}s", flush=True)
        else:
            backoff.started(now)


async def _start_server(settings: Settings, name: str, log_path: Path, backoff: Backoff) -> None:
    began = time.monotonic()
    try:
        await stack.start_component(settings, name)
    except Exception as exc:
        # StackError (port still held by the killed process, exited while starting, no answer
        # in time), OSError, or anything else: reported, and tried again; the runner goes on.
        pause = backoff.failed(time.monotonic())
        first = str(exc).splitlines()[0] if str(exc) else "no detail"
        print(
            f"starting {name} again failed ({type(exc).__name__}: {first}); next try in {pause:.0f}s "
            f"(log: {log_path})",
            flush=True,
        )
        return
    backoff.started(time.monotonic())
    print(f"{name} is up again ({time.monotonic() - began:.1f}s to start)", flush=True)


async def _wait(stopping: threading.Event, seconds: float) -> None:
    """Sleep `seconds`, or less once `stopping` is set.

    Polled, not an asyncio.Event: it is set by a plain signal handler (also while no loop runs,
    in start-up and in the `finally`), and a signal may land on another thread, which would not
    wake a loop blocked without a timeout; a short sleep bounds that."""
    deadline = time.monotonic() + seconds
    while not stopping.is_set() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(STOP_POLL_S)


def run_demo_step(settings: Settings) -> bool:
    """Play the demo; a failure is one line and the system keeps serving (the demo is a client)."""
    from services.commands.report import demo_report

    _banner("demo: bilingual conversations through the gRPC API")
    try:
        asyncio.run(load_demo_faq_indexed(settings))
        result = asyncio.run(play_demo(settings))
        _banner("what landed in ClickHouse (switchboard.conversations, then totals)")
        print(show_landed(settings, result), flush=True)
        _banner("the assistant: a bilingual FAQ, cited answers and a handoff")
        asyncio.run(play_assistant_demo(settings, faq_loaded=True))
        _banner("a report for people without Grafana (switchboard report)")
        print(f"  {demo_report(settings)}", flush=True)
        return True
    except Exception as exc:
        reason = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        code = f"{exc.code().name}: " if isinstance(exc, grpc.aio.AioRpcError) else ""
        print(
            f"demo failed ({type(exc).__name__}: {code}{reason or 'no detail'}); the system keeps serving — "
            f"see {settings.data_dir / 'logs'}",
            flush=True,
        )
        return False


def _stop_children(children: list[Child]) -> None:
    """The ingress first (no new writes while the workers stop), then the workers all at once.

    Each child may take up to Child.stop's 20 s to finish its batch; one after another those
    added up: a Ctrl-C while Kafka was down took 43-83 s, the workers' consumers each using
    their whole 20 s (tests/integration/test_runner_restarts.py)."""
    first = [c for c in children if c.name == "ingress"]
    for child in first:
        child.stop()
    stoppers = [
        threading.Thread(target=c.stop, name=f"stop-{c.name}") for c in reversed(children) if c not in first
    ]
    for thread in stoppers:
        thread.start()
    for thread in stoppers:
        thread.join()
