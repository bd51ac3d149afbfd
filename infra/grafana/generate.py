"""Writes the provisioned dashboards (dashboards/*.json) from the panel lists below.

    .venv/bin/python infra/grafana/generate.py

The JSON files are what Grafana loads and what tests/integration/test_grafana_dashboards.py runs;
this script is only how they are kept consistent (ids, grid, datasource references). ClickHouse
targets are in the grafana-clickhouse-datasource (v4) query format: ``editorType: sql``,
``rawSql`` with the plugin's macros (``$__timeFilter``, ``$__timeInterval``, ``$__interval_s``),
``format`` 0 (time series) or 1 (table), ``queryType`` ``timeseries`` or ``table``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CLICKHOUSE = {"type": "grafana-clickhouse-datasource", "uid": "switchboard-clickhouse"}
PROMETHEUS = {"type": "prometheus", "uid": "switchboard-prometheus"}
TIMESERIES, TABLE = 0, 1

# The Conversations dashboard's filter: a tenant (single) and channels (multi, All).
CONV_FILTER = "tenant_id IN (${tenant:singlequote}) AND channel IN (${channel:singlequote})"


def ch(sql: str, fmt: int = TIMESERIES, ref: str = "A") -> dict[str, Any]:
    return {
        "datasource": CLICKHOUSE,
        "editorType": "sql",
        "format": fmt,
        "queryType": "timeseries" if fmt == TIMESERIES else "table",
        "pluginVersion": "4.11.0",
        "rawSql": sql.strip(),
        "refId": ref,
    }


def prom(expr: str, legend: str, ref: str = "A") -> dict[str, Any]:
    return {
        "datasource": PROMETHEUS,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend,
        "range": True,
        "refId": ref,
    }


def panel(
    title: str,
    kind: str,
    targets: list[dict[str, Any]],
    *,
    unit: str = "short",
    description: str = "",
    expect: list[str] | None = None,
) -> dict[str, Any]:
    """`expect`: the columns a ClickHouse panel reads (checked by the tests)."""
    out: dict[str, Any] = {
        "title": title,
        "type": kind,
        "description": description,
        "datasource": targets[0]["datasource"],
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
    }
    if kind == "stat":
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    if expect:
        out["switchboard"] = {"columns": expect}
    return out


def layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    x = y = 0
    row_h = 0
    for i, p in enumerate(panels, start=1):
        w = 6 if p["type"] == "stat" else 12
        h = 4 if p["type"] == "stat" else 8
        if x + w > 24:
            x, y = 0, y + row_h
            row_h = 0
        p["id"] = i
        p["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
        x += w
        row_h = max(row_h, h)
    return panels


def dashboard(
    uid: str, title: str, panels: list[dict[str, Any]], variables: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "tags": ["switchboard"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": variables},
        "annotations": {"list": []},
        "panels": layout(panels),
    }


def query_variable(name: str, label: str, sql: str, *, multi: bool) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": CLICKHOUSE,
        "query": sql.strip(),
        "definition": sql.strip(),
        "refresh": 2,
        "multi": multi,
        "includeAll": multi,
        "sort": 1,
        "current": {},
    }


def conversations() -> dict[str, Any]:
    per_minute = "FROM switchboard.metrics_per_minute WHERE $__timeFilter(minute) AND " + CONV_FILTER
    points = "FROM switchboard.metric_points WHERE $__timeFilter(at) AND " + CONV_FILTER
    panels = [
        panel(
            "Conversations started",
            "stat",
            [ch(f"SELECT sum(conversations_started) AS started {per_minute}", TABLE)],
            expect=["started"],
        ),
        panel(
            "Bot resolution rate",
            "stat",
            [
                ch(
                    "SELECT if(sum(conversations_closed) = 0, NULL, sum(bot_resolved) / sum(conversations_closed))"
                    f" AS bot_resolution_rate {per_minute}",
                    TABLE,
                )
            ],
            unit="percentunit",
            description="Closed conversations with no handoff, over all closed in the range.",
            expect=["bot_resolution_rate"],
        ),
        panel(
            "Handoff rate",
            "stat",
            [
                ch(
                    "SELECT if(sum(conversations_started) = 0, NULL,"
                    f" sum(conversations_handed_off) / sum(conversations_started)) AS handoff_rate {per_minute}",
                    TABLE,
                )
            ],
            unit="percentunit",
            expect=["handoff_rate"],
        ),
        panel(
            "CSAT",
            "stat",
            [
                ch(
                    f"SELECT avg(value) AS csat_avg, count() AS ratings {points} AND metric = 'csat_score'",
                    TABLE,
                )
            ],
            description="Average rating (1-5) and number of ratings in the range.",
            expect=["csat_avg", "ratings"],
        ),
        panel(
            "Conversations",
            "timeseries",
            [
                ch(
                    "SELECT $__timeInterval(minute) AS time, sum(conversations_started) AS started,"
                    f" sum(conversations_closed) AS closed {per_minute} GROUP BY time ORDER BY time"
                )
            ],
            expect=["time", "started", "closed"],
        ),
        panel(
            "Messages by sender",
            "timeseries",
            [
                ch(
                    "SELECT $__timeInterval(minute) AS time, sum(customer_messages) AS customer,"
                    " sum(bot_messages) AS bot, sum(agent_messages) AS agent"
                    f" {per_minute} GROUP BY time ORDER BY time"
                )
            ],
            expect=["time", "customer", "bot", "agent"],
        ),
        panel(
            "First response time",
            "timeseries",
            [
                ch(
                    "SELECT $__timeInterval(at) AS time, quantileExact(0.5)(value) AS p50,"
                    f" quantileExact(0.9)(value) AS p90 {points} AND metric = 'first_response_ms'"
                    " GROUP BY time ORDER BY time"
                )
            ],
            unit="ms",
            description="First customer message to the first bot or agent answer, by when it was answered.",
            expect=["time", "p50", "p90"],
        ),
        panel(
            "Bot resolution and handoff rate",
            "timeseries",
            [
                ch(
                    "SELECT $__timeInterval(minute) AS time,"
                    " if(sum(conversations_closed) = 0, NULL, sum(bot_resolved) / sum(conversations_closed))"
                    " AS bot_resolution_rate,"
                    " if(sum(conversations_started) = 0, NULL, sum(conversations_handed_off) / sum(conversations_started))"
                    f" AS handoff_rate {per_minute} GROUP BY time ORDER BY time"
                )
            ],
            unit="percentunit",
            expect=["time", "bot_resolution_rate", "handoff_rate"],
        ),
        panel(
            "Agent wait",
            "timeseries",
            [
                ch(
                    "SELECT $__timeInterval(at) AS time, avg(value) AS avg_wait, quantileExact(0.9)(value) AS p90_wait"
                    f" {points} AND metric = 'agent_wait_ms' GROUP BY time ORDER BY time"
                )
            ],
            unit="ms",
            description="Handoff request to an agent's accept, by when it was accepted.",
            expect=["time", "avg_wait", "p90_wait"],
        ),
        panel(
            "CSAT over time",
            "timeseries",
            [
                ch(
                    "SELECT $__timeInterval(at) AS time, avg(value) AS csat_avg, count() AS ratings"
                    f" {points} AND metric = 'csat_score' GROUP BY time ORDER BY time"
                )
            ],
            expect=["time", "csat_avg", "ratings"],
        ),
        panel(
            "Intent mix",
            "timeseries",
            [
                ch(
                    "SELECT $__timeInterval(minute) AS time, intent, sum(classifications) AS classifications"
                    " FROM switchboard.intent_mix_per_minute WHERE $__timeFilter(minute) AND "
                    + CONV_FILTER
                    + " GROUP BY time, intent ORDER BY time, intent"
                )
            ],
            description="Classified customer messages per intent (long format: one series per intent).",
            expect=["time", "intent", "classifications"],
        ),
        panel(
            "Intents",
            "table",
            [
                ch(
                    "SELECT intent, sum(classifications) AS messages,"
                    " round(sum(avg_confidence * classifications) / sum(classifications), 3) AS mean_confidence"
                    " FROM switchboard.intent_mix_per_minute WHERE $__timeFilter(minute) AND "
                    + CONV_FILTER
                    + " GROUP BY intent ORDER BY messages DESC, intent",
                    TABLE,
                )
            ],
            expect=["intent", "messages", "mean_confidence"],
        ),
        panel(
            "LLM tokens",
            "timeseries",
            [
                ch(
                    "SELECT $__timeInterval(minute) AS time, sum(prompt_tokens) AS prompt,"
                    f" sum(completion_tokens) AS completion {per_minute} GROUP BY time ORDER BY time"
                )
            ],
            expect=["time", "prompt", "completion"],
        ),
        panel(
            "By channel",
            "table",
            [
                ch(
                    "SELECT channel, sum(conversations_started) AS started, sum(conversations_closed) AS closed,"
                    " sum(customer_messages) AS customer_messages, sum(bot_resolved) AS bot_resolved,"
                    " sum(conversations_handed_off) AS handed_off, sum(csat_count) AS ratings"
                    f" {per_minute} GROUP BY channel ORDER BY channel",
                    TABLE,
                )
            ],
            expect=[
                "channel",
                "started",
                "closed",
                "customer_messages",
                "bot_resolved",
                "handed_off",
                "ratings",
            ],
        ),
    ]
    variables = [
        query_variable(
            "tenant",
            "Tenant",
            "SELECT DISTINCT tenant_id FROM switchboard.event_counts ORDER BY tenant_id",
            multi=False,
        ),
        query_variable(
            "channel",
            "Channel",
            "SELECT DISTINCT channel FROM switchboard.conversation_facts"
            " WHERE tenant_id IN (${tenant:singlequote}) ORDER BY channel",
            multi=True,
        ),
    ]
    return dashboard("switchboard-conversations", "Conversations", panels, variables)


def pipeline() -> dict[str, Any]:
    rate = "$__rate_interval"
    panels = [
        panel(
            "Ingest rate (acked writes/s)",
            "timeseries",
            [
                prom(
                    f'sum by (method) (rate(switchboard_grpc_requests_total{{method=~"SendMessage|SendMessages|StartConversation",code="OK"}}[{rate}]))',
                    "{{method}}",
                ),
                prom(
                    f'sum(rate(switchboard_produce_seconds_count{{outcome="ok"}}[{rate}]))',
                    "events produced",
                    "B",
                ),
            ],
            unit="reqps",
        ),
        panel(
            "Ack latency",
            "timeseries",
            [
                prom(
                    f'histogram_quantile(0.5, sum by (le) (rate(switchboard_grpc_request_seconds_bucket{{method="SendMessage"}}[{rate}])))',
                    "SendMessage p50",
                ),
                prom(
                    f'histogram_quantile(0.99, sum by (le) (rate(switchboard_grpc_request_seconds_bucket{{method="SendMessage"}}[{rate}])))',
                    "SendMessage p99",
                    "B",
                ),
                prom(
                    f"histogram_quantile(0.99, sum by (le) (rate(switchboard_produce_seconds_bucket[{rate}])))",
                    "Kafka ack p99",
                    "C",
                ),
            ],
            unit="s",
        ),
        panel(
            "gRPC errors by code",
            "timeseries",
            [
                prom(
                    f'sum by (method, code) (rate(switchboard_grpc_requests_total{{code!="OK"}}[{rate}]))',
                    "{{method}} {{code}}",
                )
            ],
            unit="reqps",
        ),
        panel(
            "In-flight writes",
            "timeseries",
            [prom("sum(switchboard_inflight_writes)", "awaiting Kafka")],
        ),
        panel(
            "Consumer lag per group",
            "timeseries",
            [prom("sum by (group) (switchboard_consumer_lag)", "{{group}}")],
            description="Records in conversation-events not yet applied by each processor's group.",
        ),
        panel(
            "Events processed per processor",
            "timeseries",
            [prom(f"sum by (processor) (rate(switchboard_events_processed_total[{rate}]))", "{{processor}}")],
            unit="ops",
        ),
        panel(
            "Batch processing time per processor (p90)",
            "timeseries",
            [
                prom(
                    f"histogram_quantile(0.9, sum by (processor, le) (rate(switchboard_batch_processing_seconds_bucket[{rate}])))",
                    "{{processor}}",
                )
            ],
            unit="s",
        ),
        panel(
            "Model latency (p90)",
            "timeseries",
            [
                prom(
                    f"histogram_quantile(0.9, sum by (model, le) (rate(switchboard_model_inference_seconds_bucket[{rate}])))",
                    "{{model}}",
                )
            ],
            unit="s",
        ),
        panel(
            "Gateway errors",
            "timeseries",
            [
                prom(
                    f'sum by (adapter, outcome) (rate(switchboard_gateway_calls_total{{outcome!="ok"}}[{rate}]))',
                    "{{adapter}} {{outcome}}",
                ),
                prom(
                    f"sum by (processor) (rate(switchboard_dead_lettered_total[{rate}]))",
                    "dead-lettered by {{processor}}",
                    "B",
                ),
            ],
            unit="ops",
        ),
        panel(
            "ClickHouse inserts",
            "timeseries",
            [
                prom(
                    f"histogram_quantile(0.9, sum by (le) (rate(switchboard_projector_insert_seconds_bucket[{rate}])))",
                    "insert p90 (s)",
                ),
                prom(
                    f"sum(rate(switchboard_projector_insert_rows_sum[{rate}]))",
                    "rows/s",
                    "B",
                ),
            ],
        ),
        panel(
            "Events per minute by type (ClickHouse)",
            "timeseries",
            [
                ch(
                    "SELECT $__timeInterval(minute) AS time, type, sum(events) AS events"
                    " FROM switchboard.events_per_minute WHERE $__timeFilter(minute)"
                    " GROUP BY time, type ORDER BY time, type"
                )
            ],
            description="What landed in ClickHouse, every tenant (long format: one series per type).",
            expect=["time", "type", "events"],
        ),
        panel(
            "Reply latency (ClickHouse)",
            "timeseries",
            [
                ch(
                    "SELECT $__timeInterval(occurred_at) AS time, quantileExact(0.5)(latency_ms) AS p50_ms,"
                    " quantileExact(0.9)(latency_ms) AS p90_ms, quantileExact(0.9)(first_token_ms) AS first_token_p90_ms"
                    " FROM switchboard.replies WHERE $__timeFilter(occurred_at) GROUP BY time ORDER BY time"
                )
            ],
            unit="ms",
            description="Gateway time per answer as recorded in the reply events.",
            expect=["time", "p50_ms", "p90_ms", "first_token_p90_ms"],
        ),
        panel(
            "Replies by adapter and model (ClickHouse)",
            "table",
            [
                ch(
                    "SELECT adapter, model, count() AS replies, countIf(grounded) AS grounded,"
                    " sum(prompt_tokens + completion_tokens) AS tokens"
                    " FROM switchboard.replies WHERE $__timeFilter(occurred_at)"
                    " GROUP BY adapter, model ORDER BY replies DESC",
                    TABLE,
                )
            ],
            expect=["adapter", "model", "replies", "grounded", "tokens"],
        ),
    ]
    return dashboard("switchboard-pipeline", "Pipeline", panels, [])


def main() -> None:
    out = HERE / "dashboards"
    out.mkdir(exist_ok=True)
    for name, board in (("conversations", conversations()), ("pipeline", pipeline())):
        (out / f"{name}.json").write_text(json.dumps(board, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
