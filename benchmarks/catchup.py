"""One consumer's catch-up alone, on a fresh stack per run, variants alternated.

`ingest.py`'s phase 2 measures the sessions worker and the analytics projector one after the
other inside a long run; this measures one of them over and over, each run on its own stack, so a
setting can be compared with another in the same session (alternated, so a slower minute of a
shared VM hits both):

    .venv/bin/python benchmarks/catchup.py --consumer sessions \\
        --variant SWITCHBOARD_BATCH_SIZE=500 --variant SWITCHBOARD_BATCH_SIZE=2000 --rounds 2

The backlog is `ingest.py`'s (ConversationStarted for each conversation, then messages round-robin,
produced straight to Kafka); progress is read from what the consumer applied (live-stream entries
in Redis, rows in ClickHouse), not from committed offsets.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ingest import (
    Applied,
    BenchSystem,
    CatchUp,
    CpuMeter,
    LogWatch,
    Traffic,
    catch_up_one,
    make_plan,
    produce_backlog,
)

from services.processes import switchboard_children

GROUPS = {"sessions": "switchboard-sessions", "analytics": "switchboard-projector"}


def parse_variant(text: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in text.split():
        key, sep, value = pair.partition("=")
        if not sep or not key.startswith("SWITCHBOARD_"):
            raise argparse.ArgumentTypeError(f"a variant is SWITCHBOARD_NAME=value pairs, got {pair!r}")
        env[key] = value
    return env


async def one_run(
    consumer: str, variant: dict[str, str], backlog: int, conversations: int, port_offset: int
) -> CatchUp:
    system = BenchSystem(False, port_offset)
    plan = make_plan(True, None)
    watch = None
    try:
        await system.up()
        system.children = switchboard_children(system.settings, {**system.env, **variant})
        meter = CpuMeter(system)
        await meter.refresh()
        watch = LogWatch(system.settings)
        await watch.start()
        convs = [str(uuid.uuid4()) for _ in range(conversations)]
        made, _ = await produce_backlog(system.settings, convs, backlog, Traffic(convs))
        applied = Applied(watch, convs, 0, 0)
        await meter.refresh()
        return await catch_up_one(system, meter, applied, consumer, GROUPS[consumer], made, plan)
    finally:
        if watch is not None:
            await watch.stop()
        await system.down()


def row(label: str, r: CatchUp) -> str:
    def num(value: float | None, spec: str = ",.0f") -> str:
        return "–" if value is None else format(value, spec)

    return (
        f"| {label} | {num(r.steady_rate)} | {num(r.wall_rate)} | {num(r.cpu_us_per_event, '.1f')} "
        f"| {r.cpu.get(r.name, 0.0):.2f} | {r.cpu.get('redis', 0.0):.2f} | {r.how_done} |"
    )


async def main_async(args: argparse.Namespace) -> int:
    variants: list[dict[str, str]] = args.variant or [{}]
    lines = [
        f"{args.consumer} catch-up alone: {args.backlog:,} events over {args.conversations:,} conversations,"
        " a fresh stack per run, variants alternated",
        "",
        "| variant | steady ev/s | wall ev/s (start-up incl.) | CPU µs/event | its cores | Redis cores | how |",
        "|---|---|---|---|---|---|---|",
    ]
    failed = False
    for round_no in range(args.rounds):
        for variant in variants:
            label = " ".join(f"{k}={v}" for k, v in variant.items()) or "defaults"
            r = await one_run(args.consumer, variant, args.backlog, args.conversations, args.port_offset)
            failed = failed or r.how_done != "all applied"
            lines.append(row(f"{label} (round {round_no + 1})", r))
            print(lines[-1], flush=True)
    print("\n".join(lines))
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--consumer", choices=sorted(GROUPS), default="sessions")
    parser.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        help="SWITCHBOARD_* settings for the consumer's process, space-separated; repeat to compare",
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--conversations", type=int, default=2_500)
    parser.add_argument("--port-offset", type=int, default=1000)
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
