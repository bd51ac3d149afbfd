"""The embedded Kafka's class-data archive against a real JVM: `stack install` makes it, Kafka
starts with it, and a stale or damaged one never keeps Kafka down (services/stack/_cds.py).

Its own data directory and ports (18592/18593 + SWITCHBOARD_TEST_PORT_OFFSET), Kafka only."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from services import stack
from services.settings import Settings, load_settings
from services.stack._cds import identity, note_path, read_note
from services.stack._components import Kafka, java_executable
from services.stack._layout import Layout, StackError
from services.stack._process import read_pid

pytestmark = pytest.mark.integration

_OFFSET = int(os.environ.get("SWITCHBOARD_TEST_PORT_OFFSET", "0"))


@pytest.fixture(scope="module")
async def settings(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Settings]:
    s = load_settings(
        data_dir=tmp_path_factory.mktemp("cds"),
        # Its own jars and archive, whatever the environment says: these tests damage both.
        kafka_install_dir=None,
        kafka_bootstrap=f"127.0.0.1:{18592 + _OFFSET}",
        kafka_controller_port=18593 + _OFFSET,
    )
    try:
        await stack.install(s)
        yield s
    finally:
        await stack.stop_component(s, "kafka")


def archive_of(settings: Settings) -> Path:
    return Layout.of(settings).kafka_cds_archive(settings.kafka_version)


def started_with(settings: Settings) -> str:
    """The command line of the Kafka the pid file names."""
    found = read_pid(Layout.of(settings).pid_path("kafka"))
    assert found is not None
    return Path(f"/proc/{found[0]}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def log_since(settings: Settings, offset: int) -> str:
    return Layout.of(settings).log_path("kafka").read_bytes()[offset:].decode(errors="replace")


def log_size(settings: Settings) -> int:
    path = Layout.of(settings).log_path("kafka")
    return path.stat().st_size if path.exists() else 0


async def write_one(settings: Settings) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        if "cds-test" not in await admin.list_topics():
            await admin.create_topics([NewTopic("cds-test", 1, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=True, acks="all"
    )
    await producer.start()
    try:
        meta = await producer.send_and_wait("cds-test", b"x")
    finally:
        await producer.stop()
    return int(meta.offset)


async def restart_after_kill(settings: Settings) -> None:
    await stack.stop_component(settings, "kafka", kill=True)
    await stack.start_component(settings, "kafka")


async def test_install_makes_the_archive_and_kafka_starts_with_it(settings: Settings) -> None:
    archive = archive_of(settings)
    note = read_note(archive)
    assert note is not None and "failed" not in note, note
    assert archive.stat().st_size == note["size"] > 1_000_000
    before = log_size(settings)
    await stack.start_component(settings, "kafka")
    assert f"-XX:SharedArchiveFile={archive}" in started_with(settings)
    assert "Unable to use shared archive" not in log_since(settings, before)
    assert await write_one(settings) >= 0
    # Installed again: the archive is kept, not made again.
    mtime = archive.stat().st_mtime_ns
    await stack.install(settings)
    assert archive.stat().st_mtime_ns == mtime


async def test_a_stack_naming_another_install_dir_installs_nothing_and_starts_with_its_archive(
    settings: Settings, tmp_path: Path
) -> None:
    shared = Layout.of(settings).kafka_dir
    other = load_settings(
        data_dir=tmp_path,
        kafka_install_dir=shared,
        kafka_bootstrap=f"127.0.0.1:{18596 + _OFFSET}",
        kafka_controller_port=18597 + _OFFSET,
    )
    archive = archive_of(settings)
    assert archive_of(other) == archive
    mtime = archive.stat().st_mtime_ns
    await stack.install(other)
    assert archive.stat().st_mtime_ns == mtime
    assert not list((tmp_path / "kafka").glob("libs-*")), "the jars were fetched again"
    try:
        await stack.start_component(other, "kafka")
        cmdline = started_with(other)
        assert f"-XX:SharedArchiveFile={archive}" in cmdline
        assert f"{Kafka(settings).libs}/*" in cmdline
        assert await write_one(other) >= 0
        # Its data is its own: the shared directory holds no log of it.
        assert (tmp_path / "kafka" / "data" / "meta.properties").exists()
    finally:
        await stack.stop_component(other, "kafka")


async def test_an_archive_that_still_maps_is_kept_when_kafka_dies_starting_for_another_cause(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    archive = archive_of(settings)
    mtime = archive.stat().st_mtime_ns
    meta = Kafka(settings).log_dir / "meta.properties"
    await stack.stop_component(settings, "kafka")
    good = meta.read_text()
    assert "node.id=1" in good
    # A log dir another node formatted: Kafka exits while starting, with the archive or without.
    meta.write_text(good.replace("node.id=1", "node.id=7"))
    try:
        with caplog.at_level(logging.WARNING, logger="services.stack"):
            with pytest.raises(StackError, match="exited while starting"):
                await stack.start_component(settings, "kafka")
    finally:
        meta.write_text(good)
    said = [r.getMessage() for r in caplog.records]
    # Tried again without the archive (and died again, of the same cause), ...
    assert any("starting it once more without its class-data archive" in m for m in said), said
    # ... and the archive was checked (it maps, its checksums are right) and kept for the next
    # starts, of this stack and of every stack sharing its install dir.
    assert any("class-data archive is kept" in m for m in said), said
    assert archive.stat().st_mtime_ns == mtime
    note = read_note(archive)
    assert note is not None and "failed" not in note and note["kept_deaths"] == 1, note
    await stack.start_component(settings, "kafka")
    assert f"-XX:SharedArchiveFile={archive}" in started_with(settings)
    assert await write_one(settings) >= 0


async def test_kafka_starts_with_an_archive_the_jvm_finds_stale(settings: Settings) -> None:
    archive = archive_of(settings)
    libs = Kafka(settings).libs
    # A jar changed since the archive was made, and the note claims it is current anyway: only
    # the JVM's own check stands between the archive and a start.
    jar = next(libs.glob("kafka-clients-*.jar"))
    os.utime(jar, ns=(jar.stat().st_atime_ns, jar.stat().st_mtime_ns + 1_000_000_000))
    note = read_note(archive)
    assert note is not None
    note_path(archive).write_text(json.dumps({**note, "identity": identity(java_executable(), libs)}))
    before = log_size(settings)
    await restart_after_kill(settings)
    assert f"-XX:SharedArchiveFile={archive}" in started_with(settings)
    assert "Unable to use shared archive" in log_since(settings, before)
    assert await write_one(settings) >= 0


async def test_kafka_that_dies_starting_with_a_damaged_archive_is_started_without_it(
    settings: Settings,
) -> None:
    archive = archive_of(settings)
    libs = Kafka(settings).libs
    # A truncated archive whose note matches its size: Java 17 dies of SIGBUS mapping it.
    with archive.open("r+b") as fh:
        fh.truncate(1_000_000)
    note = read_note(archive)
    assert note is not None
    note_path(archive).write_text(
        json.dumps({"identity": identity(java_executable(), libs), "size": archive.stat().st_size})
    )
    await restart_after_kill(settings)
    assert "SharedArchiveFile" not in started_with(settings)
    assert await write_one(settings) >= 0
    # Dropped, and not made again for the same Java and jars.
    assert not archive.exists()
    dropped = read_note(archive)
    assert dropped is not None and "failed" in dropped
    await stack.install(settings)
    assert not archive.exists()
