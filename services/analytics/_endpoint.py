"""Enough of ClickHouse's HTTP interface, served over chdb, for clickhouse-connect and curl.

chdb runs ClickHouse inside one process and speaks no network protocol; this endpoint lets every
other process (the `switchboard sql` command, an analyst's `clickhouse_connect.get_client(host=…,
port=8123)`, Grafana, curl) reach the one process that owns the chdb directory.

What it implements of https://clickhouse.com/docs/interfaces/http:
- ``GET|POST /?query=…`` and the query in the POST body (``query`` + body are concatenated, and
  for ``INSERT … FORMAT X`` the body after the statement is the data); multipart form fields.
- ``param_<name>`` query parameters for ``{name:Type}`` placeholders.
- ``default_format`` (TabSeparated otherwise) and a trailing ``FORMAT`` clause; any output format
  ClickHouse has.
- ``client_protocol_version``: Native output carries what a server writes for that protocol
  revision (BlockInfo, serialization-kind bytes), as clickhouse-go v2 (Grafana) expects.
- ``database``, ``query_id``, ``session_id`` / ``session_timeout`` / ``session_check`` (``SET`` and
  ``USE`` persist in a session as a small remembered dict replayed per request, so thousands of
  clients' sessions are cheap; a session that creates a temporary table gets its own engine
  connection), and every other URL parameter as a query-scoped setting.
- Compressed request bodies (``Content-Encoding`` gzip, deflate, br, zstd, lz4); responses are
  never compressed (no ``Content-Encoding``, which clients read as identity).
- ``X-ClickHouse-Query-Id``, ``-Format``, ``-Timezone``, ``-Summary`` and ``-Server-Display-Name``
  headers; errors as ``Code: N. DB::Exception: … (NAME) (version …)`` with
  ``X-ClickHouse-Exception-Code`` and ClickHouse's 4xx/5xx status, or, after the first blocks
  of a Native result, appended in an ``X-ClickHouse-Exception-Tag`` block as a server does
  mid-stream; ``GET /ping`` -> ``Ok.``.
- GET requests (and ``readonly=1|2``) are read-only, as in ClickHouse.

Settings are the client's: the endpoint applies none of its own, so a query gives the same
answer here as on a ClickHouse server. Exact counts come from the schema (the analyst-facing
views have FINAL inside, see docs/analytics.md), not from a setting. Not implemented: users and passwords (the endpoint
listens on 127.0.0.1 only and ignores credentials), ClickHouse's native block compression
(``compress=1`` / ``decompress=1``), external data tables, progress headers.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import threading
import time
import uuid
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from services.analytics._guard import (
    EndpointPolicy,
    Refusal,
    authenticate,
    browser_refusal,
    credentials,
    reader_refusal,
    reader_settings,
)
from services.analytics._native import NativeFormatError, with_protocol_revision

log = logging.getLogger(__name__)

DEFAULT_SETTINGS: Mapping[str, str] = {}

# URL parameters that shape the HTTP exchange rather than the query (never sent to the engine).
_TRANSPORT_PARAMS = frozenset(
    {
        "query",
        "database",
        "default_format",
        "session_id",
        "session_timeout",
        "session_check",
        "query_id",
        "user",
        "password",
        "quota_key",
        "role",
        "compress",
        "decompress",
        "enable_http_compression",
        "http_zlib_compression_level",
        "http_native_compression_disable_checksumming_on_decompress",
        "wait_end_of_query",
        "buffer_size",
        "http_response_buffer_size",
        "send_progress_in_http_headers",
        "http_headers_progress_interval_ms",
        "client_protocol_version",
        "cancel_http_readonly_queries_on_client_close",
        "add_http_cors_header",
        "readonly",
    }
)

_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TRAILING_FORMAT = re.compile(r"\bFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)
# `INSERT INTO t [(cols)] [SETTINGS …] FORMAT Name` followed by data.
_INSERT_WITH_DATA = re.compile(
    rb"^\s*(INSERT\s+INTO\s.*?)\bFORMAT\s+(\w+)[ \t]*(?:\r?\n)?", re.IGNORECASE | re.DOTALL
)
_INSERT_WITHOUT_DATA = re.compile(rb"\b(?:VALUES|SELECT|WITH)\b", re.IGNORECASE)
_LEADING_NOISE = re.compile(r"^(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.DOTALL)
_FIRST_WORD = re.compile(r"^\(?\s*([A-Za-z]+)")
_ERROR_CODE = re.compile(r"Code:\s*(\d+)")
_ERROR_NAME = re.compile(r"\(([A-Z][A-Z0-9_]+)\)\s*(?:\(version [^)]*\))?\s*$")

_READ_STATEMENTS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "EXISTS", "CHECK"})
_READONLY_ALLOWED = _READ_STATEMENTS | {"SET", "USE"}

# ClickHouse's exceptionCodeToHTTPStatus, for the codes chdb can raise here.
_HTTP_STATUS = {
    **dict.fromkeys((192, 193, 194, 195, 516), 401),  # unknown user, wrong password, …
    **dict.fromkeys((164, 497), 403),  # READONLY, ACCESS_DENIED
    **dict.fromkeys((46, 60, 73, 81, 82, 372), 404),  # unknown function/table/format/db, no session
    **dict.fromkeys((373,), 409),  # SESSION_IS_LOCKED
    **dict.fromkeys((307,), 413),  # request body too large (compressed or not)
    **dict.fromkeys(
        (6, 25, 26, 27, 32, 33, 36, 38, 41, 42, 43, 44, 47, 48, 53, 57, 62, 69, 70, 72, 115, 130, 386),
        400,
    ),  # cannot parse, syntax, unknown identifier/setting, type mismatch, bad arguments, …
    **dict.fromkeys((159, 241), 500),
}

_CONTENT_TYPES = {
    "tabseparated": "text/tab-separated-values; charset=UTF-8",
    "tsv": "text/tab-separated-values; charset=UTF-8",
    "csv": "text/csv; charset=UTF-8; header=absent",
    "csvwithnames": "text/csv; charset=UTF-8; header=present",
    "json": "application/json; charset=UTF-8",
    "jsoncompact": "application/json; charset=UTF-8",
    "jsoneachrow": "application/x-ndjson; charset=UTF-8",
}


class QueryError(Exception):
    """A failed query, carrying ClickHouse's error code and message."""

    def __init__(self, message: str, code: int = 1001) -> None:
        super().__init__(message)
        self.code = code

    @classmethod
    def from_engine(cls, exc: BaseException) -> QueryError:
        if isinstance(exc, UnicodeDecodeError) and isinstance(exc.object, bytes):
            # chdb could not decode its own message (it quotes the query's bytes, which need
            # not be UTF-8): the message is in the bytes it failed on.
            text = exc.object.decode("utf-8", "replace").strip()
        else:
            text = str(exc).strip()
        start = text.find("Code: ")
        if start > 0:
            text = text[start:]
        match = _ERROR_CODE.search(text)
        return cls(text, int(match.group(1)) if match else 1001)

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS.get(self.code, 500)


@dataclass(slots=True)
class QueryRequest:
    sql: str
    # Data of an `INSERT … FORMAT X` statement, and X.
    insert_data: bytes | None = None
    insert_format: str = ""
    default_format: str = "TabSeparated"
    params: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    database: str = ""
    session_id: str = ""
    session_timeout_s: float = 60.0
    session_check: bool = False
    # "" (read-write), "1" or "2": ClickHouse's readonly levels; GET requests are "2".
    readonly: str = ""
    query_id: str = ""
    # The client's ``client_protocol_version`` (0: none); shapes Native output (see _native).
    client_protocol_version: int = 0


@dataclass(slots=True)
class QueryResult:
    body: bytes
    # The output format when the statement produces a result set, else "".
    format: str
    summary: dict[str, str]
    # An error after the first blocks of a Native result: `body` holds the blocks before it, and
    # the endpoint answers as a ClickHouse server does mid-stream (200, the blocks, then the
    # exception in an X-ClickHouse-Exception-Tag block), so clients raise where the stream broke.
    error: QueryError | None = None


def statement_kind(sql: str) -> str:
    """The statement's first keyword, upper-case (``SELECT``, ``INSERT``, …); "" if none."""
    text = _LEADING_NOISE.sub("", sql, count=1)
    match = _FIRST_WORD.match(text)
    return match.group(1).upper() if match else ""


def output_format(sql: str, default: str) -> str:
    match = _TRAILING_FORMAT.search(sql)
    return match.group(1) if match else default


def _engine_text(sql: str) -> str | bytes:
    """The query as the engine takes it: text, or the client's exact bytes when they were not
    UTF-8 (decoded with surrogateescape by parse_request)."""
    try:
        sql.encode()
    except UnicodeEncodeError:
        return sql.encode("utf-8", "surrogateescape")
    return sql


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _set_statement(settings: Mapping[str, str]) -> str:
    for name in settings:
        if not _SETTING_NAME.match(name):
            raise QueryError(f"Code: 115. DB::Exception: Unknown setting '{name}'. (UNKNOWN_SETTING)", 115)
    return "SET " + ", ".join(f"{name} = {_quote(value)}" for name, value in settings.items())


class _Session:
    """A client's session. What it SETs and USEs is remembered here (a small dict) and replayed
    on a fresh connection per request, so thousands of idle sessions cost little; the session
    gets its own engine connection only once it holds state that cannot be replayed (temporary
    tables, ``SET param_…``)."""

    __slots__ = ("conn", "database", "last_used", "lock", "settings", "timeout_s")

    def __init__(self, timeout_s: float) -> None:
        self.conn: Any = None
        self.settings: dict[str, str] = {}
        self.database = ""
        self.timeout_s = timeout_s
        self.lock = threading.Lock()
        self.last_used = time.monotonic()

    def expired(self, now: float) -> bool:
        return not self.lock.locked() and now - self.last_used > self.timeout_s


# Statements whose effect lives in the engine's session and cannot be replayed from a dict.
_NEEDS_OWN_CONNECTION = re.compile(
    r"^(?:CREATE\s+(?:OR\s+REPLACE\s+)?TEMPORARY\b|SET\s+param_)", re.IGNORECASE
)
# How often idle sessions are swept (a sweep walks every session).
_SWEEP_INTERVAL_S = 1.0


def _readonly_refusal() -> QueryError:
    return QueryError(
        "Code: 164. DB::Exception: Cannot execute query in readonly mode: a GET request "
        "(or readonly=1|2) only reads; send writes with POST. (READONLY)",
        164,
    )


class ChdbQueryEngine:
    """Runs `QueryRequest`s on chdb connections; thread-safe, blocking (call from a worker thread).

    Every request gets a fresh connection (a fraction of a millisecond) on which its session's
    remembered database and settings, then its own settings, then its readonly level are applied.
    A session that created a temporary table (or set a query parameter) keeps one connection of
    its own instead; request settings are applied there for that request only, then restored.
    At most `max_sessions` sessions, of which at most `max_stateful_sessions` hold a connection.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        default_settings: Mapping[str, str] = DEFAULT_SETTINGS,
        max_sessions: int = 20_000,
        max_stateful_sessions: int = 256,
    ) -> None:
        self.path = str(Path(path).resolve())
        self.default_settings = dict(default_settings)
        self.max_sessions = max_sessions
        self.max_stateful_sessions = max_stateful_sessions
        self._sessions: dict[str, _Session] = {}
        self._stateful = 0
        self._sessions_lock = threading.Lock()
        self._next_sweep = 0.0
        # Keeps the engine open between requests (chdb shuts it down with its last connection).
        self._anchor = self._connect()
        self.version = self._scalar("SELECT version()")
        self.timezone = self._scalar("SELECT timezone()")
        # What a fresh connection already has changed (chdb's own defaults): not a session's SET.
        self._baseline = self._changed_settings(self._anchor)

    def _connect(self, readonly: str = "") -> Any:
        import chdb  # the `embedded` extra: server deployments do not install it

        settings = dict(self.default_settings)
        if readonly:
            # Enforced by the engine for this connection, exactly as ClickHouse does for GET.
            settings["readonly"] = readonly
        suffix = "&".join(f"{k}={v}" for k, v in settings.items())
        try:
            return chdb.connect(f"{self.path}?{suffix}" if suffix else self.path)
        except Exception as exc:
            raise QueryError.from_engine(exc) from exc

    def _scalar(self, sql: str) -> str:
        return str(self._anchor.query(sql, "TSV").bytes().decode().strip())

    def _changed_settings(self, conn: Any) -> dict[str, str]:
        rows = json.loads(
            self._run(conn, "SELECT name, value FROM system.settings WHERE changed", "JSONCompact")
            .bytes()
            .decode()
        )["data"]
        return {str(name): str(value) for name, value in rows}

    def close(self) -> None:
        with self._sessions_lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
            self._stateful = 0
        for session in sessions:
            if session.conn is not None:
                session.conn.close()
        self._anchor.close()

    @property
    def session_count(self) -> tuple[int, int]:
        """(sessions, sessions holding their own connection)."""
        with self._sessions_lock:
            return len(self._sessions), self._stateful

    # --- sessions -------------------------------------------------------------------------------

    def _sweep(self, now: float) -> list[Any]:
        """Drop expired sessions (caller holds the lock); returns their connections to close."""
        if now < self._next_sweep:
            return []
        self._next_sweep = now + _SWEEP_INTERVAL_S
        closing = []
        for sid, old in list(self._sessions.items()):
            if old.expired(now):
                del self._sessions[sid]
                if old.conn is not None:
                    self._stateful -= 1
                    closing.append(old.conn)
        return closing

    def _session(self, request: QueryRequest) -> _Session:
        now = time.monotonic()
        with self._sessions_lock:
            closing = self._sweep(now)
            session = self._sessions.get(request.session_id)
            if session is None:
                if request.session_check:
                    raise QueryError(
                        f"Code: 372. DB::Exception: Session {request.session_id} not found. "
                        "(SESSION_NOT_FOUND)",
                        372,
                    )
                if len(self._sessions) >= self.max_sessions:
                    raise QueryError(
                        f"Code: 202. DB::Exception: Too many sessions (at most {self.max_sessions}); "
                        "close idle clients or lower session_timeout. (TOO_MANY_SIMULTANEOUS_QUERIES)",
                        202,
                    )
                session = _Session(request.session_timeout_s)
                self._sessions[request.session_id] = session
            session.timeout_s = request.session_timeout_s
        for conn in closing:
            conn.close()
        if not session.lock.acquire(blocking=False):
            raise QueryError(
                f"Code: 373. DB::Exception: Session {request.session_id} is locked by a concurrent "
                "client. (SESSION_IS_LOCKED)",
                373,
            )
        return session

    def _give_own_connection(self, session: _Session) -> None:
        """The session now needs state only a connection can hold: open one with what it has."""
        with self._sessions_lock:
            if self._stateful >= self.max_stateful_sessions:
                raise QueryError(
                    "Code: 202. DB::Exception: Too many sessions with temporary tables or query "
                    f"parameters (at most {self.max_stateful_sessions}); close idle clients or lower "
                    "session_timeout. (TOO_MANY_SIMULTANEOUS_QUERIES)",
                    202,
                )
            self._stateful += 1
        try:
            conn = self._connect()
            self._replay(conn, session.database, session.settings)
        except BaseException:
            with self._sessions_lock:
                self._stateful -= 1
            raise
        session.conn = conn

    # --- execution ------------------------------------------------------------------------------

    def execute(self, request: QueryRequest) -> QueryResult:
        kind = statement_kind(request.sql)
        if not request.session_id:
            return self._execute_fresh(request, kind, "", {})
        session = self._session(request)
        try:
            if session.conn is None and _NEEDS_OWN_CONNECTION.match(
                _LEADING_NOISE.sub("", request.sql, count=1)
            ):
                if request.readonly and kind not in _READONLY_ALLOWED:
                    raise _readonly_refusal()
                self._give_own_connection(session)
            if session.conn is None:
                if kind in ("SET", "USE"):
                    return self._remember(session, request, kind)
                return self._execute_fresh(request, kind, session.database, session.settings)
            return self._execute_in_session(session.conn, request, kind)
        finally:
            session.last_used = time.monotonic()
            session.lock.release()

    def _replay(self, conn: Any, database: str, settings: Mapping[str, str]) -> None:
        if database:
            self._run(conn, f"USE `{database.replace('`', '``')}`")
        if settings:
            self._run(conn, _set_statement(settings))

    def _fresh(self, request: QueryRequest, database: str, settings: Mapping[str, str]) -> Any:
        """A new connection with a session's state, the request's settings, then its readonly
        level (last, so the replayed SETs are allowed and the statement is not)."""
        conn = self._connect()
        try:
            self._replay(conn, request.database or database, {**settings, **request.settings})
            if request.readonly:
                self._run(conn, f"SET readonly = {int(request.readonly)}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _execute_fresh(
        self, request: QueryRequest, kind: str, database: str, settings: Mapping[str, str]
    ) -> QueryResult:
        conn = self._fresh(request, database, settings)
        try:
            return self._execute_on(conn, request, kind)
        finally:
            conn.close()

    def _remember(self, session: _Session, request: QueryRequest, kind: str) -> QueryResult:
        """SET or USE in a session without a connection: run it (so errors are the engine's) on a
        fresh one with the session's state, then keep what it changed."""
        scoped = QueryRequest(sql=request.sql, readonly=request.readonly)  # no URL settings: as on a session
        conn = self._fresh(scoped, session.database, session.settings)
        try:
            result = self._execute_on(conn, scoped, kind)
            database = self._run(conn, "SELECT currentDatabase()").bytes().decode().strip()
            changed = self._changed_settings(conn)
        finally:
            conn.close()
        if request.readonly:
            changed.pop("readonly", None)  # ours, for this request
        session.database = database if database != "default" or session.database else ""
        session.settings = {
            name: value
            for name, value in changed.items()
            if name != "database" and self._baseline.get(name) != value
        }
        return result

    def _execute_in_session(self, conn: Any, request: QueryRequest, kind: str) -> QueryResult:
        if request.readonly and kind not in _READONLY_ALLOWED:
            # A session's connection cannot be made read-only for one request (readonly cannot
            # be reset), so read-only requests in a session are checked by statement instead.
            raise _readonly_refusal()
        restore = self._apply_scoped_settings(conn, request.settings) if kind != "SET" else {}
        database = ""
        try:
            if request.database:
                # The URL's database is for this request; the session's own (USE) comes back after.
                database = self._run(conn, "SELECT currentDatabase()").bytes().decode().strip()
                self._replay(conn, request.database, {})
            return self._execute_on(conn, request, kind)
        finally:
            if database:
                self._replay(conn, database, {})
            if restore:
                self._run(conn, _set_statement(restore))

    def _apply_scoped_settings(self, conn: Any, settings: Mapping[str, str]) -> dict[str, str]:
        """Apply request settings on a session connection; return what restores the session."""
        if not settings:
            return {}
        names = ", ".join(_quote(name) for name in settings)
        current = {
            row[0]: row[1]
            for row in json.loads(
                self._run(
                    conn, f"SELECT name, value FROM system.settings WHERE name IN ({names})", "JSONCompact"
                )
                .bytes()
                .decode()
            )["data"]
        }
        changed = {k: v for k, v in settings.items() if current.get(k) != v}
        if not changed:
            return {}
        self._run(conn, _set_statement(changed))
        return {k: current[k] for k in changed if k in current}

    def _run(self, conn: Any, sql: str, fmt: str = "TSV", params: Mapping[str, str] | None = None) -> Any:
        try:
            return conn.query(_engine_text(sql), fmt, params=dict(params or {}))
        except Exception as exc:
            raise QueryError.from_engine(exc) from exc

    def _execute_on(self, conn: Any, request: QueryRequest, kind: str) -> QueryResult:
        if request.insert_data is not None:
            return self._insert(conn, request)
        produces_rows = kind in _READ_STATEMENTS
        fmt = output_format(request.sql, request.default_format)
        error: QueryError | None = None
        if kind in ("SELECT", "WITH") and fmt.lower() == "native":
            body, read_rows, read_bytes, elapsed, error = self._stream_native(conn, request)
        else:
            result = self._run(conn, request.sql, request.default_format, request.params)
            body = bytes(result.bytes() or b"")
            read_rows, read_bytes, elapsed = result.rows_read(), result.bytes_read(), result.elapsed()
        if request.client_protocol_version and fmt.lower() == "native":
            try:
                body = with_protocol_revision(body, request.client_protocol_version)
            except NativeFormatError as exc:
                raise QueryError(f"Code: 48. DB::Exception: {exc}. (NOT_IMPLEMENTED)", 48) from exc
        summary = {
            "read_rows": str(read_rows),
            "read_bytes": str(read_bytes),
            "written_rows": "0",
            "written_bytes": "0",
            "total_rows_to_read": str(read_rows),
            "result_rows": "0",
            "result_bytes": str(len(body)),
            "elapsed_ns": str(int(elapsed * 1e9)),
        }
        return QueryResult(body, fmt if produces_rows else "", summary, error)

    def _stream_native(
        self, conn: Any, request: QueryRequest
    ) -> tuple[bytes, int, int, float, QueryError | None]:
        """A Native result block by block (the blocks concatenate to exactly what a buffered query
        returns); an error after the first block is returned with the blocks before it."""
        chunks: list[bytes] = []
        rows = read = 0
        elapsed = 0.0
        try:
            stream = conn.send_query(_engine_text(request.sql), "Native", params=dict(request.params))
        except Exception as exc:
            raise QueryError.from_engine(exc) from exc
        try:
            for chunk in stream:
                chunks.append(bytes(chunk.bytes() or b""))
                rows += chunk.rows_read()
                read += chunk.bytes_read()
                elapsed += chunk.elapsed()
        except Exception as exc:
            if not chunks:
                raise QueryError.from_engine(exc) from exc
            return b"".join(chunks), rows, read, elapsed, QueryError.from_engine(exc)
        finally:
            stream.close()
        return b"".join(chunks), rows, read, elapsed, None

    def _insert(self, conn: Any, request: QueryRequest) -> QueryResult:
        assert request.insert_data is not None
        try:
            inserter = conn.send_insert(request.sql, request.insert_format)
            with inserter:
                inserter.append(request.insert_data)
                done = inserter.finish()
        except Exception as exc:
            raise QueryError.from_engine(exc) from exc
        summary = {
            "read_rows": "0",
            "read_bytes": "0",
            "written_rows": str(done.rows_written),
            "written_bytes": str(done.bytes_written),
            "total_rows_to_read": "0",
            "result_rows": str(done.rows_written),
            "result_bytes": "0",
            "elapsed_ns": str(int(done.elapsed * 1e9)),
        }
        return QueryResult(b"", "", summary)


# --- HTTP ---------------------------------------------------------------------------------------


def _too_big(limit: int) -> QueryError:
    return QueryError(
        f"Code: 307. DB::Exception: the decompressed request body is larger than {limit} bytes "
        "(SWITCHBOARD_ANALYTICS_MAX_DECOMPRESSED_MB). (TOO_LARGE_DECOMPRESSED_SIZE)",
        307,
    )


def _bad_body(encoding: str, exc: BaseException) -> QueryError:
    return QueryError(f"Code: 36. DB::Exception: bad {encoding} body: {exc}. (BAD_ARGUMENTS)", 36)


def _decompress(body: bytes, encoding: str, limit: int | None = None) -> bytes:
    """The body decoded per Content-Encoding; never more than `limit` bytes are produced (a small
    compressed body can expand enormously)."""
    encoding = encoding.strip().lower()
    if not body or encoding in ("", "identity"):
        return body
    bound = (limit + 1) if limit is not None else 0
    if encoding in ("gzip", "deflate"):
        # wbits 47: gzip or zlib header, detected; max_length caps the output.
        inflater = zlib.decompressobj(47 if encoding == "gzip" else 15)
        try:
            out = inflater.decompress(body, bound)
        except zlib.error as exc:
            raise _bad_body(encoding, exc) from exc
        if limit is not None and len(out) > limit:
            raise _too_big(limit)
        return out
    if encoding == "zstd":
        import io

        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body))
        try:
            out = reader.read(bound) if limit is not None else reader.readall()
        except zstandard.ZstdError as exc:
            raise _bad_body(encoding, exc) from exc
        if limit is not None and len(out) > limit:
            raise _too_big(limit)
        return bytes(out)
    if encoding == "lz4":
        import lz4.frame

        try:
            out = lz4.frame.LZ4FrameDecompressor().decompress(body, max_length=bound or -1)
        except RuntimeError as exc:  # what lz4 raises for a frame it cannot read
            raise _bad_body(encoding, exc) from exc
        if limit is not None and len(out) > limit:
            raise _too_big(limit)
        return bytes(out)
    if encoding == "br":
        try:
            import brotli
        except ImportError as exc:
            raise QueryError(
                "Code: 36. DB::Exception: br request bodies need brotli. (BAD_ARGUMENTS)", 36
            ) from exc
        try:
            out = bytes(brotli.decompress(body))
        except brotli.error as exc:
            raise _bad_body(encoding, exc) from exc
        if limit is not None and len(out) > limit:
            raise _too_big(limit)
        return out
    raise QueryError(f"Code: 36. DB::Exception: Unknown Content-Encoding {encoding!r}. (BAD_ARGUMENTS)", 36)


async def parse_request(request: web.Request, max_decompressed: int | None = None) -> QueryRequest:
    """Turn a ClickHouse-style HTTP request into a `QueryRequest` (raises `QueryError`)."""
    values: dict[str, str] = dict(request.query)
    body = b""
    if request.method == "POST":
        if request.content_type == "multipart/form-data":
            form = await request.post()
            for name, value in form.items():
                if not isinstance(value, str):
                    raise QueryError(
                        "Code: 48. DB::Exception: external data is not supported by this endpoint. "
                        "(NOT_IMPLEMENTED)",
                        48,
                    )
                values[name] = value
        else:
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge as exc:
                raise QueryError(
                    f"Code: 307. DB::Exception: the request body is larger than {request.app._client_max_size} "
                    "bytes (SWITCHBOARD_ANALYTICS_MAX_BODY_MB). (TOO_LARGE_REQUEST_BODY)",
                    307,
                ) from exc
            except (ConnectionResetError, RequestPayloadError) as exc:
                # The client hung up before the end of its body, or its framing broke: its error,
                # answered (when it can still hear it) as ClickHouse's CANNOT_READ_ALL_DATA.
                raise QueryError(
                    f"Code: 33. DB::Exception: cannot read all of the request body: {exc}. "
                    "(CANNOT_READ_ALL_DATA)",
                    33,
                ) from exc
            body = _decompress(raw, request.headers.get("Content-Encoding", ""), max_decompressed)
    for flag in ("compress", "decompress"):
        if values.get(flag, "0") not in ("0", "false", ""):
            raise QueryError(
                f"Code: 48. DB::Exception: {flag}=1 (ClickHouse native compression) is not supported "
                "by this endpoint; use Content-Encoding instead. (NOT_IMPLEMENTED)",
                48,
            )

    query = values.get("query", "")
    insert_data: bytes | None = None
    insert_format = ""
    head = (query.encode() + b"\n" + body) if query and body else (query.encode() or body)
    match = _INSERT_WITH_DATA.match(head[:65536])
    if match and _INSERT_WITHOUT_DATA.search(match.group(1)):
        match = None  # `INSERT … VALUES (…)` or `INSERT … SELECT`: all of it is SQL
    if match and (len(head) > match.end() or body):
        insert_data = head[match.end() :]
        insert_format = match.group(2).decode()
        sql = match.group(1).decode(errors="replace").strip()
    else:
        # ClickHouse takes any bytes in a string literal (a query is bytes, not text): bytes that
        # are not UTF-8 ride along as surrogates and reach the engine as they came (see _engine_text).
        sql = head.decode("utf-8", "surrogateescape")
    if not sql.strip():
        raise QueryError("Code: 62. DB::Exception: Empty query. (SYNTAX_ERROR)", 62)

    params: dict[str, str] = {}
    settings: dict[str, str] = {}
    for name, value in values.items():
        if name.startswith("param_"):
            params[name.removeprefix("param_")] = value
        elif name not in _TRANSPORT_PARAMS:
            settings[name] = value
    try:
        timeout = float(values.get("session_timeout", "60"))
        protocol = int(values.get("client_protocol_version") or 0)
    except ValueError as exc:
        raise QueryError(
            "Code: 36. DB::Exception: session_timeout or client_protocol_version is not a number. "
            "(BAD_ARGUMENTS)",
            36,
        ) from exc
    return QueryRequest(
        sql=sql,
        insert_data=insert_data,
        insert_format=insert_format,
        default_format=values.get("default_format") or "TabSeparated",
        params=params,
        settings=settings,
        database=values.get("database", ""),
        session_id=values.get("session_id", ""),
        session_timeout_s=max(1.0, min(timeout, 3600.0)),
        session_check=values.get("session_check", "0") in ("1", "true"),
        readonly=_readonly_level(request.method, values.get("readonly", "")),
        query_id=values.get("query_id", ""),
        client_protocol_version=protocol,
    )


def _readonly_level(method: str, requested: str) -> str:
    if requested in ("1", "2"):
        return requested
    return "2" if method in ("GET", "HEAD") else ""


class QueryEndpoint:
    """The aiohttp application around a `ChdbQueryEngine`; start/stop it on a running loop."""

    def __init__(
        self,
        engine: ChdbQueryEngine,
        host: str = "127.0.0.1",
        port: int = 8123,
        *,
        threads: int = 4,
        policy: EndpointPolicy | None = None,
    ) -> None:
        self.engine = engine
        self.host = host
        self.port = port
        # Queries get their own threads, so a slow analyst query never delays the projector's
        # inserts (which use the loop's default executor).
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="chdb-query")
        self._runner: web.AppRunner | None = None
        self._query_ids = itertools.count(1)
        # Who may do what (services/analytics/_guard.py); None: everything, for embedding in tests.
        self.policy = policy
        self.app = web.Application(client_max_size=policy.max_body_bytes if policy else 512 * 1024 * 1024)
        self.app.router.add_route("GET", "/ping", self._ok)
        self.app.router.add_route("GET", "/replicas_status", self._ok)
        self.app.router.add_route("*", "/", self._query)

    async def start(self) -> None:
        # auto_decompress off: bodies are decoded once, by `_decompress` (with its size limit and
        # ClickHouse's errors); aiohttp's own decoding ran first and left gzip bodies to be
        # decoded twice, and its failures were 500s.
        self._runner = web.AppRunner(self.app, access_log=None, auto_decompress=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        log.info(
            "ClickHouse HTTP endpoint on http://%s:%d (chdb at %s)", self.host, self.port, self.engine.path
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._executor.shutdown(wait=True, cancel_futures=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _headers(self, query_id: str) -> dict[str, str]:
        return {
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Timezone": self.engine.timezone,
            "X-ClickHouse-Server-Display-Name": "switchboard-chdb",
        }

    async def _ok(self, request: web.Request) -> web.Response:
        return web.Response(text="Ok.\n")

    def _admit(self, request: web.Request) -> bool:
        """Whether the request only reads (raises QueryError when it is refused outright)."""
        if self.policy is None:
            return False
        refusal = browser_refusal(self.policy, request.method, request.headers)
        if refusal is None:
            who = authenticate(self.policy, *credentials(request.headers, request.query))
            if not isinstance(who, Refusal):
                return not who
            refusal = who
        raise QueryError(f"Code: {refusal.code}. DB::Exception: {refusal.message}", refusal.code)

    @staticmethod
    def _as_reader(parsed: QueryRequest, policy: EndpointPolicy) -> None:
        kind = statement_kind(parsed.sql)
        if parsed.insert_data is not None or kind not in _READONLY_ALLOWED:
            raise QueryError(
                f"Code: 164. DB::Exception: Cannot execute query in readonly mode: {kind or 'this statement'} "
                f"changes data or schema; only the '{policy.admin_user}' user (with its password) writes. "
                "(READONLY)",
                164,
            )
        refusal = reader_refusal(parsed.sql)
        if refusal is not None:
            raise QueryError(f"Code: {refusal.code}. DB::Exception: {refusal.message}", refusal.code)
        parsed.readonly = parsed.readonly or "2"
        if kind != "SET":
            parsed.settings = reader_settings(policy, parsed.settings)

    async def _query(self, request: web.Request) -> web.StreamResponse:
        if request.method == "HEAD":
            return web.Response()  # runs nothing, whatever the URL says
        if request.method == "GET" and not request.query:
            return web.Response(text="Ok.\n")
        if request.method not in ("GET", "HEAD", "POST"):
            return web.Response(status=405, text="Method not allowed.\n")
        query_id = request.query.get("query_id") or str(uuid.uuid4())
        bad_query_id = not query_id.isprintable()
        if bad_query_id:
            # It is echoed in a header: a line break there would inject headers (aiohttp drops
            # the connection instead of answering).
            query_id = str(uuid.uuid4())
        headers = self._headers(query_id)
        try:
            if bad_query_id:
                raise QueryError(
                    "Code: 36. DB::Exception: query_id must be printable characters (it is echoed in "
                    "the X-ClickHouse-Query-Id header). (BAD_ARGUMENTS)",
                    36,
                )
            reader = self._admit(request)
            parsed = await parse_request(request, self.policy.max_decompressed_bytes if self.policy else None)
            if reader and self.policy is not None:
                self._as_reader(parsed, self.policy)
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._executor, self.engine.execute, parsed)
        except QueryError as exc:
            message = str(exc)
            if "(version " not in message:
                message = f"{message} (version {self.engine.version})"
            headers["X-ClickHouse-Exception-Code"] = str(exc.code)
            return web.Response(
                status=exc.http_status, text=message + "\n", headers=headers, content_type="text/plain"
            )
        except Exception as exc:  # a bug of ours, not a query error: still answer like ClickHouse
            log.exception("query endpoint failed")
            headers["X-ClickHouse-Exception-Code"] = "1001"
            return web.Response(
                status=500,
                text=f"Code: 1001. DB::Exception: {type(exc).__name__}: {exc}. (STD_EXCEPTION) "
                f"(version {self.engine.version})\n",
                headers=headers,
                content_type="text/plain",
            )
        body = result.body
        if result.error is not None:
            # As ClickHouse (25.11+) reports an error after the first bytes of a result.
            tag = uuid.uuid4().hex[:16]
            failure = f"{result.error} (version {self.engine.version})".encode()
            body += b"__exception__\r\n%s\r\n%s\n%d %s\r\n__exception__\r\n" % (
                tag.encode(),
                failure,
                len(failure),
                tag.encode(),
            )
            headers["X-ClickHouse-Exception-Tag"] = tag
        headers["X-ClickHouse-Summary"] = json.dumps(result.summary)
        if result.format:
            headers["X-ClickHouse-Format"] = result.format
        content_type = _CONTENT_TYPES.get(result.format.lower(), "text/plain; charset=UTF-8")
        if result.format.lower() in ("native", "rowbinary", "rowbinarywithnamesandtypes", "arrow", "parquet"):
            content_type = "application/octet-stream"
        headers["Content-Type"] = content_type
        return web.Response(body=body, headers=headers)
