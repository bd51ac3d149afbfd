"""Unary SendMessage: calls/s, latency, and the ingress's CPU and Redis commands per call.

One stack of its own (benchmarks/ingest.py's BenchSystem, sessions and analytics stopped), then,
for each level of calls in flight (over ingest.CONNECTIONS connections, so the kernel spreads them
over the ingress processes), a warm-up and a measured window. Prints one line per level:

    n=100  1,964 calls/s  p50 31.7 ms  p99 188 ms  ingress 636 µs CPU/call  Redis 4.1 commands, 0.31 reads/call

Made to compare two versions of the write path (run it in each tree, alternated): the ingress's
CPU per call is what a change in batching moves, and it is less noisy than calls/s on a shared
machine. Redis commands include those run inside Lua scripts; Redis's reads are about its round trips
(what a client pipelines arrives in one read).

    .venv/bin/python benchmarks/unary_cpu.py --levels 2,10,100 --seconds 5 --port-offset 1400
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import replace
from pathlib import Path

import grpc
import psutil
import redis
from switchboard.v1 import chat_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ingest


def _ingress_cpu_s(system: ingest.BenchSystem) -> float:
    child = system.children["ingress"]
    assert child.proc is not None
    root = psutil.Process(child.proc.pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        times = proc.cpu_times()
        total += times.user + times.system
    return total


async def _body(system: ingest.BenchSystem, levels: list[int], seconds: float) -> str:
    await system.up()
    await ingest.start_processes(system)
    conversations = await ingest.start_conversations(system.settings, 200)
    await system.stop("sessions", "analytics")
    own = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(system.settings.grpc_listen, options=own) for _ in range(ingest.CONNECTIONS)
    ]
    stubs = [chat_pb2_grpc.ChatServiceStub(c) for c in channels]
    traffic = ingest.Traffic(conversations)
    plan = ingest.make_plan(True, seconds)
    counter = redis.Redis.from_url(system.settings.redis_url)
    lines = []
    try:
        for n in levels:
            if n == 0:  # idle: what the ingress spends with no calls (timers, followers, leases)
                cpu = _ingress_cpu_s(system)
                await asyncio.sleep(seconds)
                line = f"n=0    idle: ingress {(_ingress_cpu_s(system) - cpu) / seconds * 1e3:5.1f} ms CPU/s"
                ingest.log(line)
                lines.append(line)
                continue
            await ingest.unary_run("ingress", stubs, traffic, n, replace(plan, seconds=1.0))
            before = counter.info("stats")
            commands, reads = before["total_commands_processed"], before["total_reads_processed"]
            cpu, start = _ingress_cpu_s(system), time.perf_counter()
            run = await ingest.unary_run("ingress", stubs, traffic, n, plan)
            wall = time.perf_counter() - start
            calls = run.rate * wall
            used = _ingress_cpu_s(system) - cpu
            after = counter.info("stats")
            per_call = after["total_commands_processed"] - commands
            # Reads Redis processed: about one per round trip (a pipeline's commands arrive in one read).
            round_trips = after["total_reads_processed"] - reads
            errors = f"  errors {dict(run.errors)}" if run.errors else ""
            line = (
                f"n={n:<4} {run.rate:>7,.0f} calls/s  p50 {run.percentile_ms(0.5):6.1f} ms  "
                f"p99 {run.percentile_ms(0.99):6.1f} ms  ingress {used / calls * 1e6:5.0f} µs CPU/call  "
                f"Redis {per_call / calls:4.1f} commands, {round_trips / calls:4.2f} reads/call{errors}"
            )
            ingest.log(line)
            lines.append(line)
    finally:
        counter.close()
        for channel in channels:
            await channel.close()
    return "\n".join(lines)


async def _main(levels: list[int], seconds: float, port_offset: int) -> int:
    system = ingest.BenchSystem(False, port_offset)
    return await ingest.report_after(system, _body(system, levels, seconds))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--levels", default="1,2,10,100", help="calls in flight, comma-separated (0: idle)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per level")
    parser.add_argument("--port-offset", type=int, default=0, help="add this to every port")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    return asyncio.run(_main(levels, args.seconds, args.port_offset))


if __name__ == "__main__":
    sys.exit(main())
