"""CPU burnt by aiokafka consumers while the broker is down, with and without the back-off
between failed metadata updates (services/kafka_clients.py).

    .venv/bin/python benchmarks/kafka_outage.py [--seconds 10] [--stop term|kill] [--each 1]
        [--metadata-max-age-ms 100] [--port-offset 0] [--keep-data]

The spin needs a client whose metadata says its partitions have no leader (-1) when the broker
stops answering: a broker in controlled shutdown (SIGTERM) answers metadata requests that way
for ~80 ms before it closes its port (measured), and a client that refreshes then keeps -1 (every
later update fails). From then on aiokafka's fetcher (`invalid_metadata`) and producer sender
(`unknown_leaders_exist`) ask for a metadata update, get the failure at once and ask again. In
the test stack a commit or produce answered with NotCoordinator/NotLeader in that window makes
the client refresh; here the children refresh every --metadata-max-age-ms (100 ms) so that they
catch it most of the time. The "leader -1" column says which did.

Brings up a Kafka of its own (the local stack's Kafka only, fresh `var/bench-outage-*` data
directory, 127.0.0.1 only, ports 1xxxx + --port-offset: below the ephemeral port range) with a
busy topic and an idle one of 4 partitions each, and starts consumer processes, each a started
AIOKafkaConsumer calling getmany() in a loop: "group", a member of a group of its own on the busy
topic, committing after every batch (as streams/_consumer.py's BatchConsumer), and "follower",
no group, assigned the idle topic, 100 ms fetch waits (as streams/privacy/erasures.py's
ErasureFollower, which every worker and the ingress run); each as "plain" (aiokafka as shipped:
that child does not import services.kafka_clients) and "back-off" (after importing it), --each of
every kind, all on the loop our processes use (services/eventloop.py).

Each child's CPU time (user + system, psutil) is measured over --seconds with the broker up and
about 500 records/s flowing, then over --seconds after the broker is stopped; aiokafka's "Unable
connect to node" records are counted in each child (a handler that counts and writes nothing, so
no logging I/O is measured). Then the broker is started again, a marker record is produced to
every partition of both topics, and the time from the broker's return until each child has read
them all is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
PROJECT = BENCH_DIR.parent
TOPIC = "bench-outage"
IDLE_TOPIC = "bench-outage-idle"
PARTITIONS = 4
MARKER = b"marker"

PORTS = {
    "KAFKA_CONTROLLER_PORT": 19293,
    "S3_MASTER_PORT": 19533,
    "S3_MASTER_GRPC_PORT": 19543,
    "S3_VOLUME_PORT": 18280,
    "S3_VOLUME_GRPC_PORT": 18290,
    "S3_FILER_PORT": 19088,
    "S3_FILER_GRPC_PORT": 19098,
    "S3_GRPC_PORT": 18543,
    "S3_ADMIN_PORT": 18534,
    "S3_ADMIN_GRPC_PORT": 18544,
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- the child: one consumer, commands on stdin, answers on stdout ---------------------------


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.refused = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Unable connect to node"):
            self.refused += 1


async def child(bootstrap: str, back_off: bool, follower: bool, metadata_max_age_ms: int) -> None:
    if back_off:
        import services.kafka_clients  # noqa: F401  (the patch under test)
    from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

    assigned = asyncio.Event()

    class Assigned(ConsumerRebalanceListener):
        async def on_partitions_revoked(self, revoked: Any) -> None:
            assigned.clear()

        async def on_partitions_assigned(self, partitions: Any) -> None:
            if len(partitions) == PARTITIONS:
                assigned.set()

    counter = _Count()
    aiokafka_log = logging.getLogger("aiokafka")
    aiokafka_log.addHandler(counter)
    aiokafka_log.propagate = False
    aiokafka_log.setLevel(logging.INFO)

    if follower:
        # As streams/privacy/erasures.py follows its (idle) topic: no group, short fetch waits.
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=100,
            metadata_max_age_ms=metadata_max_age_ms,
        )
        await consumer.start()
        consumer.assign([TopicPartition(IDLE_TOPIC, p) for p in range(PARTITIONS)])
        assigned.set()
    else:
        # As streams/_consumer.py's BatchConsumer: a group member of the busy topic.
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=f"bench-outage-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="latest",
            enable_auto_commit=False,
            metadata_max_age_ms=metadata_max_age_ms,
        )
        consumer.subscribe([TOPIC], listener=Assigned())
        await consumer.start()
    received = markers = 0

    async def consume() -> None:
        nonlocal received, markers
        while True:
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                received += len(records)
                markers += sum(1 for r in records if r.value == MARKER)
            if batches and not follower:
                # BatchConsumer commits after every batch: a commit answered during the broker's
                # controlled shutdown (NotCoordinator) sends the client looking for the
                # coordinator, and the metadata it gets meanwhile says the partitions have no
                # leader (-1); it keeps that until the broker is back.
                with contextlib.suppress(Exception):
                    await consumer.commit()

    task = asyncio.create_task(consume())
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )

    def answer(**fields: Any) -> None:
        print(json.dumps(fields), flush=True)

    try:
        while line := (await reader.readline()).decode().strip():
            if line == "ready?":
                # Ready once the group has given this consumer the topic's partitions and their
                # positions are known (so records produced later are read, not skipped).
                await assigned.wait()
                for tp in consumer.assignment():
                    await consumer.position(tp)
                answer(ready=True)
            elif line == "stats":
                answer(
                    refused=counter.refused,
                    received=received,
                    markers=markers,
                    # -1: the metadata says the partition has no leader.
                    leaderless=sum(
                        1
                        for tp in consumer.assignment()
                        if consumer._client.cluster.leader_for_partition(tp) == -1
                    ),
                )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await consumer.stop()


# ---- the parent ------------------------------------------------------------------------------


class Child:
    def __init__(
        self, name: str, bootstrap: str, back_off: bool, follower: bool, metadata_max_age_ms: int
    ) -> None:
        self.name = name
        flags = [*(["--back-off"] if back_off else []), *(["--follower"] if follower else [])]
        flags += ["--metadata-max-age-ms", str(metadata_max_age_ms)]
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", bootstrap, *flags],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=PROJECT,
        )

    async def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = await asyncio.to_thread(self.proc.stdout.readline)
        if not line:
            raise RuntimeError(f"child {self.name} ended (exit {self.proc.wait()})")
        return dict(json.loads(line))

    def cpu_s(self) -> float:
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return float(t.user + t.system)

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def produce_forever(bootstrap: str) -> None:
    """About 500 small records a second to the topic until cancelled (or the broker is gone)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5)
    await producer.start()
    try:
        while True:
            await asyncio.gather(*[await producer.send(TOPIC, b"x" * 100) for _ in range(50)])
            await asyncio.sleep(0.1)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.stop(), 5)


async def window(children: list[Child], seconds: float) -> dict[str, tuple[float, int, int]]:
    """CPU seconds, refused connects and partitions without a known leader (at the end) per
    child over `seconds`."""
    cpu0 = {c.name: c.cpu_s() for c in children}
    stats0 = {c.name: await c.ask("stats") for c in children}
    await asyncio.sleep(seconds)
    stats1 = {c.name: await c.ask("stats") for c in children}
    return {
        c.name: (
            c.cpu_s() - cpu0[c.name],
            stats1[c.name]["refused"] - stats0[c.name]["refused"],
            stats1[c.name]["leaderless"],
        )
        for c in children
    }


async def main(args: argparse.Namespace) -> int:
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from services import stack
    from services.settings import PROJECT_ROOT, Settings

    data_dir = Path(tempfile.mkdtemp(prefix="bench-outage-", dir=PROJECT_ROOT / "var"))
    for libs in (PROJECT_ROOT / "var" / "kafka").glob("libs-*"):
        (data_dir / "kafka").mkdir(parents=True, exist_ok=True)
        (data_dir / "kafka" / libs.name).symlink_to(libs, target_is_directory=True)
    offset = args.port_offset
    fields: dict[str, object] = {
        "data_dir": data_dir,
        "kafka_bootstrap": f"127.0.0.1:{19292 + offset}",
        "redis_url": f"redis://127.0.0.1:{16679 + offset}/0",
        "s3_endpoint": f"127.0.0.1:{18633 + offset}",
        "analytics_listen": f"127.0.0.1:{18323 + offset}",
        "grpc_listen": f"127.0.0.1:{15251 + offset}",
    }
    fields.update({name.lower(): port + offset for name, port in PORTS.items()})
    settings = Settings(**fields)  # type: ignore[arg-type]
    bootstrap = settings.kafka_bootstrap
    children: list[Child] = []
    load0 = os.getloadavg()
    try:
        await stack.install(settings)
        await stack.start_component(settings, "kafka")
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic(t, num_partitions=PARTITIONS, replication_factor=1) for t in (TOPIC, IDLE_TOPIC)]
            )
        finally:
            await admin.close()
        children = [
            Child(
                f"{kind}, {patch}{f' {i}' if i else ''}",
                bootstrap,
                patch == "back-off",
                kind == "follower",
                args.metadata_max_age_ms,
            )
            for kind in ("group", "follower")
            for patch in ("plain", "back-off")
            for i in range(args.each)
        ]
        for c in children:
            await c.ask("ready?")
        log("every consumer has its partitions")

        # Records flow (and are committed) while the broker goes down, as in test_durability.py.
        load = asyncio.create_task(produce_forever(bootstrap))
        up = await window(children, args.seconds)
        log(f"broker up for {args.seconds:.0f} s, records flowing: {up}")
        await stack.stop_component(settings, "kafka", kill=args.stop == "kill")
        t_down = time.monotonic()
        load.cancel()
        with contextlib.suppress(BaseException):
            await load
        down = await window(children, args.seconds)
        log(f"broker down for {args.seconds:.0f} s: {down}")

        await stack.start_component(settings, "kafka")
        t_up = time.monotonic()
        log(f"broker back after {t_up - t_down:.1f} s down")
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for topic in (TOPIC, IDLE_TOPIC):
                for p in range(PARTITIONS):
                    await producer.send_and_wait(topic, MARKER, partition=p)
        finally:
            await producer.stop()
        t_sent = time.monotonic()
        recovered: dict[str, float] = {}
        while len(recovered) < len(children) and time.monotonic() - t_sent < 120:
            for c in children:
                if c.name not in recovered and (await c.ask("stats"))["markers"] >= PARTITIONS:
                    recovered[c.name] = time.monotonic() - t_up
            await asyncio.sleep(0.05)

        print(
            f"\n## aiokafka consumer, broker stopped ({args.stop}) for {args.seconds:.0f} s ({time.strftime('%Y-%m-%d')})\n"
        )
        print(
            "| consumer | CPU s, broker up (records flowing) | CPU s, broker down | refused connects, down"
            " | partitions with leader -1, down | read after restart |"
        )
        print("|---|---|---|---|---|---|")
        for c in children:
            back = f"{recovered[c.name]:.1f} s" if c.name in recovered else "not in 120 s"
            print(
                f"| {c.name} | {up[c.name][0]:.2f} | {down[c.name][0]:.2f} | {down[c.name][1]:,}"
                f" | {down[c.name][2]} | {back} |"
            )
        print()
        for kind in ("group", "follower"):
            plain, fixed = down[f"{kind}, plain"][0], down[f"{kind}, back-off"][0]
            print(f"{kind}: CPU while the broker is down, back-off / plain: {fixed / max(plain, 0.01):.3f}")
        print(f"load average at start {load0[0]:.1f}, at end {os.getloadavg()[0]:.1f} (1 min)")
        return 0
    finally:
        for c in children:
            c.stop()
        await stack.down(settings)
        if not args.keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--port-offset", type=int, default=0)
    parser.add_argument(
        "--stop", choices=("term", "kill"), default="term", help="SIGTERM the broker, or kill -9 it"
    )
    parser.add_argument(
        "--metadata-max-age-ms",
        type=int,
        default=100,
        help="the children's metadata refresh interval (aiokafka's default is 300000)",
    )
    parser.add_argument("--each", type=int, default=1, help="processes of each kind (the race is rare)")
    parser.add_argument("--keep-data", action="store_true")
    parser.add_argument("--child", metavar="BOOTSTRAP", help=argparse.SUPPRESS)
    parser.add_argument("--back-off", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--follower", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(PROJECT))
    if args.child:
        from services import eventloop

        # The loop our processes run on (uvloop unless SWITCHBOARD_EVENT_LOOP=asyncio).
        eventloop.install()
        asyncio.run(child(args.child, args.back_off, args.follower, args.metadata_max_age_ms))
        sys.exit(0)
    logging.basicConfig(level=logging.WARNING)
    sys.exit(asyncio.run(main(args)))
