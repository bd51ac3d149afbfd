"""What the analyst endpoint lets in: hosts and origins (no browser page, no DNS rebinding), who
may write (only the admin user; everyone else reads), and the limits every query runs under.

Pure decisions over a request's method, headers, URL parameters and SQL; the endpoint applies
them (services/analytics/_endpoint.py) and answers refusals the way ClickHouse does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

# Content types a browser may POST cross-origin without asking first (a CORS "simple request").
_SIMPLE_CONTENT_TYPES = frozenset(
    {"", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"}
)
# Headers a page cannot add to a simple request: whoever sends one is not a plain HTML form.
_CLIENT_HEADERS = ("authorization", "x-clickhouse-")
# Functions and table functions that reach the server's files, processes, memory or network: the
# analytics process's own privileges, which a reader must not borrow. Readers' statements run at
# ClickHouse's readonly=1, which refuses most of these table functions itself; this list is the
# second line, and the only one for the scalar file(). Matched on the statement as the engine
# formats it (ChdbQueryEngine.canonical), so quoting and comments cannot hide a name; a family's
# later members (icebergLocal, deltaLakeS3, filesystem, …) match by prefix.
_HOST_REACHING = re.compile(
    r"\b(?:file|fileCluster|filesystem|url|urlCluster|s3\w*|gcs\w*|oss\w*|cosn\w*|hdfs\w*|azureBlob\w*|remote\w*|cluster\w*|"
    r"mysql\w*|postgresql\w*|mongodb\w*|redis\w*|sqlite\w*|odbc\w*|jdbc\w*|executable\w*|iceberg\w*|"
    r"deltaLake\w*|hudi\w*|paimon\w*|ytsaurus\w*|bigquery\w*|prometheus\w*|arrow\w*|python\w*|eval|"
    r"input|dictionary|loop|merge)\s*\(",
    re.IGNORECASE,
)
# Settings a reader may set (in the URL, or with SET in a session): an allow-list. The engine is
# clickhouse-local: settings name host paths (format_template_resultset, output_format_schema) or
# carry SQL (additional_result_filter), and a deny-list let a reader read and write the host's
# files through them (review, twenty-fifth session). Limits only in the URL, and capped.
_READER_LIMITS = frozenset({"max_execution_time", "max_result_bytes", "max_memory_usage", "max_threads"})
_READER_SETTING = re.compile(
    r"^(?!.*(?:schema|path|file|template|filter|url|dir|dict|allow|readonly))(?:"
    r"max_result_rows|max_rows_to_read|max_bytes_to_read|max_rows_to_group_by|max_rows_to_sort|"
    r"max_bytes_to_sort|max_bytes_before_external_(?:group_by|sort)|max_block_size|"
    r"(?:result|timeout|read|group_by|sort)_overflow_mode|output_format_\w+|"
    r"date_time_(?:input|output)_format|session_timezone|join_use_nulls|extremes|totals_mode|"
    r"log_comment|optimize_\w+|aggregate_functions_null_for_empty|prefer_column_name_to_alias|"
    r"format_csv_delimiter|format_csv_null_representation|format_tsv_null_representation|"
    r"transform_null_in|cast_keep_nullable|union_default_mode|join_algorithm|use_uncompressed_cache"
    r")$",
    re.IGNORECASE,
)


def reader_may_set(name: str, *, in_url: bool) -> bool:
    """Whether a reader may set `name`: in the URL also the limits (capped, `reader_settings`)."""
    return bool(_READER_SETTING.match(name)) or (in_url and name.lower() in _READER_LIMITS)


_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")
# A name that is a host path (`/etc/shadow`, `./x`, `~/x`): chdb's default database includes a
# filesystem one, where `EXISTS "/etc/shadow"` answered whether the file exists (review 3).
_HOST_PATH_NAME = re.compile(r"`(?:/|\./|\.\./|~)[^`]*`")
_INTO_OUTFILE = re.compile(r"\bINTO\s+OUTFILE\b", re.IGNORECASE)
# Facts of the host rather than of the data: its paths, name, kernel, disks, server settings and
# any stored credentials (the engine runs in the analytics process, as its user).
_HOST_FACT = re.compile(
    r"\b(?:getServerSetting|getMergeTreeSetting|hostName|fqdn|fullHostName|getMacro|getOSKernelVersion|serverUUID"
    r"|displayName|filesystem(?:Available|Capacity|Unreserved|Free)|getClientHTTPHeader|tcpPort|buildId)\s*\("
    r"|\bsystem`?\s*\.\s*`?(?:disks|storage_policies|user_directories|named_collections"
    r"|build_options|macros|filesystem_cache\w*|stack_trace|symbols|certificates|server_settings\w*"
    r"|s3_queue\w*|azure_queue\w*|models|users|roles|grants|settings_profiles?\w*|quotas?\w*|row_policies"
    r"|enabled_roles|current_roles|role_grants|processes|user_processes|errors|merge_tree_settings)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Refusal:
    """A refused request: ClickHouse's error code and message, and the HTTP status."""

    code: int
    message: str
    status: int


@dataclass(frozen=True)
class TenantAnalyst:
    """A user who sees one tenant's rows only. The password is kept as ClickHouse's users.xml
    keeps one: the hex SHA-256 of it (``password_sha256_hex``)."""

    tenant: str
    password_sha256_hex: str


@dataclass(frozen=True)
class EndpointPolicy:
    # Only the admin user may write; "" means nobody can (the endpoint is read-only).
    admin_user: str = "admin"
    admin_password: str = ""
    # Host names accepted in the Host header (any port); empty accepts any (tests, embedding).
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    # Origins (scheme://host:port) a browser page may call from; none by default.
    allowed_origins: frozenset[str] = field(default_factory=frozenset)
    max_body_bytes: int = 64 * 1024 * 1024
    max_decompressed_bytes: int = 256 * 1024 * 1024
    # Applied when the request does not set its own (a reader's own is capped at this).
    max_execution_time_s: int = 60
    max_result_bytes: int = 1024 * 1024 * 1024
    # A reader's statement may use at most this much memory (0 in the engine: unbounded, and one
    # GROUP BY could take the process down, the projector with it).
    max_memory_usage: int = 2 * 1024 * 1024 * 1024
    # Seconds an idle connection, or one still sending a request's head, is kept.
    idle_timeout_s: float = 10.0
    # user -> the one tenant that user reads (services/analytics/_tenancy.py).
    tenant_analysts: Mapping[str, TenantAnalyst] = field(default_factory=dict)


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def browser_refusal(policy: EndpointPolicy, method: str, headers: Mapping[str, str]) -> Refusal | None:
    """A page in a browser must not reach the endpoint: refuse foreign Host names (DNS
    rebinding), foreign Origins, and simple cross-site POSTs without a client's headers."""
    lowered = {k.lower(): v for k, v in headers.items()}
    host = _host_name(lowered.get("host", ""))
    if policy.allowed_hosts and host not in policy.allowed_hosts:
        return Refusal(
            497,
            f"Host {host[:100]!r} is not one of this endpoint's names "
            f"({', '.join(sorted(policy.allowed_hosts))}; SWITCHBOARD_ANALYTICS_ALLOWED_HOSTS). (ACCESS_DENIED)",
            403,
        )
    origin = lowered.get("origin")
    if origin is not None and origin not in policy.allowed_origins:
        return Refusal(
            497,
            f"requests from web pages (Origin {origin[:100]!r}) are refused "
            "(SWITCHBOARD_ANALYTICS_ALLOWED_ORIGINS lists the allowed ones). (ACCESS_DENIED)",
            403,
        )
    if lowered.get("sec-fetch-site") == "cross-site" and origin is None:
        return Refusal(497, "cross-site requests are refused. (ACCESS_DENIED)", 403)
    if method == "POST":
        content_type = lowered.get("content-type", "").split(";", 1)[0].strip().lower()
        has_client_header = any(k.startswith(_CLIENT_HEADERS) for k in lowered)
        if content_type in _SIMPLE_CONTENT_TYPES and not has_client_header and _browser_like(lowered):
            return Refusal(
                497,
                f"a POST with Content-Type {content_type or '(none)'!r} from a web browser and without "
                "ClickHouse client headers (Authorization or X-ClickHouse-User) looks like a web form; "
                "clients send one of those or their own User-Agent. (ACCESS_DENIED)",
                403,
            )
    return None


def _browser_like(headers: Mapping[str, str]) -> bool:
    """A page's simple request carries the browser's own User-Agent (a page cannot change it
    without a preflight) and, in every current browser, Sec-Fetch-* headers. ClickHouse clients
    (clickhouse-connect, clickhouse-go, curl) send their own name and no Sec-Fetch-*."""
    agent = headers.get("user-agent", "")
    return not agent or agent.startswith("Mozilla/") or any(k.startswith("sec-fetch-") for k in headers)


def credentials(headers: Mapping[str, str], params: Mapping[str, str]) -> tuple[str, str]:
    """(user, password) as ClickHouse reads them: basic auth, X-ClickHouse-User/-Key, or the
    `user`/`password` URL parameters; ("default", "") when none."""
    lowered = {k.lower(): v for k, v in headers.items()}
    auth = lowered.get("authorization", "")
    if auth.lower().startswith("basic "):
        try:
            user, _, password = base64.b64decode(auth[6:].strip()).decode().partition(":")
            return user or "default", password
        except (ValueError, UnicodeDecodeError):
            return "\x00invalid", ""
    if "x-clickhouse-user" in lowered:
        return lowered["x-clickhouse-user"] or "default", lowered.get("x-clickhouse-key", "")
    return params.get("user") or "default", params.get("password", "")


def authenticate(policy: EndpointPolicy, user: str, password: str) -> bool | TenantAnalyst | Refusal:
    """True: the admin (may write); False: a reader of everything; a `TenantAnalyst`: a reader of
    one tenant; a Refusal for wrong credentials."""
    wrong = Refusal(
        516, f"{user[:64]}: Authentication failed: password is incorrect. (AUTHENTICATION_FAILED)", 401
    )
    if policy.admin_password and user == policy.admin_user:
        if hmac.compare_digest(password.encode(), policy.admin_password.encode()):
            return True
        return wrong
    analyst = policy.tenant_analysts.get(user)
    if analyst is not None:
        digest = hashlib.sha256(password.encode()).hexdigest()
        if hmac.compare_digest(digest, analyst.password_sha256_hex.lower()):
            return analyst
        return wrong
    if user == "default":
        # No password, as ClickHouse's default user; one sent is wrong, as there.
        return False if not password else wrong
    return Refusal(
        192,
        f"{user[:64]}: there is no such user here: 'default' reads, '{policy.admin_user}' (with its "
        "password) writes. (UNKNOWN_USER)",
        401,
    )


_SYSTEM_DATABASE = re.compile(r"^\s*(?:USE\s+)?`?(?:system|information_schema)`?\s*;?\s*$", re.IGNORECASE)


def reader_database_refusal(database: str, use: str) -> Refusal | None:
    """A reader may not make a system database its current one (the URL's `database`, or USE): its
    host-fact tables would then go by bare names (`disks`, `server_settings`) past `_HOST_FACT`
    (review, twenty-sixth session). System tables are named in full: system.tables."""
    for name in (database, use):
        if name and _SYSTEM_DATABASE.match(name):
            return Refusal(
                497,
                "a reader names system tables in full (system.tables, system.columns); the system "
                "databases as the current one are for the admin user only. (ACCESS_DENIED)",
                403,
            )
    return None


# Where a reader's statement names the system database, its analysed tree is checked for the
# system tables' path columns (`host_path_refusal`).
MENTIONS_SYSTEM = re.compile(r"\bsystem\b", re.IGNORECASE)
_TREE_SYSTEM_TABLE = re.compile(r"^\s*TABLE id: (\d+),.*\btable_name: system\.(\w+)", re.MULTILINE)
_TREE_COLUMN = re.compile(
    r"^\s*COLUMN id: \d+, column_name: (\w*path\w*), .*\bsource_id: (\d+)", re.MULTILINE | re.IGNORECASE
)


def host_path_refusal(tree: str) -> Refusal | None:
    """Refuse a statement whose analysed tree (``EXPLAIN QUERY TREE``) reads a path column of a
    system table: where the engine keeps its data and metadata on the host (system.tables'
    data_paths and metadata_path, system.databases', system.parts' path, ...). The catalogues stay
    readable (Grafana lists databases, tables and columns from them); `SELECT *` over one is
    refused, since the analyzer lists every column it returns."""
    tables = dict(_TREE_SYSTEM_TABLE.findall(tree))
    for column, source in _TREE_COLUMN.findall(tree):
        if source in tables:
            return Refusal(
                497,
                f"system.{tables[source]}.{column} is where the server keeps its files on the host; "
                "it is for the admin user only (name the columns you need instead of *). (ACCESS_DENIED)",
                403,
            )
    return None


# A query parameter naming the system database (`{db:Identifier}.disks` with param_db=system) would
# reach system tables past every check of the statement's text (review, twenty-seventh session).
_SYSTEM_PARAMETER = re.compile(r"^\s*[`\"']?(?:system|information_schema)[`\"']?\s*(?:\.|$)", re.IGNORECASE)
_SHOW_PROCESSLIST = re.compile(r"\bSHOW\s+(?:FULL\s+)?PROCESSLIST\b", re.IGNORECASE)


def reader_parameter_refusal(params: Mapping[str, str]) -> Refusal | None:
    for name, value in params.items():
        if _SYSTEM_PARAMETER.match(value):
            return Refusal(
                497,
                f"query parameter {name} names the system database; a reader names system tables in "
                "full in the statement (system.tables). (ACCESS_DENIED)",
                403,
            )
    return None


def reader_explain_refusal(kind: str, sql: str) -> Refusal | None:
    """EXPLAIN of a statement that names the system database: the engine evaluates its scalar
    subqueries while analysing, and prints their values (a path column's value among them)."""
    if kind == "EXPLAIN" and MENTIONS_SYSTEM.search(sql):
        return Refusal(
            497,
            "EXPLAIN of a statement that reads the system tables is for the admin user only. (ACCESS_DENIED)",
            403,
        )
    return None


def reader_refusal(sql: str) -> Refusal | None:
    """What a read-only user may not run even though the engine's readonly mode allows it."""
    if _SHOW_PROCESSLIST.search(sql):
        return Refusal(
            497,
            "SHOW PROCESSLIST lists every user's queries; it is for the admin user only. (ACCESS_DENIED)",
            403,
        )
    if _INTO_OUTFILE.search(sql):
        return Refusal(
            164, "Cannot execute query in readonly mode: INTO OUTFILE writes on the server. (READONLY)", 403
        )
    match = _HOST_REACHING.search(sql)
    if match:
        name = match.group(0).rstrip("( \t\n")
        return Refusal(
            497,
            f"table function {name}() reaches the server's files, processes or network; "
            "it is for the admin user only. (ACCESS_DENIED)",
            403,
        )
    fact = _HOST_FACT.search(sql)
    if fact:
        return Refusal(
            497,
            f"{fact.group(0).rstrip('( ')} tells of the server's host (its paths, name, disks or "
            "credentials), not of the data; it is for the admin user only. (ACCESS_DENIED)",
            403,
        )
    path = _HOST_PATH_NAME.search(sql)
    if path:
        return Refusal(
            497,
            f"{path.group(0)} names a path on the server (the embedded engine's filesystem "
            "database); it is for the admin user only. (ACCESS_DENIED)",
            403,
        )
    return None


def reader_settings(policy: EndpointPolicy, settings: Mapping[str, str]) -> dict[str, str]:
    """A reader's URL settings (refused first, see `reader_setting_refusal`) with the endpoint's
    limits: a limit of its own only when it is a plain positive number within ours (1e-9 or false
    is no limit to the engine), anything else is ours."""
    out = dict(settings)
    caps = (
        ("max_execution_time", float(policy.max_execution_time_s), 0.001),
        ("max_result_bytes", float(policy.max_result_bytes), 1.0),
        ("max_memory_usage", float(policy.max_memory_usage), 1.0),
    )
    for name, cap, least in caps:
        asked = settings.get(name, "")
        out[name] = asked if _NUMBER.fullmatch(asked) and least <= float(asked) <= cap else str(int(cap))
    threads = settings.get("max_threads")
    if threads is not None:
        cores = os.cpu_count() or 1
        out["max_threads"] = threads if threads.isdigit() and 1 <= int(threads) <= cores else str(cores)
    return out


def reader_setting_refusal(settings: Mapping[str, str], *, in_url: bool = True) -> Refusal | None:
    """The first setting a reader may not set, as ClickHouse refuses it, or None."""
    for name in settings:
        if not reader_may_set(name, in_url=in_url):
            return Refusal(
                164,
                f"Cannot modify '{name}' setting in readonly mode: a reader of this endpoint may set "
                "limits (less than the endpoint's), output formats and a few query settings only. (READONLY)",
                403,
            )
    return None
