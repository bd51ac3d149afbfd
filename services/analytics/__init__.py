"""Analytics: ClickHouse migrations, the chdb-owning analytics process and its query endpoint.

Tables live in database ``switchboard`` (see ``schemas/clickhouse``). The ReplacingMergeTree
tables (events, messages, replies, intents, handoffs, csat) may briefly hold duplicates of what
was projected twice; exact reads need ``FINAL`` or the setting ``final = 1``. The embedded query
endpoint and `run_query` apply ``final = 1`` by default, so there ``SELECT count() FROM
switchboard.messages`` is exact as written; against a ClickHouse server write
``SELECT count() FROM switchboard.messages FINAL`` (or ``SETTINGS final = 1``, or put
``final = 1`` in the analysts' settings profile). ``switchboard.conversations`` is a view that
aggregates, exact either way.
"""

from services.analytics._clickhouse import (
    DATABASE,
    AnalyticsError,
    ClickHouseLockedError,
    Migration,
    MigrationError,
    applied_migrations,
    load_migrations,
    migrate,
    open_clickhouse,
    split_statements,
)
from services.analytics._endpoint import (
    ChdbQueryEngine,
    QueryEndpoint,
    QueryError,
    QueryRequest,
    QueryResult,
)
from services.analytics._process import (
    QueryFailedError,
    endpoint_is_up,
    migrate_command,
    run_analytics,
    run_query,
)

__all__ = [
    "DATABASE",
    "AnalyticsError",
    "ChdbQueryEngine",
    "ClickHouseLockedError",
    "Migration",
    "MigrationError",
    "QueryEndpoint",
    "QueryError",
    "QueryFailedError",
    "QueryRequest",
    "QueryResult",
    "applied_migrations",
    "endpoint_is_up",
    "load_migrations",
    "migrate",
    "migrate_command",
    "open_clickhouse",
    "run_analytics",
    "run_query",
    "split_statements",
]
