"""Replay: rebuild the projections, the hot view or the knowledge base from the log (the S3
archive for what Kafka no longer holds, then Kafka) into fresh storage, then swap it in."""

from streams.replay._progress import Progress
from streams.replay._projections import clickhouse_client, create_scratch, exchange_tables, table_checksums
from streams.replay._run import TARGETS, ReplayOptions, ReplaySummary, replay
from streams.replay._sessions import hot_view_snapshot, snapshot_differences
from streams.replay._source import (
    PartitionPlan,
    ReplayError,
    ReplayGapError,
    ReplayPlan,
    kafka_offsets,
    plan_replay,
    read_log,
)

__all__ = [
    "TARGETS",
    "PartitionPlan",
    "Progress",
    "ReplayError",
    "ReplayGapError",
    "ReplayOptions",
    "ReplayPlan",
    "ReplaySummary",
    "clickhouse_client",
    "create_scratch",
    "exchange_tables",
    "hot_view_snapshot",
    "kafka_offsets",
    "plan_replay",
    "read_log",
    "replay",
    "snapshot_differences",
    "table_checksums",
]
