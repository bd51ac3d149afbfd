"""What metrics, tracing hooks and PII redaction cost per message, against the same code without them.

    .venv/bin/python benchmarks/observability.py [--calls 20000] [--events 20000] [--rounds 5]

1. gRPC: unary calls/s and CPU per call of a grpc.aio server with a trivial handler, with and
   without `MetricsInterceptor` (tracing off, the default), 64 calls in flight over one channel,
   rounds interleaved so machine noise hits both alike.
2. The consumer's per-batch hook (`batch_observed`, tracing off) and the produce wrapper, per call.
3. The projector's row builder (`project`) over realistic zh/en events, with the default redaction
   policy and with redaction off: microseconds per event, and the share of events carrying PII.

Everything runs in this process on 127.0.0.1 (no stack needed). Prints one table; ratios compare
runs made back to back.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import grpc

from schemas.events import Event, LogPosition
from services.observability import metrics
from streams._consumer import Record
from streams.privacy import RedactionPolicy, redact_event, use_policy
from streams.projector import project

METHOD = "/bench.Echo/Call"


def _server(with_metrics: bool) -> tuple[grpc.aio.Server, int]:
    async def call(request: bytes, context: Any) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(call)}
    )
    server = grpc.aio.server(interceptors=[metrics.MetricsInterceptor()] if with_metrics else [])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    return server, port


async def _grpc_round(with_metrics: bool, calls: int, inflight: int = 64) -> tuple[float, float]:
    """(calls/s, CPU µs per call of this process: server and client share it)."""
    server, port = _server(with_metrics)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = channel.unary_unary(METHOD)
            await stub(b"warm")
            sem = asyncio.Semaphore(inflight)

            async def one() -> None:
                async with sem:
                    await stub(b"x" * 100)

            cpu0, t0 = time.process_time(), time.perf_counter()
            await asyncio.gather(*(one() for _ in range(calls)))
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    finally:
        await server.stop(None)
    return calls / wall, cpu / calls * 1e6


def _per_call_us(fn: Any, n: int) -> float:
    """CPU µs per call."""
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n * 1e6


def _events(n: int) -> list[tuple[Event, LogPosition]]:
    """Support traffic: 1 message in 10 carries a phone, e-mail or card, 2 in 10 an order or
    tracking number or a date (which must stay as they are), the rest plain questions."""
    plain = [
        "how long does a refund take?",
        "请问可以开发票吗",
        "退货地址是哪里？",
        "can I change the delivery address?",
        "发错颜色了，怎么换",
        "亲，在吗？我想问一下优惠券怎么用",
        "is the blue one still in stock?",
    ]
    numbers = [
        "亲，我的订单到哪了？单号 SB20261130",
        "订单号 2026113012345678 什么时候发货",
        "I ordered on 2026-11-30 and paid $129.00",
        "my tracking number is 773012345678901",
    ]
    pii = [
        "我的手机号13812345678，请回电",
        "email me at john.doe@example.com",
        "card 4111 1111 1111 1111 was charged twice",
    ]
    out: list[tuple[Event, LogPosition]] = []
    for i in range(n):
        event = Event(event_id=f"e{i}", tenant_id="bench", conversation_id=f"c{i % 500}", schema_version=1)
        event.occurred_at.FromNanoseconds(1_760_000_000 * 10**9 + i * 10**6)
        event.message_received.client_message_id = f"m{i}"
        kind = i % 10
        pool = pii if kind == 0 else numbers if kind in (1, 2) else plain
        event.message_received.text = pool[(i // 10) % len(pool)]
        out.append((event, LogPosition(i % 4, i)))
    return out


def _project_cpu_us(events: list[tuple[Event, LogPosition]], policy: RedactionPolicy) -> float:
    """CPU µs per event of `project` (CPU time, not wall: the machine is shared)."""
    use_policy(policy)
    t0 = time.process_time()
    for start in range(0, len(events), 5000):
        project(events[start : start + 5000])
    return (time.process_time() - t0) / len(events) * 1e6


def _project_pair(events: list[tuple[Event, LogPosition]], rounds: int) -> tuple[float, float]:
    """(redaction off, on): medians of interleaved rounds."""
    off, on = [], []
    for _ in range(rounds):
        off.append(_project_cpu_us(events, RedactionPolicy.parse("none")))
        on.append(_project_cpu_us(events, RedactionPolicy.parse("all")))
    use_policy(RedactionPolicy.parse("all"))
    return statistics.median(off), statistics.median(on)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    plain: list[tuple[float, float]] = []
    observed: list[tuple[float, float]] = []
    for _ in range(args.rounds):
        plain.append(await _grpc_round(False, args.calls))
        observed.append(await _grpc_round(True, args.calls))
    p_rate, p_cpu = statistics.median(r for r, _ in plain), statistics.median(c for _, c in plain)
    o_rate, o_cpu = statistics.median(r for r, _ in observed), statistics.median(c for _, c in observed)

    records = [
        Record(
            "t", i % 4, i, None, b"", 0, (("traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01"),)
        )
        for i in range(500)
    ]

    def hook() -> None:
        with metrics.batch_observed("bench", records):
            pass

    hook_us = _per_call_us(hook, 20000)
    events = _events(args.events)
    off, on = _project_pair(events, args.rounds)
    redact_us = _per_call_us(lambda: [redact_event(e) for e, _ in events[:1000]], 20) / 1000

    print(f"{'what':<58} {'without':>12} {'with':>12} {'ratio':>7}")
    print(
        f"{'gRPC unary calls/s (64 in flight, trivial handler)':<58} {p_rate:>12,.0f} {o_rate:>12,.0f} {o_rate / p_rate:>7.3f}"
    )
    print(
        f"{'gRPC CPU per call, server+client (µs)':<58} {p_cpu:>12.1f} {o_cpu:>12.1f} {o_cpu / p_cpu:>7.3f}"
    )
    print(f"{'BatchConsumer hook per batch of 500 (µs, tracing off)':<58} {'':>12} {hook_us:>12.2f}")
    print(
        f"{'project() CPU per event, 10% PII, 20% order nos. (µs)':<58} {off:>12.2f} {on:>12.2f} {on / off:>7.3f}"
    )
    print(f"{'redact_event per event alone, same mix (µs)':<58} {'':>12} {redact_us:>12.2f}")


if __name__ == "__main__":
    asyncio.run(main())
