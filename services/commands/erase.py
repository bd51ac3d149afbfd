"""`switchboard tenant erase TENANT [--customer ID]` and `switchboard tenant retention`:
data-subject erasure and per-tenant retention (streams/privacy)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from dataclasses import asdict
from typing import Any


def _erase(args: argparse.Namespace) -> int:
    from aiokafka.errors import KafkaError

    from services.cli import _settings
    from services.commands import kafka_failed
    from streams.privacy._erase import EraseError, erase

    settings = _settings()
    try:
        report = asyncio.run(
            erase(
                settings,
                args.tenant,
                args.customer,
                requested_by=args.requested_by or getpass.getuser(),
                wait_s=args.wait_s,
                progress=lambda line: print(line, file=sys.stderr),
            )
        )
    except (EraseError, ValueError) as exc:
        print(f"switchboard tenant erase: {exc}", file=sys.stderr)
        return 1
    except KafkaError as exc:
        # The erasure record may have been written (its answer lost): the purge is then still to
        # do, and every step of it is idempotent.
        return kafka_failed(
            "tenant erase",
            exc,
            "the erasure may or may not have been recorded: run the same command again to finish it",
        )
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        who = (
            f"customer {report.customer} of tenant {report.tenant}"
            if report.customer
            else f"tenant {report.tenant}"
        )
        print(f"erased {who} (erasure event {report.event_id})")
        if report.customer is not None:
            print(f"  conversations: {len(report.conversations)}")
        else:
            print(f"  knowledge documents deleted: {report.documents}")
        rows = ", ".join(f"{t} {n}" for t, n in sorted(report.clickhouse_rows.items())) or "none"
        print(f"  ClickHouse rows deleted: {rows}")
        print(f"  Redis keys deleted: {report.redis_keys}")
        a = report.archive
        print(
            f"  archive: {a.segments_rewritten} segments rewritten ({a.records_removed} records removed, "
            f"{a.segments_read} read), {a.leftovers_deleted} leftovers deleted"
        )
        print(
            "  Kafka keeps the original records until its retention passes; every processor and "
            "replay skips them"
        )
    for note in report.notes:
        print(f"warning: {note}", file=sys.stderr)
    return 1 if report.notes else 0


def _retention(args: argparse.Namespace) -> int:
    from services.cli import _settings
    from streams.privacy._retention import apply_retention

    settings = _settings()
    try:
        applied = asyncio.run(apply_retention(settings, args.tenant))
    except ValueError as exc:
        print(f"switchboard tenant retention: {exc}", file=sys.stderr)
        return 1
    if not applied:
        print("no tenant has a retention (`switchboard tenants update T --retention-days N`)")
    for result in applied:
        rows = ", ".join(f"{t} {n}" for t, n in sorted(result.clickhouse_rows.items())) or "none"
        print(
            f"{result.tenant}: {result.days} days (before {result.cutoff}): ClickHouse rows deleted: {rows}; "
            f"archive: {result.archive.segments_rewritten} segments rewritten, "
            f"{result.archive.records_removed} records removed"
        )
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("tenant", help="privacy operations on one tenant: erase, retention")
    actions = p.add_subparsers(dest="action", required=True)
    e = actions.add_parser(
        "erase",
        help="data-subject erasure: remove a customer (or the whole tenant) from ClickHouse, the hot "
        "view and the S3 archive, and record it as an event",
    )
    e.add_argument("tenant")
    e.add_argument(
        "--customer",
        default=None,
        help="the customer id (as in StartConversation); without it the whole tenant is erased",
    )
    e.add_argument("--requested-by", default="", help="who asked, for the record (default: the OS user)")
    e.add_argument(
        "--wait-s",
        type=float,
        default=120.0,
        help="how long to wait for the live projector and sessions worker to pass the erasure",
    )
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_erase)
    r = actions.add_parser(
        "retention",
        help="apply each tenant's retention (`tenants update T --retention-days N`) to ClickHouse and "
        "the archive; run it periodically (e.g. hourly from cron)",
    )
    r.add_argument("--tenant", default=None, help="only this tenant")
    r.set_defaults(func=_retention)
