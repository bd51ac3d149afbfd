"""Memory: bytes per active conversation (Redis + the sessions worker) and per live
StreamConversation stream (the ingress), issue 7's last row.

Its own stack and processes (benchmarks/ingest.py's BenchSystem, ports + --port-offset): sessions
worker and one ingress process (so every stream lands in the process measured). Baselines are
taken in the same run, after the processes started and before the load:

1. Conversations: N conversations get M messages each through SendMessageBatch; once the sessions
   worker has folded all of them, Redis `used_memory` and the worker's RSS are read again. The
   deltas over N are the cost per conversation; `MEMORY USAGE` of one conversation's keys says
   where Redis's share goes (state hash, live stream, idempotency claims).
2. Live streams: K StreamConversation calls are opened and held (each has received its replay);
   the ingress's RSS (the process tree) and Redis's connected clients are read before and after.

    .venv/bin/python benchmarks/memory.py [--conversations 5000] [--messages 10]
        [--streams 2000] [--port-offset 1700]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
import psutil
import redis.asyncio as aioredis
from ingest import BenchSystem, log, machine, report_after, requests_for, start_sessions_and_ingress
from switchboard.v1 import chat_pb2, chat_pb2_grpc

from schemas import hotview as hv
from services.processes import switchboard_children

CHANNELS = 8


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its children (the ingress supervisor and its server)."""
    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


async def settle_rss(pid: int, seconds: float = 2.0) -> int:
    """RSS once it stopped moving (allocator and GC settle after a load)."""
    last = tree_rss(pid)
    deadline = time.monotonic() + seconds * 5
    while time.monotonic() < deadline:
        await asyncio.sleep(seconds / 4)
        now = tree_rss(pid)
        if abs(now - last) < 256 * 1024:
            return now
        last = now
    return last


async def used_memory(redis: aioredis.Redis) -> int:
    info: Any = await redis.info("memory")
    return int(info["used_memory"])


async def start_all(stub: chat_pb2_grpc.ChatServiceStub, tenant: str, count: int) -> list[str]:
    sem = asyncio.Semaphore(50)

    async def one(i: int) -> str:
        async with sem:
            conv = await stub.StartConversation(
                chat_pb2.StartConversationRequest(tenant_id=tenant, customer_id=f"cust-{i:06d}"), timeout=30
            )
            return str(conv.conversation_id)

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def send_all(
    stubs: Sequence[chat_pb2_grpc.ChatServiceStub], tenant: str, conversations: list[str], messages: int
) -> int:
    requests = requests_for(tenant, conversations, messages)
    sem = asyncio.Semaphore(3)  # 1,500 messages in flight: under the ingress's in-flight bound
    acked = 0

    async def batch(k: int, chunk: list[chat_pb2.SendMessageRequest]) -> None:
        nonlocal acked
        async with sem:
            reply = await stubs[k % len(stubs)].SendMessageBatch(
                chat_pb2.SendMessageBatchRequest(messages=chunk), timeout=60
            )
            bad = [r for r in reply.results if r.error_code]
            if bad:
                raise RuntimeError(f"{len(bad)} messages refused, e.g. {bad[0].error_message}")
            acked += len(reply.results)

    size = 500
    await asyncio.gather(
        *(batch(k, requests[i : i + size]) for k, i in enumerate(range(0, len(requests), size)))
    )
    return acked


async def folded(redis: aioredis.Redis, tenant: str, conversations: list[str], messages: int) -> bool:
    """Every conversation's state in Redis counts all its messages."""
    async with redis.pipeline(transaction=False) as pipe:
        for c in conversations:
            pipe.hget(hv.conversation_key(tenant, c), hv.F_STATE)
        states = await pipe.execute()
    return all(s is not None and json.loads(s).get("message_count") == messages for s in states)


async def key_breakdown(
    redis: aioredis.Redis, tenant: str, conversation: str, messages: int, n_conv: int
) -> list[tuple[str, int, str]]:
    """(what, bytes, encoding) of one conversation's keys, and its share of the tenant's sets."""

    async def one(key: str) -> tuple[int, str]:
        size = int(await redis.memory_usage(key, samples=0) or 0)
        encoding = await redis.object("encoding", key)
        return size, encoding.decode() if isinstance(encoding, bytes) else str(encoding)

    claims = 0
    for n in range(messages):
        claims += (await one(hv.idempotency_key(tenant, conversation, f"m{n}-0")))[0]
    start_claim, claim_encoding = await one(hv.idempotency_key(tenant, conversation, hv.START_CLAIM))
    live = hv.live_stream_key(tenant, conversation)
    entries: Any = await redis.xrange(live)
    event_bytes = sum(len(fields[hv.S_EVENT.encode()]) for _, fields in entries) / max(1, len(entries))
    rows = [
        (
            "conversation hash (state JSON, registry fields)",
            *await one(hv.conversation_key(tenant, conversation)),
        ),
        (
            f"live stream ({len(entries)} entries, one per event; stored event {event_bytes:.0f} B on average)",
            *await one(live),
        ),
        (f"idempotency claims ({messages} messages and the start)", claims + start_claim, claim_encoding),
    ]
    for name, key in (
        ("tenant's open conversations", hv.open_conversations_key(tenant)),
        ("tenant's activity index", hv.activity_key(tenant)),
    ):
        size, encoding = await one(key)
        rows.append((f"share of the {name} (1/{n_conv:,} of {size:,} B)", size // n_conv, encoding))
    return rows


async def freed_by_kind(
    redis: aioredis.Redis, tenant: str, conversations: list[str], messages: int
) -> dict[str, float]:
    """Per conversation, what deleting each kind of its keys frees (Redis's own accounting)."""
    kinds = {
        "live stream": lambda i, c: [hv.live_stream_key(tenant, c)],
        "conversation hash": lambda i, c: [hv.conversation_key(tenant, c)],
        "idempotency claims (with their expiry entries)": lambda i, c: [
            hv.idempotency_key(tenant, c, cmid)
            for cmid in (hv.START_CLAIM, *(f"m{n}-{i}" for n in range(messages)))
        ],
    }
    freed: dict[str, float] = {}
    for name, keys_of in kinds.items():
        before = await used_memory(redis)
        async with redis.pipeline(transaction=False) as pipe:
            for i, c in enumerate(conversations):
                pipe.delete(*keys_of(i, c))
            await pipe.execute()
        freed[name] = (before - await used_memory(redis)) / len(conversations)
    return freed


async def run(system: BenchSystem, n_conv: int, n_msg: int, n_streams: int) -> str:
    settings = system.settings
    redis = aioredis.Redis.from_url(settings.redis_url)
    channels = [grpc.aio.insecure_channel(settings.grpc_listen) for _ in range(CHANNELS)]
    stubs = [chat_pb2_grpc.ChatServiceStub(c) for c in channels]
    sessions_pid = system.children["sessions"].proc.pid  # type: ignore[union-attr]
    ingress_pid = system.children["ingress"].proc.pid  # type: ignore[union-attr]
    tenant = f"mem{uuid.uuid4().hex[:8]}"
    # Warm up (first calls load scripts, pools, protobuf classes) before the baselines.
    warm = await start_all(stubs[0], tenant + "w", 20)
    await send_all(stubs, tenant + "w", warm, 2)

    # --- 1. per conversation -----------------------------------------------------------------
    redis_before = await used_memory(redis)
    worker_before = await settle_rss(sessions_pid)
    log(f"starting {n_conv:,} conversations, {n_msg} messages each")
    started = time.monotonic()
    conversations = await start_all(stubs[0], tenant, n_conv)
    acked = await send_all(stubs, tenant, conversations, n_msg)
    log(f"{acked:,} messages acked in {time.monotonic() - started:.1f} s; waiting for the fold")
    deadline = time.monotonic() + 300
    while not await folded(redis, tenant, conversations, n_msg):
        if time.monotonic() > deadline:
            raise RuntimeError("the sessions worker did not fold every message within 300 s")
        await asyncio.sleep(1)
    redis_after = await used_memory(redis)
    worker_after = await settle_rss(sessions_pid)
    breakdown = await key_breakdown(redis, tenant, conversations[0], n_msg, n_conv)
    redis_per = (redis_after - redis_before) / n_conv
    worker_per = (worker_after - worker_before) / n_conv

    # --- 2. per live stream --------------------------------------------------------------------
    clients_before = int((await redis.info("clients"))["connected_clients"])
    ingress_before = await settle_rss(ingress_pid)
    log(f"opening {n_streams:,} StreamConversation calls")
    opened = 0
    ready = asyncio.Event()
    calls: list[Any] = []

    # At most 100 calls opening at once: a grpc.aio client that starts ~1,500+ calls in one burst
    # gets some of them CANCELLED by its own channel (reproduced against a bare grpc.aio server:
    # RESULTS.md), which says nothing about the server.
    opening = asyncio.Semaphore(100)

    async def follow(i: int) -> None:
        nonlocal opened
        await opening.acquire()
        held = True
        call = stubs[i % CHANNELS].StreamConversation(
            chat_pb2.StreamConversationRequest(tenant_id=tenant, conversation_id=conversations[i % n_conv])
        )
        calls.append(call)
        got = 0
        try:
            async for _ in call:
                got += 1
                if got == n_msg + 1:  # the replay: the start and every message
                    opening.release()
                    held = False
                    opened += 1
                    if opened == n_streams:
                        ready.set()
        finally:
            if held:
                opening.release()

    followers = [asyncio.ensure_future(follow(i)) for i in range(n_streams)]
    try:
        await asyncio.wait_for(ready.wait(), 300)
    except TimeoutError:
        failed = [f for f in followers if f.done() and f.exception() is not None]
        detail = repr(failed[0].exception()) if failed else "none failed"
        raise RuntimeError(f"only {opened} of {n_streams} streams replayed within 300 s ({detail})") from None
    ingress_after = await settle_rss(ingress_pid)
    clients_after = int((await redis.info("clients"))["connected_clients"])
    stream_per = (ingress_after - ingress_before) / n_streams
    for call in calls:
        call.cancel()
    await asyncio.gather(*followers, return_exceptions=True)
    for c in channels:
        await c.close()
    freed = await freed_by_kind(redis, tenant, conversations, n_msg)
    await redis.aclose()

    rows = [
        "| what | measured | aim (issue 7) |",
        "|---|---:|---|",
        f"| Redis per conversation ({n_msg} messages, `used_memory` delta / {n_conv:,}) | {redis_per:,.0f} B | |",
        f"| sessions worker per conversation (RSS delta / {n_conv:,}) | {worker_per:,.0f} B | |",
        f"| **total per active conversation** | **{redis_per + worker_per:,.0f} B** | ≤ 2 KB |",
        f"| ingress per live StreamConversation (RSS delta / {n_streams:,}, one process) | {stream_per:,.0f} B "
        f"| 20k streams in ≤ 2 GB (≤ 100 KB each) |",
        f"| Redis connections per live stream | {(clients_after - clients_before) / n_streams:.2f} | |",
    ]
    parts = [f"| {name} | {size:,} B | {encoding} |" for name, size, encoding in breakdown]
    return "\n".join(
        [
            f"### Memory — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "",
            f"{n_conv:,} conversations × {n_msg} messages (SendMessageBatch, Chinese and English texts), "
            f"then {n_streams:,} live streams on one ingress process. Redis used_memory "
            f"{mib(redis_before)} → {mib(redis_after)}; sessions worker RSS {mib(worker_before)} → "
            f"{mib(worker_after)}; ingress RSS {mib(ingress_before)} → {mib(ingress_after)}; Redis "
            f"clients {clients_before} → {clients_after}.",
            "",
            *rows,
            "",
            "Redis per conversation by kind: `used_memory` freed when every conversation's keys of",
            "that kind are deleted (at the end), / N. Exact, unlike `MEMORY USAGE`, which estimates",
            "a stream's nodes:",
            "",
            "| kind | bytes per conversation |",
            "|---|---:|",
            *(f"| {name} | {size:,.0f} B |" for name, size in freed.items()),
            "",
            "One conversation's keys (`MEMORY USAGE`):",
            "",
            "| key | bytes | encoding |",
            "|---|---:|---|",
            *parts,
            "",
            "```",
            machine(),
            "```",
        ]
    )


async def main_async(n_conv: int, n_msg: int, n_streams: int, port_offset: int) -> int:
    system = BenchSystem(False, port_offset)
    # One ingress process, so every stream is in the process measured; room for the streams.
    system.env.update(
        {
            "SWITCHBOARD_INGRESS_PROCESSES": "1",
            "SWITCHBOARD_MAX_LIVE_STREAMS": str(n_streams + 100),
        }
    )
    system.children = switchboard_children(system.settings, system.env)

    async def body() -> str:
        await start_sessions_and_ingress(system)
        return await run(system, n_conv, n_msg, n_streams)

    return await report_after(system, body())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--conversations", type=int, default=5000)
    parser.add_argument("--messages", type=int, default=10)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--port-offset", type=int, default=1700)
    args = parser.parse_args(argv)
    return asyncio.run(main_async(args.conversations, args.messages, args.streams, args.port_offset))


if __name__ == "__main__":
    raise SystemExit(main())
