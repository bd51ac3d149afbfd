"""ClickHouse projections on real chdb, written and read through both ways in: the in-process
chdb client and the HTTP endpoint (with real clickhouse-connect). No Kafka needed.

chdb opens one directory per process, so every test here shares one session-scoped directory
and uses its own tenant id as its namespace.
"""

from __future__ import annotations

import asyncio
import atexit
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, cast

import clickhouse_connect
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError
from google.protobuf.timestamp_pb2 import Timestamp
from switchboard.v1 import events_pb2 as pb

from schemas.events import Event, LogPosition, new_event
from services.analytics import (
    ChdbQueryEngine,
    EndpointPolicy,
    QueryEndpoint,
    QueryFailedError,
    applied_migrations,
    load_migrations,
    migrate,
    open_clickhouse,
    run_query,
)
from services.settings import Settings
from streams.projector import project, write_batch
from streams.projector._rows import occurred_at

pytestmark = pytest.mark.integration

T0 = 1_750_000_000_000_000_000


# chdb opens one directory per process, so every module of this suite that needs ClickHouse
# (test_metrics, test_analytics_cookbook, test_go_driver) shares this one directory, migrated
# once, and one endpoint over it, through these process-wide helpers (a fixture imported into
# another module would be a second fixture, with a second directory).
_PROCESS: dict[str, Any] = {}


def process_chdb(factory: pytest.TempPathFactory) -> tuple[Path, Any, list[str]]:
    """(directory, in-process client, migrations applied by the first call)."""
    if "chdb" not in _PROCESS:
        path = factory.mktemp("chdb")
        client = open_clickhouse(Settings(clickhouse_dsn=f"chdb://{path}"))
        _PROCESS["chdb"] = (path, client, migrate(client))
    return cast(tuple[Path, Any, list[str]], _PROCESS["chdb"])


def process_endpoint(factory: pytest.TempPathFactory) -> QueryEndpoint:
    """The query endpoint over `process_chdb`'s directory, on a free port, in its own thread."""
    if "endpoint" in _PROCESS:
        return cast(QueryEndpoint, _PROCESS["endpoint"])
    _PROCESS["endpoint"] = serve(process_chdb(factory)[0])
    return cast(QueryEndpoint, _PROCESS["endpoint"])


def serve(path: Path, policy: EndpointPolicy | None = None, threads: int = 4) -> QueryEndpoint:
    """An endpoint over a chdb directory, on a free port, in its own thread (stopped at exit)."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        async def main() -> None:
            ep = QueryEndpoint(ChdbQueryEngine(path), "127.0.0.1", 0, policy=policy, threads=threads)
            await ep.start()
            box["endpoint"], box["stop"], box["loop"] = ep, asyncio.Event(), asyncio.get_running_loop()
            ready.set()
            await box["stop"].wait()
            await ep.stop()
            ep.engine.close()

        asyncio.run(main())

    thread = threading.Thread(target=run, name="query-endpoint", daemon=True)
    thread.start()
    assert ready.wait(30), "endpoint did not start"

    def stop() -> None:
        # The endpoint's loop runs in the other thread; wake it there.
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(10)

    atexit.register(stop)
    return cast(QueryEndpoint, box["endpoint"])


@pytest.fixture(scope="session")
def chdb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return process_chdb(tmp_path_factory)[0]


@pytest.fixture(scope="session")
def analytics_settings(chdb_dir: Path, endpoint: QueryEndpoint) -> Settings:
    return Settings(
        clickhouse_dsn=f"chdb://{chdb_dir}",
        analytics_listen=f"127.0.0.1:{endpoint.port}",
        data_dir=chdb_dir.parent,
    )


@pytest.fixture(scope="session")
def first_migration(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, list[str]]:
    _, client, applied = process_chdb(tmp_path_factory)
    return client, applied


@pytest.fixture(scope="session")
def chdb_client(first_migration: tuple[Any, list[str]]) -> Any:
    return first_migration[0]


@pytest.fixture(scope="session")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> QueryEndpoint:
    return process_endpoint(tmp_path_factory)


@pytest.fixture(scope="session")
def http_client(endpoint: QueryEndpoint) -> Any:
    return clickhouse_connect.get_client(host="127.0.0.1", port=endpoint.port)


@pytest.fixture(params=["chdb", "endpoint"])
def writer(request: pytest.FixtureRequest, chdb_client: Any, http_client: Any) -> Any:
    """Both ways to ClickHouse; each test below must pass through either."""
    return chdb_client if request.param == "chdb" else http_client


@pytest.fixture
def tenant() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def stamped(event: Event, ns: int) -> Event:
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    event.occurred_at.CopyFrom(ts)
    return event


def conversation_events(
    tenant: str, conv: str, partition: int = 0, first_offset: int = 0
) -> list[tuple[Event, LogPosition]]:
    events = [
        new_event(
            tenant,
            conv,
            conversation_started=pb.ConversationStarted(
                channel=pb.CHANNEL_IOS, customer_id="cust", locale="en"
            ),
        ),
        new_event(
            tenant,
            conv,
            message_received=pb.MessageReceived(
                client_message_id="m1", text="hello", sender=pb.SENDER_CUSTOMER
            ),
        ),
        new_event(tenant, conv, intent_classified=pb.IntentClassified(intent="greeting", confidence=0.8)),
        new_event(
            tenant, conv, reply_generated=pb.ReplyGenerated(text="Hi!", model="template", latency_ms=3)
        ),
        new_event(
            tenant,
            conv,
            message_received=pb.MessageReceived(
                client_message_id="m2", text="订单", sender=pb.SENDER_CUSTOMER
            ),
        ),
        new_event(tenant, conv, handoff_requested=pb.HandoffRequested(reason="asked", queue="general")),
        new_event(tenant, conv, agent_assigned=pb.AgentAssigned(agent_id="ag")),
        new_event(
            tenant,
            conv,
            agent_message_sent=pb.AgentMessageSent(agent_id="ag", client_message_id="a1", text="Hello"),
        ),
        new_event(
            tenant,
            conv,
            conversation_closed=pb.ConversationClosed(resolution="resolved", closed_by=pb.SENDER_AGENT),
        ),
        new_event(tenant, conv, csat_rated=pb.CsatRated(score=4)),
    ]
    return [
        (stamped(e, T0 + i * 10**9), LogPosition(partition, first_offset + i)) for i, e in enumerate(events)
    ]


def scalar(client: Any, sql: str, **params: Any) -> Any:
    """Read the way analysts do: plain SQL over the views, no settings (exact by construction)."""
    return client.query(sql, parameters=params).result_rows[0][0]


def counts(client: Any, tenant: str) -> dict[str, int]:
    tables = ["events", "messages", "replies", "intents", "handoffs", "csat", "conversations"]
    return {
        t: int(
            scalar(client, f"SELECT count() FROM switchboard.{t} WHERE tenant_id = {{t:String}}", t=tenant)
        )
        for t in tables
    }


EXPECTED_ONE_CONVERSATION = {
    "events": 10,
    "messages": 3,
    "replies": 1,
    "intents": 1,
    "handoffs": 2,
    "csat": 1,
    "conversations": 1,
}


# --- migrations ---------------------------------------------------------------------------------


def test_migrations_apply_once(first_migration: tuple[Any, list[str]]) -> None:
    client, first = first_migration
    every = [m.name for m in load_migrations()]
    assert first == every
    assert migrate(client) == []
    assert set(applied_migrations(client)) == set(every)


def test_migrations_through_the_endpoint_are_idempotent_too(http_client: Any) -> None:
    assert migrate(http_client) == []


# --- idempotent projection (a contract: the same through chdb and through the endpoint) ----------


def test_the_same_batch_twice_counts_once(writer: Any, tenant: str) -> None:
    batch = project(conversation_events(tenant, "c1"))
    write_batch(writer, batch)
    assert counts(writer, tenant) == EXPECTED_ONE_CONVERSATION
    write_batch(writer, batch)
    assert counts(writer, tenant) == EXPECTED_ONE_CONVERSATION


def test_overlapping_batches_after_a_crash_count_once(writer: Any, tenant: str, http_client: Any) -> None:
    records = conversation_events(tenant, "c1") + conversation_events(tenant, "c2", first_offset=10)
    # Crash after writing the first 13 events; the redelivery starts at the last committed
    # offset (5) and runs to the end.
    write_batch(writer, project(records[:13]))
    write_batch(writer, project(records[5:]))
    expected = {k: v * 2 for k, v in EXPECTED_ONE_CONVERSATION.items()}
    assert counts(writer, tenant) == expected
    assert counts(http_client, tenant) == expected


def test_conversation_row_from_out_of_order_batches(writer: Any, tenant: str) -> None:
    records = conversation_events(tenant, "c1")
    # The close and the later events arrive first, the start last, and one batch twice.
    write_batch(writer, project(records[8:]))
    write_batch(writer, project(records[3:8]))
    write_batch(writer, project(records[:3]))
    write_batch(writer, project(records[3:8]))
    row = writer.query(
        "SELECT channel, customer_id, status, resolution, closed_by, message_count, event_count, "
        "started_at < closed_at, first_event_at = started_at FROM switchboard.conversations "
        "WHERE tenant_id = {t:String}",
        parameters={"t": tenant},
    ).result_rows
    assert row == [("ios", "cust", "closed", "resolved", "agent", 3, 10, True, True)]


def closes(tenant: str, conv: str) -> list[tuple[Event, LogPosition]]:
    """Two closes of one conversation. A second lands only from an ingress process that stalled
    past its claim; made before the stall, it carries the earlier time. Its resolution and
    closed_by sort above the first's, so max() picked them."""
    first = new_event(
        tenant,
        conv,
        conversation_closed=pb.ConversationClosed(resolution="resolved", closed_by=pb.SENDER_AGENT),
    )
    late = new_event(
        tenant,
        conv,
        conversation_closed=pb.ConversationClosed(resolution="solved", closed_by=pb.SENDER_SYSTEM),
    )
    return [
        (stamped(first, T0 + 30 * 10**9), LogPosition(0, 20)),
        (stamped(late, T0 + 20 * 10**9), LogPosition(0, 21)),
    ]


@pytest.mark.parametrize("order", ["log", "late close first", "one batch"])
def test_the_first_close_in_the_log_decides_closed_at_resolution_and_closed_by(
    writer: Any, tenant: str, order: str
) -> None:
    # Was: closed_at the earliest time (the late copy's) and max() over the closes
    # ("solved"/"system", the late copy's), while the sessions fold takes the first in the log.
    records = conversation_events(tenant, "c1")[:8] + closes(tenant, "c1")
    if order == "one batch":
        write_batch(writer, project(records))
    else:
        batches = [records[:9], records[9:]]
        for batch in batches if order == "log" else reversed(batches):
            write_batch(writer, project(batch))
    row = writer.query(
        "SELECT status, resolution, closed_by, closed_at = {at:DateTime64(6, 'UTC')} "
        "FROM switchboard.conversations WHERE tenant_id = {t:String}",
        parameters={"t": tenant, "at": occurred_at(records[8][0])},
    ).result_rows
    assert row == [("closed", "resolved", "agent", 1)]


def test_a_first_close_projected_before_0008_keeps_the_earlier_rule(writer: Any, tenant: str) -> None:
    # A row written before 0008 has first_close at its default: the view takes max() over the
    # closes then (what it showed before), never the default's empty strings.
    write_batch(writer, project(conversation_events(tenant, "c1")[:8]))
    closed_at = occurred_at(closes(tenant, "c1")[0][0])
    writer.command(
        "INSERT INTO switchboard.conversation_facts (tenant_id, conversation_id, closed_at, resolution, "
        "closed_by) VALUES ({t:String}, 'c1', {at:DateTime64(6, 'UTC')}, 'resolved', 'agent')",
        parameters={"t": tenant, "at": closed_at},
    )
    row = writer.query(
        "SELECT status, resolution, closed_by, closed_at = {at:DateTime64(6, 'UTC')} "
        "FROM switchboard.conversations WHERE tenant_id = {t:String}",
        parameters={"t": tenant, "at": closed_at},
    ).result_rows
    assert row == [("closed", "resolved", "agent", 1)]


def test_open_conversation(writer: Any, tenant: str) -> None:
    write_batch(writer, project(conversation_events(tenant, "c1")[:2]))
    status, closed_at, messages = writer.query(
        "SELECT status, closed_at, message_count FROM switchboard.conversations WHERE tenant_id = {t:String}",
        parameters={"t": tenant},
    ).result_rows[0]
    assert (status, closed_at, messages) == ("open", None, 1)


def test_a_retried_client_message_with_two_event_ids_counts_once(writer: Any, tenant: str) -> None:
    first = new_event(tenant, "c1", message_received=pb.MessageReceived(client_message_id="m1", text="hi"))
    # The client retried after a lost ack: same client_message_id, a new event id, a later offset.
    retry = new_event(tenant, "c1", message_received=pb.MessageReceived(client_message_id="m1", text="hi"))
    other = new_event(tenant, "c1", message_received=pb.MessageReceived(client_message_id="m2", text="more"))
    write_batch(writer, project([(retry, LogPosition(0, 7))]))  # replay order need not be log order
    write_batch(writer, project([(first, LogPosition(0, 3)), (other, LogPosition(0, 9))]))
    assert (
        scalar(writer, "SELECT count() FROM switchboard.messages WHERE tenant_id = {t:String}", t=tenant) == 2
    )
    assert (
        scalar(writer, "SELECT count() FROM switchboard.events WHERE tenant_id = {t:String}", t=tenant) == 3
    )
    # The first write survives: the one the sessions fold counted.
    survivor = scalar(
        writer,
        "SELECT event_id FROM switchboard.messages WHERE tenant_id = {t:String} AND client_message_id = 'm1'",
        t=tenant,
    )
    assert survivor == first.event_id
    assert scalar(
        writer,
        "SELECT text_length FROM switchboard.messages WHERE tenant_id = {t:String} AND client_message_id = 'm2'",
        t=tenant,
    ) == len("more")
    assert writer.query(
        "SELECT message_count FROM switchboard.conversations WHERE tenant_id = {t:String}",
        parameters={"t": tenant},
    ).result_rows == [(2,)]


def test_raw_tables_may_hold_duplicates_the_views_never_do(writer: Any, tenant: str) -> None:
    batch = project(conversation_events(tenant, "c1"))
    write_batch(writer, batch)
    write_batch(writer, batch)
    raw = scalar(writer, "SELECT count() FROM switchboard.raw_events WHERE tenant_id = {t:String}", t=tenant)
    exact = scalar(writer, "SELECT count() FROM switchboard.events WHERE tenant_id = {t:String}", t=tenant)
    # A background merge may already have collapsed them; the view's FINAL never depends on it.
    assert raw in (10, 20) and exact == 10
    # No setting is needed, and none changes the answer.
    for final in (0, 1):
        assert (
            writer.query(
                "SELECT count() FROM switchboard.events WHERE tenant_id = {t:String}",
                parameters={"t": tenant},
                settings={"final": final},
            ).result_rows[0][0]
            == 10
        )


# --- the HTTP endpoint with a real clickhouse-connect client ----------------------------------------


def test_clickhouse_connect_query_command_parameters(http_client: Any) -> None:
    assert http_client.server_version.split(".")[0].isdigit()
    result = http_client.query(
        "SELECT {x:UInt32} + 1 AS y, {s:String} AS s", parameters={"x": 41, "s": "中文 'q'"}
    )
    assert result.column_names == ("y", "s")
    assert result.result_rows == [(42, "中文 'q'")]
    assert http_client.command("SELECT 1") == 1
    assert http_client.command("SELECT 'a', 'b'") == ["a", "b"]
    summary = http_client.command("CREATE TABLE IF NOT EXISTS default.probe (x UInt8) ENGINE = Memory")
    assert not isinstance(summary, (int, str, list))
    assert http_client.command("EXISTS TABLE default.probe") == 1


def test_clickhouse_connect_insert_and_no_settings_behind_the_clients_back(http_client: Any) -> None:
    table = f"default.t_{uuid.uuid4().hex[:8]}"
    http_client.command(f"CREATE TABLE {table} (k UInt32, v String) ENGINE = ReplacingMergeTree ORDER BY k")
    http_client.insert(table, [[1, "a"], [2, "b"]], column_names=["k", "v"])
    http_client.insert(table, [[1, "a2"]], column_names=["k", "v"])
    # As on a ClickHouse server: raw rows unless the query asks for FINAL.
    assert http_client.query(f"SELECT count() FROM {table}").result_rows[0][0] in (2, 3)
    assert http_client.query(f"SELECT count() FROM {table} FINAL").result_rows == [(2,)]
    assert http_client.query(f"SELECT v FROM {table} FINAL ORDER BY k").result_rows == [("a2",), ("b",)]
    assert http_client.query("SELECT getSetting('final')").result_rows == [(False,)]


def test_clickhouse_connect_uncompressed_client_and_dataframes(endpoint: QueryEndpoint) -> None:
    client = clickhouse_connect.get_client(host="127.0.0.1", port=endpoint.port, compress=False)
    table = f"default.t_{uuid.uuid4().hex[:8]}"
    client.command(f"CREATE TABLE {table} (k UInt32, d DateTime64(6, 'UTC')) ENGINE = MergeTree ORDER BY k")
    client.insert(table, [[1, "2024-05-01 10:00:00"]], column_names=["k", "d"])
    pandas = pytest.importorskip("pandas")
    df = client.query_df(f"SELECT k, d FROM {table}")
    assert list(df.columns) == ["k", "d"] and len(df) == 1
    assert isinstance(df, pandas.DataFrame)
    arrow = client.query_arrow(f"SELECT k FROM {table}")
    assert arrow.num_rows == 1


def test_clickhouse_connect_bad_query_raises_database_error_with_the_message(http_client: Any) -> None:
    with pytest.raises(DatabaseError) as info:
        http_client.query("SELECT * FROM switchboard.no_such_table")
    assert "UNKNOWN_TABLE" in str(info.value) and "no_such_table" in str(info.value)
    with pytest.raises(DatabaseError, match="Syntax error"):
        http_client.command("SELEC 1")


def test_session_state_persists_and_request_settings_do_not(endpoint: QueryEndpoint) -> None:
    client = clickhouse_connect.get_client(host="127.0.0.1", port=endpoint.port)
    client.command("CREATE TEMPORARY TABLE tmp_numbers (n UInt8)")
    client.command("INSERT INTO tmp_numbers VALUES (1), (2)")
    assert client.query("SELECT sum(n) FROM tmp_numbers").result_rows == [(3,)]
    assert client.query(
        "SELECT getSetting('max_block_size')", settings={"max_block_size": 1234}
    ).result_rows == [(1234,)]
    # A request's settings are for that request only…
    assert client.query("SELECT getSetting('max_block_size')").result_rows != [(1234,)]
    # …while SET lasts for the session, as on a server.
    client.command("SET final = 1")
    assert client.query("SELECT getSetting('final')").result_rows == [(True,)]
    other = clickhouse_connect.get_client(host="127.0.0.1", port=endpoint.port)
    assert other.query("SELECT getSetting('final')").result_rows == [(False,)]


def http_get(endpoint: QueryEndpoint, path: str) -> tuple[int, dict[str, str], str]:
    try:
        with urllib.request.urlopen(f"{endpoint.url}{path}", timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def test_plain_http_get(endpoint: QueryEndpoint) -> None:
    assert http_get(endpoint, "/ping")[2] == "Ok.\n"
    assert http_get(endpoint, "/")[2] == "Ok.\n"
    status, headers, body = http_get(endpoint, "/?query=" + urllib.parse.quote("SELECT 1 AS a, 'x' AS b"))
    assert (status, body) == (200, "1\tx\n")
    assert headers["X-ClickHouse-Format"] == "TabSeparated" and headers["X-ClickHouse-Query-Id"]
    status, headers, body = http_get(endpoint, "/?default_format=JSONEachRow&query=SELECT+2+AS+n")
    assert body == '{"n":2}\n'
    status, _, body = http_get(endpoint, "/?query=SELECT+{n:UInt8}&param_n=7")
    assert body == "7\n"


def test_plain_http_errors_and_read_only_get(endpoint: QueryEndpoint) -> None:
    status, headers, body = http_get(endpoint, "/?query=SELEC+1")
    assert status == 400 and headers["X-ClickHouse-Exception-Code"] == "62"
    assert body.startswith("Code: 62. DB::Exception:") and "(version " in body
    status, headers, body = http_get(endpoint, "/?query=SELECT+*+FROM+nowhere.nothing")
    assert status == 404
    status, _, body = http_get(endpoint, "/?query=DROP+TABLE+switchboard.events")
    assert status == 403 and "READONLY" in body


def test_plain_http_post_insert_with_data(endpoint: QueryEndpoint, http_client: Any) -> None:
    table = f"default.t_{uuid.uuid4().hex[:8]}"
    http_client.command(f"CREATE TABLE {table} (k UInt32, v String) ENGINE = MergeTree ORDER BY k")
    query = urllib.parse.quote(f"INSERT INTO {table} FORMAT CSV")
    request = urllib.request.Request(f"{endpoint.url}/?query={query}", data=b"1,one\n2,two\n", method="POST")
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200
    request = urllib.request.Request(
        endpoint.url + "/", data=f"INSERT INTO {table} FORMAT TSV\n3\tthree\n".encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200
    assert http_client.query(f"SELECT groupArray(v) FROM (SELECT v FROM {table} ORDER BY k)").result_rows == [
        (["one", "two", "three"],)
    ]


def test_run_query_through_the_endpoint(analytics_settings: Settings, chdb_client: Any, tenant: str) -> None:
    batch = project(conversation_events(tenant, "c1"))
    write_batch(chdb_client, batch)
    write_batch(chdb_client, batch)
    out = run_query(
        analytics_settings, f"SELECT count() FROM switchboard.messages WHERE tenant_id = '{tenant}'", "TSV"
    )
    assert out == "3\n"
    # Database switchboard by default; any ClickHouse output format.
    assert (
        run_query(analytics_settings, f"SELECT count() FROM events WHERE tenant_id = '{tenant}'", "TSV")
        == "10\n"
    )
    assert run_query(analytics_settings, "SELECT 1 AS one", "JSONEachRow") == '{"one":1}\n'
    assert "one: 1" in run_query(analytics_settings, "SELECT 1 AS one", "Vertical")
    assert run_query(analytics_settings, "SELECT 1 AS one", "Markdown").startswith("| one |")
    pretty = run_query(analytics_settings, "SELECT 1 AS one")
    assert "one" in pretty and "1" in pretty
    with pytest.raises(QueryFailedError, match="UNKNOWN_TABLE"):
        run_query(analytics_settings, "SELECT * FROM switchboard.nope")


def test_endpoint_listens_on_loopback_only(endpoint: QueryEndpoint) -> None:
    assert endpoint.host == "127.0.0.1"
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=5):
        pass
