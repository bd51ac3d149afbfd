"""The topic catalogue: names, partition counts and configs, created up front (never auto-created).

Faust changelog topics must have as many partitions as their source topic, so every topic a
processor reads is created here with the configured count before any worker starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def topic_catalogue(
    *,
    conversation_topic: str,
    knowledge_topic: str,
    dead_letter_topic: str,
    partitions: int,
    replication_factor: int = 1,
    conversation_retention_ms: int = 30 * 24 * 3600 * 1000,
    tenants_topic: str = "tenants",
    privacy_topic: str = "privacy-events",
) -> list[TopicSpec]:
    # acks=all is only as strong as the in-sync replicas it waits for: two where there are two.
    min_isr = str(min(2, replication_factor))
    return [
        # The record. Retention is long: the archiver copies closed segments to S3 before it ends.
        TopicSpec(
            conversation_topic,
            partitions,
            {"retention.ms": str(conversation_retention_ms), "min.insync.replicas": min_isr},
        ),
        # Documents, compacted by document id: the latest version of each document wins.
        TopicSpec(knowledge_topic, partitions, {"cleanup.policy": "compact", "min.insync.replicas": min_isr}),
        # Events a processor could not handle after retries; the reason travels in headers.
        TopicSpec(dead_letter_topic, 1, {"retention.ms": str(90 * 24 * 3600 * 1000)}),
        # Tenants and API keys, compacted by entity: each record is the whole state of one
        # tenant or key. One partition: one total order, read whole by every ingress at start.
        TopicSpec(tenants_topic, 1, {"cleanup.policy": "compact", "min.insync.replicas": min_isr}),
        # Data-subject erasures (CustomerErased events keyed by event id, so compaction keeps each):
        # the registry every processor folds to skip erased customers' events still in the log.
        TopicSpec(privacy_topic, 1, {"cleanup.policy": "compact", "min.insync.replicas": min_isr}),
    ]
