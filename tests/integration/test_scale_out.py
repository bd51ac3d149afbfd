"""Scale-out of the sessions worker by partitions, on real servers: two worker processes share
the topic (static membership, one id per process); under load through the ingress one is
killed -9 and another joins; every acknowledged message is applied exactly once, in order."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from switchboard.v1 import chat_pb2, events_pb2

from schemas import hotview as hv
from services.processes import Child
from tests.conftest import System, eventually, start_conversation

pytestmark = pytest.mark.integration

CONVERSATIONS = 40
MESSAGES_EACH = 40


def worker(system: System, name: str) -> Child:
    """Another `switchboard worker sessions` process with its own static membership id."""
    env = {**system.env, "SWITCHBOARD_WORKER_INSTANCE_ID": name}
    return Child(name, ["worker", "sessions"], system.settings.data_dir / "logs" / f"{name}.log", env)


def assignments(log_path: Path, since: int = 0) -> list[list[int]]:
    """The partition sets a worker logged as assigned to it (after byte `since` of its log)."""
    try:
        text = log_path.read_bytes()[since:].decode(errors="replace")
    except FileNotFoundError:
        return []
    found = []
    for line in text.splitlines():
        if "sessions: assigned partitions [" in line:
            found.append(json.loads(line[line.index("[") :]))
    return found


def log_size(child: Child) -> int:
    return child.log_path.stat().st_size if child.log_path.exists() else 0


async def applied_messages(redis: aioredis.Redis, tenant: str, conversation_id: str) -> list[str]:
    """The client message ids of the conversation's live stream, in stream order (one entry per
    applied event: a message applied twice would be there twice)."""
    entries: Any = await redis.xrange(hv.live_stream_key(tenant, conversation_id))
    ids = []
    for _, fields in entries:
        event = events_pb2.Event.FromString(fields[hv.S_EVENT.encode()])
        if event.WhichOneof("payload") == "message_received":
            ids.append(event.message_received.client_message_id)
    return ids


@pytest.mark.timeout(600)
async def test_two_workers_one_killed_one_joining_apply_every_acked_message_once_in_order(
    system: System, stub, tenant: str
) -> None:
    main = system.children["sessions"]
    second, third = worker(system, "sessions-scale-b"), worker(system, "sessions-scale-c")
    redis = aioredis.Redis.from_url(system.settings.redis_url)
    conversations = [await start_conversation(stub, tenant) for _ in range(CONVERSATIONS)]
    acked: dict[str, list[str]] = {c: [] for c in conversations}
    try:
        # Two members: the second one takes over part of the partitions.
        mark = log_size(main)
        second.start()
        await eventually(
            lambda: asyncio.sleep(0, assignments(second.log_path)),
            lambda found: bool(found and found[-1]),
            what="the second worker assigned partitions",
        )
        await eventually(
            lambda: asyncio.sleep(0, assignments(main.log_path, mark)),
            lambda found: bool(found) and len(found[-1]) < system.settings.topic_partitions,
            what="the first worker giving partitions up",
        )

        async def send_conversation(conversation_id: str) -> None:
            # A careful client: one conversation's messages one after another, retried with the
            # same client_message_id while the ingress says UNAVAILABLE.
            for i in range(MESSAGES_EACH):
                cmid = f"{conversation_id[:8]}-{i:03d}"
                request = chat_pb2.SendMessageRequest(
                    tenant_id=tenant, conversation_id=conversation_id, client_message_id=cmid, text=f"m{i}"
                )
                while True:
                    try:
                        await stub.SendMessage(request, timeout=30)
                        break
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                            raise
                        await asyncio.sleep(0.05)
                acked[conversation_id].append(cmid)

        def total() -> int:
            return sum(len(ids) for ids in acked.values())

        load = asyncio.gather(*(send_conversation(c) for c in conversations))
        everything = CONVERSATIONS * MESSAGES_EACH
        await eventually(
            lambda: asyncio.sleep(0, total()), lambda n: n >= everything // 4, what="a quarter acked"
        )
        second.kill()
        await eventually(lambda: asyncio.sleep(0, total()), lambda n: n >= everything // 2, what="half acked")
        third.start()
        await asyncio.wait_for(load, 300)
        assert total() == everything
        await eventually(
            lambda: asyncio.sleep(0, assignments(third.log_path)),
            lambda found: bool(found and found[-1]),
            what="the joining worker assigned partitions",
        )

        # Every acknowledged message applied exactly once, in the order it was sent.
        async def applied() -> dict[str, list[str]]:
            return {c: await applied_messages(redis, tenant, c) for c in conversations}

        found = await eventually(
            applied,
            lambda got: all(len(got[c]) >= MESSAGES_EACH for c in conversations),
            within_s=180,
            what="every acked message in the live streams",
        )
        for c in conversations:
            assert found[c] == acked[c], f"{c}: applied {found[c]} for acked {acked[c]}"
        for c in conversations:
            conv = await stub.GetConversation(
                chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=c, recent_messages=3)
            )
            assert conv.message_count == MESSAGES_EACH
            assert [m.sequence for m in conv.messages] == [
                MESSAGES_EACH - 2,
                MESSAGES_EACH - 1,
                MESSAGES_EACH,
            ]
    finally:
        # Back to the fixture's one worker with every partition, for the tests after this one.
        mark = log_size(main)
        second.kill()
        third.stop()
        await redis.aclose()
    await eventually(
        lambda: asyncio.sleep(0, assignments(main.log_path, mark)),
        lambda found: bool(found) and len(found[-1]) == system.settings.topic_partitions,
        within_s=120,
        what="the first worker owning every partition again",
    )
    # And it applies new writes on all of them.
    probe = [
        await start_conversation(stub, tenant, conversation_id=f"after-{uuid.uuid4().hex[:8]}-{i}")
        for i in range(8)
    ]
    for c in probe:
        await stub.SendMessage(
            chat_pb2.SendMessageRequest(tenant_id=tenant, conversation_id=c, client_message_id="x", text="x")
        )
    redis = aioredis.Redis.from_url(system.settings.redis_url)
    try:
        await eventually(
            lambda: asyncio.gather(*(applied_messages(redis, tenant, c) for c in probe)),
            lambda got: all(ids == ["x"] for ids in got),
            what="writes after the scale-in applied",
        )
    finally:
        await redis.aclose()


@pytest.mark.timeout(600)
async def test_one_command_runs_several_worker_processes_and_restarts_a_killed_one(
    system: System, stub, tenant: str
) -> None:
    import psutil

    main = system.children["sessions"]
    env = {**system.env, "SWITCHBOARD_SESSIONS_PROCESSES": "2", "SWITCHBOARD_WORKER_INSTANCE_ID": "scaleproc"}
    supervisor = Child(
        "sessions-x2", ["worker", "sessions"], system.settings.data_dir / "logs" / "sessions-x2.log", env
    )
    redis = aioredis.Redis.from_url(system.settings.redis_url)
    supervisor.start()
    try:
        assert supervisor.proc is not None
        parent = psutil.Process(supervisor.proc.pid)
        children = await eventually(
            lambda: asyncio.sleep(0, parent.children()), lambda c: len(c) == 2, what="two worker processes"
        )
        # Three members now (the fixture's and these two): the two took partitions over.
        await eventually(
            lambda: asyncio.sleep(0, assignments(supervisor.log_path)),
            lambda found: len([f for f in found if f]) >= 2,
            what="both processes assigned partitions",
        )
        victim = children[0]
        victim.kill()
        await eventually(
            lambda: asyncio.sleep(0, [c.pid for c in parent.children()]),
            lambda pids: len(pids) == 2 and victim.pid not in pids,
            what="the killed process replaced",
        )
        conversations = [await start_conversation(stub, tenant) for _ in range(8)]
        for c in conversations:
            for i in range(3):
                await stub.SendMessage(
                    chat_pb2.SendMessageRequest(
                        tenant_id=tenant, conversation_id=c, client_message_id=f"k{i}", text="x"
                    ),
                    timeout=30,
                )
        got = await eventually(
            lambda: asyncio.gather(*(applied_messages(redis, tenant, c) for c in conversations)),
            lambda got: all(len(ids) >= 3 for ids in got),
            within_s=120,
            what="the messages applied",
        )
        assert all(ids == ["k0", "k1", "k2"] for ids in got)
    finally:
        mark = log_size(main)
        supervisor.stop()
        await redis.aclose()
    assert supervisor.proc is not None and supervisor.proc.returncode == 0
    await eventually(
        lambda: asyncio.sleep(0, assignments(main.log_path, mark)),
        lambda found: bool(found) and len(found[-1]) == system.settings.topic_partitions,
        within_s=120,
        what="the first worker owning every partition again",
    )
