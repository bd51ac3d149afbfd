"""What the erasure registry costs the processors per record, without Kafka.

Every processor and replay asks `Erasures.keeps(record)` (streams/privacy/erasures.py) before it
applies a record. Times, on the mixed workload as Kafka records (median of the rounds, CPU time
of this process), per record:

- `decode_event` alone (protobuf parse) — baseline, what every processor pays anyway;
- `filter` with no erasure at all (the common case);
- `filter` with erasures of other tenants only (decided on the tenant header, no decode);
- `filter` when the records' own tenant has an erasure (each record decoded).

    .venv/bin/python benchmarks/erasure_filter.py [--events 100000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from schemas.events import decode_event, encode_event, event_headers, event_key
from streams._consumer import Record
from streams.privacy._erase import erasure_event
from streams.privacy.erasures import Erasures
from streams.replay.workload import mixed_workload


def records(n: int) -> list[Record]:
    events = mixed_workload("bench", max(1, n // 8), seed=1)[:n]
    return [
        Record("conversation-events", 0, i, event_key(e), encode_event(e), 0, tuple(event_headers(e)))
        for i, e in enumerate(events)
    ]


def per_record_us(fn: Callable[[], object], count: int, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    batch = records(args.events)
    n = len(batch)
    conversations = sorted({r.key.decode() for r in batch if r.key})

    none = Erasures()
    others = Erasures()
    for i in range(100):
        others.apply(erasure_event(f"other{i}", f"cust{i}", [f"c{i}-{j}" for j in range(50)], "bench", 0))
    own = Erasures()
    own.apply(erasure_event("bench", "cust", conversations[:10], "bench", 0))

    base = per_record_us(lambda: [decode_event(r.value) for r in batch], n, args.rounds)
    results = {
        "no erasure": per_record_us(lambda: none.filter(batch), n, args.rounds),
        "erasures of 100 other tenants": per_record_us(lambda: others.filter(batch), n, args.rounds),
        "an erasure in the records' own tenant": per_record_us(lambda: own.filter(batch), n, args.rounds),
    }
    print(f"records: {n}, rounds: {args.rounds} (median, CPU time per record)")
    print(f"  decode_event (baseline)                 {base:7.3f} us")
    for name, us in results.items():
        print(f"  filter, {name:<36} {us:7.3f} us  ({us / base:5.2f}x decode)")
    kept = len(own.filter(batch))
    print(f"  (own-tenant erasure kept {kept} of {n} records)")


if __name__ == "__main__":
    main()
