"""The projector: every conversation event into ClickHouse, in batches, idempotently."""

from streams.projector._agent import ProjectorStats, project_batch, register_projector
from streams.projector._rows import COLUMNS, TABLE_ORDER, ProjectionBatch, project
from streams.projector._sink import insert_batch, write_batch

__all__ = [
    "COLUMNS",
    "TABLE_ORDER",
    "ProjectionBatch",
    "ProjectorStats",
    "insert_batch",
    "project",
    "project_batch",
    "register_projector",
    "write_batch",
]
