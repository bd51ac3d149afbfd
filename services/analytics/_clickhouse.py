"""ClickHouse connections and the numbered migrations in `schemas/clickhouse/NNNN_*.sql`."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.resources
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import clickhouse_connect

from services.settings import Settings

log = logging.getLogger(__name__)

DATABASE = "switchboard"
MIGRATIONS_TABLE = f"{DATABASE}.schema_migrations"

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

# The table that records applied migrations exists before any migration runs.
BOOTSTRAP = (
    f"CREATE DATABASE IF NOT EXISTS {DATABASE}",
    f"""CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE}
(
    name       String,
    checksum   String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY name""",
)


class AnalyticsError(RuntimeError):
    """An analytics operation failed; the message says what to do about it."""


class ClickHouseLockedError(AnalyticsError):
    """The embedded ClickHouse directory is open in another process (only one may open it)."""


class MigrationError(AnalyticsError):
    """A migration failed, or an applied migration's file was changed afterwards."""


@dataclass(frozen=True, slots=True)
class Migration:
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def statements(self) -> list[str]:
        return split_statements(self.sql)


def chdb_path(dsn: str) -> Path:
    """The directory of a ``chdb:///abs/path`` DSN."""
    parsed = urlparse(dsn)
    if parsed.scheme != "chdb" or not parsed.path:
        raise ValueError(f"expected chdb:///absolute/path, got {dsn!r}")
    return Path(parsed.path)


def open_clickhouse(settings: Settings) -> Any:
    """A clickhouse-connect client for ``settings.effective_clickhouse_dsn``.

    ``chdb:///path`` opens ClickHouse in this process (the directory is created; only one process
    may open it, see `ClickHouseLockedError`); ``http(s)://user:pass@host:port`` talks to a server.
    """
    dsn = settings.effective_clickhouse_dsn
    if dsn.startswith("chdb://"):
        path = chdb_path(dsn).resolve()
        path.mkdir(parents=True, exist_ok=True)
        try:
            return clickhouse_connect.get_client(dsn=f"chdb://{path}")
        except Exception as exc:
            if locked_by_another_process(path):
                raise ClickHouseLockedError(
                    f"the embedded ClickHouse at {path} is open in another process (the analytics "
                    "process owns it while it runs): go through its query endpoint "
                    f"(http://{settings.analytics_listen}) or stop that process first"
                ) from exc
            raise
    # One client is shared by the projector's batches (one at a time) and the migrations; a
    # server session would refuse the overlap a thread pool can produce, so no session.
    return clickhouse_connect.get_client(dsn=dsn, autogenerate_session_id=False)


def locked_by_another_process(path: Path) -> bool:
    """Whether a ClickHouse engine holds the directory's ``status`` lock (an flock).

    Only meaningful when this process has not opened the directory itself: flock locks belong to
    open files, so our own engine's lock would look like another process's.
    """
    status = path / "status"
    if not status.exists():
        return False
    with status.open("rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def split_statements(sql: str) -> list[str]:
    """Split a script on top-level ``;``, ignoring those in quotes and comments.

    Statements that contain nothing but comments are dropped; comments inside a statement stay.
    """
    statements: list[str] = []
    current: list[str] = []
    has_code = False
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch == "-" and sql.startswith("--", i):
            end = sql.find("\n", i)
            end = n if end < 0 else end
            current.append(sql[i:end])
            i = end
            continue
        if ch == "/" and sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            end = n if end < 0 else end + 2
            current.append(sql[i:end])
            i = end
            continue
        if ch in "'\"`":
            j = i + 1
            while j < n:
                if sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == ch:
                    if j + 1 < n and sql[j + 1] == ch:  # a doubled quote is an escaped quote
                        j += 2
                        continue
                    break
                j += 1
            current.append(sql[i : j + 1])
            has_code = True
            i = j + 1
            continue
        if ch == ";":
            if has_code:
                statements.append("".join(current).strip())
            current, has_code = [], False
            i += 1
            continue
        if not ch.isspace():
            has_code = True
        current.append(ch)
        i += 1
    if has_code:
        statements.append("".join(current).strip())
    return statements


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """The migrations shipped with the package (``schemas/clickhouse``), in version order."""
    root: Any = directory if directory is not None else importlib.resources.files("schemas") / "clickhouse"
    found: dict[str, Migration] = {}
    versions: dict[str, str] = {}
    for entry in root.iterdir():
        name = entry.name
        if not name.endswith(".sql"):
            continue
        match = _MIGRATION_NAME.match(name)
        if not match:
            raise MigrationError(f"migration file {name!r} is not named NNNN_description.sql")
        if match.group(1) in versions:
            raise MigrationError(f"migrations {versions[match.group(1)]!r} and {name!r} share a version")
        versions[match.group(1)] = name
        found[name] = Migration(name, entry.read_text(encoding="utf-8"))
    return [found[name] for name in sorted(found)]


def applied_migrations(client: Any, cluster: str = "") -> dict[str, str]:
    """Applied migration names and their checksums."""
    if cluster:
        from services.analytics._cluster import cluster_bootstrap

        bootstrap: Sequence[str] = cluster_bootstrap(BOOTSTRAP, cluster)
    else:
        bootstrap = BOOTSTRAP
    for statement in bootstrap:
        client.command(statement)
    rows = client.query(f"SELECT name, checksum FROM {MIGRATIONS_TABLE} FINAL").result_rows
    return {str(name): str(checksum) for name, checksum in rows}


def migrate(client: Any, migrations: list[Migration] | None = None, cluster: str = "") -> list[str]:
    """Apply pending migrations in order, record each, and return the names applied.

    With `cluster` (``settings.clickhouse_cluster``), their cluster variants (services/analytics/
    _cluster.py: ON CLUSTER, Replicated* engines, Distributed tables) run instead.

    Idempotent: a second run applies nothing. Every statement is written to be re-runnable
    (IF NOT EXISTS), so a migration interrupted half-way is simply applied again. A migration
    whose file changed after it was applied is an error: write a new migration instead.
    """
    migrations = load_migrations() if migrations is None else migrations
    if cluster:
        from services.analytics._cluster import cluster_migrations

        migrations = cluster_migrations(migrations, cluster)
    applied = applied_migrations(client, cluster)
    done: list[str] = []
    for migration in migrations:
        if migration.name in applied:
            if applied[migration.name] != migration.checksum:
                raise MigrationError(
                    f"migration {migration.name} was changed after it was applied "
                    "(checksums differ); add a new numbered migration instead of editing it"
                )
            continue
        for number, statement in enumerate(migration.statements, 1):
            try:
                client.command(statement)
            except Exception as exc:
                raise MigrationError(
                    f"migration {migration.name}, statement {number} failed: {exc}\n{statement}"
                ) from exc
        client.insert(
            MIGRATIONS_TABLE, [[migration.name, migration.checksum]], column_names=["name", "checksum"]
        )
        log.info("applied ClickHouse migration %s", migration.name)
        done.append(migration.name)
    return done
