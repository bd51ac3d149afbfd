"""The query endpoint through the Go driver Grafana's ClickHouse plugin uses (clickhouse-go v2
over HTTP: Native format with client_protocol_version): the same rows as clickhouse-connect.

The Go program (tests/integration/go_client) is built once per source version and cached under
var/go_client/; building it needs `go` and the Go module proxy (or a warm module cache).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest

from services.settings import PROJECT_ROOT
from streams.projector import project, write_batch
from tests.integration.test_analytics import process_chdb, process_endpoint
from tests.integration.test_analytics_cookbook import cookbook_queries
from tests.integration.test_metrics import support_day

pytestmark = pytest.mark.integration

SOURCE = Path(__file__).parent / "go_client"


@pytest.fixture(scope="module")
def go_client() -> Path:
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed: the clickhouse-go driver test needs `go` on PATH")
    files = sorted(p for p in SOURCE.iterdir() if p.name in ("go.mod", "go.sum", "main.go"))
    digest = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()[:16]
    binary = PROJECT_ROOT / "var" / "go_client" / digest / "go_client"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        built = subprocess.run(
            [go, "build", "-o", str(binary), "."], cwd=SOURCE, capture_output=True, text=True, timeout=900
        )
        if built.returncode != 0:
            if "dial tcp" in built.stderr or "proxy.golang.org" in built.stderr:
                pytest.skip(f"cannot download github.com/ClickHouse/clickhouse-go/v2: {built.stderr[-500:]}")
            pytest.fail(f"go build failed:\n{built.stderr}")
    return binary


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str]:
    """(endpoint port, tenant) with a support day of data in it."""
    _, client, _ = process_chdb(tmp_path_factory)
    tenant = f"g{uuid.uuid4().hex[:12]}"
    write_batch(client, project(support_day(tenant)))
    return process_endpoint(tmp_path_factory).port, tenant


def through_go(binary: Path, port: int, *queries: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [str(binary), f"127.0.0.1:{port}", *queries], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def normal(value: Any) -> Any:
    """One representation for both clients' values."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    if isinstance(value, int):
        return round(float(value), 6)
    if isinstance(value, (list, tuple)):
        return [normal(v) for v in value]
    if isinstance(value, dict):
        return {str(k): normal(v) for k, v in value.items()}
    return value


def dashboard_queries(tenant: str) -> list[str]:
    where = f"tenant_id = '{tenant}'"
    return [
        "SELECT 1 AS one, 'x' AS s, NULL AS n, [1, 2] AS a, map('k', 1) AS m, (1, 'a') AS t, "
        "toLowCardinality('lc') AS lc, [toLowCardinality('y')] AS alc, toDateTime64('2025-01-02 03:04:05.678', 3, 'UTC') AS d",
        f"SELECT * FROM metrics_per_minute WHERE {where} ORDER BY channel, minute",
        f"SELECT * FROM intent_mix_per_minute WHERE {where} ORDER BY channel, minute, intent, stage",
        f"SELECT * FROM events_per_minute WHERE {where} ORDER BY minute, type",
        f"SELECT * FROM conversations WHERE {where} ORDER BY conversation_id",
        f"SELECT * FROM handoff_waits WHERE {where} ORDER BY event_id",
        f"SELECT * FROM replies WHERE {where} ORDER BY event_id",
        f"SELECT * FROM conversation_messages WHERE {where} ORDER BY event_id",
        f"SELECT * FROM events WHERE {where} ORDER BY event_id",
        f"SELECT count() FROM events WHERE {where} AND 0",
    ]


def test_the_go_driver_reads_the_same_rows_as_clickhouse_connect(
    go_client: Path, loaded: tuple[int, str]
) -> None:
    port, tenant = loaded
    queries = dashboard_queries(tenant) + [
        sql.replace("{tenant:String}", f"'{tenant}'") for _, sql in cookbook_queries()
    ]
    results = through_go(go_client, port, *queries)
    assert len(results) == len(queries)
    python = clickhouse_connect.get_client(host="127.0.0.1", port=port, database="switchboard")
    non_empty = 0
    for sql, got in zip(queries, results, strict=True):
        assert "error" not in got, f"{sql}\n{got.get('error')}"
        expected = python.query(sql)
        assert [normal(row) for row in got["rows"]] == [normal(list(row)) for row in expected.result_rows], (
            sql
        )
        if got["rows"]:
            assert got["columns"] == list(expected.column_names), sql
            non_empty += 1
    assert non_empty >= len(queries) - 1


def test_native_without_a_protocol_version_is_unchanged(loaded: tuple[int, str]) -> None:
    port, _ = loaded
    import urllib.request

    url = f"http://127.0.0.1:{port}/?default_format=Native&query=SELECT+1+AS+x"
    with urllib.request.urlopen(url, timeout=10) as plain:
        assert plain.read() == b"\x01\x01\x01x\x05UInt8\x01"
    with urllib.request.urlopen(url + "&client_protocol_version=54460", timeout=10) as versioned:
        # BlockInfo (overflows = 0, bucket -1), then the column with its serialization-kind byte.
        assert versioned.read() == b"\x01\x00\x02\xff\xff\xff\xff\x00" + b"\x01\x01\x01x\x05UInt8\x00\x01"


def test_the_go_driver_reads_as_the_reader_user_of_a_guarded_endpoint(
    go_client: Path, loaded: tuple[int, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Seen in the twenty-ninth session's trial: under `make run` (an admin password set, so the
    password-less `default` user is a reader) every Go connection failed. clickhouse-go opens
    with `SELECT displayName(), version(), revision(), timezone()`, and displayName() is a host
    fact a reader may not ask for: HTTP 403, ACCESS_DENIED, before the first panel's query."""
    from services.analytics import EndpointPolicy
    from tests.integration.test_analytics import serve

    _, tenant = loaded
    guarded = serve(process_chdb(tmp_path_factory)[0], EndpointPolicy(admin_password="s3cret-admin"))
    queries = dashboard_queries(tenant)
    results = through_go(go_client, guarded.port, *queries)
    python = clickhouse_connect.get_client(host="127.0.0.1", port=guarded.port, database="switchboard")
    for sql, got in zip(queries, results, strict=True):
        assert "error" not in got, f"{sql}\n{got.get('error')}"
        expected = python.query(sql)
        assert [normal(row) for row in got["rows"]] == [normal(list(row)) for row in expected.result_rows], (
            sql
        )
    # The host's name is still not the reader's to ask for, on its own or inside another query.
    for sql in (
        "SELECT displayName()",
        "SELECT displayName(), version(), revision(), timezone(), hostName()",
    ):
        (got,) = through_go(go_client, guarded.port, sql)
        assert "ACCESS_DENIED" in got.get("error", ""), (sql, got)
