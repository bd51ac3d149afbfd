"""Server mode, exercised: the projector with an ``http://`` DSN (a ClickHouse server's way in)
pointed at the embedded endpoint, signed in as its admin user, writes the same rows as the
in-process projector (``chdb://``). The endpoint here runs with the analytics process's policy
(only the admin writes), over the same engine as the suite's other endpoint.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import clickhouse_connect
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from schemas.events import Event, LogPosition, encode_event
from services.analytics import EndpointPolicy, QueryEndpoint, migrate, open_clickhouse
from services.settings import Settings
from streams._consumer import Record
from streams.projector import TABLE_ORDER, ProjectorProcessor
from tests.integration.test_analytics import process_chdb, process_endpoint
from tests.integration.test_metrics import SNAPSHOTS, chunks, support_day

pytestmark = pytest.mark.integration

PASSWORD = "server-mode-admin-pw"


@pytest.fixture(scope="module")
def guarded_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueryEndpoint]:
    """A second endpoint over the suite's engine, with the analytics process's policy."""
    engine = process_endpoint(tmp_path_factory).engine
    ready = threading.Event()
    box: dict[str, Any] = {}

    def serve() -> None:
        async def main() -> None:
            ep = QueryEndpoint(engine, "127.0.0.1", 0, policy=EndpointPolicy(admin_password=PASSWORD))
            await ep.start()
            box["endpoint"], box["stop"], box["loop"] = ep, asyncio.Event(), asyncio.get_running_loop()
            ready.set()
            await box["stop"].wait()
            await ep.stop()  # the engine belongs to the suite's endpoint

        asyncio.run(main())

    thread = threading.Thread(target=serve, name="guarded-endpoint", daemon=True)
    thread.start()
    assert ready.wait(30), "endpoint did not start"
    yield box["endpoint"]
    box["loop"].call_soon_threadsafe(box["stop"].set)
    thread.join(10)


def records(events: Sequence[tuple[Event, LogPosition]]) -> list[Record]:
    return [
        Record("conversation-events", p.partition, p.offset, e.conversation_id.encode(), encode_event(e), 0)
        for e, p in events
    ]


def retenant(events: Sequence[tuple[Event, LogPosition]], tenant: str) -> list[tuple[Event, LogPosition]]:
    """The same events (same ids, times, offsets) for another tenant."""
    out = []
    for event, position in events:
        copy = Event()
        copy.CopyFrom(event)
        copy.tenant_id = tenant
        out.append((copy, position))
    return out


def raw_rows(client: Any, table: str, tenant: str) -> list[tuple[Any, ...]]:
    """A raw table's rows for a tenant (FINAL: raw tables may hold a redelivery's duplicates until a
    merge), without the tenant and the insert time."""
    result = client.query(
        f"SELECT * FROM switchboard.{table} FINAL WHERE tenant_id = {{t:String}}", parameters={"t": tenant}
    )
    keep = [
        i
        for i, name in enumerate(result.column_names)
        if name != "tenant_id" and not name.endswith("ingested_at")
    ]
    return sorted((tuple(row[i] for i in keep) for row in result.result_rows), key=repr)


def views(client: Any, tenant: str) -> dict[str, list[tuple[Any, ...]]]:
    """The analysts' views and metrics for a tenant, with the tenant id blanked."""
    return {
        name: [
            tuple("" if v == tenant else v for v in row)
            for row in client.query(sql, parameters={"t": tenant}).result_rows
        ]
        for name, sql in SNAPSHOTS.items()
    }


async def project_all(client: Any, events: Sequence[tuple[Event, LogPosition]]) -> None:
    processor = ProjectorProcessor(client)
    for chunk in chunks(events, 7):
        assert await processor.process(records(chunk)) == []
    assert processor.stats.events == len(events)


async def test_the_projector_over_an_http_dsn_writes_what_the_in_process_one_writes(
    tmp_path_factory: pytest.TempPathFactory, guarded_endpoint: QueryEndpoint
) -> None:
    chdb_client = process_chdb(tmp_path_factory)[1]
    here, there = f"p{uuid.uuid4().hex[:12]}", f"s{uuid.uuid4().hex[:12]}"
    day = support_day(here)

    settings = Settings(clickhouse_dsn=f"http://admin:{PASSWORD}@127.0.0.1:{guarded_endpoint.port}")
    assert not settings.embedded_clickhouse
    server = open_clickhouse(settings)  # what the analytics process opens for a server DSN
    assert migrate(server) == []  # the schema is current, read through the server way in
    await project_all(chdb_client, day)
    await project_all(server, retenant(day, there))
    # Twice, as after a redelivery: still the same.
    await project_all(server, retenant(day, there))

    # The aggregating conversation_facts is compared through the conversations view below.
    for table in (t for t in TABLE_ORDER if t.startswith("raw_")):
        mine, theirs = raw_rows(chdb_client, table, here), raw_rows(server, table, there)
        assert mine == theirs, table
        assert mine or table not in ("raw_events", "raw_messages"), table
    reader = clickhouse_connect.get_client(host="127.0.0.1", port=guarded_endpoint.port)
    assert views(reader, there) == views(chdb_client, here)
    assert views(reader, there)["counts"][0][0] == len({e.event_id for e, _ in day})

    # Only the admin writes: the same projector signed in as anyone else is refused.
    reader_settings = Settings(clickhouse_dsn=f"http://default:@127.0.0.1:{guarded_endpoint.port}")
    with pytest.raises(DatabaseError, match="READONLY"):
        await project_all(open_clickhouse(reader_settings), retenant(day, f"r{uuid.uuid4().hex[:12]}"))
