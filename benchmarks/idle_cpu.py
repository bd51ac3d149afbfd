"""CPU used by an idle Switchboard stack, per process: what a running system costs the machine
when no one writes (and what every test stack costs the test suite beside it).

    .venv/bin/python benchmarks/idle_cpu.py [--settle-s 15] [--seconds 30] [--port-offset 0]
        [--keep-data]

Brings up its own stack (Kafka, Redis, SeaweedFS) and every Switchboard process (analytics,
sessions, assistant, archiver, ingress with its default process count) on the ports of
benchmarks/ingest.py moved by --port-offset, in a fresh `var/bench-*` directory, removed at the
end. Once the ingress and the analytics endpoint answer it waits --settle-s (start-up work ends),
then reports each process's CPU over --seconds in cores (1.0 = one core busy), and "others": the
rest of the machine meanwhile (noise from whatever else ran). Progress to stderr, the table
(markdown) to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PROJECT / "benchmarks"))

from ingest import BenchSystem, CpuMeter, log  # noqa: E402

from services.processes import switchboard_children, wait_for_analytics, wait_for_ingress  # noqa: E402


async def measure(system: BenchSystem, settle_s: float, seconds: float) -> str:
    await system.up()
    for child in system.children.values():
        child.start()
    await wait_for_analytics(system.settings, system.children["analytics"])
    await wait_for_ingress(system.settings, system.children["ingress"])
    # The echo server is ingest.py's baseline, not part of a stack.
    if system.echo is not None:
        system.echo.terminate()
        await asyncio.to_thread(system.echo.wait, 10)
        system.echo = None
    log(f"serving; settling {settle_s:.0f}s, then measuring {seconds:.0f}s")
    await asyncio.sleep(settle_s)
    meter = CpuMeter(system)
    await meter.refresh()
    start = meter.snapshot()
    await asyncio.sleep(seconds)
    cores = CpuMeter.cores(start, meter.snapshot())
    cores.pop("bench", None)
    others = cores.pop("others", 0.0)
    rows = sorted(cores.items(), key=lambda item: -item[1])
    lines = ["| process | cores |", "|---|---|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in rows]
    lines += [
        f"| **stack total** | **{sum(cores.values()):.3f}** |",
        f"| others (not this stack) | {others:.3f} |",
    ]
    return "\n".join(lines)


async def main_async(settle_s: float, seconds: float, port_offset: int, keep_data: bool) -> int:
    system = BenchSystem(keep_data, port_offset)
    # The models `make install` built (a fresh data dir would build its own, minutes of CPU).
    system.env["SWITCHBOARD_MODELS_DIR"] = str(PROJECT / "var" / "models")
    system.children = switchboard_children(system.settings, system.env)
    try:
        print(await measure(system, settle_s, seconds))
    finally:
        await system.down()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--settle-s", type=float, default=15.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--port-offset", type=int, default=0)
    parser.add_argument("--keep-data", action="store_true")
    args = parser.parse_args(argv)
    return asyncio.run(main_async(args.settle_s, args.seconds, args.port_offset, args.keep_data))


if __name__ == "__main__":
    sys.exit(main())
