"""End to end: messages offered through the gRPC API at a fixed rate; ack latency, and how long
until each is visible in the hot view (its live stream, written with the state) and in ClickHouse.

Issue 7's last row: ≥ 3k msg/s sustained with p99 ack ≤ 50 ms and API-to-ClickHouse p99 ≤ 2 s.
Its own stack and processes (benchmarks/ingest.py's BenchSystem, ports + --port-offset): analytics
(projector + endpoint), sessions worker, ingress. Messages are paced by a schedule (open loop: a
slow server does not slow the offered rate, late sends count from their scheduled time), sent as
unary SendMessage calls (`--api unary`), written onto SendMessages streams (`--api stream`, one
per connection: what a backend forwarding a busy app's traffic uses) or sent as a SendMessageBatch
per connection every 10 ms (`--api batch`: a backend that batches); watchers on
StreamConversation time every message of a sample of conversations; a poller asks ClickHouse every
100 ms which sampled messages have landed.

    .venv/bin/python benchmarks/end_to_end.py [--rate 3000] [--seconds 10] [--api unary|stream|batch] [--port-offset 1600]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
from ingest import BenchSystem, CpuMeter, log, machine, report_after, start_processes
from switchboard.v1 import chat_pb2, chat_pb2_grpc

from services.analytics._process import endpoint_client

CONVERSATIONS = 200
WATCHED = 20
CHANNELS = 4
# --api batch: how often each connection sends what came due meanwhile.
BATCH_EVERY_S = 0.01
API_NAMES = {
    "unary": "unary SendMessage",
    "stream": "SendMessages streams",
    "batch": f"SendMessageBatch (each connection every {BATCH_EVERY_S * 1000:.0f} ms)",
}


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@dataclass
class EndToEnd:
    """One run's figures (latencies in ms, from each message's scheduled send) and its report."""

    offered_rate: float
    api: str
    acked_rate: float
    errors: int
    ack_ms: list[float]
    live_ms: list[float]
    landed_ms: list[float]
    text: str

    def verdict(self) -> str:
        """Issue 7's row: ≥ 3k msg/s sustained, p99 ack ≤ 50 ms, API → ClickHouse p99 ≤ 2 s."""
        ack99, landed99 = pct(self.ack_ms, 0.99), pct(self.landed_ms, 0.99)
        met = self.acked_rate >= 0.97 * 3000 and not self.errors and ack99 <= 50 and landed99 <= 2000
        return (
            f"{self.acked_rate:,.0f} msg/s acked of {self.offered_rate:,.0f} offered ({self.api}), "
            f"{self.errors} errors, ack p99 {ack99:,.0f} ms, API → ClickHouse p99 {landed99:,.0f} ms, "
            f"→ hot view p99 {pct(self.live_ms, 0.99):,.0f} ms: {'met' if met else '**missed**'}"
        )


async def run(system: BenchSystem, rate: float, seconds: float, api: str = "unary") -> EndToEnd:
    settings = system.settings
    # Each channel its own connection (grpc.aio channels with the same target and options share one
    # otherwise), as separate backends would have: the kernel spreads connections, not calls, over
    # the ingress processes (SO_REUSEPORT).
    own = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(settings.grpc_listen, options=own) for _ in range(CHANNELS)]
    stubs = [chat_pb2_grpc.ChatServiceStub(c) for c in channels]
    tenant = f"e2e{uuid.uuid4().hex[:8]}"
    conversations = [
        (
            await stubs[0].StartConversation(
                chat_pb2.StartConversationRequest(tenant_id=tenant, customer_id=f"c{i}")
            )
        ).conversation_id
        for i in range(CONVERSATIONS)
    ]
    watched = set(conversations[:WATCHED])
    sent_at: dict[str, float] = {}
    acked_at: dict[str, float] = {}
    live_at: dict[str, float] = {}
    landed_at: dict[str, float] = {}
    errors: list[str] = []

    async def watch(conversation: str) -> None:
        stream = stubs[1].StreamConversation(
            chat_pb2.StreamConversationRequest(tenant_id=tenant, conversation_id=conversation)
        )
        async for update in stream:
            if update.HasField("event") and update.event.WhichOneof("payload") == "message_received":
                live_at.setdefault(update.event.message_received.client_message_id, time.monotonic())

    watchers = [asyncio.ensure_future(watch(c)) for c in watched]
    client = endpoint_client(settings, username="default")
    stop_polling = asyncio.Event()

    def landed_ids(ids: list[str]) -> list[tuple[str]]:
        return list(
            client.query(
                "SELECT client_message_id FROM switchboard.messages "
                "WHERE tenant_id = {t:String} AND client_message_id IN {ids:Array(String)}",
                parameters={"t": tenant, "ids": ids},
            ).result_rows
        )

    async def poll() -> None:
        while True:
            pending = [m for m in sent_at if m in acked_at and m not in landed_at and int(m[1:]) % 10 == 0]
            if pending:
                rows = await asyncio.to_thread(landed_ids, pending)
                now = time.monotonic()
                for (cmid,) in rows:
                    landed_at.setdefault(cmid, now)
            elif stop_polling.is_set():
                return
            await asyncio.sleep(0.1)

    poller = asyncio.ensure_future(poll())

    def request(i: int) -> chat_pb2.SendMessageRequest:
        return chat_pb2.SendMessageRequest(
            tenant_id=tenant,
            conversation_id=conversations[i % CONVERSATIONS],
            client_message_id=f"m{i}",
            text=f"e2e {i}",
        )

    # --api stream: one SendMessages stream per connection. Requests go onto a stream at their due
    # time; its responses come back in request order, each naming its client_message_id.
    outboxes: list[asyncio.Queue[chat_pb2.SendMessageRequest | None]] = [
        asyncio.Queue() for _ in range(CHANNELS)
    ]

    async def requests_of(
        outbox: asyncio.Queue[chat_pb2.SendMessageRequest | None],
    ) -> AsyncIterator[chat_pb2.SendMessageRequest]:
        while (req := await outbox.get()) is not None:
            yield req

    async def stream(n: int) -> None:
        try:
            async for response in stubs[n].SendMessages(requests_of(outboxes[n])):
                if response.error_code:
                    errors.append(f"code {response.error_code}")
                else:
                    acked_at[response.client_message_id] = time.monotonic()
        except grpc.aio.AioRpcError as exc:
            errors.append(exc.code().name)

    streams = [asyncio.ensure_future(stream(n)) for n in range(CHANNELS)] if api == "stream" else []

    # --api batch: what a backend that batches does. Each connection's flusher sends the requests
    # that came due since its last call as one SendMessageBatch every BATCH_EVERY_S, one call at a
    # time (a conversation's messages all go through one connection, so its order holds); a slow
    # answer makes the next batch bigger. A message's latency counts from its due time, so the
    # wait for its batch to leave is in it.
    async def flusher(n: int) -> None:
        outbox, done = outboxes[n], False
        next_at = time.monotonic()
        while not done:
            next_at += BATCH_EVERY_S
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:  # the last call took longer than the interval: send what waits now
                next_at = time.monotonic()
            batch: list[chat_pb2.SendMessageRequest] = []
            while not outbox.empty():
                req = outbox.get_nowait()
                if req is None:
                    done = True
                    break
                batch.append(req)
            if not batch:
                continue
            try:
                reply = await stubs[n].SendMessageBatch(
                    chat_pb2.SendMessageBatchRequest(messages=batch), timeout=30
                )
            except grpc.aio.AioRpcError as exc:
                errors.extend([exc.code().name] * len(batch))
                continue
            now = time.monotonic()
            for result in reply.results:
                if result.error_code:
                    errors.append(f"code {result.error_code}")
                else:
                    acked_at[result.client_message_id] = now

    if api == "batch":
        streams = [asyncio.ensure_future(flusher(n)) for n in range(CHANNELS)]

    async def send(i: int, due: float) -> None:
        cmid = f"m{i}"
        conversation = conversations[i % CONVERSATIONS]
        sent_at[cmid] = due
        try:
            await stubs[i % CHANNELS].SendMessage(
                chat_pb2.SendMessageRequest(
                    tenant_id=tenant, conversation_id=conversation, client_message_id=cmid, text=f"e2e {i}"
                ),
                timeout=30,
            )
            acked_at[cmid] = time.monotonic()
        except grpc.aio.AioRpcError as exc:
            errors.append(exc.code().name)

    log(f"offering {rate:,.0f} msg/s for {seconds:.0f} s over {CONVERSATIONS} conversations")
    meter = CpuMeter(system)
    await meter.refresh()
    cpu_start = meter.snapshot()
    total = int(rate * seconds)
    start = time.monotonic() + 0.2
    tasks = []
    for i in itertools.count():
        if i >= total:
            break
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if api in ("stream", "batch"):
            sent_at[f"m{i}"] = due
            outboxes[i % CHANNELS].put_nowait(request(i))
        else:
            tasks.append(asyncio.ensure_future(send(i, due)))
    await asyncio.gather(*tasks)
    for outbox in outboxes:
        outbox.put_nowait(None)
    await asyncio.gather(*streams)
    cores = CpuMeter.cores(cpu_start, meter.snapshot())
    elapsed = max(acked_at.values(), default=start) - start
    expected_live = {m for m in acked_at if conversations[int(m[1:]) % CONVERSATIONS] in watched}
    deadline = time.monotonic() + 60
    # Polled: the watchers' arrivals are plain dict writes, and this wait is outside any timing.
    while time.monotonic() < deadline and not expected_live <= set(live_at):  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    stop_polling.set()
    await asyncio.wait_for(poller, 120)
    for w in watchers:
        w.cancel()
    for c in channels:
        await c.close()
    client.close()

    acks = [(acked_at[m] - sent_at[m]) * 1000 for m in acked_at]
    live = [(live_at[m] - sent_at[m]) * 1000 for m in expected_live if m in live_at]
    landed = [(landed_at[m] - sent_at[m]) * 1000 for m in landed_at]
    sampled = [m for m in acked_at if int(m[1:]) % 10 == 0]
    rows = [
        "| what | n | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, values in (
        ("ack (scheduled send → ack)", acks),
        ("visible in the hot view (live stream of 20 watched conversations)", live),
        ("visible in ClickHouse (`switchboard.messages`, every 10th message)", landed),
    ):
        rows.append(
            f"| {name} | {len(values):,} | {statistics.median(values) if values else float('nan'):.1f} | "
            f"{pct(values, 0.9):.1f} | {pct(values, 0.99):.1f} | {max(values, default=float('nan')):.1f} |"
        )
    text = "\n".join(
        [
            f"### End to end — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "",
            f"Offered {rate:,.0f} msg/s of {API_NAMES[api]} for {seconds:.0f} s ({total:,} messages, "
            f"{CONVERSATIONS} conversations, {CHANNELS} connections); acked {len(acked_at):,} "
            f"({len(acked_at) / elapsed if elapsed > 0 else 0:,.0f} msg/s over {elapsed:.1f} s), "
            f"errors {len(errors)} {sorted(set(errors))}; in the hot view {len(live):,} of "
            f"{len(expected_live):,} watched; in ClickHouse {len(landed):,} of {len(sampled):,} sampled.",
            "",
            *rows,
            "",
            "CPU cores used while the load was offered: "
            + ", ".join(f"{name} {used:.2f}" for name, used in sorted(cores.items(), key=lambda kv: -kv[1])),
            "",
            "```",
            machine(),
            "```",
        ]
    )
    acked_rate = len(acked_at) / elapsed if elapsed > 0 else 0.0
    return EndToEnd(rate, api, acked_rate, len(errors), acks, live, landed, text)


async def main_async(
    rate: float, seconds: float, port_offset: int, api: str = "unary", keep_data: bool = False
) -> int:
    system = BenchSystem(keep_data, port_offset)

    async def body() -> str:
        await system.up()
        await start_processes(system)
        outcome = await run(system, rate, seconds, api)
        return f"{outcome.text}\n\nIssue 7's row: {outcome.verdict()}"

    return await report_after(system, body())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=3000.0, help="messages/s offered")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--port-offset", type=int, default=1600)
    parser.add_argument("--api", choices=("unary", "stream", "batch"), default="unary")
    parser.add_argument("--keep-data", action="store_true", help="keep var/bench-* (logs) after the run")
    args = parser.parse_args(argv)
    return asyncio.run(main_async(args.rate, args.seconds, args.port_offset, args.api, args.keep_data))


if __name__ == "__main__":
    sys.exit(main())
