"""The ClickHouse migrations as files: naming, splitting, re-runnable DDL. No servers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.analytics import Migration, MigrationError, load_migrations, split_statements
from services.analytics._endpoint import output_format, statement_kind
from streams.projector import COLUMNS


def test_split_respects_quotes_and_comments() -> None:
    sql = """
    -- a comment; with a semicolon
    CREATE TABLE a (x String DEFAULT 'a;b') ENGINE = Memory;
    /* block; comment */
    SELECT 'it''s; fine', "we;ird", `b;c`;
    -- trailing comment only;
    """
    assert split_statements(sql) == [
        "-- a comment; with a semicolon\n    CREATE TABLE a (x String DEFAULT 'a;b') ENGINE = Memory",
        "/* block; comment */\n    SELECT 'it''s; fine', \"we;ird\", `b;c`",
    ]


def test_split_handles_backslash_escapes_and_no_trailing_semicolon() -> None:
    assert split_statements(r"SELECT 'a\';b'; SELECT 2") == [r"SELECT 'a\';b'", "SELECT 2"]
    assert split_statements("  ;; -- nothing\n") == []


def test_shipped_migrations_are_numbered_in_order_and_rerunnable() -> None:
    migrations = load_migrations()
    names = [m.name for m in migrations]
    assert names == sorted(names) and names[0].startswith("0001_")
    assert [int(n[:4]) for n in names] == list(range(1, len(names) + 1))
    for migration in migrations:
        assert migration.statements, migration.name
        for statement in migration.statements:
            code = re.sub(r"--[^\n]*", "", statement).strip()
            assert RERUNNABLE.match(code), (
                f"{migration.name}: every statement must be re-runnable and name its database:\n{code}"
            )


# Statements that can run twice with the same outcome (a migration interrupted half-way is
# applied again from its first statement).
RERUNNABLE = re.compile(
    r"CREATE (TABLE|MATERIALIZED VIEW|VIEW) IF NOT EXISTS switchboard\."
    r"|CREATE OR REPLACE VIEW switchboard\."
    r"|RENAME TABLE IF EXISTS switchboard\.\w+ TO switchboard\."
    r"|DROP VIEW IF EXISTS switchboard\."
    r"|ALTER TABLE switchboard\.\w+\s+ADD COLUMN IF NOT EXISTS (?!.*\bADD COLUMN (?!IF NOT EXISTS))",
    re.DOTALL,
)


def table_columns() -> dict[str, set[str]]:
    """Columns per table after every migration: CREATE TABLE, then RENAME and ADD COLUMN."""
    tables: dict[str, set[str]] = {}
    for migration in load_migrations():
        for statement in migration.statements:
            code = re.sub(r"--[^\n]*", "", statement).strip()
            if match := re.match(
                r"CREATE TABLE IF NOT EXISTS switchboard\.(\w+)\s*\((.*)\)", code, re.DOTALL
            ):
                tables[match.group(1)] = set(re.findall(r"^\s*(\w+)\s", match.group(2), re.MULTILINE))
            elif match := re.match(r"RENAME TABLE IF EXISTS switchboard\.(\w+) TO switchboard\.(\w+)", code):
                tables[match.group(2)] = tables.pop(match.group(1))
            elif match := re.match(r"ALTER TABLE switchboard\.(\w+)", code):
                tables[match.group(1)] |= set(re.findall(r"ADD COLUMN IF NOT EXISTS (\w+)", code))
    return tables


def test_projected_columns_exist_in_the_migrations() -> None:
    tables = table_columns()
    for table, columns in COLUMNS.items():
        assert table in tables, table
        missing = set(columns) - tables[table]
        assert not missing, f"{table}: {sorted(missing)}"


def test_analysts_read_views_named_like_the_old_tables() -> None:
    ddl = "\n".join(m.sql for m in load_migrations())
    for name in ("events", "messages", "replies", "intents", "handoffs", "csat"):
        assert re.search(
            rf"CREATE VIEW IF NOT EXISTS switchboard\.{name}\s+AS SELECT .*FROM switchboard\.raw_{name} FINAL",
            ddl,
        ), name


def test_badly_named_or_duplicate_versions_are_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("SELECT 1")
    (tmp_path / "0001_b.sql").write_text("SELECT 1")
    with pytest.raises(MigrationError, match="share a version"):
        load_migrations(tmp_path)
    (tmp_path / "0001_b.sql").unlink()
    (tmp_path / "2_c.sql").write_text("SELECT 1")
    with pytest.raises(MigrationError, match="NNNN_description"):
        load_migrations(tmp_path)


def test_checksum_changes_with_content() -> None:
    assert Migration("0001_a.sql", "SELECT 1").checksum != Migration("0001_a.sql", "SELECT 2").checksum


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        ("SELECT 1", "SELECT"),
        ("  -- hi\n/* x */ with x AS (SELECT 1) SELECT * FROM x", "WITH"),
        ("(SELECT 1) UNION ALL (SELECT 2)", "SELECT"),
        ("insert into t values (1)", "INSERT"),
        ("", ""),
    ],
)
def test_statement_kind(sql: str, kind: str) -> None:
    assert statement_kind(sql) == kind


def test_output_format() -> None:
    assert output_format("SELECT 1\n FORMAT Native", "TabSeparated") == "Native"
    assert output_format("SELECT 1 FORMAT JSON;", "TabSeparated") == "JSON"
    assert output_format("SELECT 'FORMAT' AS x", "CSV") == "CSV"
