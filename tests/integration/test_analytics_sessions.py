"""Sessions on the embedded endpoint are cheap: every clickhouse-connect client opens one (it
sends a session_id), and analysts' tools open many. A session costs an engine connection only
once it holds state a dict cannot replay (a temporary table); SET and USE are remembered.
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import clickhouse_connect
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from services.analytics import QueryEndpoint
from tests.integration.test_analytics import process_endpoint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> QueryEndpoint:
    return process_endpoint(tmp_path_factory)


# More than the engine's 256 stateful sessions (max_stateful_sessions). benchmarks/analytics_sessions.py
# opens 2,000; this test opened 1,000, 75 s of a CI run's 19 minutes (a client's handshake is ~4
# requests of ~5 ms of endpoint CPU each), where 400 show the same.
CLIENTS = 400


def client(endpoint: QueryEndpoint, **kwargs: Any) -> Any:
    return clickhouse_connect.get_client(host="127.0.0.1", port=endpoint.port, **kwargs)


def post(endpoint: QueryEndpoint, sql: str, **params: str) -> tuple[int, str]:
    url = f"{endpoint.url}/?{urllib.parse.urlencode(params)}"
    request = urllib.request.Request(url, data=sql.encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_more_clients_at_once_than_stateful_sessions_each_query(endpoint: QueryEndpoint) -> None:
    _, stateful_before = endpoint.engine.session_count

    def one(i: int) -> tuple[Any, int]:
        # Its own session_id, and a query (version, timezone) already. A session idle for its
        # timeout (60 s by default) is dropped: a fresh-machine CI took longer than that to open
        # them, and the first ones were gone (`held` failed), so these ask for 10 minutes.
        c = client(endpoint, settings={"session_timeout": 600})
        return c, int(c.query(f"SELECT {i} + 1").result_rows[0][0])

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(one, range(CLIENTS)))
    # Every client is still open (its session alive) and got its own answer.
    assert [n for _, n in results] == [i + 1 for i in range(CLIENTS)]
    assert len({c.get_client_setting("session_id") for c, _ in results}) == CLIENTS
    sessions, stateful = endpoint.engine.session_count
    # Every one of them is held (sessions of earlier tests may have expired meanwhile: a
    # loaded CI machine once took longer than their idle timeout to open these).
    with endpoint.engine._sessions_lock:
        ids = {key.split("\x00", 1)[1] for key in endpoint.engine._sessions}  # user NUL session id
        held = {c.get_client_setting("session_id") for c, _ in results} <= ids
    assert held
    assert sessions >= CLIENTS > 256
    assert stateful <= stateful_before  # none of them needed an engine connection (earlier ones may expire)
    # And each can still query in its session afterwards.
    assert all(c.query("SELECT 1").result_rows == [(1,)] for c, _ in results[:50])
    for c, _ in results:
        c.close()


def test_set_and_use_persist_across_a_sessions_requests(endpoint: QueryEndpoint) -> None:
    c = client(endpoint)
    c.command("SET max_block_size = 4321")
    c.command("SET final = 1, max_threads = 3")
    for _ in range(3):
        assert c.query(
            "SELECT getSetting('max_block_size'), getSetting('final'), getSetting('max_threads')"
        ).result_rows == [(4321, True, 3)]
    # A request's own settings win for that request only.
    assert c.query("SELECT getSetting('max_block_size')", settings={"max_block_size": 99}).result_rows == [
        (99,)
    ]
    assert c.query("SELECT getSetting('max_block_size')").result_rows == [(4321,)]
    # Setting back to the default forgets it.
    c.command("SET final = 0")
    assert c.query("SELECT getSetting('final')").result_rows == [(False,)]
    c.command("USE switchboard")
    assert c.query("SELECT currentDatabase(), count() > 0 FROM schema_migrations").result_rows == [
        ("switchboard", True)
    ]
    # Another client's session has none of it.
    other = client(endpoint)
    assert other.query("SELECT getSetting('max_block_size') != 4321, currentDatabase()").result_rows == [
        (True, "default")
    ]


def test_session_errors_are_the_engines(endpoint: QueryEndpoint) -> None:
    c = client(endpoint)
    with pytest.raises(DatabaseError, match="UNKNOWN_SETTING"):
        c.command("SET no_such_setting_at_all = 1")
    with pytest.raises(DatabaseError, match="UNKNOWN_DATABASE"):
        c.command("USE no_such_database_here")
    # The failed statements changed nothing.
    assert c.query("SELECT currentDatabase()").result_rows == [("default",)]
    sid = f"s-{uuid.uuid4().hex}"
    assert post(endpoint, "SELECT 1", session_id=sid, session_check="1")[0] == 404
    # A read-only request in a session cannot lift its readonly level with SET.
    assert post(endpoint, "SET max_block_size = 777", session_id=sid) == (200, "")
    status, body = post(endpoint, "SET readonly = 0", session_id=sid, readonly="2")
    assert status == 500 or "readonly" in body.lower()
    assert "Code: " in body
    assert post(endpoint, "SELECT getSetting('max_block_size')", session_id=sid, readonly="2") == (
        200,
        "777\n",
    )
    assert (
        post(endpoint, "CREATE TABLE default.nope (x UInt8) ENGINE = Memory", session_id=sid, readonly="1")[0]
        == 403
    )


def test_temporary_tables_still_work_in_a_session(endpoint: QueryEndpoint) -> None:
    stateful_before = endpoint.engine.session_count[1]
    c = client(endpoint)
    c.command("SET max_block_size = 2222")
    c.command("USE switchboard")
    c.command("CREATE TEMPORARY TABLE tmp_session_numbers (n UInt32)")
    assert endpoint.engine.session_count[1] == stateful_before + 1
    c.command("INSERT INTO tmp_session_numbers VALUES (1), (2), (3)")
    c.insert("tmp_session_numbers", [[4], [5]], column_names=["n"])
    assert c.query("SELECT sum(n) FROM tmp_session_numbers").result_rows == [(15,)]
    # What the session had remembered came along into its own connection.
    assert c.query("SELECT getSetting('max_block_size'), currentDatabase()").result_rows == [
        (2222, "switchboard")
    ]
    # A request's database is for that request only, in a session with a connection too.
    sid = c.get_client_setting("session_id")
    assert post(endpoint, "SELECT currentDatabase()", session_id=sid, database="default") == (
        200,
        "default\n",
    )
    assert c.query("SELECT currentDatabase()").result_rows == [("switchboard",)]
    other = client(endpoint)
    with pytest.raises(DatabaseError, match="UNKNOWN_TABLE"):
        other.query("SELECT * FROM tmp_session_numbers")


def test_query_parameters_set_in_a_session_persist(endpoint: QueryEndpoint) -> None:
    sid = f"p-{uuid.uuid4().hex}"
    stateful_before = endpoint.engine.session_count[1]
    assert post(endpoint, "SET param_answer = 42", session_id=sid) == (200, "")
    # A query parameter is not a setting a dict could replay: the session now has its connection.
    assert endpoint.engine.session_count[1] == stateful_before + 1
    assert post(endpoint, "SELECT {answer:UInt8} + 1", session_id=sid) == (200, "43\n")
    assert post(endpoint, "SELECT {answer:UInt8}", session_id=f"p-{uuid.uuid4().hex}")[0] >= 400
