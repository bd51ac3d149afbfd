"""Writes a `ProjectionBatch` to ClickHouse through clickhouse-connect (chdb or a server)."""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from typing import Any

from services.analytics._clickhouse import DATABASE
from streams.projector._gc import gc_paused
from streams.projector._rows import TABLE_ORDER, ProjectionBatch

log = logging.getLogger(__name__)

# Insert contexts per client and table: clickhouse-connect otherwise asks ClickHouse to DESCRIBE
# the table before every insert.
_contexts: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], Any]] = weakref.WeakKeyDictionary()
_contexts_lock = threading.Lock()


def _insert_context(client: Any, database: str, table: str, columns: list[str]) -> Any:
    with _contexts_lock:
        per_client = _contexts.setdefault(client, {})
        key = (database, table)
        if key not in per_client:
            per_client[key] = client.create_insert_context(
                table=table, column_names=columns, database=database, column_oriented=True
            )
        return per_client[key]


def write_batch(client: Any, batch: ProjectionBatch, database: str = DATABASE) -> int:
    """Insert every table's rows (blocking), one insert per table; returns the number of rows written.

    Safe to repeat: every target table deduplicates (see schemas/clickhouse), so a batch written
    again after a crash or a redelivery changes nothing an analyst can count. Not for concurrent
    use with one client (the projector writes one batch at a time).
    """
    with gc_paused():
        return _write_batch(client, batch, database)


def _write_batch(client: Any, batch: ProjectionBatch, database: str) -> int:
    written = 0
    for table in TABLE_ORDER:
        count = batch.size(table)
        if not count:
            continue
        context = _insert_context(client, database, table, list(batch.columns(table)))
        # The batch is column-oriented already: clickhouse-connect serializes column by column.
        context.data = batch.data[table]
        try:
            client.insert(context=context)
        finally:
            context.data = None
        written += count
    return written


async def insert_batch(client: Any, batch: ProjectionBatch, database: str = DATABASE) -> int:
    """`write_batch` in a worker thread, so the event loop keeps serving while ClickHouse writes.

    If the caller is cancelled (the worker stopping) while the insert runs, this waits for the
    insert to finish before letting the cancellation through: Faust acks the batch as the agent
    unwinds, and the ack must not overtake rows still being written.
    """
    if not batch:
        return 0
    task = asyncio.ensure_future(asyncio.to_thread(write_batch, client, batch, database))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            log.info("projector stopping: waiting for the insert in flight to finish")
            await asyncio.wait({task})
        raise
