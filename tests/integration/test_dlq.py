"""`switchboard dlq`: a poisoned record is listed with its reason, shown, fixed by a transform and
re-driven to its source topic, where every processor applies it (once, even when re-driven twice)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from switchboard.v1 import chat_pb2, chat_pb2_grpc, events_pb2

from schemas.events import encode_event, event_headers, new_event
from services.settings import PROJECT_ROOT
from tests.integration.conftest import System, count, eventually, start_conversation

pytestmark = pytest.mark.integration

JUNK = b"SBJUNK:"


def strip_junk(value: bytes | None, headers: Mapping[str, bytes]) -> bytes | None:
    """The fix the test re-drives with (`--transform tests.integration.test_dlq:strip_junk`)."""
    return value.removeprefix(JUNK) if value is not None else None


def dlq(system: System, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "dlq", *args],
        env={**os.environ, **system.env},
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def listed(system: System, source: str) -> list[dict[str, Any]]:
    done = await asyncio.to_thread(dlq, system, "list", "--json", "--limit", "100000")
    assert done.returncode == 0, done.stderr
    return [row for row in json.loads(done.stdout) if row["source"] == source]


async def test_a_poisoned_record_is_listed_fixed_and_redriven(
    system: System, stub: chat_pb2_grpc.ChatServiceStub, tenant: str
) -> None:
    settings = system.settings
    conversation_id = await start_conversation(stub, tenant)
    good = new_event(
        tenant,
        conversation_id,
        message_received=events_pb2.MessageReceived(client_message_id="late-1", text="repaired message"),
    )
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        meta = await producer.send_and_wait(
            settings.conversation_topic,
            key=conversation_id.encode(),
            value=JUNK + encode_event(good),
            headers=event_headers(good),
        )
    finally:
        await producer.stop()
    source = f"{settings.conversation_topic}/{meta.partition}/{meta.offset}"

    # Listed, by every processor that refused it, with why.
    rows = await eventually(
        lambda: listed(system, source),
        lambda rows: {"sessions", "projector"} <= {r["processor"] for r in rows},
        within_s=90,
        what="the poison in `dlq list`",
    )
    assert all(r["reason"] and r["error"] for r in rows)
    shown = await asyncio.to_thread(dlq, system, "show", rows[0]["id"])
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert detail["key"] == conversation_id and detail["headers"]["sb-dlq-source"] == source
    assert detail["value_preview"].startswith(JUNK.decode()) and "not_an_event" in detail

    async def folded() -> int:
        conv = await stub.GetConversation(
            chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=conversation_id)
        )
        return int(conv.message_count)

    assert await folded() == 0
    # Re-driven once per source record, whichever processors refused it, through the fix.
    ids = [r["id"] for r in rows]
    transform = "--transform=tests.integration.test_dlq:strip_junk"
    replayed = await asyncio.to_thread(dlq, system, "replay", *ids, transform)
    assert replayed.returncode == 0, replayed.stderr
    lines = replayed.stdout.strip().splitlines()
    assert len(lines) == 1 and f"-> {settings.conversation_topic}/{meta.partition}/" in lines[0], lines

    await eventually(folded, lambda n: n == 1, within_s=60, what="the repaired message folded")
    sql = "SELECT count() FROM switchboard.messages WHERE tenant_id = {t:String}"
    await eventually(
        lambda: asyncio.to_thread(count, system, sql, t=tenant),
        lambda n: n == 1,
        within_s=60,
        what="the repaired message projected",
    )

    # Re-driving again changes nothing: the message is applied once. A message sent after it
    # on the same partition proves the duplicate was seen first.
    again = await asyncio.to_thread(dlq, system, "replay", ids[0], transform)
    assert again.returncode == 0, again.stderr
    await stub.SendMessage(
        chat_pb2.SendMessageRequest(
            tenant_id=tenant, conversation_id=conversation_id, client_message_id="after", text="after"
        )
    )
    await eventually(folded, lambda n: n >= 2, within_s=60, what="the later message folded")
    assert await folded() == 2
    await eventually(
        lambda: asyncio.to_thread(count, system, sql, t=tenant),
        lambda n: n >= 2,
        within_s=60,
        what="both messages projected",
    )
    assert await asyncio.to_thread(count, system, sql, t=tenant) == 2


async def test_replay_needs_ids_or_all_and_names_missing_ones(system: System) -> None:
    refused = await asyncio.to_thread(dlq, system, "replay")
    assert refused.returncode == 1 and "--all" in refused.stderr
    missing = await asyncio.to_thread(dlq, system, "replay", "0/999999999")
    assert missing.returncode == 1 and "no dead letter 0/999999999" in missing.stderr
