"""`switchboard replay`: rebuild state from the log (S3 archive, then Kafka) and swap it in."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from typing import Any


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "replay",
        help="rebuild projections / hot view / knowledge base from the log into fresh storage, then swap it in",
    )
    p.add_argument("--target", choices=["sessions", "projections", "knowledge", "all"], required=True)
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--from-offset",
        type=int,
        default=None,
        help="projections only: re-project from this offset, in place",
    )
    start.add_argument(
        "--from-time",
        default=None,
        help="projections only: re-project from the first event at or after this time (ISO 8601, UTC if no zone)",
    )
    p.add_argument(
        "--tenant", default=None, help="only this tenant's events (projections/sessions/knowledge)"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="say what would be read (archive/Kafka), write nothing"
    )
    p.add_argument(
        "--no-swap",
        action="store_true",
        help="rebuild into the scratch storage and compare with the live state; change nothing live",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="sessions: swap even though the sessions worker seems to be running",
    )
    p.add_argument(
        "--keep-old",
        action="store_true",
        help="projections: keep the previous tables in the scratch database",
    )
    p.add_argument("--no-archive", action="store_true", help="read Kafka only")
    p.add_argument(
        "--workers", type=int, default=0, help="projections: processes that build rows (0: in this process)"
    )
    p.set_defaults(func=_cmd_replay)


def _parse_time(text: str) -> int:
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def _cmd_replay(args: argparse.Namespace) -> int:
    from services.cli import _logging, _settings
    from streams.replay import ReplayError, ReplayOptions, replay

    _logging("warning")
    if args.from_offset is not None and args.from_offset < 0:
        # It re-projected the whole log, silently (trial, twenty-ninth session).
        sys.exit(f"switchboard replay: --from-offset {args.from_offset} is negative (the log starts at 0)")
    if args.workers < 0:
        sys.exit(f"switchboard replay: --workers {args.workers} is negative (0: build rows in this process)")
    settings = _settings()
    try:
        from_time = _parse_time(args.from_time) if args.from_time else None
    except ValueError:
        sys.exit(f"switchboard replay: --from-time {args.from_time!r} is not an ISO 8601 time")
    options = ReplayOptions(
        target=args.target,
        from_offset=args.from_offset,
        from_time_ms=from_time,
        tenant=args.tenant,
        dry_run=args.dry_run,
        swap=not args.no_swap,
        force=args.force,
        keep_old=args.keep_old,
        use_archive=not args.no_archive,
        workers=args.workers,
    )
    try:
        summaries = asyncio.run(replay(settings, options, out=sys.stderr))
    except (ReplayError, ValueError, ConnectionError) as exc:
        sys.exit(f"switchboard replay: {exc}")
    print("replay summary")
    for summary in summaries:
        for line in summary.lines():
            print(f"  {line}")
    return 0 if all(s.identical is not False for s in summaries) else 1
