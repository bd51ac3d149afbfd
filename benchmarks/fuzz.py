"""Live fuzzing at scale (issue 9 §5): tests/fuzz_wire.py's hostile gRPC calls and malformed HTTP
against this run's own stack, with good traffic beside them.

Prints requests/s, replies by status code (and per-message codes of streams and batches), every
UNKNOWN or INTERNAL with examples, the ingress's resident memory before and after, whether every
good message was acknowledged once and reads back in order, and the analyst endpoint's statuses.
Live streams are capped low (SWITCHBOARD_MAX_LIVE_STREAMS=100 per process) so that a slot leaked
by the open/cancel floods shows: the last check opens a stream and waits for an update.

    .venv/bin/python benchmarks/fuzz.py [--requests 50000] [--http 5000] [--framing 3000] [--seed N]
        [--port-offset 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.fuzz_wire

import grpc
from ingest import BenchSystem, log, machine, start_processes
from switchboard.v1 import chat_pb2_grpc

from services.analytics._process import endpoint_client
from tests import fuzz_wire as fw

WARMUP = 5_000
VICTIMS = 50
GOOD_CONVERSATIONS = 50
GOOD_PER_CONVERSATION = 60
LIVE_STREAMS_PER_PROCESS = 100


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


async def run(
    system: BenchSystem, requests: int, http: int, framing: int, seed: int, concurrency: int
) -> str:
    settings = system.settings
    ingress = system.children["ingress"]
    analytics = system.children["analytics"]
    assert ingress.proc is not None and analytics.proc is not None
    channels = [grpc.aio.insecure_channel(settings.grpc_listen) for _ in range(4)]
    stubs = [chat_pb2_grpc.ChatServiceStub(c) for c in channels]
    tenant = f"fz{seed % 10**8:08d}"
    victims = await fw.start_conversations(stubs[0], tenant, VICTIMS)
    good = fw.GoodTraffic(
        tenant, await fw.start_conversations(stubs[1], tenant, GOOD_CONVERSATIONS), GOOD_PER_CONVERSATION
    )
    hostile = fw.HostileRequests(seed, fw.Targets(tenant, victims))
    fuzz = fw.FuzzRun(channels, concurrency)
    pids = fw.tree_pids(ingress.proc.pid)
    log_start = fw.log_size(ingress.log_path)

    log(f"warm-up: {WARMUP:,} hostile calls")
    warmup = await fuzz.run(hostile.cases(WARMUP))
    rss_before = fw.tree_rss(ingress.proc.pid)
    log(f"fuzzing: {requests:,} hostile calls, {concurrency} in flight, good traffic beside them")
    writing = asyncio.ensure_future(good.write(stubs, seed, pace_s=0.5))
    report = await fuzz.run(hostile.cases(requests))
    await writing
    rss_after = fw.tree_rss(ingress.proc.pid)
    problems = await good.check(stubs[0])
    opens = await fw.stream_still_opens(stubs[2], tenant, good.conversations[0])
    for c in channels:
        await c.close()
    log(f"framing: {framing:,} gRPC calls with broken framing over raw HTTP/2")
    grpc_host, grpc_port = settings.grpc_listen.rsplit(":", 1)
    started = time.monotonic()
    framing_report = await fw.framing_fuzz(
        grpc_host, int(grpc_port), fw.MalformedFraming(seed, tenant).cases(framing)
    )
    framing_elapsed = time.monotonic() - started
    restarted = fw.tree_pids(ingress.proc.pid) != pids or not ingress.alive
    health = await fw.serving(settings.grpc_listen)
    incidents = fw.log_problems(ingress.log_path, log_start)

    log(f"HTTP: {http:,} malformed requests to the analyst endpoint")
    host, port = settings.analytics_listen.rsplit(":", 1)
    http_log_start = fw.log_size(analytics.log_path)
    started = time.monotonic()
    http_report = await fw.http_fuzz(host, int(port), fw.HostileHttp(seed, f"{host}:{port}").cases(http), 25)
    http_elapsed = time.monotonic() - started
    lingering = fw.established(analytics.proc.pid, int(port))
    deadline = time.monotonic() + 30
    while lingering > 10 and time.monotonic() < deadline:  # a count, polled (no event to await)
        await asyncio.sleep(0.2)
        lingering = fw.established(analytics.proc.pid, int(port))
    client = endpoint_client(settings, username="default")
    answer = await asyncio.to_thread(lambda: client.query("SELECT 1 + 1").result_rows)
    client.close()
    endpoint_failures = fw.log_problems(analytics.log_path, http_log_start, fw.ENDPOINT_FAILURES)

    codes = " · ".join(f"{k} {v:,}" for k, v in report.codes.most_common())
    items = " · ".join(f"{k} {v:,}" for k, v in report.item_codes.most_common())
    statuses = " · ".join(f"{k} {v:,}" for k, v in http_report.statuses.most_common())
    by_code: Counter[str] = Counter()
    for key, n in framing_report.outcomes.items():
        by_code[key.split(" ", 1)[1]] += n
    framed = " · ".join(f"{k} {v:,}" for k, v in by_code.most_common())
    bad = warmup.violations + report.violations
    lines = [
        f"### Live fuzzing — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} (seed {seed})",
        "",
        f"- gRPC: {report.sent:,} hostile calls in {report.elapsed_s:.1f} s "
        f"(**{report.sent / report.elapsed_s:,.0f} calls/s**, {concurrency} in flight over 4 connections) "
        f"after a {WARMUP:,}-call warm-up; replies: {codes}.",
        f"- Per-message results inside streams and batches: {items}.",
        f"- Bad replies (UNKNOWN, an INTERNAL of the server's, a refusal without details, a hang): "
        f"**{len(bad)}**{': ' + '; '.join(bad[:5]) if bad else ''}. INTERNAL for frames that are not "
        f"protobuf: {report.internal_for_not_protobuf}; statuses grpc.aio's client lost to a write racing "
        f"the server's end (`Internal error from Core`, client-side): {report.client_lost_status}. "
        f"Incidents or tracebacks in the ingress log: {len(incidents)}{' ' + str(incidents[:3]) if incidents else ''}.",
        f"- Broken gRPC framing (raw HTTP/2): {framing_report.sent:,} calls in {framing_elapsed:.1f} s; "
        f"answers {framed}; bad ones (a hang, UNKNOWN, the ingress's own INTERNAL, DEADLINE_EXCEEDED "
        f"for a request that came whole): **{len(framing_report.violations)}**"
        f"{': ' + '; '.join(framing_report.violations[:3]) if framing_report.violations else ''}.",
        f"- Ingress (supervisor + {len(pids) - 1} server processes): restarted {'YES' if restarted else 'no'}; "
        f"health {health}; RSS {_mib(rss_before)} after the warm-up → {_mib(rss_after)} after the run "
        f"(**{(rss_after - rss_before) / 2**20:+.0f} MiB**); a new StreamConversation after the floods "
        f"(cap {LIVE_STREAMS_PER_PROCESS} per process) gets its first update: {opens}.",
        f"- Good traffic beside it: {good.total:,} of {GOOD_CONVERSATIONS * GOOD_PER_CONVERSATION:,} messages "
        f"acknowledged (retries {dict(good.retries) or 0}), read back once each and in order: "
        f"**{'all' if not problems else 'NO — ' + '; '.join(problems[:3])}**.",
        f"- Analyst endpoint: {http_report.sent:,} malformed HTTP requests in {http_elapsed:.1f} s; "
        f"statuses {statuses} (`closed`: the server hung up on garbage or a request that never ended); "
        f"5xx of the endpoint's own: **{len(http_report.violations)}**"
        f"{': ' + '; '.join(http_report.violations[:3]) if http_report.violations else ''}; engine errors "
        f"ClickHouse itself answers 5xx: {dict(http_report.engine_5xx) or 'none'}; failures in its log: "
        f"{len(endpoint_failures)}; connections still open after: {lingering}; clickhouse-connect "
        f"`SELECT 1 + 1` after: {answer}.",
    ]
    return "\n".join(lines)


async def main_async(
    requests: int, http: int, framing: int, seed: int, concurrency: int, port_offset: int
) -> int:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    system = BenchSystem(False, port_offset)
    # Child processes read this env when they start (the same dict), so the cap applies.
    system.env["SWITCHBOARD_MAX_LIVE_STREAMS"] = str(LIVE_STREAMS_PER_PROCESS)
    text = ""
    try:
        await system.up()
        await start_processes(system)
        text = await run(system, requests, http, framing, seed, concurrency)
    finally:
        log("tearing down")
        await system.down()
    print(f"{text}\n\nLoad average at start: {load}\n\n```\n{machine()}\n```", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=50_000, help="hostile gRPC calls (after the warm-up)")
    parser.add_argument("--http", type=int, default=5_000, help="malformed HTTP requests")
    parser.add_argument("--framing", type=int, default=3_000, help="gRPC calls with broken framing")
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: random, printed)")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--port-offset", type=int, default=3000)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    log(f"seed {seed}")
    return asyncio.run(
        main_async(args.requests, args.http, args.framing, seed, args.concurrency, args.port_offset)
    )


if __name__ == "__main__":
    sys.exit(main())
