"""Replay into the ClickHouse projections: fresh tables, then an exchange with the live ones.

The scratch database (`settings.replay_database`) gets the same schema as `switchboard` (every
migration, with the database name replaced), is filled with the projector's own row builder
(`rows_of`) and sink (`insert_batch`; with `--workers`, the same rows serialized to Native bytes
in the workers, `build_native`), and then each storage table is swapped with its live
namesake by `EXCHANGE TABLES` (atomic per table; all of them within milliseconds). The live
materialized and plain views follow the names, so they read and feed the new tables at once.

While the system serves, the live projector keeps writing to the old tables until the exchange;
what it wrote after the replay's end offsets is written again into the new ones by a catch-up
from those offsets to Kafka's end after the exchange (every table deduplicates, so rows written
twice are harmless).

Embedded ClickHouse (chdb) can be opened by one process only: while the analytics process runs,
everything here goes through its HTTP endpoint; when it is stopped, chdb is opened in-process.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

from services.analytics import DATABASE, endpoint_client, endpoint_is_up, load_migrations, open_clickhouse
from services.settings import Settings
from streams._consumer import Record
from streams.projector import ProjectionBatch, insert_batch, rows_of
from streams.projector._sink import NativeBatch, NativeSchema, insert_native, native_blocks, native_schema

_DB_REF = re.compile(r"\bswitchboard\.")
_VIEWS = ("View", "MaterializedView", "LiveView", "WindowView")
_MERGING = ("Replacing", "Aggregating", "Summing", "Collapsing", "VersionedCollapsing")


def clickhouse_client(settings: Settings) -> Any:
    """A client for wherever the projections live (see the module docstring); through the
    endpoint it signs in as its admin user, the only one that may write there."""
    if settings.embedded_clickhouse and endpoint_is_up(settings):
        return endpoint_client(
            settings,
            write=True,
            autogenerate_session_id=False,
            compress=False,
            send_receive_timeout=600,
        )
    return open_clickhouse(settings)


def storage_tables(client: Any, database: str) -> dict[str, str]:
    """Tables that hold data (name -> engine): not views, not the migrations record."""
    rows = client.query(
        "SELECT name, engine FROM system.tables WHERE database = {db:String} AND NOT is_temporary",
        parameters={"db": database},
    ).result_rows
    return {
        str(name): str(engine)
        for name, engine in rows
        if str(engine) not in _VIEWS and str(name) != "schema_migrations"
    }


def table_checksums(client: Any, database: str) -> dict[str, tuple[int, int]]:
    """(rows, checksum) per storage table, over what an analyst sees: merged rows (FINAL) and
    finalized aggregate states, summed row hashes (independent of insert order and parts)."""
    out: dict[str, tuple[int, int]] = {}
    for table, engine in sorted(storage_tables(client, database).items()):
        columns = client.query(
            "SELECT name, type, default_expression FROM system.columns "
            "WHERE database = {db:String} AND table = {t:String} ORDER BY position",
            parameters={"db": database, "t": table},
        ).result_rows
        exprs = [
            f"finalizeAggregation(`{name}`)" if str(kind).startswith("AggregateFunction") else f"`{name}`"
            for name, kind, default in columns
            # When a row was written (ingested_at DEFAULT now64()) is not part of what it says.
            if "now" not in str(default).lower()
        ]
        final = " FINAL" if any(m in engine for m in _MERGING) else ""
        count, digest = client.query(
            f"SELECT count(), sum(cityHash64(tuple({', '.join(exprs)}))) FROM `{database}`.`{table}`{final}"
        ).result_rows[0]
        out[table] = (int(count), int(digest))
    return out


class _Raw(NamedTuple):
    """A record as a replay worker gets it: what `rows_of` reads, nothing more."""

    value: bytes | None
    partition: int
    offset: int


def build_native(
    values: list[bytes | None], partitions: list[int], offsets: list[int], schema: NativeSchema
) -> tuple[NativeBatch, int]:
    """In a worker process: decode, project and serialize one batch; (blocks, records rejected).

    Records travel as three plain lists and rows come back as Native bytes: pickling either as
    objects cost the inserting process more than building the rows did."""
    batch, rejected = rows_of([_Raw(v, p, o) for v, p, o in zip(values, partitions, offsets, strict=True)])
    return native_blocks(batch, schema), len(rejected)


Built = tuple[ProjectionBatch, list[tuple[Record, BaseException]]] | tuple[NativeBatch, int]


@dataclass(slots=True)
class ProjectionTarget:
    """Where a projections replay writes, and how it swaps.

    Rows of the next batch are built while the previous batch is inserted (one insert in flight,
    so inserts stay in log order); `flush` waits for the last one."""

    client: Any
    database: str
    # Row builders in other processes (None: a thread of this one). With N processes, N batches
    # are built (and serialized to Native format, `build_native`) at once while this process
    # reads the log and inserts.
    pool: ProcessPoolExecutor | None = None
    workers: int = 1
    # Records to project (the erasure registry: an erased customer's events stay out).
    keep: Callable[[Record], bool] | None = None
    # The tables' column types, for the workers' serialization (`native_schema`; with a pool).
    schema: NativeSchema | None = None
    _inflight: asyncio.Task[int] | None = None

    def __post_init__(self) -> None:
        if self.pool is not None and self.schema is None:
            self.schema = native_schema(self.client, self.database)

    async def build(self, records: Sequence[Record]) -> Built:
        if self.keep is not None:
            records = [r for r in records if self.keep(r)]
        if self.pool is None:
            return await asyncio.to_thread(rows_of, records)
        assert self.schema is not None
        return await asyncio.get_running_loop().run_in_executor(
            self.pool,
            build_native,
            [r.value for r in records],
            [r.partition for r in records],
            [r.offset for r in records],
            self.schema,
        )

    async def apply(self, records: Sequence[Record]) -> tuple[int, int]:
        """Project the records (the projector's pure row builder, then its sink); returns (events,
        rejected). Rejected records are those the live projector dead-letters too."""
        return await self.insert(await self.build(records), len(records))

    async def insert(self, built: Built, count: int) -> tuple[int, int]:
        await self.flush()
        if isinstance(built[0], NativeBatch):
            native, refused = built
            assert isinstance(refused, int)
            work = insert_native(self.client, native, database=self.database)
        else:
            rows, rejected = built
            assert isinstance(rows, ProjectionBatch) and isinstance(rejected, list)
            refused = len(rejected)
            work = insert_batch(self.client, rows, database=self.database)
        self._inflight = asyncio.ensure_future(work)
        return count - refused, refused

    async def flush(self) -> None:
        if self._inflight is not None:
            task, self._inflight = self._inflight, None
            await task


def create_scratch(client: Any, scratch: str) -> None:
    """An empty database with the live schema: every migration, aimed at `scratch`."""
    if scratch == DATABASE:
        raise ValueError("the scratch database cannot be the live one")
    client.command(f"DROP DATABASE IF EXISTS `{scratch}`")
    client.command(f"CREATE DATABASE `{scratch}`")
    for migration in load_migrations():
        for statement in migration.statements:
            client.command(_DB_REF.sub(f"{scratch}.", statement))


def exchange_tables(client: Any, scratch: str, live: str = DATABASE) -> list[str]:
    """Swap every storage table of `scratch` with its live namesake; returns the tables swapped.
    Afterwards `scratch` holds the previous live tables."""
    mine = storage_tables(client, scratch)
    theirs = storage_tables(client, live)
    missing = sorted(set(theirs) - set(mine))
    if missing:
        raise RuntimeError(
            f"the rebuilt schema lacks {', '.join(missing)}: the live database has tables no migration "
            "creates; nothing was swapped"
        )
    swapped: list[str] = []
    for table in sorted(mine):
        if table in theirs:
            client.command(f"EXCHANGE TABLES `{live}`.`{table}` AND `{scratch}`.`{table}`")
            swapped.append(table)
    return swapped


def drop_database(client: Any, database: str) -> None:
    if database == DATABASE:
        raise ValueError("refusing to drop the live database")
    client.command(f"DROP DATABASE IF EXISTS `{database}`")
