"""The projector's CPU per event, without Kafka: decode + row building (`rows_of`) and the
ClickHouse inserts (`write_batch` into embedded chdb in this process).

Builds the mixed workload (`streams/replay/workload.py`: every event type, zh/en text) in memory
as Kafka records, then times, round by round (median of the rounds, CPU time of this process):

- `decode_event` alone (protobuf parse) — baseline;
- `rows_of` (decode + project), in batches of `--batch`;
- `write_batch` of those rows into fresh tables (chdb, in process);
- both together, as the projector and a replay do per batch;
- both, the next batch's rows built while this batch's insert runs in a thread (what returning
  before the insert ended would buy).

    .venv/bin/python benchmarks/projector_rows.py [--events 100000] [--batch 20000] [--rounds 3]
        [--workload mixed|catchup] [--profile FILE.prof]
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from schemas.events import decode_event, encode_event
from services.analytics import migrate, open_clickhouse
from services.settings import PROJECT_ROOT, Settings
from streams._consumer import Record
from streams.projector import rows_of, write_batch
from streams.replay.workload import mixed_workload


def catchup_records(events: int) -> list[Record]:
    """The shape of ingest.py's pipeline catch-up backlog: a ConversationStarted per
    conversation (one per 24 events), then MessageReceived round-robin."""
    import uuid

    from ingest import Traffic, started_event

    conversations = [str(uuid.uuid4()) for _ in range(max(1, events // 24))]
    traffic = Traffic(conversations)
    made = [started_event(c, i) for i, c in enumerate(conversations)]
    made += [traffic.event() for _ in range(events - len(made))]
    return [
        Record("bench", i % 4, i, e.conversation_id.encode(), encode_event(e), 0) for i, e in enumerate(made)
    ]


def records_of(events: int) -> list[Record]:
    out: list[Record] = []
    seed = 0
    while len(out) < events:
        seed += 1
        for e in mixed_workload(f"bench{seed % 8}", 1000, seed)[: events - len(out)]:
            p = seed % 4
            out.append(Record("bench", p, len(out), e.conversation_id.encode(), encode_event(e), 0))
    return out


def cpu_per_event(fn: Callable[[], object], events: int, rounds: int) -> tuple[float, float]:
    """(median µs CPU per event, median wall ev/s) over `rounds` runs of fn."""
    cpu: list[float] = []
    wall: list[float] = []
    for _ in range(rounds):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append((time.process_time() - c0) / events * 1e6)
        wall.append(events / (time.perf_counter() - w0))
    return statistics.median(cpu), statistics.median(wall)


def main(args: argparse.Namespace) -> int:
    records = catchup_records(args.events) if args.workload == "catchup" else records_of(args.events)
    batches = [records[i : i + args.batch] for i in range(0, len(records), args.batch)]
    data_dir = Path(tempfile.mkdtemp(prefix="bench-rows-", dir=PROJECT_ROOT / "var"))
    results: list[tuple[str, float, float]] = []
    try:
        client = open_clickhouse(Settings(data_dir=data_dir))
        migrate(client)

        def decode_all() -> None:
            for r in records:
                decode_event(r.value)

        def build_all() -> None:
            for b in batches:
                rows_of(b)

        built = [rows_of(b)[0] for b in batches]

        def insert_all() -> None:
            for rows in built:
                write_batch(client, rows)

        def both() -> None:
            for b in batches:
                write_batch(client, rows_of(b)[0])

        inserter = ThreadPoolExecutor(1)

        def overlapped() -> None:
            # What a projector that returned before its insert ended would do: the next batch's
            # rows are built while this batch's insert runs in a thread (the inserts in order).
            pending: Future[int] | None = None
            for b in batches:
                rows = rows_of(b)[0]
                if pending is not None:
                    pending.result()
                pending = inserter.submit(write_batch, client, rows)
            if pending is not None:
                pending.result()

        results.append(
            (
                "decode_event alone (protobuf parse) — baseline",
                *cpu_per_event(decode_all, len(records), args.rounds),
            )
        )
        results.append(("rows_of (decode + project)", *cpu_per_event(build_all, len(records), args.rounds)))
        results.append(
            ("write_batch (chdb inserts, rows built)", *cpu_per_event(insert_all, len(records), args.rounds))
        )
        results.append(
            ("rows_of + write_batch (a projector batch)", *cpu_per_event(both, len(records), args.rounds))
        )
        results.append(
            (
                "the same, next rows built during the insert",
                *cpu_per_event(overlapped, len(records), args.rounds),
            )
        )
        inserter.shutdown()
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            build_all()
            profiler.disable()
            profiler.dump_stats(args.profile)
        client.close()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    print(
        f"\nprojector rows: {len(records):,} events, batches of {args.batch:,}, median of {args.rounds} rounds"
    )
    print(f"{'measurement':<50} {'µs CPU/event':>13} {'ev/s (wall)':>12}")
    for name, us, rate in results:
        print(f"{name:<50} {us:>13.2f} {rate:>12,.0f}")
    base = results[0][1]
    print(f"\nrows_of / decode alone (CPU): {results[1][1] / base:.2f}")
    print(f"projector batch / decode alone (CPU): {results[3][1] / base:.2f}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", default="")
    parser.add_argument(
        "--workload",
        choices=("mixed", "catchup"),
        default="mixed",
        help="mixed: every event type (streams/replay/workload.py); catchup: ingest.py's backlog",
    )
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("clickhouse_connect").setLevel(logging.CRITICAL)
    sys.exit(main(parser.parse_args()))
