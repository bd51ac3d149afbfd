"""`switchboard sql` against a running endpoint: database `switchboard` by default, and any
ClickHouse output format, binary ones included, written to stdout byte for byte."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid

import pyarrow.parquet as pq
import pytest

from services.settings import PROJECT_ROOT
from streams.projector import project, write_batch
from tests.integration.test_analytics import process_chdb, process_endpoint
from tests.integration.test_metrics import support_day

pytestmark = pytest.mark.integration


def sql(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "sql", *args],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        timeout=120,
    )


def test_sql_defaults_to_switchboard_and_passes_any_format(tmp_path_factory: pytest.TempPathFactory) -> None:
    path, client, _ = process_chdb(tmp_path_factory)
    endpoint = process_endpoint(tmp_path_factory)
    tenant = f"q{uuid.uuid4().hex[:12]}"
    day = support_day(tenant)
    write_batch(client, project(day))
    events = len({e.event_id for e, _ in day})
    env = {
        **os.environ,
        "SWITCHBOARD_CLICKHOUSE_DSN": f"chdb://{path}",
        "SWITCHBOARD_ANALYTICS_LISTEN": f"127.0.0.1:{endpoint.port}",
        "SWITCHBOARD_DATA_DIR": str(path.parent),
    }
    where = f"WHERE tenant_id = '{tenant}'"

    out = sql(env, f"SELECT count() FROM events {where}", "--format", "TSV")
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{events}\n".encode()
    out = sql(env, f"SELECT count() AS n FROM events {where}", "-f", "CSVWithNames")
    assert out.stdout == f'"n"\n{events}\n'.encode()
    out = sql(
        env, f"SELECT type, count() AS n FROM events {where} GROUP BY type ORDER BY type", "-f", "Parquet"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(b"PAR1")
    table = pq.read_table(io.BytesIO(out.stdout))
    assert sum(table.column("n").to_pylist()) == events
    assert "message_received" in [
        t.decode() if isinstance(t, bytes) else t for t in table.column("type").to_pylist()
    ]
    # The default format is for people.
    out = sql(env, f"SELECT count() AS n FROM events {where}")
    assert b"\xe2\x94" in out.stdout and str(events).encode() in out.stdout
    # ClickHouse's own error, and a non-zero exit.
    out = sql(env, "SELECT * FROM no_such_table_here", "-f", "TSV")
    assert out.returncode != 0 and b"UNKNOWN_TABLE" in out.stderr
    out = sql(env, "SELECT 1", "-f", "NoSuchFormat")
    assert out.returncode != 0 and b"UNKNOWN_FORMAT" in out.stderr
