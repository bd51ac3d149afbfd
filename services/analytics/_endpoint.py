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
  ``X-ClickHouse-Exception-Code`` and ClickHouse's 4xx/5xx status, or, after the first rows of
  a streamed result, appended in an ``X-ClickHouse-Exception-Tag`` block as a server does
  mid-stream; ``GET /ping`` -> ``Ok.``.
- Results streamed block by block (chunked transfer encoding) in the formats of
  `STREAMED_FORMATS`; a client that hangs up stops its query (`QueryEndpoint._call`).
- GET requests (and ``readonly=1|2``) are read-only, as in ClickHouse.

Settings are the client's: the endpoint applies none of its own, so a query gives the same
answer here as on a ClickHouse server. Exact counts come from the schema (the analyst-facing
views have FINAL inside, see docs/analytics.md), not from a setting; the exceptions are the
limits a reader runs under and a tenant analyst's row filter (_guard, _tenancy). Users: see
_guard (``default`` reads, ``admin`` writes, tenant analysts read one tenant). Not implemented:
ClickHouse's native block compression (``compress=1`` / ``decompress=1``), external data tables,
progress headers.
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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from services.analytics._clickhouse import split_statements
from services.analytics._guard import (
    MENTIONS_SYSTEM,
    EndpointPolicy,
    Refusal,
    TenantAnalyst,
    authenticate,
    browser_refusal,
    credentials,
    host_path_refusal,
    reader_database_refusal,
    reader_explain_refusal,
    reader_parameter_refusal,
    reader_refusal,
    reader_setting_refusal,
    reader_settings,
)
from services.analytics._native import NativeFormatError, block_with_protocol_revision, with_protocol_revision
from services.analytics._tenancy import OBJECTS_SQL, Objects, statement_refusal, tenant_settings, tree_refusal

log = logging.getLogger(__name__)

DEFAULT_SETTINGS: Mapping[str, str] = {}

# Seconds an idle connection, or one still sending a request's head, is kept (see start()).
IDLE_TIMEOUT_S = 10.0

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
# (The engine's formatting backticks a few format names: FORMAT `Values`, FORMAT `Null`.)
_TRAILING_FORMAT = re.compile(r"\bFORMAT\s+`?(\w+)`?\s*;?\s*$", re.IGNORECASE)
# `INSERT INTO t [(cols)] [SETTINGS …] FORMAT Name` followed by data.
_INSERT_WITH_DATA = re.compile(
    rb"^\s*(INSERT\s+INTO\s.*?)\bFORMAT\s+(\w+)[ \t]*(?:\r?\n)?", re.IGNORECASE | re.DOTALL
)
_INSERT_WITHOUT_DATA = re.compile(rb"\b(?:VALUES|SELECT|WITH)\b", re.IGNORECASE)
_LEADING_NOISE = re.compile(r"^(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.DOTALL)
_FIRST_WORD = re.compile(r"^\(?\s*([A-Za-z]+)")
_ERROR_CODE = re.compile(r"Code:\s*(\d+)")
_ERROR_NAME = re.compile(r"\(([A-Z][A-Z0-9_]+)\)\s*(?:\(version [^)]*\))?\s*$")

# The parse of a reader's statement (ChdbQueryEngine.canonical) takes statements up to this size
# (doubled by the quoting of its quotes and backslashes): the request body's own bound is 64 MiB.
PARSER_MAX_QUERY_SIZE = 256 * 1024 * 1024
_READ_STATEMENTS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "EXISTS", "CHECK"})
_READONLY_ALLOWED = _READ_STATEMENTS | {"SET", "USE"}
# What clickhouse-go (Grafana's ClickHouse plugin) sends over HTTP before anything else (its
# conn_http.go). displayName() is a host fact a reader may not ask for (_guard.py): answered so,
# every reader's Go connection failed (trial, twenty-ninth session). This statement, exactly, is
# answered with the product's name instead; displayName() anywhere else is still refused.
GO_DRIVER_HELLO = "SELECT displayName(), version(), revision(), timezone()"
READER_DRIVER_HELLO = "SELECT 'switchboard' AS display_name, version(), revision(), timezone()"
# The endpoint's cancel tag (see QueryRequest.cancel_tag) as the engine quotes it in an error.
_TAG_IN_ERROR = re.compile(r"\s*/\* sb-query-[0-9a-f]{32} \*/")

# ClickHouse's exceptionCodeToHTTPStatus, for the codes chdb can raise here.
_HTTP_STATUS = {
    **dict.fromkeys((192, 193, 194, 195, 516), 401),  # unknown user, wrong password, …
    **dict.fromkeys((164, 452, 497), 403),  # READONLY, SETTING_CONSTRAINT_VIOLATION, ACCESS_DENIED
    **dict.fromkeys((46, 60, 73, 81, 82, 372), 404),  # unknown function/table/format/db, no session
    **dict.fromkeys((373,), 409),  # SESSION_IS_LOCKED
    **dict.fromkeys((307,), 413),  # request body too large (compressed or not)
    **dict.fromkeys((202,), 429),  # TOO_MANY_SIMULTANEOUS_QUERIES (clickhouse-connect retries a 429)
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
        text = _TAG_IN_ERROR.sub("", text)  # the analyst's own SQL, without ours
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
    # A reader of an endpoint with a policy (not its admin): see QueryEndpoint._as_reader.
    reader: bool = False
    query_id: str = ""
    # The client's ``client_protocol_version`` (0: none); shapes Native output (see _native).
    client_protocol_version: int = 0
    # Who asks: sessions belong to a user (another user's session id is another session).
    user: str = ""
    # Marks the statement in the engine's process list so `ChdbQueryEngine.kill` can stop it
    # (a client that hung up); "" for none.
    cancel_tag: str = ""
    # Settings the endpoint imposes (a tenant analyst's row filter): applied after the client's
    # own, then the readonly level, so the client can change none of them.
    enforced_settings: dict[str, str] = field(default_factory=dict)
    # A tenant analyst's tenant: the statement reads only that tenant's rows (see _tenancy).
    tenant: str = ""
    # The tables and views there are, as the engine listed them for this request (_tenancy).
    objects: Objects | None = None


@dataclass(slots=True)
class QueryResult:
    body: bytes
    # The output format when the statement produces a result set, else "".
    format: str
    summary: dict[str, str]


# Output formats whose output for a whole result is the concatenation of their output for each
# block (no header, footer or separator across blocks): these are streamed block by block.
# Checked against chdb (tests/integration/test_analytics_stream.py: streamed == buffered); the
# others (JSON, Pretty, *WithNames, Parquet, Arrow, Values, ...) are formatted whole, as before.
STREAMED_FORMATS = frozenset(
    name.lower()
    for name in (
        "Native",
        "TabSeparated",
        "TSV",
        "TabSeparatedRaw",
        "TSVRaw",
        "CSV",
        "JSONEachRow",
        "JSONCompactEachRow",
        "JSONStringsEachRow",
        "JSONLines",
        "NDJSON",
        "RowBinary",
        "CustomSeparated",
        "MsgPack",
        "TSKV",
        "LineAsString",
        "BSONEachRow",
    )
)


class QueryStream:
    """A SELECT's result read block by block: the endpoint holds one block at a time, never the
    whole result. `first` is the first block (fetched before answering, so an error before any
    row is an ordinary error response). `next_chunk` blocks (call it from a worker thread, one
    call at a time); `close` may be called from any thread at any time: chdb's own cancel must
    not run while another thread fetches (it hangs), so while a block is being fetched `close`
    stops the query with KILL QUERY and the fetching thread cleans up when the engine returns."""

    def __init__(self, raw: Any, fmt: str, protocol: int, tag: str, kill: Any) -> None:
        self.format = fmt
        self.first = b""
        self.summary: dict[str, str] = {}
        self._raw = raw
        self._protocol = protocol
        self._tag = tag
        self._kill = kill
        self._lock = threading.Lock()
        self._fetching = False
        self._closed = False
        self._cleanups: list[Any] = []
        self._rows = self._read_bytes = 0
        self._elapsed = 0.0

    @property
    def tag(self) -> str:
        return self._tag

    def add_cleanup(self, action: Any) -> None:
        """Run `action` when the stream closes (in the order added)."""
        self._cleanups.append(action)

    def next_chunk(self) -> bytes | None:
        """The next block's bytes; None at the end (or once closed). Raises `QueryError` for an
        error in the middle of the result."""
        with self._lock:
            if self._closed:
                return None
            self._fetching = True
        error: QueryError | None = None
        chunk: Any = None
        try:
            chunk = self._raw.fetch()
        except Exception as exc:
            error = QueryError.from_engine(exc)
        with self._lock:
            self._fetching = False
            closed = self._closed
        if closed:
            self._cleanup()
            return None
        if error is not None:
            raise error
        if chunk is None:
            return None
        self._rows += chunk.rows_read()
        self._read_bytes += chunk.bytes_read()
        self._elapsed += chunk.elapsed()
        body = bytes(chunk.bytes() or b"")
        if self._protocol and self.format.lower() == "native":
            try:
                body = block_with_protocol_revision(body, self._protocol)
            except NativeFormatError as exc:
                raise QueryError(f"Code: 48. DB::Exception: {exc}. (NOT_IMPLEMENTED)", 48) from exc
        return body

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            fetching = self._fetching
        if fetching:
            self._kill(self._tag)  # the fetching thread cleans up when the engine returns
        else:
            self._cleanup()

    def _cleanup(self) -> None:
        try:
            self._raw.close()
        except Exception:  # the query already ended (or failed); nothing to cancel
            pass
        for action in self._cleanups:
            try:
                action()
            except Exception:
                log.exception("closing a query stream failed")
        self._cleanups.clear()

    def start(self) -> None:
        """Fetch the first block (an error here is the query's error, before any byte is sent)."""
        try:
            chunk = self.next_chunk()
        except BaseException:
            self.close()
            raise
        self.first = chunk or b""
        self.summary = _summary(self._rows, self._read_bytes, self._elapsed, len(self.first))


def _summary(rows: int, read_bytes: int, elapsed: float, result_bytes: int) -> dict[str, str]:
    return {
        "read_rows": str(rows),
        "read_bytes": str(read_bytes),
        "written_rows": "0",
        "written_bytes": "0",
        "total_rows_to_read": str(rows),
        "result_rows": "0",
        "result_bytes": str(result_bytes),
        "elapsed_ns": str(int(elapsed * 1e9)),
    }


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


def _tag_comment(tag: str) -> str:
    return f"/* {tag} */"


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
        # The connection `canonical` parses readers' statements on (made on first use).
        self._parser: Any = None
        self._parser_lock = threading.Lock()
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
        with self._parser_lock:
            if self._parser is not None:
                self._parser.close()
                self._parser = None
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
            # As on a server, a session belongs to its user: another user's id is another session.
            key = f"{request.user}\x00{request.session_id}"
            session = self._sessions.get(key)
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
                self._sessions[key] = session
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
        """Run the statement to its end and return its whole result."""
        outcome = self.open(request, stream=False)
        assert isinstance(outcome, QueryResult)
        return outcome

    def open(self, request: QueryRequest, *, stream: bool = True) -> QueryResult | QueryStream:
        """Run the statement; a SELECT in a format of `STREAMED_FORMATS` comes back as a
        `QueryStream` (its first block fetched), everything else as a whole `QueryResult`.
        A stream holds its connection (and session) until it is closed."""
        kind = statement_kind(request.sql)
        if request.tenant:
            # Looked up per request: a table made since the last one is filtered too.
            request.objects = Objects.from_rows(self._select_rows(OBJECTS_SQL))
            request.enforced_settings = {
                **tenant_settings(request.objects, request.tenant),
                **request.enforced_settings,
            }
            request.readonly = "1"
        if not request.session_id:
            return self._execute_fresh(request, kind, "", {}, stream)
        session = self._session(request)
        outcome: QueryResult | QueryStream | None = None
        try:
            if session.conn is None and _NEEDS_OWN_CONNECTION.match(
                _LEADING_NOISE.sub("", request.sql, count=1)
            ):
                if request.readonly and kind not in _READONLY_ALLOWED:
                    raise _readonly_refusal()
                if request.enforced_settings or request.reader:
                    # Its own connection could not be made read-only for one request.
                    raise QueryError(
                        "Code: 497. DB::Exception: a reader's session cannot hold temporary tables or "
                        "query parameters (SET param_...); pass parameters with the query "
                        "(param_<name> in the URL). (ACCESS_DENIED)",
                        497,
                    )
                self._give_own_connection(session)
            if session.conn is not None and request.reader:
                raise QueryError(
                    "Code: 497. DB::Exception: this session holds the admin's temporary tables or "
                    "parameters; a reader cannot use it. (ACCESS_DENIED)",
                    497,
                )
            if session.conn is None:
                if kind in ("SET", "USE"):
                    outcome = self._remember(session, request, kind)
                else:
                    outcome = self._execute_fresh(request, kind, session.database, session.settings, stream)
            else:
                outcome = self._execute_in_session(session.conn, request, kind, stream)
            return outcome
        finally:
            if isinstance(outcome, QueryStream):
                # The session stays busy (SESSION_IS_LOCKED for others) until its stream ends.
                outcome.add_cleanup(lambda: self._release(session))
            else:
                self._release(session)

    @staticmethod
    def _release(session: _Session) -> None:
        session.last_used = time.monotonic()
        session.lock.release()

    def canonical(self, sql: str) -> str:
        """The statement as the engine parses it, formatted on one line: comments, quoting of
        plain identifiers and escapes gone, FROM-first SELECT in SELECT order. Raises the engine's
        own SYNTAX_ERROR for what does not parse, and for more than one statement."""
        with self._parser_lock:  # one connection kept for it (a connection costs ~0.3 ms)
            if self._parser is None:
                # A statement of any size the request may carry: the one it runs on has the
                # client's own max_query_size.
                self._parser = self._connect()
                self._run(self._parser, f"SET max_query_size = {PARSER_MAX_QUERY_SIZE}")
                self._run(self._parser, "SET readonly = 1")
            try:
                raw = self._run(
                    self._parser, f"SELECT formatQuerySingleLine({_quote(sql)})", "TabSeparatedRaw"
                )
            except QueryError:
                raise
            except Exception:
                self._parser.close()
                self._parser = None
                raise
        # Bytes that were not UTF-8 come back as they were (see _engine_text).
        return str(raw.bytes().decode("utf-8", "surrogateescape").rstrip("\n"))

    def _select_rows(self, sql: str) -> list[list[Any]]:
        conn = self._connect()
        try:
            rows = json.loads(self._run(conn, sql, "JSONCompact").bytes().decode())["data"]
        finally:
            conn.close()
        return list(rows)

    def kill(self, tag: str) -> None:
        """Stop the running statement marked with `tag` (see `QueryRequest.cancel_tag`); nothing
        if it already ended. Returns at once; the statement stops at its next check."""
        if not tag:
            return
        conn = self._connect()
        try:
            self._run(conn, f"KILL QUERY WHERE endsWith(query, {_quote(_tag_comment(tag))}) ASYNC")
        finally:
            conn.close()

    def _replay(self, conn: Any, database: str, settings: Mapping[str, str]) -> None:
        if database:
            self._run(conn, f"USE `{database.replace('`', '``')}`")
        if settings:
            self._run(conn, _set_statement(settings))

    def _fresh(self, request: QueryRequest, database: str, settings: Mapping[str, str]) -> Any:
        """A new connection with a session's state, the request's settings, the endpoint's
        enforced settings, then its readonly level (last, so the replayed SETs are allowed and
        the statement's own SETTINGS cannot change the enforced ones when readonly is 1)."""
        conn = self._connect()
        try:
            self._replay(
                conn,
                request.database or database,
                {**settings, **request.settings, **request.enforced_settings},
            )
            if request.readonly:
                self._run(conn, f"SET readonly = {int(request.readonly)}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _execute_fresh(
        self, request: QueryRequest, kind: str, database: str, settings: Mapping[str, str], stream: bool
    ) -> QueryResult | QueryStream:
        conn = self._fresh(request, database, settings)
        try:
            outcome = self._execute_on(conn, request, kind, stream)
        except BaseException:
            conn.close()
            raise
        if isinstance(outcome, QueryStream):
            outcome.add_cleanup(conn.close)
        else:
            conn.close()
        return outcome

    def _remember(self, session: _Session, request: QueryRequest, kind: str) -> QueryResult:
        """SET or USE in a session without a connection: run it (so errors are the engine's) on a
        fresh one with the session's state, then keep what it changed."""
        # No URL settings: as on a session. The enforced ones stay, so a SET cannot lift them.
        scoped = QueryRequest(
            sql=request.sql, readonly=request.readonly, enforced_settings=request.enforced_settings
        )
        conn = self._fresh(scoped, session.database, session.settings)
        try:
            result = self._execute_on(conn, scoped, kind)
            assert isinstance(result, QueryResult)
            database = self._run(conn, "SELECT currentDatabase()").bytes().decode().strip()
            changed = self._changed_settings(conn)
        finally:
            conn.close()
        if request.readonly:
            changed.pop("readonly", None)  # ours, for this request
        for name in request.enforced_settings:
            changed.pop(name, None)  # ours, applied to every request anyway
        settings = {
            name: value
            for name, value in changed.items()
            if name != "database" and self._baseline.get(name) != value
        }
        if request.reader:
            # By what the engine says changed (aliases resolved), not by the statement's text.
            refusal = reader_setting_refusal(
                {n: v for n, v in settings.items() if session.settings.get(n) != v}, in_url=False
            )
            if refusal is not None:
                raise QueryError(f"Code: {refusal.code}. DB::Exception: {refusal.message}", refusal.code)
        session.database = database if database != "default" or session.database else ""
        session.settings = settings
        return result

    def _execute_in_session(
        self, conn: Any, request: QueryRequest, kind: str, stream: bool
    ) -> QueryResult | QueryStream:
        if request.readonly and kind not in _READONLY_ALLOWED:
            # A session's connection cannot be made read-only for one request (readonly cannot
            # be reset), so read-only requests in a session are checked by statement instead.
            raise _readonly_refusal()
        restore = self._apply_scoped_settings(conn, request.settings) if kind != "SET" else {}
        database = ""

        def undo() -> None:
            if database:
                self._replay(conn, database, {})
            if restore:
                self._run(conn, _set_statement(restore))

        try:
            if request.database:
                # The URL's database is for this request; the session's own (USE) comes back after.
                database = self._run(conn, "SELECT currentDatabase()").bytes().decode().strip()
                self._replay(conn, request.database, {})
            outcome = self._execute_on(conn, request, kind, stream)
        except BaseException:
            undo()
            raise
        if isinstance(outcome, QueryStream):
            outcome.add_cleanup(undo)
        else:
            undo()
        return outcome

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

    def _execute_on(
        self, conn: Any, request: QueryRequest, kind: str, stream: bool = False
    ) -> QueryResult | QueryStream:
        if request.insert_data is not None:
            return self._insert(conn, request)
        produces_rows = kind in _READ_STATEMENTS
        fmt = output_format(request.sql, request.default_format)
        sql = request.sql
        if kind in ("SELECT", "WITH") and (
            request.tenant or (request.reader and MENTIONS_SYSTEM.search(sql))
        ):
            self._check_tree(conn, request)
        if request.cancel_tag and kind in ("SELECT", "WITH"):
            # At the end, after a line break: a trailing `-- comment` cannot swallow it, and
            # error positions in the client's own text do not move.
            sql = f"{sql}\n{_tag_comment(request.cancel_tag)}"
        if stream and kind in ("SELECT", "WITH") and fmt.lower() in STREAMED_FORMATS:
            try:
                raw = conn.send_query(_engine_text(sql), request.default_format, params=dict(request.params))
            except Exception as exc:
                error = QueryError.from_engine(exc)
                # `WITH … INSERT` (a write that starts with WITH) cannot be streamed: run it whole.
                if "Streaming query is not supported" not in str(error):
                    raise error from exc
            else:
                opened = QueryStream(raw, fmt, request.client_protocol_version, request.cancel_tag, self.kill)
                opened.start()
                return opened
        result = self._run(conn, sql, request.default_format, request.params)
        body = bytes(result.bytes() or b"")
        if request.client_protocol_version and fmt.lower() == "native":
            try:
                body = with_protocol_revision(body, request.client_protocol_version)
            except NativeFormatError as exc:
                raise QueryError(f"Code: 48. DB::Exception: {exc}. (NOT_IMPLEMENTED)", 48) from exc
        summary = _summary(result.rows_read(), result.bytes_read(), result.elapsed(), len(body))
        return QueryResult(body, fmt if produces_rows else "", summary)

    def _check_tree(self, conn: Any, request: QueryRequest) -> None:
        """From the engine's own analysis of the statement on the caller's connection (same
        settings, parameters and database): refuse what a tenant's filter does not cover, and a
        path column of a system table (a reader's statement is analysed only when it names the
        system database: one more query, for those statements only)."""
        tree = self._tree(conn, request)
        refusal = None
        if request.tenant:
            assert request.objects is not None
            refusal = tree_refusal(tree, request.objects)
        refusal = refusal or host_path_refusal(tree)
        if refusal is not None:
            raise QueryError(f"Code: {refusal.code}. DB::Exception: {refusal.message}", refusal.code)

    def _tree(self, conn: Any, request: QueryRequest) -> str:
        statements = split_statements(request.sql)
        if len(statements) != 1:
            raise QueryError("Code: 62. DB::Exception: Multi-statements are not allowed. (SYNTAX_ERROR)", 62)
        statement = _TRAILING_FORMAT.sub("", statements[0])
        try:
            tree = self._run(conn, f"EXPLAIN QUERY TREE {statement}", "TSVRaw", request.params)
        except QueryError as exc:
            if not MENTIONS_SYSTEM.search(statement):
                raise
            # The analysis runs scalar subqueries: its error can quote a value of a system table
            # (`toUInt8(max(data_path))` failed with the path in the message; review, s27).
            raise QueryError(
                f"Code: {exc.code}. DB::Exception: the statement reads the system tables and the engine "
                "could not analyse it; its message is withheld from readers (it may quote a system "
                "table's values). Check the statement as the admin user. (ACCESS_DENIED)",
                exc.code,
            ) from exc
        return bytes(tree.bytes() or b"").decode("utf-8", "replace")

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
        # Readers' and tenant analysts' statements share all query threads but one, which is the
        # admin's: migrations, replays and the operator's writes always find a thread (a new user's
        # trial: four heavy SELECTs of the password-less reader held the four threads for their
        # 60 s limit). A reader's statement waits for one of the others (taken once its body is
        # read, held until its answer is sent), as it waited for a thread before, and is refused
        # with TOO_MANY_SIMULTANEOUS_QUERIES only when that wait passes the time limit.
        self._reader_slots = asyncio.Semaphore(max(1, threads - 1))
        self._reader_wait_s = float(policy.max_execution_time_s) if policy else 60.0
        self._driver_hello: str | None = None  # GO_DRIVER_HELLO as the engine formats it
        # Stopping and closing abandoned queries: never queued behind the queries they stop.
        self._stopper = ThreadPoolExecutor(max_workers=2, thread_name_prefix="chdb-stop")
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
        # handler_cancellation: a client that hangs up cancels its handler, which stops its query
        # (`_call`). keepalive_timeout also bounds how long a connection may take to send a
        # request's head (aiohttp closes a connection still waiting for one when it expires):
        # a client that sends part of a head and stalls is dropped, as ClickHouse's own
        # keep_alive_timeout does.
        idle = self.policy.idle_timeout_s if self.policy else IDLE_TIMEOUT_S
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            auto_decompress=False,
            handler_cancellation=True,
            keepalive_timeout=idle,
        )
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
        self._stopper.shutdown(wait=True)

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

    def _admit(self, request: web.Request) -> tuple[str, bool | TenantAnalyst]:
        """(user, True for the admin | False for a reader | the tenant analyst's tenant); raises
        QueryError when the request is refused outright. Without a policy everyone is admin."""
        if self.policy is None:
            return "", True
        refusal = browser_refusal(self.policy, request.method, request.headers)
        if refusal is None:
            user, password = credentials(request.headers, request.query)
            who = authenticate(self.policy, user, password)
            if not isinstance(who, Refusal):
                return user, who
            refusal = who
        raise QueryError(f"Code: {refusal.code}. DB::Exception: {refusal.message}", refusal.code)

    def _open_as_reader(
        self, parsed: QueryRequest, analyst: TenantAnalyst | None
    ) -> QueryResult | QueryStream:
        """On a query thread: a reader's statement is checked, and run, as the engine parses it. A
        comment (`#`, nested /* */), a quoted `file` or file/**/( hid from the text checks what it
        was (review, twenty-fifth session); a typo is the engine's SYNTAX_ERROR."""
        assert self.policy is not None
        if parsed.insert_data is None:
            parsed.sql = self.engine.canonical(parsed.sql)
            if self._driver_hello is None:
                self._driver_hello = self.engine.canonical(GO_DRIVER_HELLO)
            if parsed.sql == self._driver_hello:
                parsed.sql = READER_DRIVER_HELLO
        self._as_reader(parsed, self.policy, analyst)
        return self.engine.open(parsed)

    @staticmethod
    def _as_reader(parsed: QueryRequest, policy: EndpointPolicy, analyst: TenantAnalyst | None) -> None:
        kind = statement_kind(parsed.sql)
        if analyst is not None:
            refusal = statement_refusal(kind, parsed.sql)
            if refusal is not None:
                raise QueryError(f"Code: {refusal.code}. DB::Exception: {refusal.message}", refusal.code)
            parsed.tenant = analyst.tenant
        if parsed.insert_data is not None or kind not in _READONLY_ALLOWED:
            raise QueryError(
                f"Code: 164. DB::Exception: Cannot execute query in readonly mode: {kind or 'this statement'} "
                f"changes data or schema; only the '{policy.admin_user}' user (with its password) writes. "
                "(READONLY)",
                164,
            )
        # (A SET is checked by what it changed: ChdbQueryEngine._remember.)
        refusal = (
            reader_refusal(parsed.sql)
            or reader_database_refusal(parsed.database, parsed.sql if kind == "USE" else "")
            or reader_setting_refusal(parsed.settings)
            or reader_parameter_refusal(parsed.params)
            or reader_explain_refusal(kind, parsed.sql)
        )
        if refusal is not None:
            raise QueryError(f"Code: {refusal.code}. DB::Exception: {refusal.message}", refusal.code)
        # ClickHouse's read-only mode proper (readonly=1): table functions that reach files,
        # processes, memory or the network are the engine's refusals, and so is a setting changed
        # by the statement itself (its SETTINGS clause). At readonly=2 (a GET's level, which
        # readers had) a reader read the host's files with filesystem() or python() and lifted its
        # time limit with SETTINGS max_execution_time = false (review, twenty-fifth session). A SET
        # runs at 2, checked above; what a session remembers is applied before the level is set.
        parsed.reader = True
        parsed.readonly = "2" if kind == "SET" else "1"
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
        holding = False  # a reader's slot (see _reader_slots), released once the answer is sent
        try:
            if bad_query_id:
                raise QueryError(
                    "Code: 36. DB::Exception: query_id must be printable characters (it is echoed in "
                    "the X-ClickHouse-Query-Id header). (BAD_ARGUMENTS)",
                    36,
                )
            user, who = self._admit(request)
            parsed = await parse_request(request, self.policy.max_decompressed_bytes if self.policy else None)
            parsed.user = user
            parsed.cancel_tag = f"sb-query-{uuid.uuid4().hex}"
            if who is not True:
                try:
                    await asyncio.wait_for(self._reader_slots.acquire(), self._reader_wait_s)
                except TimeoutError:
                    raise QueryError(
                        "Code: 202. DB::Exception: Too many simultaneous queries: every query thread "
                        f"readers may use was busy for {self._reader_wait_s:g} s. Retry later. "
                        "(TOO_MANY_SIMULTANEOUS_QUERIES)",
                        202,
                    ) from None
                holding = True
            if who is not True and self.policy is not None:
                analyst = who if isinstance(who, TenantAnalyst) else None
                outcome = await self._call(parsed.cancel_tag, self._open_as_reader, parsed, analyst)
            else:
                outcome = await self._call(parsed.cancel_tag, self.engine.open, parsed)
        except QueryError as exc:
            return self._error_response(exc, headers)
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
        else:
            if isinstance(outcome, QueryStream):
                return await self._stream(request, outcome, headers)
            headers["X-ClickHouse-Summary"] = json.dumps(outcome.summary)
            if outcome.format:
                headers["X-ClickHouse-Format"] = outcome.format
            headers["Content-Type"] = _content_type(outcome.format)
            return web.Response(body=outcome.body, headers=headers)
        finally:
            if holding:
                self._reader_slots.release()

    def _error_response(self, exc: QueryError, headers: dict[str, str]) -> web.Response:
        message = str(exc)
        if "(version " not in message:
            message = f"{message} (version {self.engine.version})"
        headers["X-ClickHouse-Exception-Code"] = str(exc.code)
        return web.Response(
            status=exc.http_status, text=message + "\n", headers=headers, content_type="text/plain"
        )

    async def _call(self, tag: str, action: Any, *args: Any) -> Any:
        """`action(*args)` on a query thread. If the client hangs up meanwhile (the handler is
        cancelled), the statement marked `tag` is killed and whatever `action` still returns (an
        open stream) is closed: the engine never keeps working for nobody."""
        future = self._executor.submit(action, *args)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if not future.cancel():  # already running: stop it where it is
                self._stopper.submit(self.engine.kill, tag)
                future.add_done_callback(self._close_abandoned)
            raise

    def _close_abandoned(self, future: Future[Any]) -> None:
        if not future.cancelled() and future.exception() is None:
            outcome = future.result()
            if isinstance(outcome, QueryStream):
                self._stopper.submit(outcome.close)

    async def _stream(
        self, request: web.Request, stream: QueryStream, headers: dict[str, str]
    ) -> web.StreamResponse:
        """Send a result block by block with chunked transfer encoding. An error after the first
        bytes is appended as ClickHouse (25.11+) does: an exception block framed by the tag sent
        in X-ClickHouse-Exception-Tag, which clickhouse-connect raises as StreamFailureError."""
        tag = uuid.uuid4().hex[:16]
        headers["X-ClickHouse-Summary"] = json.dumps(stream.summary)
        headers["X-ClickHouse-Format"] = stream.format
        headers["X-ClickHouse-Exception-Tag"] = tag
        headers["Content-Type"] = _content_type(stream.format)
        response = web.StreamResponse(headers=headers)
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            chunk: bytes | None = stream.first
            failure: QueryError | None = None
            while chunk is not None:
                if chunk:
                    await response.write(chunk)
                try:
                    chunk = await self._call(stream.tag, stream.next_chunk)
                except QueryError as exc:
                    failure = exc
                    break
            # Its connection and session are free before the client sees the end of the answer
            # (its next query in the session must not find the session still locked).
            await asyncio.wrap_future(self._stopper.submit(stream.close))
            if failure is not None:
                text = f"{failure} (version {self.engine.version})".encode()
                await response.write(
                    b"__exception__\r\n%s\r\n%s\n%d %s\r\n__exception__\r\n"
                    % (tag.encode(), text, len(text), tag.encode())
                )
            await response.write_eof()
        except ConnectionError:
            # The client went away between blocks: the finally below stops the query.
            pass
        finally:
            self._stopper.submit(stream.close)
        return response


def _content_type(fmt: str) -> str:
    if fmt.lower() in ("native", "rowbinary", "rowbinarywithnamesandtypes", "arrow", "parquet"):
        return "application/octet-stream"
    return _CONTENT_TYPES.get(fmt.lower(), "text/plain; charset=UTF-8")
