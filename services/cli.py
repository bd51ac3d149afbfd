"""`switchboard` — the command line for every process and operation."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from services.processes import STANDBY_ENV
from services.settings import Settings, load_settings


def _settings() -> Settings:
    try:
        return load_settings()
    except ValidationError as exc:
        sys.exit(f"switchboard: invalid configuration:\n{exc}")


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")


def _cmd_stack(args: argparse.Namespace) -> int:
    from services import stack

    if args.brokers is not None:  # through the environment: validated like the setting
        os.environ["SWITCHBOARD_KAFKA_BROKERS"] = str(args.brokers)
    settings = _settings()
    if args.action == "install":
        asyncio.run(stack.install(settings, for_tests=args.for_tests))
    elif args.action == "up":
        asyncio.run(stack.install(settings))
        asyncio.run(stack.up(settings))
        print(json.dumps(asyncio.run(stack.status(settings)), indent=2, default=str))
    elif args.action == "down":
        asyncio.run(stack.down(settings))
    elif args.action == "status":
        status = asyncio.run(stack.status(settings))
        print(json.dumps(status, indent=2, default=str))
        return 0 if all(c.get("alive") for c in status.values()) else 1
    elif args.action == "logs":
        print(stack.logs(settings, args.name, args.lines))
    return 0


def _cmd_topics(args: argparse.Namespace) -> int:
    from services.kafka_topics import TopicCreationError, ensure_topics

    try:
        created = asyncio.run(ensure_topics(_settings()))
    except TopicCreationError as exc:
        sys.exit(f"switchboard topics: {exc}")
    print("created: " + (", ".join(created) if created else "nothing (all topics exist)"))
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    from services.analytics import AnalyticsError, migrate_command

    try:
        applied = migrate_command(_settings())
    except AnalyticsError as exc:
        sys.exit(f"switchboard migrate: {exc}")
    print("applied: " + (", ".join(applied) if applied else "nothing (schema is current)"))
    return 0


def _cmd_sql(args: argparse.Namespace) -> int:
    from services.analytics import AnalyticsError, run_query_bytes

    try:
        # Bytes as ClickHouse wrote them: binary formats (Parquet, Native, …) pass through intact.
        sys.stdout.flush()
        sys.stdout.buffer.write(run_query_bytes(_settings(), args.query, args.format))
        sys.stdout.buffer.flush()
    except AnalyticsError as exc:
        sys.exit(f"switchboard sql: {exc}")
    return 0


def _cmd_ingress(args: argparse.Namespace) -> int:
    from services.ingress import serve

    _logging(args.log_level)
    try:
        return asyncio.run(serve(_settings()))
    except KeyboardInterrupt:
        return 0


# Each stream processor: the module it runs in, and its `run_*(settings, log_level)`.
_WORKERS = {
    "sessions": ("streams.sessions._worker", "run_sessions"),
    "assistant": ("streams.assistant._worker", "run_assistant"),
    "archiver": ("streams.archive", "run_archiver"),
}


def _cmd_worker(args: argparse.Namespace) -> int:
    module, function = _WORKERS[args.role]
    getattr(importlib.import_module(module), function)(_settings(), args.log_level)
    return 0


def _modules_of(args: argparse.Namespace) -> list[str]:
    """What a long-running command imports before it does anything (a warm spare's head start)."""
    if args.command == "worker":
        if args.role == "assistant":
            # Its encoder and classifier are imported as its models load (the load is not done
            # here: it may build them, which the running assistant may be doing).
            return [
                _WORKERS["assistant"][0],
                "streams.assistant.encoder",
                "streams.assistant.intent._classifier",
            ]
        return [_WORKERS[args.role][0]]
    return {
        "ingress": ["services.ingress"],
        # chdb's import maps its ~200 MB library (shared with the running process's pages).
        "analytics": ["services.analytics._process", "streams.projector", "chdb"],
    }.get(args.command, [])


def _stand_by(args: argparse.Namespace) -> None:
    """As a warm spare (`switchboard run` starts one beside a process it looks after, with
    STANDBY_ENV set): import what the command runs, then wait for a line on stdin, which comes
    when the process this one stands by for has died; the command then runs as if just started,
    its imports done. EOF instead (the runner stopping, or gone) ends the spare. Nothing is held
    while waiting: no port, no consumer, no file."""
    if os.environ.pop(STANDBY_ENV, "") != "1":
        return
    # `kill -USR2 $(pgrep -f "services.cli worker sessions")` (the README's task dump) reaches the
    # spare too: not a reason to die (the handler comes with eventloop.install, after this).
    previous = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        _settings()  # a bad configuration ends the spare now, not the process it replaces
        for module in _modules_of(args):
            importlib.import_module(module)
        told = sys.stdin.buffer.readline()
    except KeyboardInterrupt:
        sys.exit(0)
    if not told:
        sys.exit(0)
    signal.signal(signal.SIGUSR2, previous)


def _cmd_models(args: argparse.Namespace) -> int:
    from streams.assistant.intent import build_models

    _logging("info")
    settings = _settings()
    manifest = build_models(settings.effective_models_dir, force=args.force)
    print(
        f"models in {settings.effective_models_dir}: {', '.join(sorted(manifest.get('artifacts', manifest)))}"
    )
    return 0


def _cmd_analytics(args: argparse.Namespace) -> int:
    from services.analytics import run_analytics

    _logging(args.log_level)
    run_analytics(_settings())
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from services.runner import run_system

    return run_system(_settings(), demo=not args.no_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from services.demo import run_demo

    return asyncio.run(run_demo(_settings()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchboard",
        description="Event-sourced streaming customer-service backend. "
        "Configuration comes from SWITCHBOARD_* environment variables.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stack", help="the embedded local stack: Kafka, Redis, SeaweedFS (S3)")
    p.add_argument("action", choices=["install", "up", "down", "status", "logs"])
    p.add_argument("name", nargs="?", help="component (logs only): kafka, redis, s3 or kafka-<i>")
    p.add_argument("-n", "--lines", type=int, default=50)
    p.add_argument(
        "--brokers", type=int, help="Kafka brokers (a KRaft cluster on loopback); SWITCHBOARD_KAFKA_BROKERS"
    )
    p.add_argument(
        "--for-tests", action="store_true", help="install: also what the test suite needs (chromium)"
    )
    p.set_defaults(func=_cmd_stack)

    p = sub.add_parser("topics", help="create the Kafka topics with their partition counts")
    p.add_argument("action", choices=["create"])
    p.set_defaults(func=_cmd_topics)

    p = sub.add_parser("migrate", help="apply pending ClickHouse migrations")
    p.set_defaults(func=_cmd_migrate)

    p = sub.add_parser("sql", help="run a query against the ClickHouse projections")
    p.add_argument("query")
    p.add_argument("-f", "--format", default="PrettyCompact", help="ClickHouse output format")
    p.set_defaults(func=_cmd_sql)

    for name, func, help_text in (
        ("ingress", _cmd_ingress, "serve the gRPC API"),
        ("analytics", _cmd_analytics, "project events into ClickHouse and serve the query endpoint"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--log-level", default="info")
        p.set_defaults(func=func)

    p = sub.add_parser("worker", help="run a stream processor")
    p.add_argument("role", choices=["sessions", "assistant", "archiver"])
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("models", help="build the ONNX models and tokenizers the assistant runs on")
    p.add_argument("action", choices=["build"])
    p.add_argument("--force", action="store_true", help="rebuild even when current")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("run", help="bring up the stack and every process, play a demo, serve until Ctrl-C")
    p.add_argument("--no-demo", action="store_true")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("demo", help="play the bilingual demo against a running system")
    p.set_defaults(func=_cmd_demo)

    from services.commands import register_all

    register_all(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from services.processes import die_with_parent

    die_with_parent()
    args = build_parser().parse_args(argv)
    _stand_by(args)
    from services import eventloop
    from services.observability.logs import quiet_repeats

    eventloop.install()
    quiet_repeats()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
