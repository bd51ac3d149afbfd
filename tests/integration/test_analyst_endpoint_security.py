"""The analyst endpoint as a server (the test system's `switchboard analytics` process): read-only
for everyone but its admin user, whatever the method; closed to web pages (Host, Origin, simple
POSTs); reader queries under a time limit; HEAD runs nothing; bounded bodies."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

import clickhouse_connect
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, ProgrammingError

from services.analytics import admin_password, endpoint_client
from services.settings import PROJECT_ROOT
from tests.integration.conftest import System

pytestmark = pytest.mark.integration

WRITES = [
    "CREATE TABLE default.sec_probe (x UInt8) ENGINE = Memory",
    "INSERT INTO switchboard.raw_events (event_id) VALUES ('x')",
    "ALTER TABLE switchboard.raw_events DELETE WHERE 1",
    "DROP TABLE switchboard.raw_events",
    "TRUNCATE TABLE switchboard.raw_events",
    "SYSTEM DROP DNS CACHE",
    "KILL QUERY WHERE 1",
    "OPTIMIZE TABLE switchboard.raw_events FINAL",
    "RENAME TABLE switchboard.raw_events TO switchboard.gone",
    "  /* hidden */ -- comment\n drop table switchboard.raw_events",
]


def http(
    system: System,
    path: str,
    *,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    method: str | None = None,
) -> tuple[int, str, dict[str, str]]:
    url = f"http://{system.settings.analytics_listen}{path}"
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def reader(system: System) -> Any:
    host, port = system.settings.analytics_listen.rsplit(":", 1)
    return clickhouse_connect.get_client(host=host, port=int(port))


def q(sql: str) -> str:
    return "/?query=" + urllib.parse.quote(sql)


CLIENT = {"X-ClickHouse-User": "default", "Content-Type": "text/plain"}


@pytest.mark.parametrize("sql", WRITES)
def test_every_write_is_refused_with_readonly_whatever_the_method(system: System, sql: str) -> None:
    client = reader(system)
    with pytest.raises(DatabaseError) as refused:
        client.command(sql)
    assert "READONLY" in str(refused.value) and "164" in str(refused.value)
    for status, body, headers in (
        http(system, q(sql)),
        http(system, "/", data=sql.encode(), headers=CLIENT),
        http(system, q(sql), data=b"", headers=CLIENT),
    ):
        assert (status, headers.get("X-ClickHouse-Exception-Code")) == (403, "164"), body
        assert "READONLY" in body


def test_readers_read_but_cannot_borrow_the_servers_files_or_lift_the_limit(system: System) -> None:
    client = reader(system)
    assert client.query("SELECT count() > 0 FROM system.tables").result_rows == [(1,)]
    # Within its session a reader may SET, but that turns no write back on.
    client.command("SET max_block_size = 1000")
    with pytest.raises(DatabaseError, match="READONLY"):
        client.command("INSERT INTO switchboard.raw_events (event_id) VALUES ('x')")
    with pytest.raises(DatabaseError, match="READONLY"):
        client.command("SELECT 1 INTO OUTFILE '/tmp/sb-analyst-probe.txt'")
    assert not os.path.exists("/tmp/sb-analyst-probe.txt")
    for sql in (
        "SELECT * FROM file('/etc/hostname', 'LineAsString')",
        "SELECT * FROM url('http://127.0.0.1:1/x', 'CSV', 'a String')",
    ):
        with pytest.raises(DatabaseError, match="ACCESS_DENIED"):
            client.query(sql)
    # Nor in the statement itself, nor with a number the engine reads as no limit (review,
    # twenty-fifth session: SETTINGS max_execution_time = false, or ?max_execution_time=1e-9).
    for sql in ("SELECT 1 SETTINGS max_execution_time = 0", "SET max_execution_time = 0"):
        with pytest.raises(DatabaseError, match="READONLY"):
            client.query(sql)
    # Readers are ClickHouse read-only users (readonly=1): clickhouse-connect itself refuses to send
    # a setting then; over HTTP a reader may ask for less time, never for none or more.
    with pytest.raises(ProgrammingError, match="readonly"):
        client.query("SELECT 1", settings={"max_execution_time": 5})
    for asked, got in (
        ("1e-9", "60"),
        ("false", "60"),
        ("0", "60"),
        ("3600", "60"),
        ("5", "5"),
        ("0.5", "0.5"),
    ):
        status, body, _ = http(
            system, q("SELECT getSetting('max_execution_time')") + f"&max_execution_time={asked}"
        )
        assert (status, body) == (200, f"{got}\n"), asked
    status, body, _ = http(system, q("SELECT getSetting('max_result_bytes')") + "&max_result_bytes=0")
    assert (status, body) == (200, f"{1024**3}\n")
    status, body, _ = http(system, q("SELECT 1") + "&allow_experimental_eval_table_function=1")
    assert status == 403 and "READONLY" in body, body
    status, body, _ = http(system, q("SELECT getSetting('max_memory_usage')"))
    assert (status, body) == (200, f"{2 * 1024**3}\n")
    # A session with query parameters (a connection of its own, which could not be read-only).
    with pytest.raises(DatabaseError, match="ACCESS_DENIED"):
        client.command("SET param_x = 1")
    assert client.query("SELECT {x:UInt8}", parameters={"x": 7}).result_rows == [(7,)]
    # A reader's queries stop after 60 s.
    assert client.query("SELECT getSetting('max_execution_time')").result_rows == [(60,)]


def test_a_mistyped_first_keyword_is_a_syntax_error_and_errors_show_the_analysts_own_sql(
    system: System,
) -> None:
    """A new user's walkthrough: `SELEC * FRM t` was refused as a write (READONLY "SELEC changes
    data or schema"), and error texts carried the endpoint's internal `/* sb-query-<id> */`."""
    client = reader(system)  # in a session, as clickhouse-connect always is
    with pytest.raises(DatabaseError) as caught:
        client.query("SELEC * FRM switchboard.messages")
    assert "SYNTAX_ERROR" in str(caught.value) and "READONLY" not in str(caught.value), caught.value
    status, body, _ = http(system, q("SELEC 1"))
    assert status == 400 and "SYNTAX_ERROR" in body, (status, body)
    # ClickHouse's FROM-first SELECT is a read like any other.
    assert client.query("FROM numbers(3) SELECT count()").result_rows == [(3,)]
    assert http(system, q("FROM numbers(3) SELECT count()"))[:2] == (200, "3\n")
    for sql in ("SELECT no_such_column FROM switchboard.messages", "SELEC 1"):
        with pytest.raises(DatabaseError) as caught:
            client.query(sql)
        assert "sb-query" not in str(caught.value), caught.value
        assert "sb-query" not in http(system, q(sql))[1]


def test_settings_that_name_host_paths_or_carry_sql_are_refused_to_readers(
    system: System, tmp_path: Any
) -> None:
    """Review 3 (twenty-fifth session): URL settings and a session's SET were applied before the
    read-only level, and the engine is clickhouse-local: format settings took host paths (read
    /etc/passwd into an error, wrote any file: a .pth in site-packages is code at the next start),
    and filter settings carried SQL past the text checks. Readers may set an allow-list now."""
    evil = tmp_path / "evil.proto"
    for params in (
        "&default_format=Template&format_template_resultset=/etc/passwd",
        "&additional_result_filter=" + urllib.parse.quote("toUInt8(file('/etc/hostname')) = 1"),
        f"&default_format=Protobuf&output_format_schema={evil}",
        "&format_schema_source=query&format_schema=" + urllib.parse.quote("SELECT file('/etc/hostname')"),
    ):
        status, body, _ = http(system, q("SELECT 1 AS a") + params)
        assert status == 403 and "READONLY" in body, (params, status, body)
        assert "root:" not in body
    assert not evil.exists()
    client = reader(system)
    client.command("SET max_block_size = 100, output_format_json_quote_64bit_integers = 0")  # allowed
    for sql in (
        f"SET output_format_schema = '{evil}'",
        "SET format_template_resultset = '/etc/passwd'",
        # A map value's quote hid the names after it from a text parse of the SET.
        "SET additional_table_filters = {'k':'q, z = '}, allow_introspection_functions = 1",
        "SET enable_lightweight_delete = 1",  # an alias
        "SET allow_experimental_eval_table_function = 1",
        "SET max_execution_time = 5",  # limits only in the URL (capped there)
    ):
        with pytest.raises(DatabaseError, match="READONLY"):
            client.command(sql)
    assert client.query("SELECT getSetting('max_block_size')").result_rows == [(100,)]


def test_what_the_engines_formatting_changes_reads_the_same(system: System) -> None:
    """Review 2: FORMAT Values and FORMAT Null come back backticked from the engine's formatting
    (the format went unrecognised: Values streamed without the comma between blocks), and a
    string literal that is not UTF-8 failed with an internal error."""
    sql = "SELECT number FROM numbers(30) FORMAT Values"
    status, body, headers = http(system, "/?max_block_size=10", data=sql.encode(), headers=CLIENT)
    assert status == 200 and body == ",".join(f"({n})" for n in range(30)), body
    assert headers.get("X-ClickHouse-Format") == "Values"
    status, body, _ = http(system, "/", data=b"SELECT 1 FORMAT Null", headers=CLIENT)
    assert (status, body) == (200, "")
    status, body, _ = http(system, "/", data=b"SELECT length('caf\xe9')", headers=CLIENT)
    assert (status, body) == (200, "4\n")


@pytest.mark.parametrize(
    ("sql", "code"),
    [
        # What the text checks missed, found by a review (twenty-fifth session): the statement as
        # the engine parses it is what is checked now.
        ("# a comment\nKILL QUERY WHERE 1", "READONLY"),
        ("/* a /* nested */ comment */ KILL QUERY WHERE 1", "READONLY"),
        ("((SELECT 1)); KILL QUERY WHERE 1", "SYNTAX_ERROR"),
        ("SELECT 1; KILL QUERY WHERE 1", "SYNTAX_ERROR"),
        ("SELECT * FROM `file`('/etc/passwd', 'LineAsString')", "ACCESS_DENIED"),
        ("SELECT * FROM file/**/('/etc/passwd', 'LineAsString')", "ACCESS_DENIED"),
        ("SELECT * FROM \"url\"('http://127.0.0.1:1/x', 'CSV', 'a String')", "ACCESS_DENIED"),
        ("\ufeffDROP TABLE switchboard.raw_events", "READONLY"),
        ('EXISTS "/etc/shadow"', "ACCESS_DENIED"),  # answered whether the host file exists
        ("DESCRIBE TABLE `./var/secrets/analytics-password`", "ACCESS_DENIED"),
        # Review 2 (twenty-fifth session): table functions the name list did not know, read at
        # readonly=2; now readers run at readonly=1, and the list knows them too.
        ("SELECT content FROM filesystem('/etc/hostname')", "ACCESS_DENIED"),
        ("SELECT * FROM python(x)", "ACCESS_DENIED"),
        (
            "SELECT * FROM eval('SELECT * FROM fi' || 'le(\\'/etc/hostname\\', \\'LineAsString\\')') "
            "SETTINGS allow_experimental_eval_table_function = 1",
            "ACCESS_DENIED",
        ),
        ("SELECT * FROM icebergLocal('/etc')", "ACCESS_DENIED"),
        ("SELECT 1 SETTINGS max_execution_time = false", "READONLY"),
        ("SELECT 1 SETTINGS max_execution_time = 1e-9", "READONLY"),
        # Host facts, not data (twenty-sixth session): the data directory's path, the host's name.
        ("SELECT getServerSetting('path')", "ACCESS_DENIED"),
        ("SELECT hostName()", "ACCESS_DENIED"),
        ("SELECT path FROM system.disks", "ACCESS_DENIED"),
        ("SELECT path FROM `system`.`disks`", "ACCESS_DENIED"),
        ("SELECT * FROM system . server_settings WHERE name = 'path'", "ACCESS_DENIED"),
        ("SELECT filesystemAvailable()", "ACCESS_DENIED"),
        # Review (twenty-sixth session): the system database as the current one, bare names.
        ("USE system", "ACCESS_DENIED"),
        ("USE `INFORMATION_SCHEMA`", "ACCESS_DENIED"),
        ("SELECT fullHostName()", "ACCESS_DENIED"),
        ("SELECT query FROM system.processes", "ACCESS_DENIED"),
    ],
)
def test_what_a_reader_sends_is_checked_as_the_engine_parses_it(system: System, sql: str, code: str) -> None:
    client = reader(system)
    with pytest.raises(DatabaseError) as caught:
        client.query(sql)
    assert code in str(caught.value), caught.value
    status, body, _ = http(system, "/", data=sql.encode(), headers=CLIENT)
    assert status >= 400 and code in body, (status, body)
    assert "root:" not in body


def test_the_admin_user_writes_and_a_wrong_password_is_refused(system: System) -> None:
    admin = endpoint_client(system.settings, write=True)
    table = f"default.sec_{uuid.uuid4().hex[:8]}"
    admin.command(f"CREATE TABLE {table} (k UInt32) ENGINE = MergeTree ORDER BY k")
    admin.insert(table, [[1], [2]], column_names=["k"])
    assert reader(system).query(f"SELECT count() FROM {table}").result_rows == [(2,)]
    # HEAD runs nothing, even the admin's INSERT.
    token = base64.b64encode(f"admin:{admin_password(system.settings)}".encode()).decode()
    status, _, _ = http(
        system,
        q(f"INSERT INTO {table} VALUES (3)"),
        method="HEAD",
        headers={"Authorization": f"Basic {token}"},
    )
    assert status == 200
    assert reader(system).query(f"SELECT count() FROM {table}").result_rows == [(2,)]
    admin.command(f"DROP TABLE {table}")

    status, body, headers = http(
        system, q("SELECT 1"), headers={"X-ClickHouse-User": "admin", "X-ClickHouse-Key": "wrong"}
    )
    assert (status, headers.get("X-ClickHouse-Exception-Code")) == (401, "516"), body
    status, body, _ = http(system, q("SELECT 1") + "&user=mallory")
    assert status == 401 and "UNKNOWN_USER" in body


def test_web_pages_cannot_reach_it(system: System) -> None:
    # A form or text/plain POST (what a page can send cross-origin without asking) is refused.
    browser = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        form = {"Content-Type": content_type, "User-Agent": browser}
        status, body, _ = http(system, "/", data=b"SELECT 1", headers=form)
        assert status == 403 and "web form" in body, body
        # With a client's header it is a client.
        assert http(system, "/", data=b"SELECT 1", headers={**form, **CLIENT})[:2] == (200, "1\n")
    # A page's Origin is refused, even for a GET.
    status, body, _ = http(system, q("SELECT 1"), headers={"Origin": "http://evil.example"})
    assert status == 403 and "Origin" in body
    # DNS rebinding: a foreign name for this address is refused; our own names are not.
    port = system.settings.analytics_listen.rsplit(":", 1)[1]
    status, body, _ = http(system, q("SELECT 1"), headers={"Host": f"evil.example:{port}"})
    assert status == 403 and "Host" in body
    assert http(system, q("SELECT 1"), headers={"Host": f"localhost:{port}"})[:2] == (200, "1\n")


def test_sql_and_migrate_commands_keep_working(system: System) -> None:
    env = {**os.environ, **system.env}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli", *args],
            env=env,
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    done = cli("sql", "SELECT 40 + 2", "--format", "TSV")
    assert done.returncode == 0 and done.stdout == "42\n", done.stderr
    refused = cli("sql", "DROP TABLE switchboard.raw_events")
    assert refused.returncode != 0 and "READONLY" in refused.stderr
    migrated = cli("migrate")
    assert migrated.returncode == 0 and "nothing" in migrated.stdout, migrated.stderr


async def test_the_projector_keeps_writing(system: System, stub: Any, tenant: str) -> None:
    from tests.integration.conftest import start_conversation, wait_for_count

    await start_conversation(stub, tenant)
    await wait_for_count(
        system,
        "SELECT count() FROM switchboard.events WHERE tenant_id = {t:String}",
        1,
        what="the start projected",
        t=tenant,
    )


@pytest.mark.parametrize("database", ["system", "SYSTEM", "information_schema"])
def test_a_reader_may_not_make_a_system_database_its_current_one(system: System, database: str) -> None:
    """With `?database=system` the host's disks were `SELECT path FROM disks`, a bare name past the
    check of system table names (review, twenty-sixth session)."""
    status, body, _ = http(
        system, q("SELECT name, path FROM disks") + f"&database={database}", headers=CLIENT
    )
    assert status == 403 and "ACCESS_DENIED" in body, (status, body)
    assert "/tmp/" not in body and "/var/" not in body and "/work/" not in body, body
    # Named in full, the catalogues stay readable (Grafana's and the drivers' own queries).
    client = reader(system)
    assert (
        client.query("SELECT count() FROM system.tables WHERE database = 'switchboard'").result_rows[0][0] > 0
    )


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM system.tables WHERE database = 'switchboard'",
        "SELECT name, data_paths FROM system.tables",
        "SELECT metadata_path FROM system.databases",
        "SELECT d.data_path FROM system.databases AS d",
        "SELECT x FROM (SELECT metadata_path AS x FROM system.tables)",
        "SELECT path FROM system.parts LIMIT 1",
        "WITH t AS (SELECT * FROM system.tables) SELECT * FROM t",
    ],
)
def test_a_reader_does_not_learn_where_the_server_keeps_its_files(system: System, sql: str) -> None:
    """The catalogues' path columns named the data directory on the host (the last open point of the
    twenty-sixth session's review); checked in the engine's analysis of the statement, so aliases,
    subqueries, CTEs and `*` are seen as the engine resolves them."""
    client = reader(system)
    with pytest.raises(DatabaseError) as caught:
        client.query(sql)
    assert "ACCESS_DENIED" in str(caught.value), caught.value
    status, body, _ = http(system, "/", data=sql.encode(), headers=CLIENT)
    assert status == 403 and "ACCESS_DENIED" in body, (status, body)
    assert str(system.settings.data_dir) not in body, body


@pytest.mark.parametrize(
    "sql",
    [
        # What Grafana's ClickHouse plugin and the drivers ask of the catalogues.
        "SELECT name FROM system.databases",
        "SELECT name, engine FROM system.tables WHERE database = 'switchboard'",
        "SELECT name, type FROM system.columns WHERE database = 'switchboard' AND table = 'raw_events'",
        "SELECT name FROM (SELECT * FROM system.tables) WHERE database = 'switchboard'",
        "SELECT version()",
        # A column of one's own named like a path, beside a catalogue.
        "SELECT 'a/b' AS path, name FROM system.databases",
    ],
)
def test_the_catalogues_stay_readable_without_their_paths(system: System, sql: str) -> None:
    result = reader(system).query(sql)
    assert result.result_rows, sql
    assert str(system.settings.data_dir) not in repr(result.result_rows)


@pytest.mark.parametrize(
    ("sql", "params"),
    [
        # Review (twenty-seventh session): the system database as a query parameter passed every
        # check of the statement's text, old (system.disks, system.processes) and new (paths).
        ("SELECT name, data_path FROM {db:Identifier}.databases", {"db": "system"}),
        ("SELECT name, path FROM {db:Identifier}.disks", {"db": "system"}),
        ("SELECT query FROM {db:Identifier}.processes", {"db": "SYSTEM"}),
        # EXPLAIN evaluates scalar subqueries and prints their values.
        ("EXPLAIN QUERY TREE SELECT (SELECT max(data_path) FROM system.databases)", {}),
        ("EXPLAIN PLAN actions = 1 SELECT (SELECT max(data_path) FROM system.databases)", {}),
        # ...and the analysis's error quoted one.
        ("SELECT (SELECT toUInt8(max(data_path)) FROM system.databases)", {}),
        ("SHOW PROCESSLIST", {}),
    ],
)
def test_parameters_explain_and_errors_do_not_reach_the_system_tables(
    system: System, sql: str, params: dict[str, str]
) -> None:
    path = "/?" + urllib.parse.urlencode({f"param_{k}": v for k, v in params.items()})
    status, body, _ = http(system, path, data=sql.encode(), headers=CLIENT)
    assert status >= 400 and "ACCESS_DENIED" in body, (status, body)
    assert str(system.settings.data_dir) not in body and "/tmp/" not in body, body


def test_a_reader_still_uses_query_parameters_and_explain(system: System) -> None:
    client = reader(system)
    rows = client.query(
        "SELECT count() FROM system.tables WHERE database = {db:String}", parameters={"db": "switchboard"}
    ).result_rows
    assert rows[0][0] > 0
    status, body, _ = http(
        system, "/", data=b"EXPLAIN SELECT count() FROM switchboard.events", headers=CLIENT
    )
    assert status == 200, body
