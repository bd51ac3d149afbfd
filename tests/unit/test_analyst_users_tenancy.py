"""The tenant analysts' pure decisions (services/analytics/_tenancy.py): the filter setting, the
statements they may run, and what an analysed query tree may read."""

from __future__ import annotations

import pytest

from services.analytics._tenancy import Objects, statement_refusal, tenant_settings, tree_refusal

OBJECTS = Objects.from_rows(
    [
        ("switchboard", "raw_events", 0, 1),
        ("switchboard", "events", 1, 1),
        ("switchboard", "totals", 1, 0),
        ("switchboard", "schema_migrations", 0, 0),
    ]
)


def tree(*lines: str) -> str:
    return "QUERY id: 0\n  JOIN TREE\n" + "\n".join(f"    {line}" for line in lines) + "\n"


def test_the_filter_names_every_tenant_table_and_quotes_the_tenant() -> None:
    settings = tenant_settings(OBJECTS, "o'brien\\co")
    assert settings["use_query_cache"] == "0"
    filters = settings["additional_table_filters"]
    assert filters.startswith("{") and filters.endswith("}")
    # The condition quotes the tenant; the map quotes the condition again.
    assert "'switchboard.raw_events': 'tenant_id = \\'o\\\\\\'brien\\\\\\\\co\\''" in filters
    assert (
        "'switchboard.events'" in filters and "totals" not in filters and "schema_migrations" not in filters
    )


@pytest.mark.parametrize(
    ("lines", "refused"),
    [
        (["TABLE id: 3, alias: __table1, table_name: switchboard.raw_events"], None),
        (["TABLE id: 3, alias: __table1, table_name: switchboard.totals"], None),
        (["TABLE id: 3, alias: __table1, table_name: system.one"], None),
        (["TABLE id: 3, alias: __table1, table_name: information_schema.tables"], None),
        (["TABLE_FUNCTION id: 3, alias: __table1, table_function_name: numbers"], None),
        (["TABLE id: 3, alias: __table1, table_name: switchboard.schema_migrations"], "no tenant_id column"),
        (["TABLE id: 3, alias: __table1, table_name: default.bare"], "no tenant_id column"),
        (["TABLE id: 3, alias: __table1, table_name: system.processes"], "system.processes"),
        (["TABLE_FUNCTION id: 3, alias: __table1, table_function_name: merge"], "merge()"),
        (["TABLE_FUNCTION id: 3, alias: __table1, table_function_name: view"], "view()"),
        (
            [
                "TABLE id: 3, alias: __table1, table_name: switchboard.events",
                "TABLE id: 7, alias: __table2, table_name: system.parts",
            ],
            "system.parts",
        ),
    ],
)
def test_what_a_query_tree_may_read(lines: list[str], refused: str | None) -> None:
    refusal = tree_refusal(tree(*lines), OBJECTS)
    if refused is None:
        assert refusal is None
    else:
        assert refusal is not None and refused in refusal.message and refusal.code == 497


@pytest.mark.parametrize(
    ("kind", "sql", "allowed"),
    [
        ("SELECT", "SELECT 1", True),
        ("WITH", "WITH 1 AS x SELECT x", True),
        ("DESCRIBE", "DESCRIBE switchboard.events", True),
        ("SHOW", "SHOW TABLES FROM switchboard", True),
        ("SHOW", "/* c */ SHOW CREATE TABLE switchboard.events", True),
        ("SHOW", "SHOW PROCESSLIST", False),
        ("SHOW", "SHOW GRANTS", False),
        ("EXPLAIN", "EXPLAIN ESTIMATE SELECT 1", False),
        ("INSERT", "INSERT INTO t VALUES (1)", False),
        ("KILL", "KILL QUERY WHERE 1", False),
    ],
)
def test_which_statements_a_tenant_analyst_runs(kind: str, sql: str, allowed: bool) -> None:
    assert (statement_refusal(kind, sql) is None) is allowed
