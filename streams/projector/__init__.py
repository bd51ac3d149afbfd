"""The projector: every conversation event into ClickHouse, in batches, idempotently."""

from streams.projector._agent import ProjectorProcessor, ProjectorStats, projector_consumer, rows_of
from streams.projector._rows import COLUMNS, TABLE_ORDER, ProjectionBatch, project
from streams.projector._sink import insert_batch, write_batch

__all__ = [
    "COLUMNS",
    "TABLE_ORDER",
    "ProjectionBatch",
    "ProjectorProcessor",
    "ProjectorStats",
    "insert_batch",
    "project",
    "projector_consumer",
    "rows_of",
    "write_batch",
]
