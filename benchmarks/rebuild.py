"""Hot-view rebuild after Redis loses everything: how long until the ingress takes writes again and
every conversation's state is back, for 10k conversations (issue 9 §6).

Its own stack and processes (benchmarks/ingest.py's BenchSystem, ports + --port-offset): the
sessions worker and the ingress. N conversations get M messages each through the API
(StartConversation, then SendMessageBatch of 500); once the worker folded them all, a sample's
GetConversation (the whole message, with its M recent messages), its live-stream lengths and a
census of Redis's keys are recorded. Then Redis loses everything, the clock starting at the loss:

- `flushall`: FLUSHALL on the running Redis;
- `restart-empty`: Redis `kill -9`-ed, its data directory (append-only file) deleted, restarted.

Measured from the loss: (a) the first write the ingress accepts (a SendMessage to a conversation
outside the N every 50 ms; the refusals are counted with their `retry-after-ms` trailer, and at the
first acceptance the readiness hash must already be complete), (b) `sb:sessions:ready` complete
again, (c) all N states back with message_count == M (read every second, every 100 ms once (b)
holds); the sessions worker's own account from its log (when it noticed, when it finished); the
rebuild rate N×(M+1)/(c); each process's CPU over (c). Then the sample's GetConversation and
live streams must equal the snapshot, and a retry of every one of the N×M acknowledged messages
must be answered duplicate=true with its original ack (event id, partition, offset) while the log
does not grow.

    .venv/bin/python benchmarks/rebuild.py [--conversations 10000] [--messages 5] [--sample 200]
        [--scenarios flushall,restart-empty] [--port-offset 1800] [--keep-data]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
import redis.asyncio as aioredis
from ingest import (
    BenchSystem,
    CpuMeter,
    LogWatch,
    log,
    machine,
    report_after,
    requests_for,
    start_sessions_and_ingress,
)
from memory import start_all
from redis.exceptions import RedisError
from switchboard.v1 import chat_pb2, chat_pb2_grpc

from schemas import hotview as hv
from services import stack
from services.ingress._producer import RETRY_AFTER_KEY
from services.stack._layout import Layout

CHANNELS = 8
BATCH = 500
BATCHES_IN_FLIGHT = 3
RETRY_ATTEMPTS = 5
PROBE_EVERY_S = 0.05
READY_EVERY_S = 0.05
# All N states are read (pipelined HGET) every STATES_EVERY_S once READY is complete, and only every
# STATES_EARLY_S before: reading 10k states costs the benchmark ~0.1 s of CPU, taken from the
# rebuild it measures on a small machine.
STATES_EVERY_S = 0.1
STATES_EARLY_S = 1.0
WITHIN_S = 900.0
SCENARIOS = ("flushall", "restart-empty")
CPU_NAMES = ("sessions", "redis", "kafka", "ingress", "bench", "others")

Ack = tuple[str, int, int]  # event id, partition, offset


async def send_batches(
    stubs: Sequence[chat_pb2_grpc.ChatServiceStub], requests: list[chat_pb2.SendMessageRequest]
) -> list[chat_pb2.SendMessageResponse]:
    """Every request through SendMessageBatch (BATCH per call); the results in request order. At
    most BATCHES_IN_FLIGHT calls at once: more would pass the ingress's in-flight limit
    (SWITCHBOARD_MAX_INFLIGHT_PRODUCE) and be refused."""
    sem = asyncio.Semaphore(BATCHES_IN_FLIGHT)

    async def batch(k: int, chunk: list[chat_pb2.SendMessageRequest]) -> list[chat_pb2.SendMessageResponse]:
        async with sem:
            reply = await stubs[k % len(stubs)].SendMessageBatch(
                chat_pb2.SendMessageBatchRequest(messages=chunk), timeout=120
            )
            return list(reply.results)

    parts = await asyncio.gather(
        *(batch(k, requests[i : i + BATCH]) for k, i in enumerate(range(0, len(requests), BATCH)))
    )
    return [r for part in parts for r in part]


async def unfolded(
    redis: aioredis.Redis, tenant: str, conversations: Sequence[str], messages: int
) -> list[str]:
    """The conversations whose state in Redis is missing or does not count all `messages` yet."""
    async with redis.pipeline(transaction=False) as pipe:
        for c in conversations:
            pipe.hget(hv.conversation_key(tenant, c), hv.F_STATE)
        states = await pipe.execute()
    return [
        c
        for c, s in zip(conversations, states, strict=True)
        if s is None or json.loads(s).get("message_count") != messages
    ]


async def key_census(redis: aioredis.Redis) -> Counter[str]:
    """Keys by kind: the last part of the name (conv, live, msg, open, …) or the name itself."""
    kinds: Counter[str] = Counter()
    async for key in redis.scan_iter(count=5000):
        name = key.decode()
        if name.startswith("sb:{"):
            rest = name.split("}:", 1)[1] if "}:" in name else name
            kinds[rest.split(":", 1)[0]] += 1
        else:
            kinds[name] += 1
    return kinds


async def snapshot(
    stub: chat_pb2_grpc.ChatServiceStub,
    redis: aioredis.Redis,
    tenant: str,
    sample: Sequence[str],
    messages: int,
) -> dict[str, tuple[bytes, int]]:
    """What a client sees of each sampled conversation: GetConversation (serialized, with its
    messages) and its live stream's length."""
    out: dict[str, tuple[bytes, int]] = {}
    for c in sample:
        conv = await stub.GetConversation(
            chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=c, recent_messages=messages),
            timeout=30,
        )
        length = int(await redis.xlen(hv.live_stream_key(tenant, c)))
        out[c] = (conv.SerializeToString(deterministic=True), length)
    return out


def differences(before: bytes, after: bytes) -> list[str]:
    a, b = chat_pb2.Conversation(), chat_pb2.Conversation()
    a.ParseFromString(before)
    b.ParseFromString(after)
    return [
        f.name for f in chat_pb2.Conversation.DESCRIPTOR.fields if getattr(a, f.name) != getattr(b, f.name)
    ]


@dataclass
class WorkerTimeline:
    """The sessions worker's own account, from its log: seconds after the loss."""

    started: list[float]  # each partition's "rebuilding its hot view" line
    done: list[float]  # each partition's "hot view rebuilt" line


def worker_timeline(text: str, since: float) -> WorkerTimeline:
    def at(line: str) -> float:
        stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").astimezone()
        return stamp.timestamp() - since

    lines = text.splitlines()
    return WorkerTimeline(
        started=[at(x) for x in lines if "rebuilding its hot view" in x],
        done=[at(x) for x in lines if "hot view rebuilt" in x],
    )


@dataclass
class Outcome:
    scenario: str
    accept_s: float | None = None
    ready_s: float | None = None
    states_s: float | None = None
    refusals: Counter[str] = field(default_factory=Counter)
    trailers: int = 0
    details: Counter[str] = field(default_factory=Counter)
    ready_at_accept: int | None = None
    log_records: int = 0
    cores: dict[str, float] = field(default_factory=dict)
    states_back: int = 0
    sampled: int = 0
    sample_equal: int = 0
    sample_diffs: Counter[str] = field(default_factory=Counter)
    live_equal: int = 0
    census: Counter[str] = field(default_factory=Counter)
    retried: int = 0
    duplicates_same_ack: int = 0
    retry_problems: Counter[str] = field(default_factory=Counter)
    retry_unavailable: Counter[str] = field(default_factory=Counter)
    log_grew: int = 0
    worker: WorkerTimeline | None = None


async def lose_redis(system: BenchSystem, redis: aioredis.Redis, scenario: str) -> asyncio.Task[None] | None:
    """Redis without its data from the moment this returns; the restart (a task) may still be
    under way, so the polls see the outage too."""
    if scenario == "flushall":
        await redis.flushall()
        return None
    settings = system.settings
    await stack.stop_component(settings, "redis", kill=True)
    shutil.rmtree(Layout.of(settings).redis_dir, ignore_errors=True)
    return asyncio.create_task(stack.start_component(settings, "redis"))


async def until(check: Callable[[], Awaitable[bool]], every_s: float, within_s: float) -> float | None:
    """Seconds (monotonic clock) at which `check` first held, polling; None if it never did. Redis
    errors (it is down in the restart scenario) count as not yet."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if await check():
                return time.monotonic()
        except (RedisError, OSError):
            pass
        await asyncio.sleep(every_s)
    return None


async def scenario_run(
    system: BenchSystem,
    scenario: str,
    tenant: str,
    conversations: list[str],
    probe: tuple[str, str],
    messages: int,
    sample_before: dict[str, tuple[bytes, int]],
    acks: dict[tuple[str, str], Ack],
    requests: list[chat_pb2.SendMessageRequest],
    stubs: Sequence[chat_pb2_grpc.ChatServiceStub],
    watch: LogWatch,
) -> Outcome:
    settings = system.settings
    partitions = settings.topic_partitions
    redis = aioredis.Redis.from_url(settings.redis_url)
    out = Outcome(scenario)
    out.log_records = sum((await watch.end_offsets()).values())
    sessions_log = system.children["sessions"].log_path
    log_from = sessions_log.stat().st_size
    meter = CpuMeter(system)
    await meter.refresh()
    cpu_start = meter.snapshot()
    t0, wall0 = time.monotonic(), time.time()
    log(f"{scenario}: Redis loses everything")
    restart = await lose_redis(system, redis, scenario)

    probe_n = 0

    async def accepted() -> bool:
        nonlocal probe_n
        probe_n += 1
        try:
            await stubs[0].SendMessage(
                chat_pb2.SendMessageRequest(
                    tenant_id=probe[0],
                    conversation_id=probe[1],
                    client_message_id=f"probe-{scenario}-{probe_n}",
                    text="are you there?",
                ),
                timeout=10,
            )
        except grpc.aio.AioRpcError as exc:
            out.refusals[exc.code().name] += 1
            out.details[f"{exc.code().name}: {exc.details()}"[:200]] += 1
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                # The probe's conversation exists: anything but "not now" is wrong.
                raise RuntimeError(
                    f"{scenario}: a write to an existing conversation was refused: {exc!r}"
                ) from None
            if probe_n % 100 == 0:
                log(f"{scenario}: {probe_n} writes refused so far: {dict(out.details)}")
            if any(k == RETRY_AFTER_KEY for k, _ in exc.trailing_metadata() or ()):
                out.trailers += 1
            return False
        # The gate opens only once every partition is ready, and it never closes again here.
        with contextlib.suppress(RedisError, OSError):
            out.ready_at_accept = int(await redis.hlen(hv.READY_KEY))
        return True

    ready_seen = False

    async def ready() -> bool:
        nonlocal ready_seen
        ready_seen = int(await redis.hlen(hv.READY_KEY)) >= partitions
        return ready_seen

    pending = list(conversations)
    last_read = 0.0

    async def states() -> bool:
        nonlocal pending, last_read
        if not ready_seen and time.monotonic() - last_read < STATES_EARLY_S:
            return False
        last_read = time.monotonic()
        pending = await unfolded(redis, tenant, pending, messages)
        return not pending

    accept_at, ready_at, states_at = await asyncio.gather(
        until(accepted, PROBE_EVERY_S, WITHIN_S),
        until(ready, READY_EVERY_S, WITHIN_S),
        until(states, STATES_EVERY_S, WITHIN_S),
    )
    if restart is not None:
        await restart
        # A new redis-server: all of its CPU is since the loss.
        await meter.refresh()
        cpu_start[1]["redis"] = 0.0
    cpu_end = meter.snapshot()
    out.accept_s = accept_at - t0 if accept_at else None
    out.ready_s = ready_at - t0 if ready_at else None
    out.states_s = states_at - t0 if states_at else None
    out.states_back = len(conversations) - len(pending)
    out.cores = CpuMeter.cores(cpu_start, cpu_end)
    log(
        f"{scenario}: writes accepted at {out.accept_s}, ready at {out.ready_s}, states back at {out.states_s}"
    )

    after = await snapshot(stubs[1], redis, tenant, list(sample_before), messages)
    out.sampled = len(after)
    for c, (conv, length) in sample_before.items():
        if after[c][0] == conv:
            out.sample_equal += 1
        else:
            out.sample_diffs.update(differences(conv, after[c][0]))
        out.live_equal += after[c][1] == length
    out.census = await key_census(redis)

    # Every acknowledged message again: each must be a duplicate with its first ack, writing nothing.
    # A message refused UNAVAILABLE is sent again, as a client would (counted: `retry_unavailable`).
    ends_before = await watch.end_offsets()
    answers: dict[int, chat_pb2.SendMessageResponse] = {}
    todo = list(range(len(requests)))
    for attempt in range(RETRY_ATTEMPTS):
        results = await send_batches(stubs, [requests[i] for i in todo])
        again = []
        for i, res in zip(todo, results, strict=True):
            if res.error_code == grpc.StatusCode.UNAVAILABLE.value[0] and attempt + 1 < RETRY_ATTEMPTS:
                out.retry_unavailable[res.error_message[:160]] += 1
                again.append(i)
            else:
                answers[i] = res
        todo = again
        if not todo:
            break
        await asyncio.sleep(0.5)
    ends_after = await watch.end_offsets()
    out.log_grew = sum(ends_after.values()) - sum(ends_before.values())
    out.retried = len(answers)
    for i, res in sorted(answers.items()):
        req = requests[i]
        first = acks[(req.conversation_id, req.client_message_id)]
        if res.error_code:
            out.retry_problems[f"error {res.error_code}: {res.error_message[:160]}"] += 1
        elif not res.duplicate:
            out.retry_problems["not duplicate"] += 1
        elif (res.event_id, res.partition, res.offset) != first:
            out.retry_problems["another ack"] += 1
        else:
            out.duplicates_same_ack += 1
    with sessions_log.open("rb") as f:
        f.seek(log_from)
        out.worker = worker_timeline(f.read().decode(errors="replace"), wall0)
    await redis.aclose()
    return out


def timeline_text(w: WorkerTimeline | None) -> str:
    if w is None or not w.started:
        return "worker log: **no rebuild started**"
    text = (
        f"worker log: {len(w.started)} partition rebuild(s) started {min(w.started):.2f}–{max(w.started):.2f} s "
        f"after the loss"
    )
    if w.done:
        text += (
            f", {len(w.done)} done by {max(w.done):.2f} s (the rebuild itself: "
            f"{max(w.done) - min(w.started):.2f} s)"
        )
    return text


def fmt_s(value: float | None) -> str:
    return f"{value:.2f} s" if value is not None else "**never**"


def report(
    outcomes: list[Outcome],
    n_conv: int,
    n_msg: int,
    census_before: Counter[str],
    load_start: str,
    partitions: int,
    batch_size: int,
    command: str,
) -> str:
    events = n_conv * (n_msg + 1)
    rows = [
        "| scenario | (a) writes accepted again | (b) `sb:sessions:ready` complete | (c) all "
        f"{n_conv:,} states back | (d) rebuild rate N×(M+1)/(c) | log records re-read | "
        "refusals meanwhile (retry-after-ms trailer) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    cpu_rows = [
        f"| scenario | {' | '.join(CPU_NAMES)} | sessions CPU per event |",
        "|---|" + "---:|" * (len(CPU_NAMES) + 1),
    ]
    checks = []
    for o in outcomes:
        rate = f"{events / o.states_s:,.0f} events/s" if o.states_s else "–"
        refusals = ", ".join(f"{n} {code}" for code, n in o.refusals.most_common()) or "none"
        rows.append(
            f"| {o.scenario} | {fmt_s(o.accept_s)} | {fmt_s(o.ready_s)} | {fmt_s(o.states_s)} | {rate} | "
            f"{o.log_records:,} | {refusals} ({o.trailers} of {sum(o.refusals.values())} with the trailer) |"
        )
        # CPU time per event rebuilt: steadier than the rate on a machine other agents load.
        per_event = (
            f"{o.cores.get('sessions', 0.0) * o.states_s / events * 1e6:.0f} µs" if o.states_s else "–"
        )
        cpu_rows.append(
            f"| {o.scenario} | "
            + " | ".join(f"{o.cores.get(n, 0.0):.2f}" for n in CPU_NAMES)
            + f" | {per_event} |"
        )
        diffs = ", ".join(f"{k} ×{v}" for k, v in o.sample_diffs.most_common()) or "none"
        problems = ", ".join(f"{k} ×{v}" for k, v in o.retry_problems.most_common()) or "none"
        unavailable = (
            "; ".join(f"{v:,} × {k!r}" for k, v in o.retry_unavailable.most_common())
            + " — sent again, as a client would"
            if o.retry_unavailable
            else "none"
        )
        census = ", ".join(f"{k} {v:,}" for k, v in sorted(o.census.items()))
        checks.append(
            f"- **{o.scenario}**: {timeline_text(o.worker)}; readiness "
            f"hash at the first accepted write: {o.ready_at_accept} of {partitions} partitions"
            f"{'' if o.ready_at_accept in (None, partitions) else ' — **a write was accepted before READY**'}; "
            f"states back {o.states_back:,} of {n_conv:,}; sample GetConversation equal to the snapshot "
            f"{o.sample_equal} of {o.sampled} (fields differing: {diffs}); live-stream lengths "
            f"equal {o.live_equal}; retry of all {o.retried:,} acknowledged messages: "
            f"{o.duplicates_same_ack:,} duplicate=true with their original ack (problems: {problems}; "
            f"UNAVAILABLE on a first attempt: {unavailable}), the "
            f"log grew by {o.log_grew} records; keys after: {census}."
        )
    census_text = ", ".join(f"{k} {v:,}" for k, v in sorted(census_before.items()))
    return "\n".join(
        [
            f"### Hot-view rebuild — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "",
            f"`{command}`",
            "",
            f"{n_conv:,} conversations × {n_msg} messages ({events:,} events, {partitions} partitions), "
            f"folded by the sessions worker (batches of {batch_size}, `SWITCHBOARD_BATCH_SIZE`); then Redis "
            "lost everything, the clock starting at the loss. "
            f"Load average at the start: {load_start}. Keys before the loss: {census_text}.",
            "",
            *rows,
            "",
            "CPU over (c), in cores (1.0 = one core busy; `bench` reads all states every "
            f"{STATES_EARLY_S:.0f} s, and every {STATES_EVERY_S * 1000:.0f} ms once READY is complete):",
            "",
            *cpu_rows,
            "",
            *checks,
            "",
            "```",
            machine(),
            "```",
        ]
    )


async def run(system: BenchSystem, n_conv: int, n_msg: int, n_sample: int, scenarios: Sequence[str]) -> str:
    settings = system.settings
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    redis = aioredis.Redis.from_url(settings.redis_url)
    channels = [grpc.aio.insecure_channel(settings.grpc_listen) for _ in range(CHANNELS)]
    stubs = [chat_pb2_grpc.ChatServiceStub(c) for c in channels]
    watch = LogWatch(settings)
    await watch.start()
    try:
        tenant = f"rb{uuid.uuid4().hex[:8]}"
        log(f"starting {n_conv:,} conversations, {n_msg} messages each")
        started = time.monotonic()
        conversations = await start_all(stubs[0], tenant, n_conv)
        # The probe writes to a conversation of its own (another tenant), so the N keep M messages.
        probe = (tenant + "p", (await start_all(stubs[0], tenant + "p", 1))[0])
        requests = requests_for(tenant, conversations, n_msg)
        results = await send_batches(stubs, requests)
        refused = [r for r in results if r.error_code]
        if refused:
            raise RuntimeError(f"{len(refused)} messages refused, e.g. {refused[0].error_message}")
        acks = {
            (r.conversation_id, r.client_message_id): (r.event_id, r.partition, r.offset) for r in results
        }
        log(f"{len(acks):,} messages acked in {time.monotonic() - started:.1f} s; waiting for the fold")
        pending = list(conversations)

        async def folded() -> bool:
            nonlocal pending
            pending = await unfolded(redis, tenant, pending, n_msg)
            return not pending

        if await until(folded, 1.0, 600) is None:
            raise RuntimeError(f"{len(pending):,} conversations not folded within 600 s")
        step = max(1, n_conv // n_sample)
        sample = conversations[::step][:n_sample]
        sample_before = await snapshot(stubs[1], redis, tenant, sample, n_msg)
        census_before = await key_census(redis)

        outcomes = []
        for scenario in scenarios:
            outcome = await scenario_run(
                system,
                scenario,
                tenant,
                conversations,
                probe,
                n_msg,
                sample_before,
                acks,
                requests,
                stubs,
                watch,
            )
            outcomes.append(outcome)
            if outcome.states_s is None:
                log(f"{scenario}: the hot view did not come back within {WITHIN_S:.0f} s; stopping here")
                break
    finally:
        await watch.stop()
        for c in channels:
            await c.close()
        await redis.aclose()
    command = " ".join(
        [
            *(f"{k}={v}" for k, v in os.environ.items() if k == "SWITCHBOARD_BATCH_SIZE"),
            ".venv/bin/python",
            "benchmarks/rebuild.py",
            *sys.argv[1:],
        ]
    )
    return report(
        outcomes,
        n_conv,
        n_msg,
        census_before,
        load_start,
        settings.topic_partitions,
        settings.batch_size,
        command,
    )


async def main_async(
    n_conv: int, n_msg: int, n_sample: int, scenarios: Sequence[str], port_offset: int, keep_data: bool
) -> int:
    system = BenchSystem(keep_data, port_offset)

    async def body() -> str:
        await start_sessions_and_ingress(system)
        return await run(system, n_conv, n_msg, n_sample, scenarios)

    return await report_after(system, body())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--conversations", type=int, default=10_000)
    parser.add_argument("--messages", type=int, default=5)
    parser.add_argument(
        "--sample", type=int, default=200, help="conversations compared through GetConversation"
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {SCENARIOS}")
    parser.add_argument("--port-offset", type=int, default=1800)
    parser.add_argument("--keep-data", action="store_true", help="keep var/bench-* (the processes' logs)")
    args = parser.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; expected some of {SCENARIOS}")
    return asyncio.run(
        main_async(
            args.conversations, args.messages, args.sample, scenarios, args.port_offset, args.keep_data
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
