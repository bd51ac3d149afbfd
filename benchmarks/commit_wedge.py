"""Commits after a `kill -9` of Kafka: aiokafka as shipped against aiokafka with our wrappers
(services/kafka_clients.py), in the same run.

    .venv/bin/python benchmarks/commit_wedge.py [--rounds 15] [--groups 12] [--burners 2]
        [--port-offset 1400] [--seed 2] [--order shipped,patched]

A Kafka of its own (`var/bench-wedge-*`, 127.0.0.1, ports 21592/21593 + offset), a 4-partition
topic, and --groups BatchConsumers (streams/_consumer.py, the processors' loop: poll, apply,
commit) with trivial processors, one group each, on uvloop as our processes run; --burners busy
processes keep both cores saturated as a loaded deployment does. Per phase, in --order: "shipped"
has aiokafka's `AIOKafkaConnection.send` and `AIOKafkaClient._metadata_update` as shipped (our
wrappers taken out; the stall watchdog's check of the metadata task stays in both), "patched" our
wrappers; each phase has fresh consumers and 20 fresh producers, and --rounds kills of Kafka (1 to
4 s apart; started again as `switchboard run` does). Per round: the time from the kill until every
group has committed after Kafka was started again. Reported per phase: those times (median,
worst), commits that ran into COMMIT_BOUND_S (the consumer is then started again), the consumers'
Kafka clients whose metadata task ended on an error (sampled every 0.2 s), consumer restarts, and
the producers' acks per second.

Progress goes to stderr, the results (markdown) to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PROJECT / "benchmarks"))

from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402
from aiokafka.client import AIOKafkaClient  # noqa: E402
from aiokafka.conn import AIOKafkaConnection  # noqa: E402
from kafka_restart import TOPIC, Load, kafka_pid, own_kafka  # noqa: E402

from services import eventloop, stack  # noqa: E402
from services.settings import Settings  # noqa: E402
from streams import _consumer as sc  # noqa: E402


def _wrapped(patched: Any, name: str) -> Any:
    """The aiokafka function our patch in services/kafka_clients.py wraps."""
    return next(
        c.cell_contents
        for c in (patched.__closure__ or ())
        if callable(c.cell_contents) and getattr(c.cell_contents, "__name__", "") == name
    )


PATCHED = (AIOKafkaConnection.send, AIOKafkaClient._metadata_update)
SHIPPED = (_wrapped(PATCHED[0], "send"), _wrapped(PATCHED[1], "_metadata_update"))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Trivial:
    def __init__(self, name: str) -> None:
        self.name = name
        self.last_commit = time.monotonic()
        self.bounded = 0

    async def on_assigned(self, partitions: set[int], consumer: Any) -> None:
        pass

    async def on_revoked(self, partitions: set[int]) -> None:
        pass

    async def process(self, records: Sequence[Any]) -> list[Any]:
        return []

    async def idle(self, consumer: Any) -> None:
        pass

    async def healthy(self) -> bool:
        return True


_commit = sc.BatchConsumer._commit


async def _timed_commit(self: sc.BatchConsumer, records: Sequence[sc.Record]) -> bool:
    processor: Trivial = self._processor  # type: ignore[assignment]
    committed = await _commit(self, records)
    if committed:
        processor.last_commit = time.monotonic()
    else:
        processor.bounded += 1
    return committed


sc.BatchConsumer._commit = _timed_commit  # type: ignore[method-assign]


async def phase(
    settings: Settings, name: str, args: argparse.Namespace, rng: random.Random
) -> dict[str, Any]:
    send, update = PATCHED if name == "patched" else SHIPPED
    AIOKafkaConnection.send = send  # type: ignore[method-assign]
    AIOKafkaClient._metadata_update = update  # type: ignore[method-assign]
    load = Load(settings.kafka_bootstrap, 20)  # fresh producers: a shipped phase may break some
    processors = [Trivial(f"{name}-{i}") for i in range(args.groups)]
    consumers = [
        sc.BatchConsumer(settings, p, topic=TOPIC, group_id=p.name, batch_size=500, instance_id=p.name + "-0")
        for p in processors
    ]
    for c in consumers:
        await c.start()
    tasks = [asyncio.create_task(c.run()) for c in consumers]
    back: list[float] = []
    ended: dict[int, BaseException] = {}

    async def sample() -> None:
        # A client's metadata task that ended on an error (`close()` cancels it: not counted).
        while True:
            for c in consumers:
                client = c._consumer._client if c._consumer is not None else None
                task = client._sync_task if client is not None else None
                if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
                    if id(client) not in ended:
                        log(f"{name}: a metadata task ended on {task.exception()!r}")
                    ended[id(client)] = task.exception()  # type: ignore[assignment]
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample())
    acks_before = len(load.acks)
    try:
        began = time.monotonic()
        while any(p.last_commit < began for p in processors):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for r in range(args.rounds):
            await asyncio.sleep(rng.uniform(1, 4))
            killed = time.monotonic()
            os.kill(kafka_pid(settings), signal.SIGKILL)
            await asyncio.sleep(rng.uniform(0, 0.25))
            while "kafka" not in stack.gone(settings):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            restarted = time.monotonic()
            await stack.start_component(settings, "kafka")
            while any(p.last_commit < restarted for p in processors):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            back.append(max(p.last_commit for p in processors) - killed)
            log(f"{name} round {r + 1}: every group committing again {back[-1]:.2f} s after the kill")
        return {
            "name": name,
            "acks": (len(load.acks) - acks_before) / (time.monotonic() - began),
            "median": statistics.median(back),
            "worst": max(back),
            "bounded": sum(p.bounded for p in processors),
            "dead": len(ended),
            "restarts": sum(c.stats.restarts for c in consumers),
            "back": back,
        }
    finally:
        sampler.cancel()
        for c in consumers:
            await c.stop()
        await asyncio.wait(tasks, timeout=30)
        for c in consumers:
            await c.close()
        await load.stop()


async def main(args: argparse.Namespace) -> int:
    data_dir, settings = own_kafka("bench-wedge-", args.port_offset)
    rng = random.Random(args.seed)
    burners: list[subprocess.Popen[bytes]] = []
    try:
        await stack.install(settings)
        await stack.start_component(settings, "kafka")
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(TOPIC, 4, 1)])
        finally:
            await admin.close()
        burn = [sys.executable, "-c", "while True: pass"]
        burners = [subprocess.Popen(burn) for _ in range(args.burners)]  # noqa: ASYNC220
        results = [await phase(settings, name, args, rng) for name in args.order.split(",")]
    finally:
        for b in burners:
            b.kill()
        await stack.stop_component(settings, "kafka")
        shutil.rmtree(data_dir, ignore_errors=True)
    print(
        f"kill -9 of Kafka, {args.rounds} rounds per phase, {args.groups} consumer groups, "
        f"{args.burners} busy processes, COMMIT_BOUND_S {sc.COMMIT_BOUND_S:.0f} s; "
        f"load average {os.getloadavg()[0]:.1f} at the end\n"
    )
    print(
        "| aiokafka | kill → every group committing again, median | worst | commits past COMMIT_BOUND_S "
        "| consumers' clients whose metadata task ended | consumer restarts | producer acks/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        cells = [
            r["name"],
            f"{r['median']:.2f} s",
            f"{r['worst']:.2f} s",
            r["bounded"],
            r["dead"],
            r["restarts"],
            f"{r['acks']:.0f}",
        ]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--groups", type=int, default=12)
    parser.add_argument("--burners", type=int, default=2)
    parser.add_argument("--port-offset", type=int, default=1400)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--order", default="shipped,patched", help="the phases, in order")
    return parser.parse_args(argv)


if __name__ == "__main__":
    eventloop.install()
    sys.exit(asyncio.run(main(parse())))
