"""Unary SendMessage ack latency at 1 call in flight: the ingress, the bare grpc.aio echo server
and a raw aiokafka producer, interleaved in rounds so drifting load hits all three alike.

Issue 7's row "unary ack latency at 1 in flight, p50 ≤ 1.5 ms". `make bench` measures it once per
run among many rows; this measures it alone, in several short interleaved rounds, and prints the
p50/p90/p99 of each target and the ingress's p50 over the echo's. Its own stack (ingest.py's
BenchSystem: Kafka, Redis, SeaweedFS, sessions worker, ingress, echo server; ports + --port-offset).

    .venv/bin/python benchmarks/unary_latency.py [--rounds 5] [--seconds 3] [--port-offset 1700]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
from ingest import (
    BenchSystem,
    Plan,
    Run,
    Traffic,
    log,
    machine,
    make_plan,
    produce_run,
    raw_producer,
    report_after,
    start_conversations,
    start_sessions_and_ingress,
    unary_run,
    wait_for_echo,
)
from switchboard.v1 import chat_pb2_grpc


def _ms(run_latencies: list[float], q: float) -> float:
    ordered = sorted(run_latencies)
    return 1000 * ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


async def measure(system: BenchSystem, rounds: int, seconds: float) -> str:
    settings = system.settings
    plan: Plan = make_plan(True, seconds)
    conversations = await start_conversations(settings, 50)
    traffic = Traffic(conversations)
    await wait_for_echo(system.echo_listen)
    echo_channel = grpc.aio.insecure_channel(system.echo_listen)
    ingress_channel = grpc.aio.insecure_channel(settings.grpc_listen)
    producer = raw_producer(settings, "bench-latency-producer")
    await producer.start()
    by_target: dict[str, list[Run]] = {"ingress": [], "echo": [], "kafka": []}
    try:
        echo = [chat_pb2_grpc.ChatServiceStub(echo_channel)]
        ingress = [chat_pb2_grpc.ChatServiceStub(ingress_channel)]
        for r in range(rounds):
            by_target["ingress"].append(await unary_run("ingress", ingress, traffic, 1, plan))
            by_target["echo"].append(await unary_run("echo", echo, traffic, 1, plan))
            by_target["kafka"].append(
                await produce_run(producer, settings.conversation_topic, traffic, 1, plan)
            )
            log(
                f"round {r + 1}: "
                + ", ".join(f"{t} p50 {_ms(runs[-1].latencies, 0.5):.2f} ms" for t, runs in by_target.items())
            )
    finally:
        await producer.stop()
        await echo_channel.close()
        await ingress_channel.close()
    lines = [
        f"### Unary ack latency at 1 in flight — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"{rounds} interleaved rounds of {seconds:.0f} s per target (ingress, echo, raw Kafka producer).",
        "",
        "| target | calls | p50 ms | p90 ms | p99 ms | p50 of each round ms |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for target, runs in by_target.items():
        every = [x for run in runs for x in run.latencies]
        lines.append(
            f"| {target} | {len(every):,} | {_ms(every, 0.5):.2f} | {_ms(every, 0.9):.2f} | "
            f"{_ms(every, 0.99):.2f} | {' / '.join(f'{_ms(run.latencies, 0.5):.2f}' for run in runs)} |"
        )
    ratios = [
        _ms(i.latencies, 0.5) / _ms(e.latencies, 0.5)
        for i, e in zip(by_target["ingress"], by_target["echo"], strict=True)
    ]
    lines += [
        "",
        f"Ingress p50 over echo p50, per round: {' / '.join(f'{x:.2f}' for x in ratios)} "
        f"(median {statistics.median(ratios):.2f}).",
        "",
        "```",
        machine(),
        "```",
    ]
    return "\n".join(lines)


async def main_async(rounds: int, seconds: float, port_offset: int) -> int:
    system = BenchSystem(False, port_offset)

    async def body() -> str:
        await start_sessions_and_ingress(system)
        return await measure(system, rounds, seconds)

    return await report_after(system, body())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--port-offset", type=int, default=1700)
    args = parser.parse_args(argv)
    return asyncio.run(main_async(args.rounds, args.seconds, args.port_offset))


if __name__ == "__main__":
    sys.exit(main())
