"""Analytics: ClickHouse migrations, the chdb-owning analytics process and its query endpoint.

The projector writes raw_* storage tables; analysts read views with FINAL inside (events,
messages, ...) and aggregate views (conversations, metrics_per_minute), exact on any DSN with no
settings of ours; see docs/analytics.md.
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
from services.analytics._guard import EndpointPolicy
from services.analytics._process import (
    QueryFailedError,
    admin_password,
    endpoint_client,
    endpoint_is_up,
    endpoint_policy,
    migrate_command,
    run_analytics,
    run_query,
    run_query_bytes,
)

__all__ = [
    "DATABASE",
    "AnalyticsError",
    "ChdbQueryEngine",
    "ClickHouseLockedError",
    "EndpointPolicy",
    "Migration",
    "MigrationError",
    "QueryEndpoint",
    "QueryError",
    "QueryFailedError",
    "QueryRequest",
    "QueryResult",
    "admin_password",
    "applied_migrations",
    "endpoint_client",
    "endpoint_is_up",
    "endpoint_policy",
    "load_migrations",
    "migrate",
    "migrate_command",
    "open_clickhouse",
    "run_analytics",
    "run_query",
    "run_query_bytes",
    "split_statements",
]
