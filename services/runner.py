"""`switchboard run`: the whole system on the embedded defaults, in the foreground."""

from __future__ import annotations

import asyncio
import signal
import threading

import grpc

from services import stack
from services.auth import issue_demo_key
from services.demo import play_assistant_demo, play_demo, show_landed
from services.kafka_topics import ensure_topics
from services.processes import Child, switchboard_children, wait_for_analytics, wait_for_ingress
from services.settings import Settings


def _banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def run_system(settings: Settings, demo: bool = True) -> int:
    # Until the system serves, SIGTERM interrupts start-up like Ctrl-C does, so whatever was
    # started is stopped again (the `finally` below).
    signal.signal(signal.SIGTERM, _interrupt)
    children = switchboard_children(settings)
    stopping = threading.Event()

    def stop(*_: object) -> None:
        stopping.set()

    try:
        _banner("installing what is missing (first run only)")
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
        signal.signal(signal.SIGINT, stop)
        # The handler sets the event, which wakes this wait at once; every second the children
        # are checked and a crashed one is restarted (its log says why it died).
        while not stopping.wait(1.0):
            for child in children.values():
                if not child.alive:
                    print(f"{child.name} exited; restarting it (log: {child.log_path})", flush=True)
                    child.start()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        _banner("stopping")
        _stop_children(list(children.values()))
        asyncio.run(stack.down(settings))


def run_demo_step(settings: Settings) -> bool:
    """Play the demo; a failure is one line and the system keeps serving (the demo is a client)."""
    from services.commands.report import demo_report

    _banner("demo: bilingual conversations through the gRPC API")
    try:
        result = asyncio.run(play_demo(settings))
        _banner("what landed in ClickHouse (switchboard.conversations, then totals)")
        print(show_landed(settings, result), flush=True)
        _banner("the assistant: a bilingual FAQ, cited answers and a handoff")
        asyncio.run(play_assistant_demo(settings))
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
    for child in reversed(children):
        child.stop()
