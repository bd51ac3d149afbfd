"""When the embedded Kafka's class-data archive is used or made (services/stack/_cds.py), and the
session timeout its server.properties gets (single node vs cluster)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.settings import load_settings
from services.stack._cds import MAX_ATTEMPTS, should_make, usable
from services.stack._components import CLUSTER_SESSION_TIMEOUT_MS, SINGLE_NODE_SESSION_TIMEOUT_MS, Kafka

IDENTITY: dict[str, Any] = {
    "java": "/usr/lib/jvm/java-17/bin/java",
    "java_size": 1,
    "java_mtime_ns": 2,
    "jars": [["kafka_2.13-4.1.2.jar", 3, 4]],
    "libs": "/x/libs",
}


def test_an_archive_is_used_only_with_its_note_for_this_java_and_jars_and_its_written_size() -> None:
    note = {"identity": IDENTITY, "size": 100}
    assert usable(note, IDENTITY, 100)
    assert not usable(note, IDENTITY, 99)  # truncated: Java 17 would crash on it
    assert not usable(note, IDENTITY, None)  # no archive
    assert not usable(None, IDENTITY, 100)  # no note
    other_jar = {**IDENTITY, "jars": [["kafka_2.13-4.1.2.jar", 3, 5]]}
    assert not usable(note, other_jar, 100)
    assert not usable({"identity": IDENTITY, "failed": "SIGBUS", "size": 100}, IDENTITY, 100)


def test_one_is_made_unless_a_usable_one_exists_or_making_failed_for_the_same_jars() -> None:
    assert should_make(None, IDENTITY, None)
    assert not should_make({"identity": IDENTITY, "size": 100}, IDENTITY, 100)
    assert should_make({"identity": IDENTITY, "size": 100}, IDENTITY, 50)
    failed = {"identity": IDENTITY, "failed": "the scratch Kafka exited 1", "attempts": 1}
    assert should_make(failed, IDENTITY, None)  # once more: it may have been a port taken under it
    assert not should_make({**failed, "attempts": MAX_ATTEMPTS}, IDENTITY, None)
    assert not should_make({"identity": IDENTITY, "failed": "dropped"}, IDENTITY, None)
    assert should_make(
        {**failed, "attempts": MAX_ATTEMPTS}, {**IDENTITY, "java_mtime_ns": 9}, None
    )  # a new Java


def test_a_single_node_gets_the_short_session_and_a_cluster_keeps_four_seconds(tmp_path: Path) -> None:
    def session(brokers: int, node: int) -> int:
        kafka = Kafka(load_settings(data_dir=tmp_path, kafka_brokers=brokers), node)
        text = kafka.properties(kafka.log_dir, kafka.port, kafka.controller_port)
        return int(
            next(
                v
                for k, _, v in (line.partition("=") for line in text.splitlines())
                if k == "broker.session.timeout.ms"
            )
        )

    assert session(1, 1) == SINGLE_NODE_SESSION_TIMEOUT_MS < 2000
    assert session(3, 2) == CLUSTER_SESSION_TIMEOUT_MS == 4000
    # The scratch node that makes the archive is a single node whatever the configured count.
    kafka = Kafka(load_settings(data_dir=tmp_path, kafka_brokers=3))
    text = kafka.properties(tmp_path / "scratch", 1, 2)
    assert "controller.quorum.voters=1@127.0.0.1:2\n" in text
    assert f"broker.session.timeout.ms={SINGLE_NODE_SESSION_TIMEOUT_MS}\n" in text
