"""`switchboard run`: the whole system on the embedded defaults, in the foreground."""

from __future__ import annotations

import asyncio
import signal
import time

from services import stack
from services.demo import run_demo
from services.kafka_topics import ensure_topics
from services.processes import Child, switchboard_children, wait_for_analytics, wait_for_ingress
from services.settings import Settings


def _banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


async def _analytics_summary(settings: Settings) -> None:
    from services.analytics import run_query

    deadline = time.monotonic() + 60
    query = (
        "SELECT (SELECT count() FROM switchboard.events) AS events, "
        "(SELECT count() FROM switchboard.messages) AS messages, "
        "(SELECT uniqExact(conversation_id) FROM switchboard.events) AS conversations"
    )
    while True:
        out = await asyncio.to_thread(run_query, settings, query, "TSV")
        events = int(out.split()[0]) if out.strip() else 0
        if events >= 20 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    print(
        await asyncio.to_thread(
            run_query, settings, query.replace("SELECT (", "SELECT\n  (", 1), "PrettyCompact"
        )
    )


def run_system(settings: Settings, demo: bool = True) -> int:
    _banner("installing what is missing (first run only)")
    asyncio.run(stack.install(settings))
    _banner("starting the local stack: Kafka (KRaft), Redis, SeaweedFS")
    asyncio.run(stack.up(settings))
    created = asyncio.run(ensure_topics(settings))
    print(f"topics created: {', '.join(created) or 'none needed'}")

    children = switchboard_children(settings)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    try:
        _banner("starting analytics (projector + ClickHouse query endpoint), sessions worker, ingress")
        for child in children.values():
            child.start()
        asyncio.run(wait_for_analytics(settings, children["analytics"]))
        asyncio.run(wait_for_ingress(settings, children["ingress"]))
        print(f"gRPC API on {settings.grpc_listen}; ClickHouse HTTP endpoint on {settings.analytics_listen}")
        if demo:
            _banner("demo: bilingual conversations through the gRPC API")
            asyncio.run(run_demo(settings))
            _banner("what landed in ClickHouse")
            asyncio.run(_analytics_summary(settings))
        _banner("serving; Ctrl-C stops everything")
        print(
            f"  grpcurl -plaintext {settings.grpc_listen} list\n"
            '  .venv/bin/switchboard sql "SELECT type, count() FROM switchboard.events GROUP BY type"\n'
            f"  logs: {settings.data_dir / 'logs'}",
            flush=True,
        )
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        while not stopping:
            for child in children.values():
                if not child.alive:
                    print(f"{child.name} exited; restarting it (log: {child.log_path})", flush=True)
                    child.start()
            signal.sigtimedwait([signal.SIGINT, signal.SIGTERM], 1.0)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        _banner("stopping")
        _stop_children(list(children.values()))
        asyncio.run(stack.down(settings))


def _stop_children(children: list[Child]) -> None:
    for child in reversed(children):
        child.stop()
