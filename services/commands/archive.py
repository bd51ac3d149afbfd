"""`switchboard archive list | verify | restore`: the cold archive of conversation-events in S3."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("archive", help="the S3 archive of the event log: list, verify, restore")
    p.add_argument("action", choices=["list", "verify", "restore"])
    p.add_argument("--topic", default=None, help="archived topic (default: the conversation topic)")
    p.add_argument("--partition", type=int, default=None, help="one partition (restore: required)")
    p.add_argument("--from-offset", type=int, default=None, help="restore: first offset")
    p.add_argument("--to-offset", type=int, default=None, help="restore: last offset (inclusive)")
    p.add_argument(
        "--into-topic",
        default=None,
        help="restore: produce the records into this topic (same partition, key, value, headers, "
        "timestamp); without it, print them as JSON lines",
    )
    p.add_argument("--json", action="store_true", help="list/verify: machine-readable output")
    p.set_defaults(func=_cmd_archive)


def _cmd_archive(args: argparse.Namespace) -> int:
    from services.cli import _settings

    settings = _settings()
    topic = args.topic or settings.conversation_topic
    try:
        if args.action == "list":
            return _list(settings, topic, args)
        if args.action == "verify":
            return _verify(settings, topic, args)
        return asyncio.run(_restore(settings, topic, args))
    except ConnectionError as exc:
        sys.exit(f"switchboard archive: {exc}")


def _list(settings: Any, topic: str, args: argparse.Namespace) -> int:
    from streams.archive import ArchiveStore

    store = ArchiveStore(settings)
    partitions = [args.partition] if args.partition is not None else store.partitions(topic)
    rows: list[dict[str, Any]] = []
    for p in partitions:
        listing = store.listing(topic, p)
        for m in listing.manifests:
            rows.append(
                {
                    "partition": p,
                    "first_offset": m.first_offset,
                    "last_offset": m.last_offset,
                    "count": m.count,
                    "min_timestamp_ms": m.min_timestamp_ms,
                    "max_timestamp_ms": m.max_timestamp_ms,
                    "raw_bytes": m.raw_bytes,
                    "stored_bytes": m.stored_bytes,
                    "sha256": m.sha256,
                    "segment": m.segment,
                }
            )
        for name in listing.orphans:
            rows.append({"partition": p, "orphan": name})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"archive of {topic} in s3://{store.bucket}/{store.prefix}/{topic}/")
    print(
        f"{'part':>4} {'first':>12} {'last':>12} {'events':>8} {'raw':>10} {'stored':>10} {'ratio':>6}  time range (UTC)"
    )
    for row in rows:
        if "orphan" in row:
            print(f"{row['partition']:>4} orphan segment (no manifest; ignored): {row['orphan']}")
            continue
        ratio = row["raw_bytes"] / max(row["stored_bytes"], 1)
        print(
            f"{row['partition']:>4} {row['first_offset']:>12} {row['last_offset']:>12} {row['count']:>8} "
            f"{row['raw_bytes']:>10} {row['stored_bytes']:>10} {ratio:>6.1f}  "
            f"{_when(row['min_timestamp_ms'])} .. {_when(row['max_timestamp_ms'])}"
        )
    if not rows:
        print("(nothing archived yet)")
    return 0


def _when(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _verify(settings: Any, topic: str, args: argparse.Namespace) -> int:
    from streams.archive import ArchiveStore, PartitionReport, kafka_coverage_problems, verify_archive

    store = ArchiveStore(settings)
    partitions = [args.partition] if args.partition is not None else None
    reports = verify_archive(store, topic, partitions)
    # And against Kafka: nothing may be gone from both.
    try:
        from streams.replay import kafka_offsets

        starts, _ = asyncio.run(kafka_offsets(settings, topic))
    except Exception as exc:
        print(f"(Kafka not reachable, archive checked on its own: {exc})", file=sys.stderr)
        starts = {}
    if partitions is not None:
        starts = {p: o for p, o in starts.items() if p in partitions}
    known = {r.partition for r in reports}
    reports.extend(PartitionReport(p) for p in sorted(starts) if p not in known)
    lost = kafka_coverage_problems(reports, starts)
    for r in reports:
        r.problems.extend(x for x in lost if x.startswith(f"partition {r.partition}:"))
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "partition": r.partition,
                        "ok": r.ok,
                        "segments": r.segments,
                        "records": r.records,
                        "first_offset": r.first_offset,
                        "last_offset": r.last_offset,
                        "problems": r.problems,
                        "orphans": r.orphans,
                    }
                    for r in reports
                ],
                indent=2,
            )
        )
    else:
        for r in reports:
            span = f"offsets {r.first_offset}..{r.last_offset}" if r.first_offset is not None else "empty"
            print(
                f"partition {r.partition}: {'ok' if r.ok else 'FAILED'}, {r.segments} segments, {r.records} records, "
                f"{span}" + (f", {len(r.orphans)} orphan segment(s) ignored" if r.orphans else "")
            )
            for problem in r.problems:
                print(f"  {problem}")
        if not reports:
            print("(nothing archived yet)")
    return 0 if all(r.ok for r in reports) else 1


async def _restore(settings: Any, topic: str, args: argparse.Namespace) -> int:
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    from services import kafka_clients  # also throttles aiokafka's failed metadata updates
    from services.commands import kafka_failed
    from streams.archive import ArchiveStore
    from streams.privacy._retention import replay_filter
    from streams.replay import PartitionPlan, ReplayError, ReplayPlan, read_log
    from streams.replay._source import _cover, kafka_offsets

    if args.partition is None or args.from_offset is None or args.to_offset is None:
        sys.exit("switchboard archive restore: --partition, --from-offset and --to-offset are required")
    if args.from_offset < 0:
        sys.exit("switchboard archive restore: --from-offset is negative")
    if args.to_offset < args.from_offset:
        sys.exit("switchboard archive restore: --to-offset is before --from-offset")
    if args.into_topic in (topic, settings.conversation_topic):
        # Seen in a trial: the records went through idempotence, but the assistant answered them
        # again, ten minutes late, in the customer's conversation.
        sys.exit(
            f"switchboard archive restore: --into-topic {args.into_topic} is the live event log: its "
            "processors would take the records for new events (the assistant would answer them again); "
            "restore into a topic of its own (`switchboard archive restore --help`)"
        )
    try:
        # Where the log is now: records before its start come from the archive, the rest from Kafka.
        starts, ends = await kafka_offsets(settings, topic)
        if args.into_topic:
            _, into_ends = await kafka_offsets(settings, args.into_topic)
            if args.partition not in into_ends:
                sys.exit(
                    f"switchboard archive restore: {args.into_topic} has no partition {args.partition} "
                    f"(it has {len(into_ends)}); the records keep their partition"
                )
    except ReplayError as exc:  # a topic that does not exist
        sys.exit(
            f"switchboard archive restore: {exc}"
            + (
                f"; create it first, with as many partitions as {topic} (`kafka-topics.sh --create`)"
                if args.into_topic and args.into_topic in str(exc)
                else ""
            )
        )
    except KafkaError as exc:
        return kafka_failed(
            "archive restore", exc, f"nothing was restored; run again with --from-offset {args.from_offset}"
        )
    if args.partition not in ends:
        sys.exit(
            f"switchboard archive restore: {topic} has no partition {args.partition} "
            f"(its partitions are 0..{max(ends)})"
        )
    kafka_start, log_end = starts[args.partition], ends[args.partition]
    if args.from_offset >= log_end:
        sys.exit(
            f"switchboard archive restore: {topic} partition {args.partition} ends at offset {log_end - 1}; "
            f"--from-offset {args.from_offset} is past it"
        )
    end = min(args.to_offset + 1, log_end)
    if end <= args.to_offset:
        print(
            f"{topic} partition {args.partition} ends at offset {log_end - 1}: restoring "
            f"{args.from_offset}..{end - 1}",
            file=sys.stderr,
        )
    store = ArchiveStore(settings)
    segments = []
    if args.from_offset < kafka_start:
        listing = await asyncio.to_thread(store.listing, topic, args.partition)
        try:
            segments = _cover(
                args.partition, listing.manifests, args.from_offset, min(kafka_start, end), topic
            )
        except ReplayError as exc:
            sys.exit(f"switchboard archive restore: {exc}")
    plan = ReplayPlan(topic, [PartitionPlan(args.partition, args.from_offset, end, kafka_start, segments)])
    withheld = 0
    producer: AIOKafkaProducer | None = None
    restored = 0
    # The offset after the last record Kafka confirmed, in order: where a re-run resumes.
    confirmed_to = args.from_offset
    try:
        keep = await replay_filter(settings)
        if args.into_topic:
            producer = await kafka_clients.started(
                AIOKafkaProducer(
                    bootstrap_servers=settings.kafka_bootstrap,
                    acks="all",
                    enable_idempotence=True,
                    linger_ms=20,
                )
            )
        async for read in read_log(settings, store, plan):
            # As a replay would (streams/privacy): the archiver leaves these out of the archive,
            # and Kafka may still have them until its own retention.
            batch = [r for r in read if keep(r)]
            withheld += len(read) - len(batch)
            if producer is None:
                for r in batch:
                    print(
                        json.dumps(
                            {
                                "partition": r.partition,
                                "offset": r.offset,
                                "timestamp_ms": r.timestamp_ms,
                                "key": (r.key or b"").decode("utf-8", "replace"),
                                "value_hex": (r.value or b"").hex(),
                                "headers": {k: v.decode("utf-8", "replace") for k, v in r.headers},
                            }
                        )
                    )
            else:
                futures = [
                    (
                        r.offset,
                        await producer.send(
                            args.into_topic,
                            value=r.value,
                            key=r.key,
                            partition=r.partition,
                            timestamp_ms=r.timestamp_ms,
                            headers=list(r.headers),
                        ),
                    )
                    for r in batch
                ]
                for offset, f in futures:
                    await f
                    confirmed_to = offset + 1
                if read:
                    confirmed_to = read[-1].offset + 1
            restored += len(batch)
    except KafkaError as exc:
        return kafka_failed(
            "archive restore",
            exc,
            f"Kafka confirmed the records before offset {confirmed_to} in {args.into_topic}, and later ones "
            f"may have been written too; run again with --from-offset {confirmed_to} (a re-run writes "
            "again whatever of its range is already there)",
        )
    finally:
        if producer is not None:
            await producer.stop()
    print(
        f"restored {restored} records of {topic}/{args.partition} offsets {args.from_offset}..{end - 1}"
        + (f" into {args.into_topic}" if args.into_topic else "")
        + (
            f"; {withheld} withheld (erased customers' events, or past their tenant's retention)"
            if withheld
            else ""
        ),
        file=sys.stderr,
    )
    return 0
