"""Tenant analysts (issue 9 §3): a user of the analyst endpoint bound to one tenant sees that
tenant's rows in every table and view with a tenant column, and cannot reach another tenant's
by any way round: a SETTINGS clause, SET, URL parameters, system tables, table functions,
subqueries, joins, multi-statements, the query cache or another user's session.

Real chdb with the projector's rows for two tenants, the endpoint over real sockets, and
clickhouse-connect as the analysts' client.
"""

from __future__ import annotations

import base64
import hashlib
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

import clickhouse_connect
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from services.analytics import EndpointPolicy, QueryEndpoint
from services.analytics._guard import TenantAnalyst
from services.analytics._process import tenant_analysts
from services.analytics._tenancy import TENANT_TABLES_SQL
from services.settings import Settings
from streams.projector import project, write_batch
from tests.integration.test_analytics import process_chdb, serve
from tests.integration.test_metrics import support_day

pytestmark = pytest.mark.integration

ADMIN_PASSWORD = "admin-" + uuid.uuid4().hex
PASSWORDS = {"alice": "alice-" + uuid.uuid4().hex, "bob": "bob-" + uuid.uuid4().hex}


def sha(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(alice's tenant, bob's tenant), each with a support day of projected data."""
    _, client, _ = process_chdb(tmp_path_factory)
    a, b = f"ua{uuid.uuid4().hex[:10]}", f"ub{uuid.uuid4().hex[:10]}"
    for tenant in (a, b):
        write_batch(client, project(support_day(tenant)))
    return a, b


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory, tenants: tuple[str, str]) -> QueryEndpoint:
    a, b = tenants
    policy = EndpointPolicy(
        admin_password=ADMIN_PASSWORD,
        tenant_analysts={
            "alice": TenantAnalyst(tenant=a, password_sha256_hex=sha(PASSWORDS["alice"])),
            "bob": TenantAnalyst(tenant=b, password_sha256_hex=sha(PASSWORDS["bob"])),
        },
    )
    return serve(process_chdb(tmp_path_factory)[0], policy)


def client(endpoint: QueryEndpoint, user: str, **kwargs: Any) -> Any:
    password = ADMIN_PASSWORD if user == "admin" else PASSWORDS.get(user, "")
    return clickhouse_connect.get_client(
        host="127.0.0.1", port=endpoint.port, username=user, password=password, **kwargs
    )


def http(endpoint: QueryEndpoint, user: str, sql: str, **params: str) -> tuple[int, str]:
    token = base64.b64encode(f"{user}:{PASSWORDS.get(user, '')}".encode()).decode()
    url = f"{endpoint.url}/?{urllib.parse.urlencode(params)}"
    request = urllib.request.Request(
        url, data=sql.encode(), headers={"Authorization": f"Basic {token}"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def tenant_tables(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    _, admin, _ = process_chdb(tmp_path_factory)
    return sorted(f"{d}.{t}" for d, t in admin.query(TENANT_TABLES_SQL).result_rows)


def test_an_analyst_sees_only_its_tenant_in_every_table_with_a_tenant_column(
    tmp_path_factory: pytest.TempPathFactory, endpoint: QueryEndpoint, tenants: tuple[str, str]
) -> None:
    _, admin, _ = process_chdb(tmp_path_factory)
    tables = tenant_tables(tmp_path_factory)
    # The projector's storage, the analysts' views and the metrics: all of them are covered.
    for name in (
        "raw_events",
        "raw_messages",
        "events",
        "conversations",
        "metrics_per_minute",
        "event_counts",
    ):
        assert f"switchboard.{name}" in tables
    for user, tenant in zip(("alice", "bob"), tenants, strict=True):
        analyst = client(endpoint, user)
        with_rows = 0
        for table in tables:
            seen = analyst.query(f"SELECT DISTINCT tenant_id FROM {table}").result_rows
            assert seen in ([], [(tenant,)]), (user, table, seen)
            expected = admin.query(
                f"SELECT count() FROM {table} WHERE tenant_id = %(t)s", parameters={"t": tenant}
            )
            assert analyst.query(f"SELECT count() FROM {table}").result_rows == expected.result_rows, table
            with_rows += bool(seen)
        assert with_rows >= 10  # every event kind's table and view holds the tenant's rows
        # The other tenant's rows are not there, asked for by name.
        other = tenants[1] if tenant == tenants[0] else tenants[0]
        assert analyst.query(
            "SELECT count() FROM switchboard.events WHERE tenant_id = %(t)s", parameters={"t": other}
        ).result_rows == [(0,)]


def test_a_table_made_later_is_filtered_at_once(
    tmp_path_factory: pytest.TempPathFactory, endpoint: QueryEndpoint, tenants: tuple[str, str]
) -> None:
    admin = client(endpoint, "admin")
    table = f"default.later_{uuid.uuid4().hex[:8]}"
    admin.command(f"CREATE TABLE {table} (tenant_id String, x UInt8) ENGINE = MergeTree ORDER BY tenant_id")
    admin.insert(table, [[tenants[0], 1], [tenants[1], 2]], column_names=["tenant_id", "x"])
    alice = client(endpoint, "alice")
    assert alice.query(f"SELECT tenant_id, x FROM {table}").result_rows == [(tenants[0], 1)]
    # A view without the column is filtered where it reads; a table without it is not readable
    # at all (deny by default: nothing says whose its rows are).
    admin.command(f"CREATE VIEW {table}_total AS SELECT sum(x) AS total FROM {table}")
    admin.command(f"CREATE TABLE {table}_bare (x UInt8) ENGINE = MergeTree ORDER BY x")
    assert alice.query(f"SELECT total FROM {table}_total").result_rows == [(1,)]
    with pytest.raises(DatabaseError, match=r"has no tenant_id column.*ACCESS_DENIED"):
        alice.query(f"SELECT * FROM {table}_bare")
    with pytest.raises(DatabaseError, match="ACCESS_DENIED"):
        alice.query("SELECT * FROM switchboard.schema_migrations")
    for name in (f"{table}_total", f"{table}_bare", table):
        admin.command(f"DROP TABLE {name}")


def test_no_setting_lifts_the_filter(endpoint: QueryEndpoint, tenants: tuple[str, str]) -> None:
    alice = client(endpoint, "alice")
    lift = "{'switchboard.raw_events': '1'}"
    # A SETTINGS clause, SET in the session, and readonly: the engine refuses (readonly = 1).
    for sql in (
        f"SELECT count() FROM switchboard.raw_events SETTINGS additional_table_filters = {lift}",
        "SELECT count() FROM switchboard.raw_events SETTINGS readonly = 0",
        "SELECT count() FROM switchboard.raw_events SETTINGS `additional_table_filters` = {}",
    ):
        with pytest.raises(DatabaseError, match="READONLY"):
            alice.query(sql)
    with pytest.raises(DatabaseError, match="READONLY"):
        alice.command(f"SET additional_table_filters = {lift}")
    # URL settings outside a reader's allow-list are refused (they were overridden by ours; the
    # allow-list came with review 3 of the twenty-fifth session: settings naming host paths).
    one_tenant = [(tenants[0],)]
    sql = "SELECT DISTINCT tenant_id FROM switchboard.raw_events"
    for params in (
        {"additional_table_filters": lift},
        {"additional_table_filters": "{}", "readonly": "0"},
        {"use_query_cache": "1", "additional_result_filter": "1"},
    ):
        status, body = http(endpoint, "alice", sql, **params)
        assert status == 403 and "READONLY" in body and tenants[1] not in body, (params, status, body)
    # The query cache is off for alice: an entry made by the admin does not answer her.
    admin = client(endpoint, "admin")
    assert len(admin.query(sql, settings={"use_query_cache": 1}).result_rows) >= 2
    status, body = http(endpoint, "alice", sql, use_query_cache="1")
    assert status == 403 and tenants[1] not in body, body
    assert http(endpoint, "alice", sql) == (200, f"{tenants[0]}\n")
    assert alice.query(sql).result_rows == one_tenant


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM system.processes",
        "SELECT * FROM system.parts",
        "SELECT * FROM system.errors",
        "SHOW PROCESSLIST",
        "SELECT count() FROM merge('switchboard', '^raw_events$')",
        "SELECT * FROM view(SELECT query FROM system.processes)",
        "SELECT * FROM (SELECT query FROM system.processes) AS s",
        "SELECT * FROM file('/etc/hostname', 'LineAsString')",
        "SELECT * FROM url('http://127.0.0.1:1/x', 'CSV', 'a String')",
        "SELECT count() FROM switchboard.events WHERE event_id IN (SELECT event_id FROM merge('switchboard', '^raw_events$'))",
        "WITH leaked AS (SELECT * FROM system.processes) SELECT * FROM leaked",
        "EXPLAIN ESTIMATE SELECT * FROM switchboard.raw_events",
        "SELECT 1; SELECT * FROM system.processes",
        "INSERT INTO switchboard.raw_events (event_id) VALUES ('x')",
        # The catalogues' path columns (the host's data directory), as for readers.
        "SELECT * FROM system.tables WHERE database = 'switchboard'",
        "SELECT metadata_path FROM system.databases",
    ],
)
def test_ways_past_the_filter_are_refused(endpoint: QueryEndpoint, sql: str) -> None:
    status, body = http(endpoint, "alice", sql)
    assert status in (400, 403), body
    assert any(name in body for name in ("ACCESS_DENIED", "READONLY", "SYNTAX_ERROR")), body


def test_subqueries_joins_and_unions_stay_in_the_tenant(
    endpoint: QueryEndpoint, tenants: tuple[str, str]
) -> None:
    a, b = tenants
    alice = client(endpoint, "alice")
    p = {"b": b}
    for sql in (
        "SELECT count() FROM switchboard.raw_events WHERE tenant_id IN (SELECT %(b)s)",
        "SELECT (SELECT count() FROM switchboard.raw_events WHERE tenant_id = %(b)s)",
        "SELECT count() FROM (SELECT * FROM switchboard.raw_events FINAL) WHERE tenant_id = %(b)s",
        "SELECT count() FROM switchboard.events AS e JOIN switchboard.conversations AS c "
        "ON e.conversation_id = c.conversation_id WHERE c.tenant_id = %(b)s",
        "SELECT count() FROM (SELECT tenant_id FROM switchboard.events UNION ALL "
        "SELECT tenant_id FROM switchboard.raw_messages) WHERE tenant_id = %(b)s",
        "WITH x AS (SELECT * FROM switchboard.metrics_per_minute) SELECT count() FROM x WHERE tenant_id = %(b)s",
    ):
        assert alice.query(sql, parameters=p).result_rows == [(0,)], sql
    # And the same shapes do see alice's own rows.
    assert alice.query(
        "SELECT count() > 0 FROM switchboard.raw_events WHERE tenant_id IN (SELECT %(a)s)",
        parameters={"a": a},
    ).result_rows == [(1,)]
    # Catalogues stay open: clients list tables and columns.
    assert alice.query(
        "SELECT count() > 0 FROM system.tables WHERE database = 'switchboard'"
    ).result_rows == [(1,)]
    assert alice.command("SHOW CREATE TABLE switchboard.events").startswith("CREATE VIEW")


def test_credentials_and_sessions_belong_to_their_user(
    endpoint: QueryEndpoint, tenants: tuple[str, str]
) -> None:
    status, body = http(endpoint, "alice", "SELECT 1", password="x")  # the header's password counts
    assert status == 200
    token = base64.b64encode(b"alice:wrong").decode()
    request = urllib.request.Request(
        f"{endpoint.url}/?query=SELECT%201", headers={"Authorization": f"Basic {token}"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 401 and "AUTHENTICATION_FAILED" in refused.value.read().decode()
    # The admin's session with a temporary table: alice naming the same session id gets her own.
    session = uuid.uuid4().hex
    admin = client(endpoint, "admin", session_id=session)
    admin.command("CREATE TEMPORARY TABLE leak (tenant_id String)")
    admin.command("INSERT INTO leak SELECT DISTINCT tenant_id FROM switchboard.raw_events")
    status, body = http(endpoint, "alice", "SELECT count() FROM leak", session_id=session)
    assert status == 404 and "UNKNOWN_TABLE" in body, body
    # A tenant analyst cannot hold a temporary table of its own (it would hold a connection
    # outside the filter).
    status, body = http(endpoint, "alice", "CREATE TEMPORARY TABLE t (x UInt8)", session_id=uuid.uuid4().hex)
    assert status == 403, body


def test_the_setting_is_checked() -> None:
    good = Settings(analytics_tenant_users={"carol": {"tenant": "t1", "password_sha256_hex": sha("pw")}})
    assert tenant_analysts(good) == {"carol": TenantAnalyst("t1", sha("pw"))}
    from services.analytics import AnalyticsError

    for entry in (
        {"tenant": "t1"},
        {"password_sha256_hex": sha("pw")},
        {"tenant": "t1", "password_sha256_hex": "pw"},
    ):
        with pytest.raises(AnalyticsError, match="password_sha256_hex"):
            tenant_analysts(Settings(analytics_tenant_users={"carol": entry}))


def test_a_tenant_analyst_gets_the_go_drivers_hello(endpoint: QueryEndpoint) -> None:
    """clickhouse-go's first statement (GO_DRIVER_HELLO) is answered for a tenant analyst as for a
    reader (trial, twenty-ninth session: ACCESS_DENIED for displayName() stopped every Go
    connection); displayName() of its own is still refused."""
    from services.analytics._endpoint import GO_DRIVER_HELLO

    status, body = http(endpoint, "alice", GO_DRIVER_HELLO)
    assert status == 200, body
    assert body.split("\t")[0] == "switchboard"
    status, body = http(endpoint, "alice", "SELECT displayName()")
    assert status == 403 and "ACCESS_DENIED" in body, body
