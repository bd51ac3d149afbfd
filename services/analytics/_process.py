"""The analytics process, and the commands (`switchboard sql`, `switchboard migrate`) that reach it.

In embedded mode (``chdb://`` DSN) this process is the only one that opens the chdb directory: it
runs the projector and serves the ClickHouse HTTP endpoint on ``settings.analytics_listen``,
through which everything else (the commands below, analysts, dashboards) queries. With a
ClickHouse server (``http(s)://`` DSN) it only projects; everyone connects to the server.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import re
import secrets
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import clickhouse_connect

from services.analytics._clickhouse import (
    DATABASE,
    AnalyticsError,
    chdb_path,
    locked_by_another_process,
    migrate,
    open_clickhouse,
)
from services.analytics._endpoint import ChdbQueryEngine, QueryEndpoint, QueryError, QueryRequest
from services.analytics._guard import EndpointPolicy, TenantAnalyst
from services.settings import Settings

log = logging.getLogger(__name__)

# The analytics endpoint's only user that may write; everyone else reads (see _guard).
ADMIN_USER = "admin"


class QueryFailedError(AnalyticsError):
    """ClickHouse refused a query; the message is ClickHouse's own (``Code: N. DB::Exception: …``)."""


def listen_address(settings: Settings) -> tuple[str, int]:
    """``settings.analytics_listen`` as (host, port). A non-loopback address needs an admin
    password set in the configuration (a generated one lives on this host only)."""
    host, port = settings.analytics_listen.rsplit(":", 1)
    host = host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not settings.analytics_password:
        raise AnalyticsError(
            f"analytics_listen={settings.analytics_listen!r}: refusing to listen on a non-loopback "
            "address without SWITCHBOARD_ANALYTICS_PASSWORD (its admin user is the only one that "
            "writes; everyone else reads everything)"
        )
    return host, int(port)


def admin_password(settings: Settings) -> str:
    """The endpoint's admin password: SWITCHBOARD_ANALYTICS_PASSWORD, else a random one kept in
    `<data_dir>/secrets/analytics-password` (mode 0600), made on first use."""
    if settings.analytics_password:
        return settings.analytics_password
    path = Path(settings.data_dir) / "secrets" / "analytics-password"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(24))
    return path.read_text().strip()


def endpoint_policy(settings: Settings) -> EndpointPolicy:
    host = listen_address(settings)[0]
    names = {h.strip().lower() for h in settings.analytics_allowed_hosts.split(",") if h.strip()}
    names.add(f"[{host}]" if ":" in host else host.lower())
    return EndpointPolicy(
        admin_user=ADMIN_USER,
        admin_password=admin_password(settings),
        allowed_hosts=frozenset(names),
        allowed_origins=frozenset(
            o.strip() for o in settings.analytics_allowed_origins.split(",") if o.strip()
        ),
        max_body_bytes=settings.analytics_max_body_mb * 1024 * 1024,
        max_decompressed_bytes=settings.analytics_max_decompressed_mb * 1024 * 1024,
        max_execution_time_s=settings.analytics_max_execution_time_s,
        idle_timeout_s=settings.analytics_idle_timeout_s,
        tenant_analysts=tenant_analysts(settings),
    )


def tenant_analysts(settings: Settings) -> dict[str, TenantAnalyst]:
    """`settings.analytics_tenant_users` checked: each user names a tenant and a SHA-256 hex."""
    analysts: dict[str, TenantAnalyst] = {}
    for user, entry in settings.analytics_tenant_users.items():
        tenant = str(entry.get("tenant", ""))
        digest = str(entry.get("password_sha256_hex", "")).lower()
        if not tenant or not re.fullmatch(r"[0-9a-f]{64}", digest) or user == ADMIN_USER:
            raise AnalyticsError(
                f"analytics_tenant_users[{user!r}] needs a tenant and a password_sha256_hex (64 hex "
                f"digits: sha256 of the password), and may not be named {ADMIN_USER!r}"
            )
        analysts[user] = TenantAnalyst(tenant=tenant, password_sha256_hex=digest)
    return analysts


def endpoint_client(settings: Settings, *, write: bool = False, **kwargs: Any) -> Any:
    """A clickhouse-connect client of the analytics endpoint; `write=True` signs in as its admin
    user (migrations, replays: the only writers besides the projector, which is in-process)."""
    host, port = listen_address(settings)
    if write:
        kwargs = {"username": ADMIN_USER, "password": admin_password(settings), **kwargs}
    return clickhouse_connect.get_client(host=host, port=port, **kwargs)


def migration_cluster(settings: Settings) -> str:
    """The cluster whose migration variants apply; embedded ClickHouse has no cluster."""
    if settings.clickhouse_cluster and settings.embedded_clickhouse:
        raise AnalyticsError(
            f"clickhouse_cluster={settings.clickhouse_cluster!r} needs a ClickHouse server DSN "
            "(SWITCHBOARD_CLICKHOUSE_DSN=http://…); embedded chdb is a single node"
        )
    return settings.clickhouse_cluster


def run_analytics(settings: Settings, loglevel: str = "info") -> None:
    """Run the analytics process until SIGTERM/SIGINT (blocking).

    Opens ClickHouse (chdb in embedded mode), applies pending migrations, then runs the projector
    and, in embedded mode, the query endpoint on ``settings.analytics_listen``.
    """
    asyncio.run(serve_analytics(settings))


async def serve_analytics(settings: Settings) -> None:
    from services.observability import metrics
    from streams._consumer import run_until_signalled
    from streams.projector import projector_consumer

    if settings.embedded_clickhouse:
        host, port = listen_address(settings)
    client = open_clickhouse(settings)
    applied = migrate(client, cluster=migration_cluster(settings))
    log.info("ClickHouse migrations applied: %s", ", ".join(applied) or "none pending")
    endpoint: QueryEndpoint | None = None
    if settings.embedded_clickhouse:
        engine = ChdbQueryEngine(chdb_path(settings.effective_clickhouse_dsn))
        endpoint = QueryEndpoint(engine, host, port, policy=endpoint_policy(settings))
        await endpoint.start()

    async def stop_endpoint() -> None:
        if endpoint is not None:
            await endpoint.stop()
            endpoint.engine.close()

    metrics.observe_clickhouse_inserts(client)
    consumer, _ = projector_consumer(settings, client)
    await run_until_signalled(consumer, stop_endpoint)


# --- commands -----------------------------------------------------------------------------------


def _endpoint_url(settings: Settings) -> str:
    return f"http://{settings.analytics_listen}"


def endpoint_is_up(settings: Settings, timeout_s: float = 2.0) -> bool:
    """Whether the analytics process's query endpoint answers ``/ping``."""
    try:
        with urllib.request.urlopen(f"{_endpoint_url(settings)}/ping", timeout=timeout_s) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _post_query(base_url: str, sql: str, params: dict[str, str], timeout_s: float = 300.0) -> bytes:
    parsed = urllib.parse.urlsplit(base_url)
    # The header tells the endpoint this is a ClickHouse client, not a web form (see _guard).
    headers = {"Content-Type": "text/plain; charset=utf-8", "X-ClickHouse-User": "default"}
    if parsed.username:
        token = f"{urllib.parse.unquote(parsed.username)}:{urllib.parse.unquote(parsed.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(token.encode()).decode()
    database = parsed.path.strip("/")
    if database:
        params = {**params, "database": database}
    netloc = parsed.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parsed.port:
        netloc = f"{netloc}:{parsed.port}"
    url = urllib.parse.urlunsplit((parsed.scheme, netloc, "/", urllib.parse.urlencode(params), ""))
    request = urllib.request.Request(url, data=sql.encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return bytes(resp.read())
    except urllib.error.HTTPError as exc:
        raise QueryFailedError(exc.read().decode("utf-8", errors="replace").strip()) from None


def run_query(settings: Settings, sql: str, fmt: str = "PrettyCompact", database: str = DATABASE) -> str:
    """`run_query_bytes` as text (for the text formats)."""
    return run_query_bytes(settings, sql, fmt, database).decode("utf-8", errors="replace")


def run_query_bytes(
    settings: Settings, sql: str, fmt: str = "PrettyCompact", database: str = DATABASE
) -> bytes:
    """Run one statement and return ClickHouse's output in format `fmt` (any ClickHouse format).

    Unqualified names resolve in `database` (``switchboard`` unless a server DSN names one), so
    ``SELECT count() FROM events`` works. No settings are added: the analyst-facing views are
    exact by construction. Embedded mode goes through the analytics process's endpoint; when that
    is not running, chdb is opened here. With a server DSN, the server is queried directly.
    Binary formats (Parquet, Arrow, Native, RowBinary) come back as the engine wrote them.
    Raises `QueryFailedError` with ClickHouse's message.
    """
    params = {"default_format": fmt, "database": database}
    if not settings.embedded_clickhouse:
        # A database in the DSN's path wins (see _post_query).
        return _post_query(settings.effective_clickhouse_dsn, sql, params)
    if endpoint_is_up(settings):
        return _post_query(_endpoint_url(settings), sql, params)
    path = chdb_path(settings.effective_clickhouse_dsn)
    if locked_by_another_process(path):
        raise AnalyticsError(
            f"the embedded ClickHouse at {path} is open in another process, but its query endpoint "
            f"({_endpoint_url(settings)}) does not answer; is the analytics process still starting?"
        )
    path.mkdir(parents=True, exist_ok=True)
    engine = ChdbQueryEngine(path)
    try:
        exists = engine.execute(
            QueryRequest(sql=f"EXISTS DATABASE {database}", default_format="TSV")
        ).body.strip()
        return engine.execute(
            QueryRequest(sql=sql, default_format=fmt, database=database if exists == b"1" else "")
        ).body
    except QueryError as exc:
        raise QueryFailedError(str(exc)) from None
    finally:
        engine.close()


def migrate_command(settings: Settings) -> list[str]:
    """Apply pending migrations wherever ClickHouse is; returns the names applied.

    Embedded mode: through the running analytics process's endpoint, or, when it is not
    running, by opening chdb here (a clear `ClickHouseLockedError` if another process has it).
    """
    if settings.embedded_clickhouse and endpoint_is_up(settings):
        client = endpoint_client(settings, write=True)
    else:
        client = open_clickhouse(settings)
    try:
        return migrate(client, cluster=migration_cluster(settings))
    finally:
        client.close()
