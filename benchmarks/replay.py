"""Replay and archive throughput, and the archive's compression ratio.

Brings up its own local stack (Kafka, Redis, SeaweedFS) on its own ports, writes a mixed workload
(every event type, `streams/replay/workload.py`) to a topic of its own, then measures, in one run:

- baselines: reading the topic with a plain aiokafka consumer and doing nothing; the pure row
  builder (`rows_of`, decode + project) over the records in memory; zstd over the records in memory;
- `replay --target projections` from Kafka into fresh tables (embedded chdb, opened in this process
  as when the analytics process is stopped) with the exchange at the end;
- the archiver (the same processor `switchboard worker archiver` runs) archiving the topic to S3;
- the records deleted from Kafka, then `replay --target projections` through the S3 archive.

    .venv/bin/python benchmarks/replay.py [--events 200000] [--port-offset 0] [--batch-size 20000]
        [--rounds 3] [--keep-data]

Each replay also reports its CPU per event: this process's and its row-building workers' CPU
time (user + system, the workers counted once the pool is shut down) over the records read; it
moves far less with the machine's load than the rates do. The load average is printed at the
start and the end.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.records_to_delete import RecordsToDelete

from schemas.events import encode_event, event_headers, event_key
from services import stack
from services.analytics import migrate, open_clickhouse
from services.settings import PROJECT_ROOT, Settings
from streams._consumer import Record
from streams.archive import ArchiveStore, archiver_consumer, build_segment
from streams.projector import rows_of
from streams.replay import ReplayOptions, ReplaySummary, kafka_offsets, plan_replay, read_log, replay
from streams.replay.workload import mixed_workload

PORTS = {
    "KAFKA_CONTROLLER_PORT": 39193,
    "S3_MASTER_PORT": 39433,
    "S3_MASTER_GRPC_PORT": 39443,
    "S3_VOLUME_PORT": 38180,
    "S3_VOLUME_GRPC_PORT": 38190,
    "S3_FILER_PORT": 38988,
    "S3_FILER_GRPC_PORT": 38998,
    "S3_GRPC_PORT": 38443,
    "S3_ADMIN_PORT": 38434,
    "S3_ADMIN_GRPC_PORT": 38444,
}


def cpu_s() -> float:
    """CPU seconds of this process and of its finished children (the replay's worker pool)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


async def timed_replay(settings: Settings, options: ReplayOptions) -> tuple[ReplaySummary, float]:
    """The replay's summary and its CPU µs per record read."""
    c0 = cpu_s()
    (summary,) = await replay(settings, options)
    return summary, (cpu_s() - c0) / max(summary.read, 1) * 1e6


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def bench_settings(data_dir: Path, offset: int) -> Settings:
    fields: dict[str, object] = {
        "data_dir": data_dir,
        "kafka_bootstrap": f"127.0.0.1:{39192 + offset}",
        "redis_url": f"redis://127.0.0.1:{36579 + offset}/0",
        "s3_endpoint": f"127.0.0.1:{38433 + offset}",
        "analytics_listen": f"127.0.0.1:{38223 + offset}",
        "grpc_listen": f"127.0.0.1:{35151 + offset}",
        "topic_partitions": 4,
    }
    fields.update({name.lower(): port + offset for name, port in PORTS.items()})
    return Settings(**fields)  # type: ignore[arg-type]


async def produce(settings: Settings, topic: str, events: int) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=20,
        max_batch_size=1 << 20,
        compression_type=None,
    )
    await producer.start()
    written = 0
    seed = 0
    try:
        while written < events:
            seed += 1
            batch = mixed_workload(f"bench{seed % 8}", 1000, seed)
            futures = [
                await producer.send(topic, key=event_key(e), value=encode_event(e), headers=event_headers(e))
                for e in batch[: events - written]
            ]
            await asyncio.gather(*futures)
            written += len(futures)
    finally:
        await producer.stop()
    return written


async def read_all(
    settings: Settings, topic: str, store: ArchiveStore | None = None
) -> tuple[list[Record], float]:
    plan = await plan_replay(settings, store, topic)
    t0 = time.perf_counter()
    records = [r async for batch in read_log(settings, store, plan, 20_000) for r in batch]
    return records, time.perf_counter() - t0


async def archive_all(settings: Settings, store: ArchiveStore, topic: str, ends: dict[int, int]) -> float:
    consumer, _ = archiver_consumer(settings, store, topic)
    t0 = time.perf_counter()
    await consumer.start()
    task = asyncio.ensure_future(consumer.run())
    try:
        while True:
            done = [await asyncio.to_thread(store.next_offset, topic, p) for p in sorted(ends)]
            if all((n or 0) >= ends[p] for p, n in zip(sorted(ends), done, strict=True)):
                break
            await asyncio.sleep(0.2)
        return time.perf_counter() - t0
    finally:
        await consumer.stop()
        await task
        await consumer.close()


async def main(args: argparse.Namespace) -> int:
    data_dir = Path(tempfile.mkdtemp(prefix="bench-replay-", dir=PROJECT_ROOT / "var"))
    installed = PROJECT_ROOT / "var" / "kafka"
    settings = bench_settings(data_dir, args.port_offset)
    # Segments close by size in this run (8 MiB, the default); the age only matters for the tail.
    settings = settings.model_copy(update={"archive_segment_age_s": 2.0})
    for libs in installed.glob("libs-*"):
        (data_dir / "kafka").mkdir(parents=True, exist_ok=True)
        (data_dir / "kafka" / libs.name).symlink_to(libs, target_is_directory=True)
    results: list[tuple[str, float, str]] = []
    load0 = os.getloadavg()
    try:
        await stack.install(settings)
        await stack.up(settings)
        topic = "bench-replay"
        t0 = time.perf_counter()
        n = await produce(settings, topic, args.events)
        log(f"produced {n} events in {time.perf_counter() - t0:.1f}s")
        _, ends = await kafka_offsets(settings, topic)

        records, read_s = await read_all(settings, topic)
        results.append(("read the topic, nothing else (aiokafka)", len(records) / read_s, "ev/s"))
        t0 = time.perf_counter()
        for i in range(0, len(records), 20_000):
            rows_of(records[i : i + 20_000])
        results.append(
            ("rows_of (decode + project), in memory", len(records) / (time.perf_counter() - t0), "ev/s")
        )
        raw = stored = 0
        t0 = time.perf_counter()
        for p in sorted(ends):
            mine = [r for r in records if r.partition == p]
            for i in range(0, len(mine), 20_000):
                chunk = mine[i : i + 20_000]
                _, manifest = build_segment("b", topic, p, chunk[0].offset, chunk[-1].offset, chunk)
                raw += manifest.raw_bytes
                stored += manifest.stored_bytes
        zstd_s = time.perf_counter() - t0
        results.append(("zstd level 3 segments, in memory", raw / zstd_s / 1e6, "MB/s raw"))

        client = open_clickhouse(settings)
        migrate(client)
        client.close()
        # The three setups interleaved round by round (the machine's load moves within a run):
        # each one's median rate and CPU per event over the rounds, and its best rate.
        setups = (
            ("replay --target projections (Kafka -> fresh tables + exchange)", 0),
            ("  the same, rows built by 1 worker process (--workers 1)", 1),
            ("  the same, rows built by 2 worker processes (--workers 2)", 2),
        )
        rounds: dict[int, list[tuple[float, float]]] = {w: [] for _, w in setups}
        for r in range(args.rounds):
            for label, workers in setups:
                options = ReplayOptions(
                    target="projections",
                    topic=topic,
                    use_archive=False,
                    workers=workers,
                    batch_size=args.batch_size,
                )
                run, cpu = await timed_replay(settings, options)
                rounds[workers].append((run.rate, cpu))
                log(f"round {r + 1}: {label.strip()}: {run.rate:,.0f} ev/s, {cpu:.1f} µs CPU/event")
        rates: dict[int, float] = {}
        for label, workers in setups:
            rate = statistics.median(x for x, _ in rounds[workers])
            cpu = statistics.median(c for _, c in rounds[workers])
            best = max(x for x, _ in rounds[workers])
            rates[workers] = rate
            results.append((label, rate, f"ev/s median (best {best:,.0f}), {cpu:.1f} µs CPU/event"))
        single, pooled = rates[0], max(rates[1], rates[2])
        store = ArchiveStore(settings)
        archive_s = await archive_all(settings, store, topic, ends)
        listing = [await asyncio.to_thread(store.listing, topic, p) for p in sorted(ends)]
        arch_raw = sum(m.raw_bytes for pl in listing for m in pl.manifests)
        arch_stored = sum(m.stored_bytes for pl in listing for m in pl.manifests)
        segments = sum(len(pl.manifests) for pl in listing)
        results.append(("archiver: Kafka -> zstd segments in S3", n / archive_s, "ev/s"))
        results.append(("archiver: raw bytes archived per second", arch_raw / archive_s / 1e6, "MB/s"))
        results.append(("archive compression ratio (raw / stored)", arch_raw / max(arch_stored, 1), "x"))

        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        await admin.start()
        try:
            await admin.delete_records(
                {TopicPartition(topic, p): RecordsToDelete(before_offset=e) for p, e in ends.items()},
                timeout_ms=30_000,
            )
        finally:
            await admin.close()
        archived, archive_read_s = await read_all(settings, topic, store)
        assert len(archived) == n, (len(archived), n)
        results.append(("read the archive, nothing else (S3 + zstd + decode)", n / archive_read_s, "ev/s"))
        options = ReplayOptions(
            target="projections", topic=topic, swap=False, workers=2, batch_size=args.batch_size
        )
        through, through_cpu = await timed_replay(settings, options)
        results.append(
            (
                "replay --target projections --workers 2 through the S3 archive",
                through.rate,
                f"ev/s, {through_cpu:.1f} µs CPU/event",
            )
        )

        print(
            f"\nreplay benchmark: {n:,} events ({len(ends)} partitions), {segments} segments, "
            f"{arch_raw / 1e6:.1f} MB raw -> {arch_stored / 1e6:.1f} MB stored"
        )
        print(f"load average at the start {load0[0]:.1f}, at the end {os.getloadavg()[0]:.1f} (1 min)")
        print(f"{'measurement':<66} {'value':>12}")
        for name, value, unit in results:
            print(f"{name:<66} {value:>12,.1f} {unit}")
        base = results[0][1]
        print(f"\nreplay into projections / plain read of the topic: {single / base:.2f}")
        print(f"replay into projections / rows_of alone:          {single / results[1][1]:.2f}")
        print(f"best replay with workers / replay in one process: {pooled / single:.2f}")
        print(f"best replay with workers / rows_of alone:         {pooled / results[1][1]:.2f}")
        print(f"identical through the archive: {through.identical} (rows and checksums of every table)")
        return 0
    finally:
        await stack.down(settings)
        if not args.keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--port-offset", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=20_000, help="records per replay batch")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three Kafka replays")
    parser.add_argument("--keep-data", action="store_true")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("clickhouse_connect").setLevel(logging.CRITICAL)
    sys.exit(asyncio.run(main(parser.parse_args())))
