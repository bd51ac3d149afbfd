"""Real servers for integration and soak tests: a local stack on test ports, plus Switchboard's processes.

The stack (Kafka, Redis, SeaweedFS) and the processes start once per session in their own data
directory, on ports that do not clash with a `make run` stack; each test gets a fresh tenant id
as its namespace.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import clickhouse_connect
import grpc
import pytest
import redis.asyncio as aioredis
from switchboard.v1 import agent_pb2_grpc, chat_pb2, chat_pb2_grpc

from services import stack
from services.eventloop import DUMP_MARK, DUMP_SIGNAL, loop_name
from services.kafka_topics import ensure_topics
from services.observability.metrics import metrics_listen
from services.processes import Child, switchboard_children, wait_for_analytics, wait_for_ingress
from services.settings import PROJECT_ROOT, Settings

T = TypeVar("T")

# Another checkout's suite (or a helper's) can run beside this one with its own ports:
# SWITCHBOARD_TEST_PORT_OFFSET=100 moves every port below up by 100.
# Each pytest-xdist worker (`make test` runs two) has a stack of its own, 50 ports further on per
# worker; set here, before any test module reads the variable for the ports of its own servers.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER.startswith("gw"):
    os.environ["SWITCHBOARD_TEST_PORT_OFFSET"] = str(
        int(os.environ.get("SWITCHBOARD_TEST_PORT_OFFSET", "0")) + 50 * int(_WORKER[2:])
    )
_PORT_OFFSET = int(os.environ.get("SWITCHBOARD_TEST_PORT_OFFSET", "0"))


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    """The tests' coroutines run on the event loop the services run on (services/eventloop.py):
    uvloop unless SWITCHBOARD_EVENT_LOOP=asyncio. The two differ where it matters: uvloop's
    `call_at` hands back a plain Handle, without `when()`, for a delay under 0.5 ms, which the
    stdlib loop never does, and a settle failed on it in the ingress only (aee21d0)."""
    if loop_name() == "uvloop":
        import uvloop

        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


def _shift(value: str) -> str:
    return re.sub(r"(?<=:)(\d{4,5})(?=/|$)", lambda m: str(int(m.group(1)) + _PORT_OFFSET), value)


# Kafka's jars and class-data archive, installed once (by `make test`, or the first stack's install)
# and shared by every stack the tests start, as var/models is; each fresh data directory made them
# again, ~18 s of Maven and a JVM each, more beside the other test worker.
SHARED_KAFKA_INSTALL = PROJECT_ROOT / "var" / "kafka"

_BASE_ENV = {
    "SWITCHBOARD_KAFKA_BOOTSTRAP": "127.0.0.1:29092",
    "SWITCHBOARD_KAFKA_CONTROLLER_PORT": "29093",
    "SWITCHBOARD_REDIS_URL": "redis://127.0.0.1:26379/0",
    "SWITCHBOARD_S3_ENDPOINT": "127.0.0.1:28333",
    "SWITCHBOARD_S3_MASTER_PORT": "29333",
    "SWITCHBOARD_S3_MASTER_GRPC_PORT": "29334",
    "SWITCHBOARD_S3_VOLUME_PORT": "28080",
    "SWITCHBOARD_S3_VOLUME_GRPC_PORT": "28081",
    "SWITCHBOARD_S3_FILER_PORT": "28888",
    "SWITCHBOARD_S3_FILER_GRPC_PORT": "28889",
    "SWITCHBOARD_S3_GRPC_PORT": "28334",
    "SWITCHBOARD_S3_ADMIN_PORT": "28335",
    "SWITCHBOARD_S3_ADMIN_GRPC_PORT": "28336",
    "SWITCHBOARD_GRPC_LISTEN": "127.0.0.1:25051",
    "SWITCHBOARD_ANALYTICS_LISTEN": "127.0.0.1:28123",
    "SWITCHBOARD_ASSISTANT_LISTEN": "127.0.0.1:25071",
    # Prometheus endpoints of the processes (services/observability).
    "SWITCHBOARD_INGRESS_METRICS_LISTEN": "127.0.0.1:29464",
    "SWITCHBOARD_SESSIONS_METRICS_LISTEN": "127.0.0.1:29465",
    "SWITCHBOARD_ASSISTANT_METRICS_LISTEN": "127.0.0.1:29466",
    "SWITCHBOARD_ANALYTICS_METRICS_LISTEN": "127.0.0.1:29467",
    "SWITCHBOARD_TOPIC_PARTITIONS": "4",
    "SWITCHBOARD_PRODUCE_TIMEOUT_S": "5",
    "SWITCHBOARD_REDIS_TIMEOUT_S": "3",  # test_ingress_redis_hang waits for it while Redis is stopped
    # The archiver closes segments after 2 s, so tests see them soon (streams/archive).
    "SWITCHBOARD_ARCHIVE_SEGMENT_AGE_S": "2",
    # `switchboard ingress` as two processes on one port, whatever the machine's core count.
    "SWITCHBOARD_INGRESS_PROCESSES": "2",
    "SWITCHBOARD_KAFKA_INSTALL_DIR": str(SHARED_KAFKA_INSTALL),
}
_PORT_KEYS = {k for k in _BASE_ENV if k.endswith(("_PORT", "_BOOTSTRAP", "_URL", "_ENDPOINT", "_LISTEN"))}
TEST_ENV = {
    k: (str(int(v) + _PORT_OFFSET) if k.endswith("_PORT") else _shift(v)) if k in _PORT_KEYS else v
    for k, v in _BASE_ENV.items()
}


class System:
    """The running test system and handles to its parts."""

    def __init__(self, settings: Settings, env: dict[str, str]) -> None:
        self.settings = settings
        self.env = env
        self.children: dict[str, Child] = switchboard_children(settings, env)

    async def start_children(self, *names: str) -> None:
        for name in names or tuple(self.children):
            if not self.children[name].alive:
                self.children[name].start()
        if not names or "analytics" in names:
            await wait_for_analytics(self.settings, self.children["analytics"])
        if not names or "ingress" in names:
            await wait_for_ingress(self.settings, self.children["ingress"])

    def stop_children(self) -> None:
        for child in reversed(list(self.children.values())):
            child.stop()

    def clickhouse(self) -> Any:
        host, port = self.settings.analytics_listen.rsplit(":", 1)
        return clickhouse_connect.get_client(host=host, port=int(port))


def free_port() -> int:
    """A port nothing listens on now (for a process of a test's own)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape_text(address: str, timeout_s: float = 5.0) -> str:
    """A process's Prometheus /metrics page."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout_s) as response:
        return str(response.read().decode(errors="replace"))


_LOG_OFFSETS = pytest.StashKey[dict[str, int]]()


# Tests that replay or rewrite the whole shared log and ClickHouse: their time grows with what
# the suite wrote before them (test_erase took 191 s late in a run, 55 s on its own), so they go
# first. Only the order changes; each test makes its own tenants as everywhere else. Under
# pytest-xdist (`make test`: --dist loadfile --no-loadscope-reorder) each goes first on its worker.
_FIRST = ("tests/integration/test_erase.py", "tests/integration/test_replay.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: not item.nodeid.startswith(_FIRST))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test that used the shared system gets what its processes logged while it ran (a
    CI run's data directory is gone by the time anyone reads the failure)."""
    report = yield
    system = getattr(item, "funcargs", {}).get("system")
    if not isinstance(system, System):
        return report
    if call.when == "setup" and report.passed:
        item.stash[_LOG_OFFSETS] = {
            name: child.log_path.stat().st_size if child.log_path.exists() else 0
            for name, child in system.children.items()
        }
    elif report.failed and call.when == "call":
        offsets = item.stash.get(_LOG_OFFSETS, {})
        _dump_tasks(system, offsets)
        for name, start in offsets.items():
            lines = _log_since(system.children[name].log_path, start).splitlines()
            shown = lines[-400:]
            head = f"({len(lines) - len(shown)} earlier lines not shown)\n" if len(lines) > len(shown) else ""
            report.sections.append((f"{name} log during the test", head + "\n".join(shown)))
        # Whether a processor was behind (lag) or stuck (no restarts, joining) when it failed.
        report.sections.append(("consumer metrics at the failure", _consumer_metrics(system.settings)))
    return report


def _dump_tasks(system: System, offsets: dict[str, int]) -> None:
    """Have each process log its asyncio tasks and where they wait (services/eventloop.dump_tasks,
    SIGUSR2), and wait a little for the dumps to reach the logs."""
    asked = []
    for name, child in system.children.items():
        if child.proc is None or not child.alive or not _catches(child.proc.pid, DUMP_SIGNAL):
            continue  # a process still starting would be killed by a signal it does not catch yet
        child.proc.send_signal(DUMP_SIGNAL)
        asked.append(name)
    deadline = time.monotonic() + 5
    while asked and time.monotonic() < deadline:
        asked = [
            n for n in asked if DUMP_MARK not in _log_since(system.children[n].log_path, offsets.get(n, 0))
        ]
        time.sleep(0.1)


def _catches(pid: int, signum: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0")
    return bool(int(caught, 16) & (1 << (signum - 1)))


def _log_since(path: Path, start: int) -> str:
    try:
        with path.open("rb") as log:
            log.seek(start)
            return log.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _consumer_metrics(settings: Settings) -> str:
    lines = []
    for role in ("sessions", "assistant", "analytics"):
        address = metrics_listen(settings, role)
        try:
            text = scrape_text(address, timeout_s=3)
        except OSError as exc:
            lines.append(f"{role}: {address} did not answer ({exc!r})")
            continue
        lines += [f"{role}: {line}" for line in text.splitlines() if line.startswith("switchboard_consumer_")]
    return "\n".join(lines)


@pytest.fixture(scope="session")
def test_env() -> Iterator[dict[str, str]]:
    keep = os.environ.get("SWITCHBOARD_TEST_KEEP_DATA")
    data_dir = Path(
        tempfile.mkdtemp(
            prefix="sb-it-", dir=PROJECT_ROOT / "var" if (PROJECT_ROOT / "var").exists() else None
        )
    )
    # Models are built once into the project's var/models and shared by every run.
    env = {
        **TEST_ENV,
        "SWITCHBOARD_DATA_DIR": str(data_dir),
        "SWITCHBOARD_MODELS_DIR": str(PROJECT_ROOT / "var" / "models"),
    }
    yield env
    if not keep:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def test_settings(test_env: dict[str, str]) -> Settings:
    fields = {k.removeprefix("SWITCHBOARD_").lower(): v for k, v in test_env.items()}
    known = {k: v for k, v in fields.items() if k in Settings.model_fields}
    return Settings(**known)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
async def local_stack(test_settings: Settings) -> AsyncIterator[Settings]:
    await stack.install(test_settings)
    try:
        # Inside the try: an `up` that fails part-way must not leave servers behind.
        await stack.up(test_settings)
        await ensure_topics(test_settings)
        yield test_settings
    finally:
        await stack.down(test_settings)


@pytest.fixture(scope="session")
async def system(local_stack: Settings, test_env: dict[str, str]) -> AsyncIterator[System]:
    sys_ = System(local_stack, test_env)
    try:
        # Inside the try: a process that fails to start must not leave the others running.
        await sys_.start_children()
        yield sys_
    finally:
        sys_.stop_children()


@pytest.fixture
def tenant() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def stub(system: System) -> AsyncIterator[chat_pb2_grpc.ChatServiceStub]:
    async with grpc.aio.insecure_channel(system.settings.grpc_listen) as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


@pytest.fixture
async def agents(system: System) -> AsyncIterator[agent_pb2_grpc.AgentServiceStub]:
    async with grpc.aio.insecure_channel(system.settings.grpc_listen) as channel:
        yield agent_pb2_grpc.AgentServiceStub(channel)


@pytest.fixture
async def redis(system: System) -> AsyncIterator[aioredis.Redis]:
    """A client of the test system's Redis."""
    client = aioredis.Redis.from_url(system.settings.redis_url)
    yield client
    await client.aclose()


async def events_in_log(settings: Settings) -> list[tuple[int, int, Any]]:
    """Every event of the conversation topic, from its beginning to its end as it is now, as
    (partition, offset, event); records that do not decode (another test's poison) left out."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from schemas.events import EventDecodeError, decode_event

    topic = settings.conversation_topic
    reader = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await reader.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
        reader.assign(tps)
        await reader.seek_to_beginning(*tps)
        ends = await reader.end_offsets(tps)
        found: list[tuple[int, int, Any]] = []
        while [tp for tp in tps if await reader.position(tp) < ends[tp]]:
            for tp, records in (await reader.getmany(timeout_ms=500, max_records=5000)).items():
                for record in records:
                    try:
                        found.append((tp.partition, record.offset, decode_event(record.value)))
                    except EventDecodeError:
                        continue
        return found
    finally:
        await reader.stop()


async def eventually(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], *, within_s: float = 60.0, what: str = ""
) -> T:
    """Poll `probe` until `done(value)`; fail with the last value seen when time runs out."""
    deadline = time.monotonic() + within_s
    while True:
        value = await probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or 'condition'}; last value: {value!r}")
        await asyncio.sleep(0.2)


async def start_conversation(stub: chat_pb2_grpc.ChatServiceStub, tenant: str, **kwargs: Any) -> str:
    conv = await stub.StartConversation(chat_pb2.StartConversationRequest(tenant_id=tenant, **kwargs))
    return str(conv.conversation_id)


def count(system: System, sql: str, **params: Any) -> int:
    return int(system.clickhouse().query(sql, parameters=params).result_rows[0][0])


async def wait_for_count(system: System, sql: str, expected: int, *, what: str, **params: Any) -> None:
    """Wait until the count query returns `expected` (projections catch up asynchronously)."""
    await eventually(
        lambda: asyncio.to_thread(count, system, sql, **params), lambda n: n == expected, what=what
    )
