"""Per-tenant retention: ClickHouse rows and archived records older than the tenant's
`retention_days` (a tenant setting on the tenants topic) are deleted.

Why a periodic job and not a table TTL: the retention differs per tenant and changes at runtime.
A TTL expression can only read the row and constants, so per-tenant days would need a dictionary
(`dictGet`) the TTL re-reads at merge time, which embedded chdb has no server configuration for,
and TTL deletes happen only when a merge runs, so "deleted after N days" would be "some time
after". `ALTER TABLE … DELETE WHERE tenant_id = T AND occurred_at < cutoff` works the same on chdb
and on a server, is synchronous (`mutations_sync`), and changing a tenant's days needs no DDL.
Run `switchboard tenant retention` periodically (cron, hourly); it is idempotent.

What is deleted, per tenant with a retention of N days (cutoff = now - N days):
- every raw_* row that occurred before the cutoff, and the per-minute event counts before it;
- the conversation facts (and so the `conversations` row) of conversations whose last event is
  before the cutoff (a conversation still active keeps its row);
- archived records of the tenant with a Kafka timestamp before the cutoff (segments rewritten,
  see streams/privacy/_archive.py).
The hot view (Redis) is not touched: it holds conversations for the API, not history.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from schemas.events import HEADER_TENANT, EventDecodeError, decode_event
from services.analytics import DATABASE
from services.settings import Settings
from streams._consumer import Record
from streams.archive import ArchiveStore, Manifest
from streams.privacy._archive import RewriteStats, rewrite_archive
from streams.privacy._erase import database_exists, quote, table_columns
from streams.privacy.erasures import load_erasures

log = logging.getLogger(__name__)

RETENTION_SETTING = "retention_days"


@dataclass(slots=True)
class RetentionResult:
    tenant: str
    days: float
    cutoff: str
    clickhouse_rows: dict[str, int] = field(default_factory=dict)
    archive: RewriteStats = field(default_factory=RewriteStats)


def check_retention_days(value: float | None) -> float | None:
    if value is None:
        return None
    if value != value or value <= 0 or value == float("inf"):
        raise ValueError(f"retention days must be a number > 0, got {value!r}")
    return value


async def set_tenant_retention(settings: Settings, tenant_id: str, days: float | None) -> Any:
    """Set (None: remove) the tenant's retention on the tenants topic; returns the record."""
    from services.auth._admin import AdminError
    from services.auth._log import append_records, read_registry

    days = check_retention_days(days)
    registry = await read_registry(settings)
    tenant = registry.tenants.get(tenant_id)
    if tenant is None:
        raise AdminError(f"no tenant {tenant_id!r} (see `switchboard tenants list`)")
    merged = {k: v for k, v in tenant.settings.items() if k != RETENTION_SETTING}
    if days is not None:
        merged[RETENTION_SETTING] = days
    record = replace(tenant, settings=merged, updated_at=time.time())
    await append_records(settings, [record])
    return record


def purge_older(client: Any, tenant: str, cutoff: datetime, database: str = DATABASE) -> dict[str, int]:
    """Delete the tenant's ClickHouse rows older than `cutoff` (blocking, synchronous)."""
    from streams.replay._projections import storage_tables

    at = f"toDateTime64({quote(cutoff.strftime('%Y-%m-%d %H:%M:%S.%f'))}, 6, 'UTC')"
    t = quote(tenant)
    deleted: dict[str, int] = {}
    for table in sorted(storage_tables(client, database)):
        columns = table_columns(client, database, table)
        if "tenant_id" not in columns:
            continue
        if "occurred_at" in columns:
            condition = f"tenant_id = {t} AND occurred_at < {at}"
        elif "minute" in columns:
            condition = f"tenant_id = {t} AND minute < {at}"
        elif "last_event_at" in columns:
            # The ids first: a mutation whose subquery reads the table it rewrites deleted nothing
            # through the embedded endpoint.
            stale = [
                str(r[0])
                for r in client.query(
                    f"SELECT conversation_id FROM `{database}`.`{table}` WHERE tenant_id = {t} "
                    f"GROUP BY conversation_id HAVING max(last_event_at) < {at}"
                ).result_rows
            ]
            if not stale:
                continue
            condition = f"tenant_id = {t} AND conversation_id IN ({', '.join(quote(c) for c in stale)})"
        else:
            continue
        held = int(
            client.query(f"SELECT count() FROM `{database}`.`{table}` WHERE {condition}").result_rows[0][0]
        )
        if held:
            client.command(
                f"ALTER TABLE `{database}`.`{table}` DELETE WHERE {condition}", settings={"mutations_sync": 2}
            )
            deleted[table] = held
    return deleted


def older_than(tenant: str, cutoff_ms: int) -> Callable[[Record], bool]:
    """Archived records of the tenant whose event occurred before the cutoff (the same instant
    the ClickHouse rows and a replay go by; the Kafka timestamp only pre-selects)."""
    name = tenant.encode()
    cutoff_ns = cutoff_ms * 1_000_000

    def drop(record: Record) -> bool:
        header = next((v for k, v in record.headers if k == HEADER_TENANT), None)
        if header is not None and header != name:
            return False
        try:
            event = decode_event(record.value)
        except EventDecodeError:
            return False
        return event.tenant_id == tenant and event.occurred_at.ToNanoseconds() < cutoff_ns

    return drop


# An event occurs before Kafka stamps its record (the ingress sets occurred_at, then produces):
# a segment whose oldest record was stamped this long after the cutoff holds nothing to delete.
_STAMP_MARGIN_MS = 3_600_000


def clickhouse_for_job(settings: Settings) -> Any | None:
    """ClickHouse for a job outside the analytics process: a server DSN, or the embedded one
    through its endpoint; None while the endpoint is down (opening chdb here would lock the
    analytics process out of its own files)."""
    from services.analytics import endpoint_is_up
    from streams.replay._projections import clickhouse_client

    if settings.embedded_clickhouse and not endpoint_is_up(settings):
        return None
    return clickhouse_client(settings)


async def apply_retention(
    settings: Settings,
    only: str | None = None,
    now: float | None = None,
    clickhouse: Callable[[Settings], Any | None] | None = None,
) -> list[RetentionResult]:
    from services.auth._log import read_registry
    from streams.replay._projections import clickhouse_client

    registry = await read_registry(settings)
    tenants = [
        (t.tenant_id, float(t.settings[RETENTION_SETTING]))
        for t in sorted(registry.tenants.values(), key=lambda t: t.tenant_id)
        if t.settings.get(RETENTION_SETTING) and (only is None or t.tenant_id == only)
    ]
    if only is not None and only not in registry.tenants:
        raise ValueError(f"no tenant {only!r}")
    results: list[RetentionResult] = []
    if not tenants:
        return results
    clock = time.time() if now is None else now
    store = ArchiveStore(settings)
    client = await asyncio.to_thread(clickhouse or clickhouse_client, settings)
    try:
        # The replay's scratch database too: it keeps a rebuild or the previous tables.
        databases = [DATABASE] if client is not None else []
        if client is not None and await asyncio.to_thread(database_exists, client, settings.replay_database):
            databases.append(settings.replay_database)
        for tenant, days in tenants:
            cutoff_s = clock - days * 86400
            cutoff = datetime.fromtimestamp(cutoff_s, UTC)
            result = RetentionResult(tenant, days, cutoff.isoformat())
            for database in databases:
                rows = await asyncio.to_thread(purge_older, client, tenant, cutoff, database)
                for table, n in rows.items():
                    result.clickhouse_rows[table if database == DATABASE else f"{database}.{table}"] = n
            cutoff_ms = int(cutoff_s * 1000)

            def newer(manifest: Manifest, cutoff_ms: int = cutoff_ms) -> bool:
                # Nothing in the segment is old enough: not even read.
                return manifest.count == 0 or manifest.min_timestamp_ms >= cutoff_ms + _STAMP_MARGIN_MS

            result.archive = await asyncio.to_thread(
                rewrite_archive,
                store,
                settings.conversation_topic,
                older_than(tenant, cutoff_ms),
                settings.archive_zstd_level,
                newer,
            )
            results.append(result)
    finally:
        if client is not None:
            await asyncio.to_thread(client.close)
    return results


def retention_cutoffs(tenants: dict[str, Any], now: float) -> dict[str, int]:
    """tenant -> events that occurred before this (ns) are past its retention. Pure."""
    return {
        tenant_id: int((now - float(t.settings[RETENTION_SETTING]) * 86400) * 1_000_000_000)
        for tenant_id, t in tenants.items()
        if t.settings.get(RETENTION_SETTING)
    }


async def replay_filter(settings: Settings) -> Callable[[Record], bool]:
    """What a replay may project: not erased (streams/privacy/erasures.py) and not past its
    tenant's retention as of now, so a replay from Kafka brings back neither."""
    from services.auth._log import read_registry

    erasures = await load_erasures(settings)
    try:
        cutoffs = retention_cutoffs((await read_registry(settings)).tenants, time.time())
    except Exception as exc:  # no tenants topic (a bare test stack): no retention anywhere
        log.info("replay: no tenant retention applied (%r)", exc)
        cutoffs = {}

    def keep(record: Record) -> bool:
        if not erasures.keeps(record):
            return False
        if not cutoffs:
            return True
        tenant = next((v for k, v in record.headers if k == HEADER_TENANT), None)
        if tenant is not None and tenant.decode(errors="replace") not in cutoffs:
            return True
        try:
            event = decode_event(record.value)
        except EventDecodeError:
            return True
        cutoff = cutoffs.get(event.tenant_id)
        return cutoff is None or event.occurred_at.ToNanoseconds() >= cutoff

    return keep


async def retention_loop(settings: Settings, interval_s: float) -> None:
    """Apply every tenant's retention every `interval_s` (run by the archiver); failures are
    logged and retried at the next round."""
    while True:
        try:
            for result in await apply_retention(settings, clickhouse=clickhouse_for_job):
                if result.clickhouse_rows or result.archive.records_removed:
                    log.info(
                        "retention %s (%g days): ClickHouse %s; archive %d records removed",
                        result.tenant,
                        result.days,
                        result.clickhouse_rows,
                        result.archive.records_removed,
                    )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("retention: %r; trying again in %.0fs", exc, interval_s)
        await asyncio.sleep(interval_s)
