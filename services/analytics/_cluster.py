"""The cluster variant of the migrations: the same schema on a sharded, replicated ClickHouse.

Selected by ``SWITCHBOARD_CLICKHOUSE_CLUSTER=<cluster name>`` (a ``<remote_servers>`` cluster of
the servers, with Keeper and the ``{shard}`` / ``{replica}`` macros configured). Each statement
of ``schemas/clickhouse`` is rewritten, in order, so the names analysts and the projector use
stay the same (docs/analytics.md):

- every ``*MergeTree`` table ``t`` becomes ``t_local`` with the ``Replicated*`` engine on every
  node, and ``t`` a ``Distributed`` table over it, sharded by conversation (all of a
  conversation's rows, and so all duplicates a redelivery writes, meet on one shard, where
  FINAL and the argMax/uniqExact aggregates are exact; the views' merges then combine shards);
- materialized views run on each node from ``s_local`` into ``t_local``;
- plain views read the ``Distributed`` names; ``ALTER`` changes both; ``RENAME`` renames the
  local table and recreates the ``Distributed`` one; every DDL runs ``ON CLUSTER``.

Pure text in, text out; the engine parses every rewritten statement in a test (formatQuery).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from services.analytics._clickhouse import DATABASE, Migration, split_statements

_NOISE = re.compile(r"^(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.DOTALL)
_NAME = r"((?:\w+\.)?\w+)"
_CREATE_TABLE = re.compile(rf"^CREATE\s+TABLE\s+(IF\s+NOT\s+EXISTS\s+)?{_NAME}", re.IGNORECASE)
_ENGINE = re.compile(r"\bENGINE\s*=\s*(\w*MergeTree)\b(\s*\(([^)]*)\))?", re.IGNORECASE)
_CREATE_MV = re.compile(rf"^CREATE\s+MATERIALIZED\s+VIEW\s+(IF\s+NOT\s+EXISTS\s+)?{_NAME}", re.IGNORECASE)
_CREATE_VIEW = re.compile(
    rf"^CREATE\s+(?:OR\s+REPLACE\s+)?VIEW\s+(IF\s+NOT\s+EXISTS\s+)?{_NAME}", re.IGNORECASE
)
_CREATE_DATABASE = re.compile(rf"^CREATE\s+DATABASE\s+(IF\s+NOT\s+EXISTS\s+)?{_NAME}", re.IGNORECASE)
_DROP = re.compile(rf"^DROP\s+(?:TABLE|VIEW)\s+(IF\s+EXISTS\s+)?{_NAME}", re.IGNORECASE)
_ALTER = re.compile(rf"^ALTER\s+TABLE\s+{_NAME}", re.IGNORECASE)
_RENAME = re.compile(rf"^RENAME\s+TABLE\s+(IF\s+EXISTS\s+)?{_NAME}\s+TO\s+{_NAME}\s*$", re.IGNORECASE)


class ClusterRewriteError(ValueError):
    """A migration statement the cluster rewrite does not know how to distribute."""


def _qualified(name: str) -> tuple[str, str]:
    database, _, table = name.rpartition(".")
    return database or DATABASE, table


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _sharding_key(columns: str, after_engine: str) -> str:
    """By conversation where there is one (all its rows and duplicates on one shard), else by
    tenant, else by the sort key (the migrations table)."""
    if re.search(r"\bconversation_id\b", columns) and re.search(r"\btenant_id\b", columns):
        return "cityHash64(tenant_id, conversation_id)"
    if re.search(r"\btenant_id\b", columns):
        return "cityHash64(tenant_id)"
    order = re.search(r"\bORDER\s+BY\s+(\([^)]*\)|\w+)", after_engine, re.IGNORECASE)
    if order is None:
        raise ClusterRewriteError("a table without tenant_id or ORDER BY has no sharding key")
    return f"cityHash64({order.group(1).strip('()')})"


class ClusterRewriter:
    """Rewrites statements in migration order; remembers which tables are sharded storage."""

    def __init__(self, cluster: str) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", cluster):
            raise ClusterRewriteError(f"cluster name {cluster!r} is not a ClickHouse identifier")
        self.cluster = cluster
        self.on_cluster = f"ON CLUSTER `{cluster}`"
        # Storage tables (database, table) -> sharding key expression.
        self.sharded: dict[tuple[str, str], str] = {}

    def _distributed(self, database: str, table: str, if_not_exists: str = "IF NOT EXISTS ") -> str:
        key = self.sharded[(database, table)]
        return (
            f"CREATE TABLE {if_not_exists}{database}.{table} {self.on_cluster} AS {database}.{table}_local\n"
            f"ENGINE = Distributed({_quote(self.cluster)}, {_quote(database)}, {_quote(table + '_local')}, {key})"
        )

    def _localize(self, sql: str) -> str:
        """References to sharded storage tables in a materialized view's query -> the local ones."""
        for database, table in self.sharded:
            sql = re.sub(
                rf"\b{re.escape(database)}\.{re.escape(table)}\b(?!_local)", f"{database}.{table}_local", sql
            )
        return sql

    def rewrite(self, statement: str) -> list[str]:
        sql = _NOISE.sub("", statement, count=1).strip()
        if match := _CREATE_DATABASE.match(sql):
            return [f"{sql[: match.end()]} {self.on_cluster}{sql[match.end() :]}"]
        if match := _CREATE_TABLE.match(sql):
            engine = _ENGINE.search(sql)
            if engine is None:
                raise ClusterRewriteError(f"a table without a MergeTree engine: {sql[:120]}")
            database, table = _qualified(match.group(2))
            args = [_quote("/clickhouse/tables/{shard}/{database}/{table}"), _quote("{replica}")]
            if engine.group(3) and engine.group(3).strip():
                args.append(engine.group(3).strip())
            replicated = f"ENGINE = Replicated{engine.group(1)}({', '.join(args)})"
            head = f"CREATE TABLE {match.group(1) or ''}{database}.{table}_local {self.on_cluster}"
            local = head + sql[match.end() : engine.start()] + replicated + sql[engine.end() :]
            self.sharded[(database, table)] = _sharding_key(
                sql[match.end() : engine.start()], sql[engine.end() :]
            )
            return [local, self._distributed(database, table)]
        if match := _CREATE_MV.match(sql):
            return [self._localize(f"{sql[: match.end()]} {self.on_cluster}{sql[match.end() :]}")]
        if match := _CREATE_VIEW.match(sql):
            return [f"{sql[: match.end()]} {self.on_cluster}{sql[match.end() :]}"]
        if match := _DROP.match(sql):
            return [f"{sql[: match.end()]} {self.on_cluster}{sql[match.end() :]}"]
        if match := _ALTER.match(sql):
            database, table = _qualified(match.group(1))
            rest = sql[match.end() :]
            out = [f"ALTER TABLE {database}.{table} {self.on_cluster}{rest}"]
            if (database, table) in self.sharded:
                out.insert(0, f"ALTER TABLE {database}.{table}_local {self.on_cluster}{rest}")
            return out
        if match := _RENAME.match(sql):
            if_exists = match.group(1) or ""
            old, new = _qualified(match.group(2)), _qualified(match.group(3))
            if old not in self.sharded:
                return [f"{sql} {self.on_cluster}"]
            self.sharded[new] = self.sharded.pop(old)
            return [
                f"RENAME TABLE {if_exists}{old[0]}.{old[1]}_local TO {new[0]}.{new[1]}_local {self.on_cluster}",
                f"DROP TABLE IF EXISTS {old[0]}.{old[1]} {self.on_cluster} SYNC",
                self._distributed(*new),
            ]
        raise ClusterRewriteError(f"no cluster variant for: {sql[:120]}")


def cluster_migrations(migrations: Sequence[Migration], cluster: str) -> list[Migration]:
    """The migrations' cluster variants, same names (so the record of what is applied matches)."""
    rewriter = ClusterRewriter(cluster)
    out = []
    for migration in migrations:
        statements = [s for statement in migration.statements for s in rewriter.rewrite(statement)]
        out.append(Migration(migration.name, ";\n\n".join(statements) + ";\n"))
    return out


def cluster_bootstrap(bootstrap: Sequence[str], cluster: str) -> list[str]:
    """The migrations table and its database, replicated too (every node knows what is applied)."""
    rewriter = ClusterRewriter(cluster)
    return [s for statement in bootstrap for s in rewriter.rewrite(statement)]


def cluster_statements(migrations: Sequence[Migration], cluster: str) -> list[str]:
    """Every statement of the cluster variant, bootstrap first, in the order they run."""
    from services.analytics._clickhouse import BOOTSTRAP

    statements = cluster_bootstrap(BOOTSTRAP, cluster)
    for migration in cluster_migrations(migrations, cluster):
        statements.extend(split_statements(migration.sql))
    return statements
