"""Writes a `ProjectionBatch` to ClickHouse through clickhouse-connect (chdb or a server), or
serializes it to Native-format bytes for another process to insert."""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from clickhouse_connect.datatypes.registry import get_from_name
from clickhouse_connect.driver.insert import InsertContext
from clickhouse_connect.driver.transform import NativeTransform

from services.analytics._clickhouse import DATABASE
from streams.projector._gc import gc_paused
from streams.projector._rows import COLUMNS, TABLE_ORDER, ProjectionBatch

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
    insert to finish before letting the cancellation through: the consumer must not commit, or a
    replay swap tables, while rows are still being written.
    """
    if not batch:
        return 0
    return await _finish_even_if_cancelled(asyncio.to_thread(write_batch, client, batch, database))


async def _finish_even_if_cancelled(work: Coroutine[Any, Any, int]) -> int:
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            log.info("projector stopping: waiting for the insert in flight to finish")
            await asyncio.wait({task})
        raise


# --- Native blocks: a batch serialized where it was built ---------------------------------------
#
# A replay builds rows in worker processes. Sending the rows back to the process that inserts
# would cost that process a pickle round per value (it is the replay's bottleneck: it reads Kafka
# and runs ClickHouse); a worker serializes its batch into ClickHouse's Native format instead,
# with clickhouse-connect's own column writers, and the inserting process hands the bytes over.

# Per table: column names and ClickHouse type names, as the insert context has them.
NativeSchema = dict[str, tuple[tuple[str, ...], tuple[str, ...]]]


@dataclass(slots=True)
class NativeBatch:
    """A batch's rows as Native-format bytes per table (insert order), and how many rows."""

    blocks: dict[str, bytes] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)

    @property
    def row_count(self) -> int:
        return sum(self.rows.values())


def native_schema(client: Any, database: str = DATABASE) -> NativeSchema:
    """What a worker needs to serialize rows for `database` (plain data: it is pickled)."""
    schema: NativeSchema = {}
    for table in TABLE_ORDER:
        context = _insert_context(client, database, table, list(COLUMNS[table]))
        schema[table] = (tuple(context.column_names), tuple(t.name for t in context.column_types))
    return schema


_types: dict[str, Any] = {}


def native_blocks(batch: ProjectionBatch, schema: NativeSchema) -> NativeBatch:
    """Serialize every table's rows to Native format (pure: no ClickHouse connection)."""
    out = NativeBatch()
    with gc_paused():
        for table in TABLE_ORDER:
            count = batch.size(table)
            if not count:
                continue
            names, type_names = schema[table]
            types = [_types.get(n) or _types.setdefault(n, get_from_name(n)) for n in type_names]
            context = InsertContext(table, names, types, batch.data[table], column_oriented=True)
            chunks = list(NativeTransform.build_insert(context))
            if context.insert_exception is not None:
                raise context.insert_exception
            # The first chunk starts with the INSERT statement an HTTP body would carry.
            chunks[0] = chunks[0].split(b"\n", 1)[1]
            out.blocks[table] = b"".join(chunks)
            out.rows[table] = count
    return out


def write_native(client: Any, batch: NativeBatch, database: str = DATABASE) -> int:
    """Insert a `NativeBatch` (blocking), one insert per table in `TABLE_ORDER`; like
    `write_batch`, safe to repeat."""
    written = 0
    for table in TABLE_ORDER:
        block = batch.blocks.get(table)
        if not block:
            continue
        client.raw_insert(
            table=f"`{database}`.`{table}`", column_names=COLUMNS[table], insert_block=block, fmt="Native"
        )
        written += batch.rows[table]
    return written


async def insert_native(client: Any, batch: NativeBatch, database: str = DATABASE) -> int:
    """`write_native` in a worker thread; a cancellation waits for the insert (see insert_batch)."""
    if not batch.blocks:
        return 0
    return await _finish_even_if_cancelled(asyncio.to_thread(write_native, client, batch, database))
