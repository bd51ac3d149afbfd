"""Soak and chaos: load through the gRPC API while a chaos loop kill -9s and restarts the sessions
worker, the projector, the ingress, Kafka and Redis; poison records are injected along the way.

At the end every acknowledged message must be in ClickHouse exactly once and in the conversation's
live stream exactly once, in send order; after every restart (once the victim serves again) a
probe on every partition must be applied within the liveness bound; the dead-letter topic holds
exactly the injected poison. How long each victim took to serve again is printed, not asserted
(a process start is CPU-bound: a figure of the machine, for benchmarks/RESULTS.md); each must
serve again within 120 s.

`make test` runs a short form (SWITCHBOARD_SOAK_CYCLES, default 5: each victim once); `make soak`
runs 30 cycles and prints the figures that go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
import uuid
from dataclasses import dataclass, field

import grpc
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from switchboard.v1 import chat_pb2

from services import stack
from services.processes import wait_for_ingress
from tests.conftest import System, eventually, scrape_text, start_conversation
from tests.integration.test_backbone import PROCESSORS, conversation_ids_per_partition

pytestmark = [pytest.mark.integration, pytest.mark.soak]

CYCLES = int(os.environ.get("SWITCHBOARD_SOAK_CYCLES", "5"))
CONVERSATIONS = int(os.environ.get("SWITCHBOARD_SOAK_CONVERSATIONS", "40"))
# From a probe's ack, the victim serving again: a partition that does not resume by itself (a
# write gate never reopened, a claim held to its lease) takes tens of seconds or forever.
LIVENESS_BOUND_S = 5.0
ALL_VICTIMS = ("sessions", "analytics", "ingress", "kafka", "redis")
# SWITCHBOARD_SOAK_VICTIMS=sessions,redis: only those (a run down of one component's restarts).
VICTIMS = tuple(os.environ.get("SWITCHBOARD_SOAK_VICTIMS", ",".join(ALL_VICTIMS)).split(","))
RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)


@dataclass
class Load:
    """One sequential sender per conversation: message k+1 is sent once k was acknowledged, each
    retried with its client_message_id until it is, so send order is the order to find."""

    stub: object
    tenant: str
    conversations: list[str]
    acked: dict[str, list[str]] = field(default_factory=dict)
    retries: int = 0
    unexpected: list[str] = field(default_factory=list)
    ack_latency_s: list[float] = field(default_factory=list)
    stopping: bool = False

    async def sender(self, cid: str) -> None:
        sent = self.acked.setdefault(cid, [])
        k = 0
        while not self.stopping:
            cmid = f"{cid}-{k}"
            request = chat_pb2.SendMessageRequest(
                tenant_id=self.tenant, conversation_id=cid, client_message_id=cmid, text=f"soak {k} 你好"
            )
            while True:
                began = time.monotonic()
                try:
                    await self.stub.SendMessage(request, timeout=10)  # type: ignore[attr-defined]
                    self.ack_latency_s.append(time.monotonic() - began)
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in RETRYABLE:
                        self.unexpected.append(f"{cmid}: {exc.code().name} {exc.details()}")
                    self.retries += 1
                    await asyncio.sleep(0.05)
            sent.append(cmid)
            k += 1
            await asyncio.sleep(random.uniform(0, 0.02))


async def restart(system: System, victim: str) -> float:
    """kill -9 the victim, bring it back; returns seconds until it served again."""
    settings = system.settings
    began = time.monotonic()
    if victim in ("kafka", "redis"):
        await stack.stop_component(settings, victim, kill=True)
        await asyncio.sleep(random.uniform(0, 1.5))
        await stack.start_component(settings, victim)
    else:
        system.children[victim].kill()
        await asyncio.sleep(random.uniform(0, 1.5))
        await system.start_children(victim)
    await wait_for_ingress(settings, system.children["ingress"], within_s=120)
    if victim == "sessions":
        # Back once it fetches every partition again: the probes then time the fold itself, not
        # the new process's start (a Python start that needs ~1 s of CPU, CPU-starved on a
        # saturated 2-core machine: up to 7 s of wall time seen), which is this figure.
        await eventually(
            lambda: asyncio.to_thread(fetching_partitions, settings.sessions_metrics_listen),
            lambda n: n == settings.topic_partitions,
            within_s=120,
            what="the sessions worker fetching every partition",
        )
    return time.monotonic() - began


def fetching_partitions(address: str) -> int:
    """Partitions a consumer process reports a lag for (it has fetched them); 0 while it is down."""
    try:
        page = scrape_text(address, timeout_s=2)
    except OSError:
        return 0
    return sum(1 for line in page.splitlines() if line.startswith("switchboard_consumer_lag{"))


async def probe_liveness(
    system: System, stub, tenant: str, probes: list[str], cycle: int
) -> tuple[float, float]:
    """A message to each partition's probe conversation; seconds until every one is folded
    (GetConversation) and projected (ClickHouse), counted from its ack."""
    acked_at: dict[str, float] = {}
    for cid in probes:
        request = chat_pb2.SendMessageRequest(
            tenant_id=tenant, conversation_id=cid, client_message_id=f"probe-{cycle}", text="probe"
        )
        while True:
            try:
                await stub.SendMessage(request, timeout=10)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise
                await asyncio.sleep(0.05)
        acked_at[cid] = time.monotonic()
    folded = projected = 0.0
    for cid in probes:

        async def last(c: str = cid) -> str:
            try:
                conv = await stub.GetConversation(
                    chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=c, recent_messages=1),
                    timeout=5,
                )
            except grpc.aio.AioRpcError:
                return ""
            return conv.messages[-1].client_message_id if conv.messages else ""

        await eventually(last, lambda m: m == f"probe-{cycle}", within_s=120, what=f"probe {cycle} folded")
        folded = max(folded, time.monotonic() - acked_at[cid])

    def in_clickhouse() -> int:
        return int(
            system.clickhouse()
            .query(
                "SELECT count() FROM switchboard.messages WHERE tenant_id = {t:String} AND client_message_id = {m:String}",
                parameters={"t": tenant, "m": f"probe-{cycle}"},
            )
            .result_rows[0][0]
        )

    await eventually(
        lambda: asyncio.to_thread(in_clickhouse),
        lambda n: n >= len(probes),
        within_s=120,
        what="probes projected",
    )
    projected = time.monotonic() - min(acked_at.values())
    return folded, projected


async def inject_poison(system: System, conversation_id: str) -> list[str]:
    settings = system.settings
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        meta = await producer.send_and_wait(
            settings.conversation_topic,
            key=conversation_id.encode(),
            value=b"\x0a\xff poison " + uuid.uuid4().bytes,
        )
        return [f"{settings.conversation_topic}/{meta.partition}/{meta.offset}"]
    finally:
        await producer.stop()


async def dead_letters(system: System) -> set[tuple[str, str]]:
    settings = system.settings
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    found: set[tuple[str, str]] = set()
    try:
        tp = TopicPartition(settings.dead_letter_topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        while await consumer.position(tp) < end:
            for rec in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                headers = {k: v.decode() for k, v in rec.headers}
                found.add((headers.get("sb-dlq-processor", ""), headers.get("sb-dlq-source", "")))
    finally:
        await consumer.stop()
    return found


@pytest.mark.timeout(1800 + 120 * CYCLES)
async def test_soak_under_chaos_keeps_every_acknowledged_message_once_in_order(
    system: System, stub, tenant: str
) -> None:
    settings = system.settings
    before = await dead_letters(system)
    conversations = [await start_conversation(stub, tenant) for _ in range(CONVERSATIONS)]
    probes = conversation_ids_per_partition(f"probe-{tenant}", settings.topic_partitions)
    for cid in probes:
        await start_conversation(stub, tenant, conversation_id=cid)
    load = Load(stub, tenant, conversations)
    senders = [asyncio.create_task(load.sender(c)) for c in conversations]
    victims = [VICTIMS[i % len(VICTIMS)] for i in range(CYCLES)]
    random.shuffle(victims)
    poison_sources: list[str] = []
    recoveries: dict[str, list[float]] = {}
    liveness: list[tuple[str, float, float]] = []
    try:
        for cycle, victim in enumerate(victims):
            # Sometimes right after the previous restart, sometimes after traffic built up.
            await asyncio.sleep(random.choice([0.0, 0.5, 2.0, 4.0]))
            if cycle % 2 == 0:
                poison_sources += await inject_poison(system, random.choice(conversations))
            recoveries.setdefault(victim, []).append(await restart(system, victim))
            try:
                folded, projected = await probe_liveness(system, stub, tenant, probes, cycle)
            except AssertionError as exc:
                # CI keeps no data directory: what the processors were doing goes with the failure.
                tails = "\n".join(
                    f"--- {name} log, last lines ---\n{system.children[name].log_tail(80)}"
                    for name in ("analytics", "sessions")
                )
                raise AssertionError(f"cycle {cycle}, after restarting {victim}: {exc}\n{tails}") from None
            liveness.append((victim, folded, projected))
            # No process may have died of another's restart (nothing here restarts it).
            dead = [name for name, child in system.children.items() if not child.alive]
            assert not dead, f"cycle {cycle}, after restarting {victim}: exited: {dead}\n" + "\n".join(
                f"--- {name} log, last lines ---\n{system.children[name].log_tail(60)}" for name in dead
            )
    finally:
        load.stopping = True
        await asyncio.wait_for(asyncio.gather(*senders), 300)

    total = sum(len(v) for v in load.acked.values())
    print(
        f"\nsoak: {CYCLES} cycles, {total} messages acked over {len(conversations)} conversations, "
        f"{load.retries} retries; ack p50 {statistics.median(load.ack_latency_s) * 1000:.1f} ms"
    )
    for victim, times in sorted(recoveries.items()):
        print(f"  {victim}: back in {max(times):.1f}s at worst over {len(times)} kills")
    for victim, folded, projected in liveness:
        print(f"  after {victim}: probes folded in {folded:.2f}s, projected in {projected:.2f}s")
    assert not load.unexpected, load.unexpected[:10]
    assert all(folded <= LIVENESS_BOUND_S for _, folded, _ in liveness), liveness

    # Exactly once in ClickHouse.
    acked = {cmid for sent in load.acked.values() for cmid in sent}

    def projected_ids() -> list[str]:
        return [
            r[0]
            for r in system.clickhouse()
            .query(
                "SELECT client_message_id FROM switchboard.messages FINAL WHERE tenant_id = {t:String} "
                "AND client_message_id NOT LIKE 'probe-%'",
                parameters={"t": tenant},
            )
            .result_rows
        ]

    rows = await eventually(
        lambda: asyncio.to_thread(projected_ids),
        lambda r: set(r) >= acked,
        within_s=180,
        what="every ack projected",
    )
    assert len(rows) == len(set(rows)) == len(acked), "a message is missing or projected twice"

    # Exactly once, in send order, in each conversation's live stream (and its count in the state).
    for cid, sent in load.acked.items():
        seen: list[str] = []
        stream = stub.StreamConversation(
            chat_pb2.StreamConversationRequest(tenant_id=tenant, conversation_id=cid)
        )
        async for update in stream:
            if update.event.WhichOneof("payload") == "message_received":
                seen.append(update.event.message_received.client_message_id)
            if (sent and seen and seen[-1] == sent[-1]) or not sent:
                stream.cancel()
                break
        assert seen == sent, f"{cid}: live stream differs from send order"
        conv = await stub.GetConversation(
            chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=cid)
        )
        assert conv.message_count == len(sent)

    # Dead letters: exactly the injected poison, once per processor.
    new = {(p, s) for p, s in await dead_letters(system) if (p, s) not in before}
    assert new == {(p, s) for s in poison_sources for p in PROCESSORS}

    # Everything is back.
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()
