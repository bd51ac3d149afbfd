"""Tenant analysts: users of the analyst endpoint who see one tenant's rows and nothing else.

chdb has one user (its access control is off), so ClickHouse's row policies cannot be used. The
endpoint gets the same effect from three things, all enforced by the engine or checked against
the engine's own analysis of the query, never by reading the SQL's text alone:

1. ``additional_table_filters`` (a ClickHouse setting) holds ``tenant_id = '<tenant>'`` for every
   table and view that has a ``tenant_id`` column, in every database, looked up per request (a
   table made later is covered at once). The engine applies it wherever the table is read: in
   views, subqueries, joins, IN, scalar subqueries, FINAL.
2. ``readonly = 1``, set after it: the client can change no setting, neither in the statement's
   SETTINGS clause nor with SET; the endpoint applies the client's URL settings *before* its own,
   so a URL parameter cannot replace the filter either. The query cache is off (an entry made by
   an unrestricted user must not answer a restricted one).
3. Reading anything the filter does not cover is refused: the tables and table functions of the
   statement come from ``EXPLAIN QUERY TREE`` (ClickHouse's analyzer, so aliases, CTEs, views and
   subqueries are resolved); system tables other than schema/catalogue ones (processes, parts,
   errors, ... carry other tenants' data or queries) and table functions other than generators
   (``merge()`` reads a table by pattern, past the filter) are refused with ACCESS_DENIED.

Pure functions; the engine (_endpoint.py) runs the look-ups.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from services.analytics._guard import Refusal

TENANT_COLUMN = "tenant_id"

_CATALOGUE_DATABASES = ("system", "INFORMATION_SCHEMA", "information_schema")
# Lists every table and view with the tenant column (the filter's keys).
TENANT_TABLES_SQL = (
    f"SELECT database, table FROM system.columns WHERE name = '{TENANT_COLUMN}' "
    f"AND database NOT IN {_CATALOGUE_DATABASES}"
)
# Every table and view outside the catalogues: (database, name, is a plain view, has the column).
OBJECTS_SQL = (
    "SELECT database, name, engine = 'View', (database, name) IN "
    f"(SELECT database, table FROM system.columns WHERE name = '{TENANT_COLUMN}') "
    f"FROM system.tables WHERE database NOT IN {_CATALOGUE_DATABASES} AND NOT is_temporary"
)


@dataclass(frozen=True)
class Objects:
    """What a tenant analyst's statement may read outside the catalogues."""

    # Tables and views with the tenant column: filtered (the filter's keys).
    tenant_bearing: frozenset[str]
    # Plain views: what they read is filtered where it is read (a view of a tenant table is).
    views: frozenset[str]

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[Any]]) -> Objects:
        tenant, views = set(), set()
        for database, name, is_view, has_tenant in rows:
            if has_tenant:
                tenant.add(f"{database}.{name}")
            elif is_view:
                views.add(f"{database}.{name}")
        return cls(frozenset(tenant), frozenset(views))


# Catalogue and constant tables: schema, settings and functions, no one's rows.
_SYSTEM_TABLES = frozenset(
    {
        "one",
        "numbers",
        "numbers_mt",
        "zeros",
        "zeros_mt",
        "databases",
        "tables",
        "columns",
        "settings",
        "functions",
        "formats",
        "table_functions",
        "table_engines",
        "data_type_families",
        "time_zones",
        "collations",
        "aggregate_function_combinators",
        "keywords",
        "build_options",
        "contributors",
        "licenses",
        "current_roles",
        "enabled_roles",
    }
)
# Table functions that generate rows, or read only what the query itself gives them. Not view():
# the tree does not show the tables of its inner query.
_TABLE_FUNCTIONS = frozenset(
    {
        "numbers",
        "numbers_mt",
        "zeros",
        "zeros_mt",
        "generateRandom",
        "generate_series",
        "generateSeries",
        "values",
        "null",
        "format",
    }
)
# Statements a tenant analyst may run besides SELECT/WITH (checked with EXPLAIN QUERY TREE).
_SHOW_ALLOWED = re.compile(
    r"^SHOW\s+(?:FULL\s+)?(?:TEMPORARY\s+)?(?:TABLES|DATABASES|COLUMNS|FIELDS|CREATE|SETTINGS?|"
    r"CHANGED\s+SETTINGS|FUNCTIONS|ENGINES)\b",
    re.IGNORECASE,
)
_LEADING_NOISE = re.compile(r"^(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.DOTALL)
_TREE_TABLE = re.compile(r"\btable_name: ([^\n]*?)(?:, \w+: |\n|$)")
_TREE_FUNCTION = re.compile(r"\btable_function_name: (\w+)")


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def tenant_settings(objects: Objects, tenant: str) -> dict[str, str]:
    """The settings that restrict a connection to `tenant` (applied before ``readonly = 1``)."""
    condition = f"{TENANT_COLUMN} = {_quote(tenant)}"
    entries = sorted(f"{_quote(name)}: {_quote(condition)}" for name in objects.tenant_bearing)
    return {
        "additional_table_filters": "{" + ", ".join(entries) + "}",
        "use_query_cache": "0",
    }


def statement_refusal(kind: str, sql: str) -> Refusal | None:
    """What a tenant analyst may not run at all: anything but reading statements, EXPLAIN (its
    estimates count other tenants' rows) and SHOW forms other than the schema ones (SHOW
    PROCESSLIST lists everyone's queries)."""
    if kind in ("SELECT", "WITH", "DESCRIBE", "DESC", "EXISTS", "USE", "SET"):
        return None
    if kind == "SHOW" and _SHOW_ALLOWED.match(_LEADING_NOISE.sub("", sql, count=1)):
        return None
    return Refusal(
        497,
        f"{kind or 'this statement'}: a tenant analyst reads its tenant's tables and views "
        "(SELECT, DESCRIBE, EXISTS, SHOW TABLES/DATABASES/COLUMNS/CREATE). (ACCESS_DENIED)",
        403,
    )


def tree_refusal(tree: str, objects: Objects) -> Refusal | None:
    """Refuse a statement whose analysed tree (``EXPLAIN QUERY TREE``) reads a system table that
    is not a catalogue, a table without the tenant column (deny by default: a table added later
    without one is not readable), or calls a table function that could read past the filter."""
    for function in _TREE_FUNCTION.findall(tree):
        if function not in _TABLE_FUNCTIONS:
            return Refusal(
                497,
                f"table function {function}() is not available to a tenant analyst (it can read "
                "tables past the tenant's row filter). (ACCESS_DENIED)",
                403,
            )
    for name in _TREE_TABLE.findall(tree):
        name = name.strip()
        database, _, table = name.partition(".")
        if database in _CATALOGUE_DATABASES[1:]:
            continue  # information_schema: views of system.tables and system.columns
        if database != "system":
            if name in objects.tenant_bearing or name in objects.views:
                continue
            return Refusal(
                497,
                f"{name} has no {TENANT_COLUMN} column, so a tenant analyst cannot read it. (ACCESS_DENIED)",
                403,
            )
        if table not in _SYSTEM_TABLES:
            return Refusal(
                497,
                f"system.{table} is not available to a tenant analyst (it holds other tenants' "
                "data or queries); system.tables, system.columns and the other catalogues are. "
                "(ACCESS_DENIED)",
                403,
            )
    return None
