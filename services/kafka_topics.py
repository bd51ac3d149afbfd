"""Creates the topic catalogue in Kafka with explicit partition counts (auto-creation is off)."""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from schemas.topics import TopicSpec, topic_catalogue
from services.settings import Settings

log = logging.getLogger(__name__)


def catalogue(settings: Settings) -> list[TopicSpec]:
    return topic_catalogue(
        conversation_topic=settings.conversation_topic,
        knowledge_topic=settings.knowledge_topic,
        dead_letter_topic=settings.dead_letter_topic,
        partitions=settings.topic_partitions,
        replication_factor=settings.topic_replication_factor,
        tenants_topic=settings.tenants_topic,
    )


async def ensure_topics(settings: Settings) -> list[str]:
    """Create missing topics; returns the names created. Existing topics are left as they are, but a
    partition count that differs from the configuration is reported (the key→partition map would
    change, so it is never altered automatically)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="switchboard-admin")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = catalogue(settings)
        missing = [t for t in wanted if t.name not in existing]
        if missing:
            await admin.create_topics(
                [
                    NewTopic(
                        t.name,
                        num_partitions=t.partitions,
                        replication_factor=settings.topic_replication_factor,
                        topic_configs=t.config,
                    )
                    for t in missing
                ]
            )
        present = [t for t in wanted if t.name in existing]
        if present:
            described = await admin.describe_topics([t.name for t in present])
            for spec, info in zip(present, described, strict=True):
                count = len(info.get("partitions", []))
                if count != spec.partitions:
                    log.warning(
                        "topic %s has %d partitions, configuration says %d; leaving it as it is",
                        spec.name,
                        count,
                        spec.partitions,
                    )
        return [t.name for t in missing]
    finally:
        await admin.close()
