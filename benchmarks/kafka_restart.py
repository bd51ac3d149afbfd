"""How long writes wait after a `kill -9` of the embedded Kafka: from the kill until the first
write is acknowledged again, "before" and "after" the fast-restart changes, in the same run.

    .venv/bin/python benchmarks/kafka_restart.py [--rounds 5] [--producers 20] [--warm-s 10]
        [--port-offset 0] [--seed 1] [--keep-data]

"after" is the stack as shipped: Kafka started with its class-data archive (made by `stack
install`, services/stack/_cds.py) and C1 only (-XX:TieredStopAtLevel=1), a 1.5 s broker session
on a single node, and `switchboard run` looking at its servers every 0.25 s (services/runner.py
CHECK_S). "before" is the stack as it was: no archive (SWITCHBOARD_KAFKA_CDS=false), tiered C2,
broker.session.timeout.ms=4000 and broker.heartbeat.interval.ms=500 (appended to the rendered
server.properties: the last value of a key wins), and a look every 1 s.

Brings up a Kafka of its own (Kafka only, fresh `var/bench-restart-*` data directory, 127.0.0.1,
ports 21592/21593 + --port-offset), a 4-partition topic, and --producers idempotent producers
configured as the ingress's (acks=all, retry_backoff_ms=100, metadata_max_age_ms=60000), each
writing one ~600-byte record at a time (a new producer after a fatal producer error, as the
ingress does). Each round takes one configuration: Kafka is killed and started with it
(unmeasured, so the killed broker ran with it too), runs --warm-s under load, then is killed
with SIGKILL; after the runner's detection delay (uniform in [0, look interval), seeded) it is
started again as `switchboard run` does (`stack.start_component`). Rounds alternate
before/after. Reported per round and as medians: the detection delay, the broker's phases
from its log (first log line, controller active, broker registered, unfenced; seconds after
the kill) and kill -> first ack (the first acknowledgement of any write after the new
process was spawned).

Progress goes to stderr, the results (markdown) to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import logging
import os
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from aiokafka import AIOKafkaProducer  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402
from aiokafka.errors import KafkaError  # noqa: E402

from services import stack  # noqa: E402
from services.kafka_clients import FATAL_PRODUCER_ERRORS  # noqa: E402
from services.runner import CHECK_S  # noqa: E402
from services.settings import Settings, load_settings  # noqa: E402
from services.stack._components import Kafka  # noqa: E402
from services.stack._layout import Layout  # noqa: E402
from services.stack._process import read_pid  # noqa: E402

TOPIC = "bench-restart"
PARTITIONS = 4
BEFORE_PROPERTIES = "broker.session.timeout.ms=4000\nbroker.heartbeat.interval.ms=500\n"
BEFORE_CHECK_S = 1.0  # services/runner.py CHECK_S before
PHASES = {
    "first log": re.compile(r"^\["),
    "controller active": re.compile(r"Becoming the active controller"),
    "registered": re.compile(r"Successfully registered broker"),
    "unfenced": re.compile(r"The broker has been unfenced"),
}
_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\]")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Config:
    name: str
    cds: bool
    extra_properties: str
    check_s: float
    drop_flags: tuple[str, ...] = ()


BEFORE = Config(
    "before",
    cds=False,
    extra_properties=BEFORE_PROPERTIES,
    check_s=BEFORE_CHECK_S,
    drop_flags=("-XX:TieredStopAtLevel=1",),
)
AFTER = Config("after", cds=True, extra_properties="", check_s=CHECK_S)


@dataclass
class Round:
    config: str
    detect_s: float
    first_ack_s: float
    phases: dict[str, float] = field(default_factory=dict)


# The "before" server.properties: the shipped one with the old values appended (last one wins),
# and the JVM without the C1-only flag.
_properties = Kafka.properties
_jvm = Kafka._jvm
_current: list[Config] = [AFTER]


def _properties_of_config(self: Kafka, log_dir: Path, port: int, controller_port: int) -> str:
    return _properties(self, log_dir, port, controller_port) + _current[0].extra_properties


def _jvm_of_config(self: Kafka, *, archive: bool = True) -> list[str]:
    flags = _jvm(self, archive=archive)
    return [f for f in flags if f not in _current[0].drop_flags]


Kafka.properties = _properties_of_config  # type: ignore[method-assign]
Kafka._jvm = _jvm_of_config  # type: ignore[method-assign]


def settings_for(base: Settings, config: Config) -> Settings:
    return base.model_copy(update={"kafka_cds": config.cds})


def phases_since(log_path: Path, offset: int, kill_wall: float) -> dict[str, float]:
    """Seconds from the kill to each phase's first line in the broker's log after `offset`."""
    found: dict[str, float] = {}
    text = log_path.read_bytes()[offset:].decode(errors="replace")
    for line in text.splitlines():
        stamp = _STAMP.match(line)
        if stamp is None:
            continue
        wall = time.mktime(time.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S")) + int(stamp.group(2)) / 1000
        for name, pattern in PHASES.items():
            if name not in found and pattern.search(line):
                found[name] = round(wall - kill_wall, 2)
    return found


class Load:
    """Producers writing one record at a time; the monotonic time of every acknowledgement."""

    def __init__(self, bootstrap: str, producers: int) -> None:
        self.bootstrap = bootstrap
        self.acks: list[float] = []
        self.stopping = asyncio.Event()
        self.tasks = [asyncio.create_task(self._one(i)) for i in range(producers)]

    def first_ack_after(self, t: float) -> float | None:
        i = bisect.bisect_right(self.acks, t)  # appended in time order
        return self.acks[i] if i < len(self.acks) else None

    async def _one(self, i: int) -> None:
        producer: AIOKafkaProducer | None = None
        value = os.urandom(300).hex().encode()  # ~600 bytes, as a small event
        while not self.stopping.is_set():
            if producer is None:
                producer = AIOKafkaProducer(
                    bootstrap_servers=self.bootstrap,
                    enable_idempotence=True,
                    acks="all",
                    request_timeout_ms=30_000,
                    retry_backoff_ms=100,
                    metadata_max_age_ms=60_000,
                )
                try:
                    await asyncio.wait_for(producer.start(), 10)
                except (KafkaError, OSError, TimeoutError):
                    await _close(producer)
                    producer = None
                    await asyncio.sleep(0.5)
                    continue
            try:
                await asyncio.wait_for(producer.send_and_wait(TOPIC, value, key=str(i).encode()), 10)
                self.acks.append(time.monotonic())
                await asyncio.sleep(0.02)
            except FATAL_PRODUCER_ERRORS:
                await _close(producer)
                producer = None
            except (KafkaError, OSError, TimeoutError):
                await asyncio.sleep(0.05)
        if producer is not None:
            await _close(producer)

    async def stop(self) -> None:
        self.stopping.set()
        await asyncio.wait(self.tasks, timeout=30)


async def _close(producer: AIOKafkaProducer) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(producer.stop(), 5)


def kafka_pid(settings: Settings) -> int:
    found = read_pid(Layout.of(settings).pid_path("kafka"))
    assert found is not None, "Kafka has no pid file"
    return found[0]


async def kill_and_start(settings: Settings) -> None:
    os.kill(kafka_pid(settings), signal.SIGKILL)
    while "kafka" not in stack.gone(settings):  # noqa: ASYNC110  (a process, polled as the runner does)
        await asyncio.sleep(0.02)
    await stack.start_component(settings, "kafka")


async def one_round(base: Settings, config: Config, load: Load, warm_s: float, rng: random.Random) -> Round:
    _current[0] = config
    settings = settings_for(base, config)
    await kill_and_start(settings)  # the broker that is killed below ran with this configuration
    await asyncio.sleep(warm_s)
    log_path = Layout.of(settings).log_path("kafka")
    offset = log_path.stat().st_size
    pid = kafka_pid(settings)
    kill_wall, t0 = time.time(), time.monotonic()
    os.kill(pid, signal.SIGKILL)
    # switchboard run looks every check_s, at a moment unrelated to the kill.
    await asyncio.sleep(rng.uniform(0, config.check_s))
    while "kafka" not in stack.gone(settings):  # noqa: ASYNC110  (a process, polled as the runner does)
        await asyncio.sleep(0.01)
    spawned = time.monotonic()
    await stack.start_component(settings, "kafka")
    while (ack := load.first_ack_after(spawned)) is None:  # noqa: ASYNC110  (ack times are kept anyway)
        await asyncio.sleep(0.01)
    return Round(
        config.name,
        detect_s=round(spawned - t0, 2),
        first_ack_s=round(ack - t0, 2),
        phases=phases_since(log_path, offset, kill_wall),
    )


def median(values: list[float]) -> float:
    return round(statistics.median(values), 2) if values else float("nan")


def report(rounds: list[Round], archive_note: str, args: argparse.Namespace) -> str:
    lines = [
        f"kill -9 of Kafka under load ({args.producers} producers, {args.warm_s:.0f} s between kills), "
        f"{args.rounds} rounds each, interleaved; load average {os.getloadavg()[0]:.1f} at the end",
        f"class-data archive: {archive_note}",
        "",
        "| round | config | detected | first log | controller active | registered | unfenced | kill → first ack |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rounds, 1):
        cells = [f"{r.phases.get(p, float('nan')):.2f}" for p in PHASES]
        lines.append(
            f"| {i} | {r.config} | {r.detect_s:.2f} | {' | '.join(cells)} | **{r.first_ack_s:.2f}** |"
        )
    lines += [
        "",
        "| config | median detected | median unfenced | median kill → first ack (min–max) |",
        "|---|---|---|---|",
    ]
    medians = {}
    for name in (BEFORE.name, AFTER.name):
        mine = [r for r in rounds if r.config == name]
        acks = [r.first_ack_s for r in mine]
        medians[name] = median(acks)
        unfenced = median([r.phases["unfenced"] for r in mine if "unfenced" in r.phases])
        lines.append(
            f"| {name} | {median([r.detect_s for r in mine]):.2f} s | {unfenced:.2f} s | "
            f"**{medians[name]:.2f} s** ({min(acks):.2f}–{max(acks):.2f}) |"
        )
    ratio = medians[AFTER.name] / medians[BEFORE.name]
    lines += [
        "",
        f"after / before (medians): {ratio:.2f} ({(1 - ratio) * 100:.0f}% less time from kill to first ack)",
    ]
    return "\n".join(lines)


def own_kafka(prefix: str, port_offset: int) -> tuple[Path, Settings]:
    """A fresh data directory under var/ and the settings of a Kafka of its own in it (127.0.0.1,
    ports 21592/21593 + port_offset)."""
    data_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=PROJECT / "var"))
    settings = load_settings(
        data_dir=data_dir,
        kafka_bootstrap=f"127.0.0.1:{21592 + port_offset}",
        kafka_controller_port=21593 + port_offset,
    )
    return data_dir, settings


async def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.ERROR)  # aiokafka's connection errors while Kafka is down
    data_dir, base = own_kafka("bench-restart-", args.port_offset)
    rng = random.Random(args.seed)
    load: Load | None = None
    rounds: list[Round] = []
    try:
        began = time.monotonic()
        await stack.install(base)  # makes the class-data archive
        archive = Layout.of(base).kafka_cds_archive(base.kafka_version)
        archive_note = (
            f"{archive.stat().st_size / 2**20:.0f} MiB, install took {time.monotonic() - began:.1f} s with it"
            if archive.exists()
            else "none (could not be made: see the install log)"
        )
        log(f"installed; {archive_note}")
        _current[0] = AFTER
        await stack.start_component(settings_for(base, AFTER), "kafka")
        admin = AIOKafkaAdminClient(bootstrap_servers=base.kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(TOPIC, PARTITIONS, 1)])
        finally:
            await admin.close()
        load = Load(base.kafka_bootstrap, args.producers)
        for i in range(args.rounds * 2):
            config = (BEFORE, AFTER)[i % 2]
            r = await one_round(base, config, load, args.warm_s, rng)
            rounds.append(r)
            log(f"round {i + 1}: {r}")
        print(report(rounds, archive_note, args))
        return 0
    finally:
        if load is not None:
            await load.stop()
        await stack.stop_component(base, "kafka")
        if not args.keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="kills per configuration")
    parser.add_argument("--producers", type=int, default=20)
    parser.add_argument("--warm-s", type=float, default=10.0, help="load between a start and the kill")
    parser.add_argument("--port-offset", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep-data", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
