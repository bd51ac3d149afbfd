"""`switchboard dlq list|show|replay`: what the processors set aside, and re-driving it after a fix.

A dead letter is the original record (key, value, headers) plus `sb-dlq-*` headers saying which
processor refused it, why, and where it came from (streams/_consumer.py). `replay` writes the
record (optionally changed by a `--transform module:function`) back to its source topic, keyed as
before, so it lands on the same partition; every processor sees it again, which is safe because
each of them applies an event once (by event id / client message id), whoever saw it before.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib
import json
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

DLQ_HEADER_PREFIX = "sb-dlq-"
REPLAYED_FROM = "sb-replayed-from"

# (value, original headers) -> the value to re-drive, or None to leave the record out.
Transform = Callable[[bytes | None, Mapping[str, bytes]], bytes | None]


@dataclass(frozen=True)
class DeadLetter:
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    @property
    def id(self) -> str:
        return f"{self.partition}/{self.offset}"

    def header(self, name: str) -> str:
        for key, value in self.headers:
            if key == name:
                return value.decode("utf-8", "replace")
        return ""

    @property
    def source(self) -> str:
        return self.header("sb-dlq-source")

    @property
    def source_topic(self) -> str:
        return self.header("sb-dlq-topic")

    @property
    def original_headers(self) -> list[tuple[str, bytes]]:
        return [(k, v) for k, v in self.headers if not k.startswith(DLQ_HEADER_PREFIX) and k != REPLAYED_FROM]

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.timestamp_ms / 1000)),
            "processor": self.header("sb-dlq-processor"),
            "source": self.source,
            "error": self.header("sb-dlq-error"),
            "reason": self.header("sb-dlq-reason"),
        }


def parse_id(text: str) -> tuple[int, int]:
    """`17` (partition 0) or `0/17`."""
    partition, _, offset = text.rpartition("/")
    try:
        return int(partition or 0), int(offset)
    except ValueError as exc:
        raise ValueError(f"a dead letter id is OFFSET or PARTITION/OFFSET, got {text!r}") from exc


def select(
    letters: list[DeadLetter], ids: list[str], processor: str | None, source_topic: str | None
) -> list[DeadLetter]:
    """The dead letters asked for; one per source record (three processors refusing one record
    leave three dead letters of it; re-driving it once is enough)."""
    wanted = {parse_id(i) for i in ids}
    chosen: list[DeadLetter] = []
    sources: set[str] = set()
    for letter in letters:
        if wanted and (letter.partition, letter.offset) not in wanted:
            continue
        if processor and letter.header("sb-dlq-processor") != processor:
            continue
        if source_topic and letter.source_topic != source_topic:
            continue
        if letter.source and letter.source in sources:
            continue
        sources.add(letter.source)
        chosen.append(letter)
    missing = wanted - {(x.partition, x.offset) for x in letters}
    if missing:
        raise ValueError(f"no dead letter {', '.join(f'{p}/{o}' for p, o in sorted(missing))}")
    return chosen


def load_transform(spec: str) -> Transform:
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"--transform is module:function, got {spec!r}")
    function = getattr(importlib.import_module(module_name), name, None)
    if not callable(function):
        raise ValueError(f"{spec} is not a function")
    return function


def describe_value(value: bytes | None) -> dict[str, Any]:
    """The value as an Event when it is one, else its bytes (base64) and a readable prefix."""
    if value is None:
        return {"value": None}
    from google.protobuf import json_format

    from schemas.events import decode_event

    try:
        event = decode_event(value)
        return {"event": json_format.MessageToDict(event)}
    except Exception as exc:
        return {
            "not_an_event": str(exc)[:200],
            "value_base64": base64.b64encode(value[:65536]).decode(),
            "value_preview": value[:200].decode("utf-8", "replace"),
            "value_bytes": len(value),
        }


async def read_dead_letters(settings: Any) -> list[DeadLetter]:
    from aiokafka import AIOKafkaConsumer

    import services.kafka_clients  # noqa: F401  (throttles aiokafka's failed metadata updates)
    from services.auth._log import TenantsTopicMissing, topic_partitions
    from services.kafka_clients import started

    topic = settings.dead_letter_topic
    consumer = await started(
        AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id="switchboard-dlq",
        )
    )
    try:
        try:
            partitions = await topic_partitions(consumer, topic, within_s=5.0)
        except TenantsTopicMissing:
            return []
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        letters: list[DeadLetter] = []
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                letters.extend(
                    DeadLetter(
                        tp.partition,
                        r.offset,
                        r.timestamp,
                        r.key,
                        r.value,
                        tuple((k, bytes(v)) for k, v in (r.headers or ())),
                    )
                    for r in records
                    if r.offset < ends[tp]
                )
        return sorted(letters, key=lambda x: (x.partition, x.offset))
    finally:
        await consumer.stop()


async def replay(
    settings: Any, letters: list[DeadLetter], to: str | None, transform: Transform | None, dry_run: bool
) -> list[tuple[DeadLetter, str]]:
    """Re-drive each letter; returns (letter, where it went or why not)."""
    from aiokafka import AIOKafkaProducer

    import services.kafka_clients  # noqa: F401  (throttles aiokafka's failed metadata updates)

    outcomes: list[tuple[DeadLetter, str]] = []
    producer = None
    if not dry_run:
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap,
            acks="all",
            enable_idempotence=True,
            client_id="switchboard-dlq-replay",
        )
        await producer.start()
    try:
        for letter in letters:
            topic = to or letter.source_topic
            if not topic:
                outcomes.append((letter, "skipped: no sb-dlq-topic header and no --to"))
                continue
            headers = letter.original_headers
            value = transform(letter.value, dict(headers)) if transform else letter.value
            if transform and value is None:
                outcomes.append((letter, "skipped by the transform"))
                continue
            if producer is None:
                outcomes.append((letter, f"would go to {topic}"))
                continue
            meta = await producer.send_and_wait(
                topic,
                value=value,
                key=letter.key,
                headers=[*headers, (REPLAYED_FROM, f"{settings.dead_letter_topic}/{letter.id}".encode())],
            )
            outcomes.append((letter, f"{meta.topic}/{meta.partition}/{meta.offset}"))
    finally:
        if producer is not None:
            await producer.stop()
    return outcomes


def _run(args: argparse.Namespace) -> int:
    from aiokafka.errors import KafkaError

    from services.cli import _settings
    from services.commands import kafka_failed

    settings = _settings()
    try:
        letters = asyncio.run(read_dead_letters(settings))
        if args.action == "list":
            rows = [
                x.summary()
                for x in letters
                if (not args.processor or x.header("sb-dlq-processor") == args.processor)
            ][-args.limit :]
            if args.json:
                print(json.dumps(rows, indent=2, ensure_ascii=False))
                return 0
            print(f"{'ID':<9} {'TIME':<20} {'PROCESSOR':<10} {'SOURCE':<32} {'ERROR':<20} REASON")
            for row in rows:
                print(
                    f"{row['id']:<9} {row['time']:<20} {row['processor']:<10} {row['source']:<32} "
                    f"{row['error']:<20} {row['reason'][:80]}"
                )
            print(f"{len(rows)} dead letters", file=sys.stderr)
        elif args.action == "show":
            partition, offset = parse_id(args.id)
            found = [x for x in letters if (x.partition, x.offset) == (partition, offset)]
            if not found:
                raise ValueError(f"no dead letter {args.id} in {settings.dead_letter_topic}")
            letter = found[0]
            print(
                json.dumps(
                    {
                        **letter.summary(),
                        "key": letter.key.decode("utf-8", "replace") if letter.key is not None else None,
                        "headers": {k: v.decode("utf-8", "replace") for k, v in letter.headers},
                        **describe_value(letter.value),
                    },
                    indent=2,
                    ensure_ascii=False,
                )
            )
        else:
            if not args.ids and not args.all:
                raise ValueError("name the dead letters to replay (ids from `dlq list`) or pass --all")
            chosen = select(letters, args.ids, args.processor, args.source_topic)
            transform = load_transform(args.transform) if args.transform else None
            outcomes = asyncio.run(replay(settings, chosen, args.to, transform, args.dry_run))
            for letter, where in outcomes:
                print(f"{letter.id} ({letter.source}) -> {where}")
    except ValueError as exc:
        print(f"switchboard dlq {args.action}: {exc}", file=sys.stderr)
        return 1
    except KafkaError as exc:
        return kafka_failed(
            f"dlq {args.action}",
            exc,
            "some of the chosen letters may have been re-driven already (processors apply an event "
            "once: replaying them again is safe)"
            if args.action == "replay"
            else "",
        )
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("dlq", help="dead letters: list, show, replay (re-drive after a fix)")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("list", help="dead letters with processor, source and reason")
    a.add_argument("--processor", help="only those this processor set aside (sessions, assistant, projector)")
    a.add_argument("--limit", type=int, default=100, help="the last N (default 100)")
    a.add_argument("--json", action="store_true")
    a = actions.add_parser("show", help="one dead letter: headers, key and value (decoded when an Event)")
    a.add_argument("id", help="OFFSET or PARTITION/OFFSET from `dlq list`")
    a = actions.add_parser("replay", help="write dead letters back to their source topic")
    a.add_argument("ids", nargs="*", help="ids from `dlq list`")
    a.add_argument("--all", action="store_true", help="every dead letter (after the filters)")
    a.add_argument("--processor", help="only those this processor set aside")
    a.add_argument("--source-topic", help="only those from this topic")
    a.add_argument("--to", help="write to this topic instead of the source topic")
    a.add_argument(
        "--transform",
        help="module:function(value, headers) -> bytes or None (leave out): fixes each value first",
    )
    a.add_argument("--dry-run", action="store_true", help="say what would be written, write nothing")
    p.set_defaults(func=_run)
