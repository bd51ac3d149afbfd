"""The local stack supervisor against the real servers: up, use, restart Kafka, down.

The stack here has its own data directory and its own ports (37xxx/36xxx/39xxx), so it runs beside a
`make run` stack and beside the pipeline tests' stack (2xxxx, whose derived gRPC ports are 3xxxx).
"""

from __future__ import annotations

import asyncio
import io
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from minio import Minio
from minio.error import S3Error

from services import stack
from services.kafka_topics import wait_for_leaders
from services.settings import Settings, load_settings
from tests.conftest import SHARED_KAFKA_INSTALL

pytestmark = pytest.mark.integration

PORTS = {
    "kafka_bootstrap": "127.0.0.1:19192",
    "kafka_controller_port": 19193,
    "redis_url": "redis://127.0.0.1:16479/0",
    "s3_endpoint": "127.0.0.1:17333",
    "s3_grpc_port": 17334,
    "s3_master_port": 17335,
    "s3_master_grpc_port": 17336,
    "s3_volume_port": 17337,
    "s3_volume_grpc_port": 17338,
    "s3_filer_port": 17339,
    "s3_filer_grpc_port": 17340,
    "s3_admin_port": 17341,
    "s3_admin_grpc_port": 17342,
}


def stack_settings(data_dir: Path, **overrides: object) -> Settings:
    return load_settings(data_dir=data_dir, kafka_install_dir=SHARED_KAFKA_INSTALL, **{**PORTS, **overrides})


@pytest.fixture(scope="module")
async def settings(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Settings]:
    s = stack_settings(tmp_path_factory.mktemp("stack"))
    await stack.install(s)
    started = time.monotonic()
    try:
        # Inside the try: an `up` that fails part-way must not leave servers behind.
        await stack.up(s)
        print(f"first up: {time.monotonic() - started:.1f}s")
        yield s
    finally:
        await stack.down(s)


async def create_topic(settings: Settings, partitions: int = 3) -> str:
    topic = f"stack-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics([NewTopic(topic, partitions, 1)])
        assert all(err[1] == 0 for err in response.topic_errors), response
        # Raises unless every partition is described with a leader (a describe straight after the
        # create may return none: CI saw `0 == 3`).
        await wait_for_leaders(admin, {topic: partitions})
    finally:
        await admin.close()
    return topic


async def produce(settings: Settings, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=True, acks="all"
    )
    await producer.start()
    try:
        for i, value in enumerate(values):
            meta = await producer.send_and_wait(topic, value, key=str(i).encode())
            assert meta.offset >= 0
    finally:
        await producer.stop()


async def consume(settings: Settings, topic: str, group: str, count: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    got: list[bytes] = []
    try:
        deadline = time.monotonic() + 30
        while len(got) < count and time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                got.extend(m.value for m in messages if m.value is not None)
        await consumer.commit()
    finally:
        await consumer.stop()
    return got


async def committed(settings: Settings, group: str, topic: str, partitions: int) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return sum(offsets[TopicPartition(topic, p)].offset for p in range(partitions))


async def test_status_all_alive(settings: Settings) -> None:
    status = await stack.status(settings)
    assert set(status) == {"kafka", "redis", "s3"}
    for name, entry in status.items():
        assert entry["alive"] and entry["pid"], f"{name}: {entry}\n{stack.logs(settings, name, 30)}"
    assert status["kafka"]["address"] == settings.kafka_bootstrap
    assert status["s3"]["address"] == settings.s3_endpoint
    for name in status:
        assert (settings.data_dir / "run" / f"{name}.pid").exists()
        assert (settings.data_dir / "logs" / f"{name}.log").exists()


async def test_second_up_is_fast_and_keeps_the_same_processes(settings: Settings) -> None:
    before = {name: entry["pid"] for name, entry in (await stack.status(settings)).items()}
    started = time.monotonic()
    await stack.up(settings)
    print(f"second up: {time.monotonic() - started:.2f}s")
    assert time.monotonic() - started < 5
    after = {name: entry["pid"] for name, entry in (await stack.status(settings)).items()}
    assert after == before


async def test_kafka_idempotent_produce_and_group_consume(settings: Settings) -> None:
    topic = await create_topic(settings)
    values = [f"m{i}".encode() for i in range(20)]
    await produce(settings, topic, values)
    assert sorted(await consume(settings, topic, "g-stack", len(values))) == sorted(values)
    assert await committed(settings, "g-stack", topic, 3) == len(values)


async def test_redis_ping(settings: Settings) -> None:
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        assert await client.ping()
        await client.set("stack-test", "ok")
        assert await client.get("stack-test") == b"ok"
    finally:
        await client.aclose()


async def test_s3_bucket_put_get(settings: Settings) -> None:
    client = Minio(
        settings.s3_endpoint,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        secure=settings.s3_secure,
        region=settings.s3_region,
    )
    assert await asyncio.to_thread(client.bucket_exists, settings.s3_bucket)
    body = os.urandom(100_000)
    key = f"test/{uuid.uuid4().hex}.bin"
    await asyncio.to_thread(client.put_object, settings.s3_bucket, key, io.BytesIO(body), len(body))
    response = await asyncio.to_thread(client.get_object, settings.s3_bucket, key)
    try:
        assert response.read() == body
    finally:
        response.close()
        response.release_conn()

    # The identities file is enforced: a wrong secret is rejected.
    wrong = Minio(settings.s3_endpoint, access_key=settings.s3_access_key, secret_key="wrong", secure=False)
    with pytest.raises(S3Error) as rejected:
        await asyncio.to_thread(wrong.list_buckets)
    assert rejected.value.code in {"SignatureDoesNotMatch", "AccessDenied", "InvalidAccessKeyId"}


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
async def test_kafka_restart_keeps_data(settings: Settings, kill: bool) -> None:
    topic = await create_topic(settings)
    values = [f"before-{i}".encode() for i in range(10)]
    await produce(settings, topic, values)
    assert len(await consume(settings, topic, "g-restart", len(values))) == len(values)
    old_pid = (await stack.status(settings))["kafka"]["pid"]

    await stack.stop_component(settings, "kafka", kill=kill)
    status = await stack.status(settings)
    assert not status["kafka"]["alive"] and status["kafka"]["pid"] is None
    assert status["redis"]["alive"] and status["s3"]["alive"]

    await stack.start_component(settings, "kafka")
    status = await stack.status(settings)
    assert status["kafka"]["alive"] and status["kafka"]["pid"] != old_pid

    # Same log dirs, no reformat: the messages and the group's committed offsets are still there.
    assert sorted(await consume(settings, topic, f"g-{uuid.uuid4().hex[:6]}", len(values))) == sorted(values)
    assert await committed(settings, "g-restart", topic, 3) == len(values)
    await produce(settings, topic, [b"after"])
    assert await consume(settings, topic, "g-restart", 1) == [b"after"]


async def test_a_taken_port_is_reported_not_shared(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = stack_settings(tmp_path_factory.mktemp("other"))  # same ports, other data dir
    with pytest.raises(stack.StackError, match="already in use"):
        await stack.start_component(other, "redis")
    assert not (await stack.status(other))["redis"]["alive"]


async def test_stale_pid_files_are_ignored_and_removed(tmp_path: Path) -> None:
    s = stack_settings(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "kafka.pid").write_text(f"{os.getpid()}\n")  # alive, but pytest is not a Kafka broker
    (run / "redis.pid").write_text("999999999\n")  # no such process
    (run / "s3.pid").write_text("garbage\n")
    status = await stack.status(s)
    assert all(not entry["alive"] and entry["pid"] is None for entry in status.values()), status
    assert not any(run.glob("*.pid"))
    await stack.down(s)  # nothing to stop: still fine


async def test_down_stops_everything(settings: Settings) -> None:
    pids = [entry["pid"] for entry in (await stack.status(settings)).values()]
    await stack.down(settings)
    status = await stack.status(settings)
    assert all(not entry["alive"] and entry["pid"] is None for entry in status.values()), status
    assert not any(psutil.pid_exists(pid) for pid in pids if pid)
    assert not any((settings.data_dir / "run").glob("*.pid"))
    await stack.down(settings)  # idempotent
    assert "kafka" in stack.logs(settings, None, 5)
