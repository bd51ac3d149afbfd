"""`switchboard migrate` and `switchboard sql` in embedded mode when no analytics process runs,
and the error when another process holds the chdb directory. Each runs in its own process
(chdb allows one directory per process); no Kafka needed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.analytics import load_migrations
from services.settings import PROJECT_ROOT
from tests.conftest import free_port

pytestmark = pytest.mark.integration


def env_for(data_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "SWITCHBOARD_DATA_DIR": str(data_dir),
        "SWITCHBOARD_CLICKHOUSE_DSN": f"chdb://{data_dir / 'clickhouse'}",
        # Nothing listens here: the commands must open chdb themselves.
        "SWITCHBOARD_ANALYTICS_LISTEN": f"127.0.0.1:{free_port()}",
    }


def switchboard(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_migrate_then_sql_without_a_running_analytics_process(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    first = switchboard(env, "migrate")
    assert first.returncode == 0, first.stderr
    names = [m.name for m in load_migrations()]
    assert first.stdout.strip() == "applied: " + ", ".join(names)
    second = switchboard(env, "migrate")
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "applied: nothing (schema is current)"
    out = switchboard(env, "sql", "SELECT count() FROM switchboard.schema_migrations", "-f", "TSV")
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{len(names)}\n"
    # Database switchboard by default; any ClickHouse output format.
    out = switchboard(env, "sql", "SELECT count() AS n FROM events", "--format", "JSONEachRow")
    assert out.returncode == 0, out.stderr
    assert out.stdout == '{"n":0}\n'


def test_a_directory_held_by_another_process_gives_a_clear_error(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    path = tmp_path / "clickhouse"
    path.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, chdb; c = chdb.connect(sys.argv[1]); print('ready', flush=True); time.sleep(120)",
            str(path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "from services.analytics import migrate_command, run_query, AnalyticsError\n"
                "from services.settings import load_settings\n"
                "for call in (lambda s: migrate_command(s), lambda s: run_query(s, 'SELECT 1')):\n"
                "    try:\n"
                "        call(load_settings())\n"
                "    except AnalyticsError as exc:\n"
                "        print(type(exc).__name__, '|', exc)\n",
            ],
            env=env,
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = probe.stdout.strip().splitlines()
        assert len(lines) == 2, probe.stdout + probe.stderr
        assert lines[0].startswith("ClickHouseLockedError |") and "another process" in lines[0]
        assert lines[1].startswith("AnalyticsError |") and "another process" in lines[1]
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait(10)
    # Once the holder is gone, the directory opens again.
    start = time.monotonic()
    done = switchboard(env, "migrate")
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - start < 60
