"""Every Grafana panel's query runs, as Grafana's ClickHouse plugin would send it, against the real
schema with data in it.

Grafana itself cannot be installed here, so this does what the plugin does before it queries:
resolves the dashboard variables (running their own queries), interpolates them
(``${tenant:singlequote}``, multi-value ``All``), expands the plugin's macros (``$__timeFilter``,
``$__timeInterval``, ``$__interval_s``, ...) for a real range the way pkg/macros of
grafana/clickhouse-datasource does, then runs each panel's SQL through clickhouse-connect and
through the Go driver the plugin uses (clickhouse-go v2, tests/integration/go_client), and checks
both return the same non-empty rows with the columns the panel reads. Prometheus panels are
checked against the processes' /metrics in test_observability.py.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest

from services.settings import PROJECT_ROOT
from streams.projector import project, write_batch
from tests.integration.test_analytics import process_chdb, process_endpoint
from tests.integration.test_go_driver import go_client, normal, through_go
from tests.integration.test_metrics import T0, support_day

pytestmark = pytest.mark.integration
__all__ = ["go_client"]

GRAFANA = PROJECT_ROOT / "infra" / "grafana"
CLICKHOUSE_PLUGIN = "grafana-clickhouse-datasource"
# The range a user would pick around the support day, and Grafana's interval for it.
FROM = dt.datetime.fromtimestamp(T0 // 10**9, dt.UTC) - dt.timedelta(hours=1)
TO = FROM + dt.timedelta(hours=6)
INTERVAL_S = 60


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((GRAFANA / "dashboards").glob("*.json"))}


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for p in board["panels"]:
        found.extend(p.get("panels", [p]))  # rows may nest panels
    return found


def clickhouse_targets() -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(dashboard, panel title, panel, target) for every ClickHouse query."""
    out = []
    for name, board in dashboards().items():
        for p in panels(board):
            for t in p.get("targets", []):
                if t["datasource"]["type"] == CLICKHOUSE_PLUGIN:
                    out.append((name, p["title"], p, t))
    return out


def prometheus_exprs() -> list[tuple[str, str]]:
    return [
        (p["title"], t["expr"])
        for board in dashboards().values()
        for p in panels(board)
        for t in p.get("targets", [])
        if t["datasource"]["type"] == "prometheus"
    ]


# --- what the plugin does to a query ------------------------------------------------------------


def _seconds(t: dt.datetime) -> int:
    return int(t.timestamp())


def _args(text: str, start: int) -> tuple[list[str], int]:
    """The comma-separated arguments of a macro call whose '(' is at `start`; and the end."""
    depth, i, args, current = 0, start, [], ""
    while i < len(text):
        c = text[i]
        if c == "(":
            depth += 1
            if depth > 1:
                current += c
        elif c == ")":
            depth -= 1
            if depth == 0:
                args.append(current.strip())
                return [a for a in args if a], i + 1
            current += c
        elif c == "," and depth == 1:
            args.append(current.strip())
            current = ""
        else:
            current += c
        i += 1
    raise AssertionError(f"unclosed macro call in {text!r}")


def _date(t: dt.datetime) -> str:
    return f"toDate('{t:%Y-%m-%d}')"


MACROS: dict[str, Callable[[list[str]], str]] = {
    # The functions of grafana/clickhouse-datasource pkg/macros/macros.go, for FROM..TO.
    "fromTime": lambda a: f"toDateTime({_seconds(FROM)})",
    "toTime": lambda a: f"toDateTime({_seconds(TO)})",
    "fromTime_ms": lambda a: f"fromUnixTimestamp64Milli({_seconds(FROM) * 1000})",
    "toTime_ms": lambda a: f"fromUnixTimestamp64Milli({_seconds(TO) * 1000})",
    "timeFilter": lambda a: (
        f"{a[0]} >= toDateTime({_seconds(FROM)}) AND {a[0]} <= toDateTime({_seconds(TO)})"
    ),
    "timeFilter_ms": lambda a: (
        f"{a[0]} >= fromUnixTimestamp64Milli({_seconds(FROM) * 1000}) AND "
        f"{a[0]} <= fromUnixTimestamp64Milli({_seconds(TO) * 1000})"
    ),
    "dateFilter": lambda a: f"{a[0]} >= {_date(FROM)} AND {a[0]} <= {_date(TO)}",
    "timeInterval": lambda a: f"toStartOfInterval(toDateTime({a[0]}), INTERVAL {INTERVAL_S} second)",
    "timeInterval_ms": lambda a: (
        f"toStartOfInterval(toDateTime64({a[0]}, 3), INTERVAL {INTERVAL_S * 1000} millisecond)"
    ),
    "interval_s": lambda a: str(INTERVAL_S),
}
_MACRO = re.compile(r"\$__(" + "|".join(sorted(MACROS, key=len, reverse=True)) + r")\b")


def expand_macros(sql: str) -> str:
    while (m := _MACRO.search(sql)) is not None:
        name = m.group(1)
        args: list[str] = []
        end = m.end()
        if end < len(sql) and sql[end] == "(":
            args, end = _args(sql, end)
        sql = sql[: m.start()] + MACROS[name](args) + sql[end:]
    return sql


def interpolate(sql: str, variables: dict[str, list[str]]) -> str:
    """Grafana's variable interpolation for the formats the dashboards use."""

    def value(m: re.Match[str]) -> str:
        name, fmt = m.group(1) or m.group(3), m.group(2)
        values = variables[name]
        if fmt == "singlequote":
            return ",".join("'" + v.replace("'", "\\'") + "'" for v in values)
        assert fmt is None, f"format {fmt} not handled"
        return ",".join(values)

    return re.sub(r"\$\{(\w+)(?::(\w+))?\}|\$(\w+)", value, sql)


def to_query(sql: str, variables: dict[str, list[str]]) -> str:
    query = interpolate(expand_macros(sql), variables)
    assert "$" not in query, f"unexpanded macro or variable in {query}"
    return query


# --- data and clients ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, int, str]:
    """(clickhouse-connect client on the endpoint, endpoint port, tenant) over a support day."""
    _, chdb_client, _ = process_chdb(tmp_path_factory)
    tenant = f"gf{uuid.uuid4().hex[:10]}"
    write_batch(chdb_client, project(support_day(tenant)))
    port = process_endpoint(tmp_path_factory).port
    return clickhouse_connect.get_client(host="127.0.0.1", port=port), port, tenant


def resolve_variables(board: dict[str, Any], client: Any, tenant: str) -> dict[str, list[str]]:
    """Run each variable's query (in order, later ones may use earlier ones): the tenant is
    ours (it must be among the choices); a multi-value variable takes All."""
    chosen: dict[str, list[str]] = {}
    for var in board.get("templating", {}).get("list", []):
        assert var["type"] == "query" and var["datasource"]["type"] == CLICKHOUSE_PLUGIN, var["name"]
        rows = client.query(to_query(var["query"], chosen)).result_rows
        options = [str(r[0]) for r in rows]
        assert options, f"variable {var['name']} has no options"
        if var.get("multi") or var.get("includeAll"):
            chosen[var["name"]] = options
        else:
            assert tenant in options, f"{var['name']}: {tenant} not among {options[:5]}..."
            chosen[var["name"]] = [tenant]
    return chosen


# --- tests --------------------------------------------------------------------------------------


def test_dashboards_are_provisioned_with_both_datasources() -> None:
    boards = dashboards()
    assert {b["title"] for b in boards.values()} == {"Conversations", "Pipeline"}
    sources = (GRAFANA / "datasources" / "switchboard.yaml").read_text()
    provider = (GRAFANA / "dashboards" / "switchboard.yaml").read_text()
    assert "type: grafana-clickhouse-datasource" in sources and "type: prometheus" in sources
    assert "path: /etc/grafana/provisioning/dashboards" in provider
    for board in boards.values():
        for p in panels(board):
            for t in p["targets"]:
                # Every target names a provisioned datasource by its uid.
                assert f"uid: {t['datasource']['uid']}" in sources, (board["title"], p["title"])
                if t["datasource"]["type"] == CLICKHOUSE_PLUGIN:
                    # The plugin's own query model (v4): SQL editor, numeric format.
                    assert t["editorType"] == "sql" and t["format"] in (0, 1) and t["rawSql"]
                    assert t["queryType"] == ("timeseries" if t["format"] == 0 else "table")
    conversations = boards["conversations"]
    assert [v["name"] for v in conversations["templating"]["list"]] == ["tenant", "channel"]
    titles = " ".join(p["title"].lower() for p in panels(boards["pipeline"]))
    for topic in (
        "ingest",
        "ack latency",
        "consumer lag",
        "processing time",
        "model latency",
        "gateway errors",
    ):
        assert topic in titles, topic


def test_macros_expand_like_the_plugin() -> None:
    sql = "SELECT $__timeInterval(minute) AS t FROM x WHERE $__timeFilter(minute) AND n < $__interval_s"
    assert expand_macros(sql) == (
        f"SELECT toStartOfInterval(toDateTime(minute), INTERVAL 60 second) AS t FROM x WHERE "
        f"minute >= toDateTime({_seconds(FROM)}) AND minute <= toDateTime({_seconds(TO)}) AND n < 60"
    )
    assert interpolate(
        "tenant_id IN (${tenant:singlequote}) AND c IN ($c)", {"tenant": ["a", "b"], "c": ["x"]}
    ) == ("tenant_id IN ('a','b') AND c IN (x)")


TARGETS = clickhouse_targets()


@pytest.mark.parametrize(
    ("board", "title", "panel", "target"), TARGETS, ids=[f"{b}:{t}:{x['refId']}" for b, t, _, x in TARGETS]
)
def test_clickhouse_panel_returns_rows(
    loaded: tuple[Any, int, str],
    go_client: Path,
    board: str,
    title: str,
    panel: dict[str, Any],
    target: dict[str, Any],
) -> None:
    client, port, tenant = loaded
    variables = resolve_variables(dashboards()[board], client, tenant)
    query = to_query(target["rawSql"], variables)
    result = client.query(query)
    assert result.result_rows, f"{title}: no rows\n{query}"
    assert list(result.column_names) == panel["switchboard"]["columns"], title
    if target["format"] == 0:
        # A time series needs its time column first, in the requested range.
        times = [row[0] for row in result.result_rows]
        assert all(FROM <= t.replace(tzinfo=dt.UTC) <= TO for t in times), title
        assert times == sorted(times), title
    # A useful panel shows something besides zeros.
    assert any(v not in (0, None, "") for row in result.result_rows for v in row[1:] or row), title
    (through_plugin_driver,) = through_go(go_client, port, query)
    assert "error" not in through_plugin_driver, through_plugin_driver.get("error")
    assert through_plugin_driver["columns"] == list(result.column_names)
    assert [normal(r) for r in through_plugin_driver["rows"]] == [normal(list(r)) for r in result.result_rows]


def test_the_conversations_dashboard_reads_the_metrics_views(loaded: tuple[Any, int, str]) -> None:
    """The numbers the panels show are the metrics' own: the support day's 12 conversations."""
    client, _, tenant = loaded
    board = dashboards()["conversations"]
    variables = resolve_variables(board, client, tenant)
    by_title = {p["title"]: p for p in panels(board)}

    def run(title: str) -> list[tuple[Any, ...]]:
        return list(client.query(to_query(by_title[title]["targets"][0]["rawSql"], variables)).result_rows)

    assert run("Conversations started") == [(12,)]
    assert sum(r[1] for r in run("Conversations")) == 12
    by_channel = run("By channel")
    assert sum(r[1] for r in by_channel) == 12 and {r[0] for r in by_channel} == {"web", "ios", "wechat"}
    (rate,) = run("Bot resolution rate")[0]
    assert rate == pytest.approx(4 / 8)
    intents = run("Intents")
    assert {r[0] for r in intents} == {"order_status", "refund", "shipping_cost", "greeting"}
    assert all(0.6 <= r[2] <= 1 for r in intents), intents  # a mean confidence is a confidence
