"""Creates the topic catalogue in Kafka with explicit partition counts (auto-creation is off)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

import services.kafka_clients  # noqa: F401  (throttles aiokafka's failed metadata updates)
from schemas.topics import TopicSpec, topic_catalogue
from services.settings import Settings

log = logging.getLogger(__name__)


_TOPIC_ALREADY_EXISTS = 36


class TopicCreationError(RuntimeError):
    """Kafka refused to create a topic (e.g. a replication factor above the broker count).
    `retriable`: every refusal was the broker's passing state (its brokers fenced for a moment,
    as right after a restart or a stall), which ensure_topics waits out."""

    def __init__(self, message: str, *, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable


# "Unable to replicate the partition 1 time(s): All brokers are currently fenced." (error 38):
# a broker just restarted, or stalled past its heartbeat, is fenced until its next heartbeat.
_INVALID_REPLICATION_FACTOR = 38


def refusal(topic_errors: list[tuple[Any, ...]]) -> TopicCreationError:
    """The error for CreateTopics' per-topic refusals (topic, code, message)."""
    detail = "; ".join(f"{e[0]}: error {e[1]} {e[2] if len(e) > 2 else ''}".strip() for e in topic_errors)
    passing = all(
        e[1] == _INVALID_REPLICATION_FACTOR and len(e) > 2 and "fenced" in str(e[2]) for e in topic_errors
    )
    return TopicCreationError(f"Kafka refused to create topics ({detail})", retriable=passing)


async def wait_for_leaders(
    admin: AIOKafkaAdminClient, partitions: dict[str, int], *, within_s: float = 30.0
) -> None:
    """Wait until every named topic is described with its partition count and a leader for each
    partition. A create is answered by the controller before every broker's metadata has the new
    topic; a describe in that window returns no partitions (seen in CI), and a client started then
    gets UNKNOWN_TOPIC_OR_PARTITION."""
    deadline = time.monotonic() + within_s
    pending = dict(partitions)
    while True:
        described = await admin.describe_topics(list(pending))
        for info in described:
            parts = info.get("partitions") or []
            if (
                info.get("error_code", 0) == 0
                and len(parts) == pending.get(info.get("topic"), -1)
                and all(p.get("leader", -1) >= 0 for p in parts)
            ):
                pending.pop(info["topic"], None)
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TopicCreationError(
                f"topics created but not ready after {within_s:.0f}s: {sorted(pending)} "
                "(no leader for some partition; is every broker up?)"
            )
        await asyncio.sleep(0.1)


def replication_factor(settings: Settings) -> int:
    """The configured factor, raised to 3 on an embedded cluster of 3 or more brokers (and to the
    broker count on a 2-broker one), so losing a broker loses no acknowledged write."""
    return max(settings.topic_replication_factor, min(3, settings.kafka_brokers))


def catalogue(settings: Settings) -> list[TopicSpec]:
    return topic_catalogue(
        conversation_topic=settings.conversation_topic,
        knowledge_topic=settings.knowledge_topic,
        dead_letter_topic=settings.dead_letter_topic,
        partitions=settings.topic_partitions,
        replication_factor=replication_factor(settings),
        conversation_retention_ms=settings.conversation_retention_ms,
        tenants_topic=settings.tenants_topic,
        privacy_topic=settings.privacy_topic,
    )


# How long ensure_topics retries a Kafka that is not ready for it yet (a broker just started
# answers metadata without itself for a moment: NodeNotReadyError, seen in CI right after the
# broker of the previous test was restarted).
ENSURE_RETRY_S = 30.0


async def ensure_topics(settings: Settings) -> list[str]:
    """Create missing topics; returns the names created. Existing topics are left as they are, but a
    partition count that differs from the configuration is reported (the key→partition map would
    change, so it is never altered automatically). Kafka's retriable errors are retried for up to
    ENSURE_RETRY_S."""
    deadline = time.monotonic() + ENSURE_RETRY_S
    pause = 0.2
    while True:
        try:
            return await _ensure_topics_once(settings)
        except (KafkaError, TopicCreationError) as exc:
            if not exc.retriable or time.monotonic() + pause > deadline:
                raise
            log.info("Kafka is not ready for the topics yet (%r); trying again in %.1fs", exc, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)


async def _ensure_topics_once(settings: Settings) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="switchboard-admin")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = catalogue(settings)
        missing = [t for t in wanted if t.name not in existing]
        if missing:
            response = await admin.create_topics(
                [
                    NewTopic(
                        t.name,
                        num_partitions=t.partitions,
                        replication_factor=replication_factor(settings),
                        topic_configs=t.config,
                    )
                    for t in missing
                ]
            )
            # Kafka answers per topic; aiokafka does not raise for a refused one. 36: it exists
            # already (another process created it meanwhile), which is what we wanted.
            refused = [e for e in response.topic_errors if e[1] not in (0, _TOPIC_ALREADY_EXISTS)]
            if refused:
                raise refusal(refused)
            await wait_for_leaders(admin, {t.name: t.partitions for t in missing})
        present = [t for t in wanted if t.name in existing]
        if present:
            described = await admin.describe_topics([t.name for t in present])
            for name, count, configured in partition_mismatches(
                {t.name: t.partitions for t in present}, described
            ):
                log.warning(
                    "topic %s has %d partitions, configuration says %d; leaving it as it is",
                    name,
                    count,
                    configured,
                )
            await _apply_retention(admin, settings)
        return [t.name for t in missing]
    finally:
        await admin.close()


def partition_mismatches(wanted: dict[str, int], described: list[Any]) -> list[tuple[str, int, int]]:
    """(topic, partitions it has, partitions configured) for each described topic that differs.
    Matched by name: Kafka answers DescribeTopics in an order of its own (seen: every second
    `make run` warned that conversation-events had 1 partition, the count of another topic)."""
    found = []
    for info in described:
        name = info.get("topic")
        if name in wanted:
            count = len(info.get("partitions", []))
            if count != wanted[name]:
                found.append((str(name), count, wanted[name]))
    return found


async def _apply_retention(admin: AIOKafkaAdminClient, settings: Settings) -> None:
    """`conversation_retention_ms` also applies to a topic created before it was changed."""
    resource = ConfigResource(ConfigResourceType.TOPIC, settings.conversation_topic)
    described = await admin.describe_configs([resource])
    current = {
        str(entry[0]): entry[1] for response in described for res in response.resources for entry in res[4]
    }
    wanted = str(settings.conversation_retention_ms)
    if current.get("retention.ms") != wanted:
        await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, settings.conversation_topic, {"retention.ms": wanted})]
        )
        log.info(
            "topic %s: retention.ms %s -> %s",
            settings.conversation_topic,
            current.get("retention.ms"),
            wanted,
        )
