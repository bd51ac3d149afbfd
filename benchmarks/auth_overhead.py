"""What the API-key check costs per call: one grpc.aio server on 127.0.0.1 with a trivial unary
handler shaped like the ingress's (a StartConversationRequest in, a Conversation out), measured
without an interceptor, with the auth interceptor in its open mode (no key exists), and with a
key checked on every call (HMAC, registry lookup, tenant filled in). Same process, same run.

    .venv/bin/python benchmarks/auth_overhead.py [--calls 20000] [--concurrency 50]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence
from typing import Any

import grpc
from switchboard.v1 import chat_pb2, chat_pb2_grpc

from services.auth import AuthInterceptor, Registry, authorize, encode_record, new_key


async def handler(request: Any, context: grpc.aio.ServicerContext) -> chat_pb2.Conversation:
    return chat_pb2.Conversation(tenant_id=request.tenant_id, conversation_id="c")


async def serve(interceptors: Sequence[grpc.aio.ServerInterceptor]) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(interceptors=list(interceptors))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "switchboard.v1.ChatService",
                {
                    "StartConversation": grpc.unary_unary_rpc_method_handler(
                        handler,
                        chat_pb2.StartConversationRequest.FromString,
                        chat_pb2.Conversation.SerializeToString,
                    )
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def measure(port: int, key: str | None, calls: int, concurrency: int) -> tuple[float, float]:
    """(calls per second, p50 latency in ms)."""
    # The key goes as call metadata (what any client sends), so only the server's cost differs.
    metadata = (("authorization", f"Bearer {key}"),) if key else None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        request = chat_pb2.StartConversationRequest(customer_id="c1")
        latencies: list[float] = []

        async def worker(n: int) -> None:
            for _ in range(n):
                start = time.perf_counter()
                reply = await stub.StartConversation(request, metadata=metadata)
                latencies.append(time.perf_counter() - start)
                assert reply.tenant_id == ("bench" if key else "")

        await asyncio.gather(*(worker(200) for _ in range(concurrency)))  # warm-up
        latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        return len(latencies) / elapsed, statistics.median(latencies) * 1000


async def main(calls: int, concurrency: int, rounds: int) -> None:
    pepper = b"bench-pepper"
    record, token = new_key(pepper, "bench", ["customer-app"], time.time())
    keyed = Registry()
    keyed.apply(*encode_record(record))
    empty = Registry()
    setups: list[tuple[str, Sequence[grpc.aio.ServerInterceptor], str | None]] = [
        ("no interceptor", [], None),
        ("auth, open (no key exists)", [AuthInterceptor(lambda: empty, pepper)], None),
        ("auth, key checked per call", [AuthInterceptor(lambda: keyed, pepper)], token),
    ]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in setups}
    for _ in range(rounds):  # interleaved rounds: the machine's load drifts
        for name, interceptors, key in setups:
            server, port = await serve(interceptors)
            try:
                results[name].append(await measure(port, key, calls, concurrency))
            finally:
                await server.stop(None)
    # The check alone, without the network: CPU per call of authorize() (parse, HMAC, lookups).
    n = 100_000
    started = time.perf_counter()
    for _ in range(n):
        authorize(keyed, pepper, "/switchboard.v1.ChatService/StartConversation", token, 0.0)
    check_us = (time.perf_counter() - started) / n * 1e6
    base = statistics.median(r[0] for r in results["no interceptor"])
    print(f"{calls} unary calls x {rounds} rounds, {concurrency} in flight, one process (client and server)")
    for name, rows in results.items():
        rate = statistics.median(r[0] for r in rows)
        p50 = statistics.median(r[1] for r in rows)
        print(f"  {name:<30} {rate:8.0f} calls/s  p50 {p50:6.2f} ms  ratio {rate / base:.2f}")
    print(f"  authorize() alone: {check_us:.1f} us per call")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.concurrency, args.rounds))
