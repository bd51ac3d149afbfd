"""The migrations' cluster variants (ON CLUSTER, Replicated* engines, Distributed tables), selected
by `clickhouse_cluster`: every statement is parsed by the real engine (formatQuery), and their
shape is what a sharded, replicated deployment needs. chdb has no cluster to run them on."""

from __future__ import annotations

import re
from typing import Any

import pytest

from services.analytics import AnalyticsError, load_migrations
from services.analytics._cluster import (
    ClusterRewriteError,
    ClusterRewriter,
    cluster_migrations,
    cluster_statements,
)
from services.analytics._process import migration_cluster
from services.settings import Settings
from tests.integration.test_analytics import process_chdb

pytestmark = pytest.mark.integration

CLUSTER = "switchboard_cluster"


@pytest.fixture(scope="module")
def chdb_client(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return process_chdb(tmp_path_factory)[1]


def formatted(client: Any, sql: str) -> str:
    """ClickHouse's own formatting of `sql`: raises on anything it cannot parse."""
    return str(client.query("SELECT formatQuery({q:String})", parameters={"q": sql}).result_rows[0][0])


def test_every_cluster_statement_parses_and_runs_on_the_cluster(chdb_client: Any) -> None:
    statements = cluster_statements(load_migrations(), CLUSTER)
    assert len(statements) > len([s for m in load_migrations() for s in m.statements])
    kinds: dict[str, int] = {}
    for sql in statements:
        text = formatted(chdb_client, sql)
        assert f"ON CLUSTER {CLUSTER}" in text, text
        for kind in (
            "ENGINE = Replicated",
            "ENGINE = Distributed",
            "MATERIALIZED VIEW",
            "RENAME TABLE",
            "ALTER",
        ):
            kinds[kind] = kinds.get(kind, 0) + (kind in text)
    assert all(kinds.values()), kinds
    # The engine rejects what is not ClickHouse: the check above could fail.
    with pytest.raises(Exception, match="Syntax error"):
        formatted(chdb_client, "CREATE TABLE t ON CLUSTER (x UInt8)")


def test_storage_is_replicated_and_sharded_by_conversation_and_views_read_the_distributed_names() -> None:
    statements = cluster_statements(load_migrations(), CLUSTER)
    local = {
        m.group(1) for s in statements if (m := re.search(r"^CREATE TABLE IF NOT EXISTS (\S+)_local ", s))
    }
    distributed = {
        m.group(1): m.group(2)
        for s in statements
        if (
            m := re.search(
                r"^CREATE TABLE IF NOT EXISTS (\S+) ON CLUSTER .*ENGINE = Distributed\('[^']*', '[^']*', '[^']*', (.*)\)$",
                s,
                re.S,
            )
        )
    }
    # The projector's tables (renamed in 0005) and the aggregates, each with its Distributed face.
    for table in ("raw_events", "raw_messages", "raw_replies", "conversation_facts", "event_counts"):
        assert f"switchboard.{table}" in distributed, table
    assert "switchboard.raw_events" in distributed and distributed["switchboard.raw_events"].startswith(
        "cityHash64(tenant_id, conversation_id"
    )
    assert "switchboard.events" in local  # created as events_local by 0001, renamed by 0005
    assert any(
        s.startswith("RENAME TABLE IF EXISTS switchboard.events_local TO switchboard.raw_events_local")
        for s in statements
    )
    assert distributed["switchboard.schema_migrations"] == "cityHash64(name)"
    for sql in statements:
        if sql.startswith("CREATE MATERIALIZED VIEW"):
            # Each node's view reads and writes its own shard's storage.
            names = re.findall(r"switchboard\.(\w+)", sql)[1:]
            assert names and all(n.endswith("_local") for n in names), sql
        if re.match(r"CREATE TABLE IF NOT EXISTS \S+_local ON CLUSTER", sql):
            assert (
                "ENGINE = Replicated" in sql
                and "'/clickhouse/tables/{shard}/{database}/{table}', '{replica}'" in sql
            )
    views = [s for s in statements if re.match(r"CREATE (OR REPLACE )?VIEW", s)]
    assert views and not any("_local" in v for v in views)
    # Same migration names: the record of what is applied is the same on a single server.
    assert [m.name for m in cluster_migrations(load_migrations(), CLUSTER)] == [
        m.name for m in load_migrations()
    ]


def test_the_setting_selects_the_variant_and_embedded_refuses_it(tmp_path: Any) -> None:
    assert (
        migration_cluster(Settings(clickhouse_dsn="http://127.0.0.1:1", clickhouse_cluster=CLUSTER))
        == CLUSTER
    )
    assert migration_cluster(Settings(clickhouse_dsn="http://127.0.0.1:1")) == ""
    with pytest.raises(AnalyticsError, match="needs a ClickHouse server DSN"):
        migration_cluster(Settings(clickhouse_dsn=f"chdb://{tmp_path}", clickhouse_cluster=CLUSTER))
    with pytest.raises(ClusterRewriteError, match="no cluster variant"):
        ClusterRewriter(CLUSTER).rewrite("INSERT INTO switchboard.x VALUES (1)")
    with pytest.raises(ClusterRewriteError):
        ClusterRewriter("bad name; DROP")
