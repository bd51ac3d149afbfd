"""`switchboard report`: one self-contained HTML file for people without Grafana.

    switchboard report [--tenant T] [--since 7d|2026-11-30|2026-11-30T08:00] [--out report.html]

Volume, first response time, bot resolution and handoff rate, CSAT, intent mix and pipeline lag
as inline SVG charts (drawn here: no script, no external file, readable offline and printable),
with the tables behind them. Every number comes from the analyst views of docs/analytics.md
(`metrics_per_minute`, `metric_points`, `intent_mix_per_minute`, ...), queried through the
analytics endpoint or the ClickHouse server, so the report agrees with Grafana and SQL. Free text
(questions) is masked with the tenant's PII policy before it is written.

`collect` (queries) and `render` (pure: data in, HTML out) are separate so both can be tested.
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Query = Callable[[str], list[dict[str, Any]]]

_TENANT = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
# Bucket sizes the charts use; the smallest giving at most ~60 points over the data's span.
_BUCKETS_S = (60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400)
_COLORS = ("#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563")


# --- the data -----------------------------------------------------------------------------------


@dataclass
class Series:
    """A chart: named lines over time (values may be None where there is nothing to show)."""

    title: str
    unit: str
    times: list[dt.datetime]
    lines: dict[str, list[float | None]]
    note: str = ""


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""


@dataclass
class Report:
    tenant: str | None
    since: dt.datetime
    until: dt.datetime
    generated_at: dt.datetime
    bucket_s: int
    totals: dict[str, float | None] = field(default_factory=dict)
    charts: list[Series] = field(default_factory=list)
    bars: list[Table] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


def parse_since(value: str, now: dt.datetime) -> dt.datetime:
    """``7d``, ``12h``, ``30m`` ago, or an ISO date/time (UTC unless it says otherwise)."""
    m = re.fullmatch(r"(\d+)\s*([dhm])", value.strip())
    if m:
        n, unit = int(m.group(1)), m.group(2)
        return now - dt.timedelta(**{{"d": "days", "h": "hours", "m": "minutes"}[unit]: n})
    try:
        parsed = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"--since: expected e.g. 7d, 12h, 2026-11-30 or 2026-11-30T08:00, got {value!r}"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _lit(t: dt.datetime) -> str:
    return f"toDateTime('{t.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S}', 'UTC')"


def _num(value: Any) -> float | None:
    if value is None:
        return None
    f = float(value)
    return None if math.isnan(f) else f


def _time(value: Any) -> dt.datetime:
    return dt.datetime.fromisoformat(str(value)).replace(tzinfo=dt.UTC)


def collect(
    query: Query,
    *,
    tenant: str | None,
    since: dt.datetime,
    until: dt.datetime,
    redact: Callable[[str], str] = lambda s: s,
) -> Report:
    """Everything the report shows, from the metrics views."""
    if tenant is not None and not _TENANT.match(tenant):
        raise ValueError(f"--tenant: not a tenant id: {tenant!r}")
    who = f"tenant_id = '{tenant}'" if tenant else "1"
    span = f"{who} AND minute >= {_lit(since)} AND minute <= {_lit(until)}"
    at_span = f"{who} AND at >= {_lit(since)} AND at <= {_lit(until)}"
    (bounds,) = query(
        f"SELECT min(minute) AS lo, max(minute) AS hi, count() AS n FROM switchboard.metrics_per_minute WHERE {span}"
    )
    lo, hi = (_time(bounds["lo"]), _time(bounds["hi"])) if int(bounds["n"]) else (since, until)
    bucket_s = next((b for b in _BUCKETS_S if (hi - lo).total_seconds() / b <= 60), _BUCKETS_S[-1])
    report = Report(tenant, since, until, dt.datetime.now(dt.UTC), bucket_s)
    bucket = f"toStartOfInterval(minute, INTERVAL {bucket_s} second)"
    at_bucket = f"toStartOfInterval(at, INTERVAL {bucket_s} second)"

    (totals,) = query(
        "SELECT sum(conversations_started) AS total_conversations_started, sum(conversations_closed) AS total_conversations_closed,"
        " sum(customer_messages) AS total_customer_messages, sum(bot_messages) AS total_bot_messages,"
        " sum(agent_messages) AS total_agent_messages, sum(bot_resolved) AS total_bot_resolved,"
        " sum(conversations_handed_off) AS total_conversations_handed_off, sum(csat_count) AS total_csat_count,"
        " if(sum(csat_count) = 0, NULL, sum(csat_avg * csat_count) / sum(csat_count)) AS total_csat_avg,"
        " sum(llm_tokens) AS total_llm_tokens"
        f" FROM switchboard.metrics_per_minute WHERE {span}"
    )
    (frt,) = query(
        "SELECT if(count() = 0, NULL, quantileExact(0.5)(value)) AS frt_p50_ms,"
        " if(count() = 0, NULL, quantileExact(0.9)(value)) AS frt_p90_ms"
        f" FROM switchboard.metric_points WHERE {at_span} AND metric = 'first_response_ms'"
    )
    # Aliases differ from the view's column names: ClickHouse would read sum(x) AS x inside
    # another aggregate of x as a nested aggregate.
    report.totals = {k.removeprefix("total_"): _num(v) for k, v in {**totals, **frt}.items()}
    closed, started = report.totals["conversations_closed"] or 0, report.totals["conversations_started"] or 0
    report.totals["bot_resolution_rate"] = (report.totals["bot_resolved"] or 0) / closed if closed else None
    report.totals["handoff_rate"] = (
        (report.totals["conversations_handed_off"] or 0) / started if started else None
    )

    def series(title: str, unit: str, sql: str, names: Sequence[str], note: str = "") -> None:
        rows = query(sql)
        report.charts.append(
            Series(
                title,
                unit,
                [_time(r["t"]) for r in rows],
                {n: [_num(r[n]) for r in rows] for n in names},
                note,
            )
        )

    series(
        "Volume",
        "count",
        f"SELECT {bucket} AS t, sum(conversations_started) AS started, sum(conversations_closed) AS closed,"
        " sum(customer_messages) AS customer_messages, sum(bot_messages) AS bot_replies,"
        f" sum(agent_messages) AS agent_messages FROM switchboard.metrics_per_minute WHERE {span}"
        " GROUP BY t ORDER BY t",
        ("started", "closed", "customer_messages", "bot_replies", "agent_messages"),
    )
    series(
        "First response time",
        "ms",
        f"SELECT {at_bucket} AS t, quantileExact(0.5)(value) AS p50, quantileExact(0.9)(value) AS p90"
        f" FROM switchboard.metric_points WHERE {at_span} AND metric = 'first_response_ms' GROUP BY t ORDER BY t",
        ("p50", "p90"),
        "First customer message to the first bot or agent answer, in the bucket it was answered.",
    )
    series(
        "Bot resolution and handoff rate",
        "%",
        f"SELECT {bucket} AS t,"
        " if(sum(conversations_closed) = 0, NULL, 100 * sum(bot_resolved) / sum(conversations_closed)) AS bot_resolution,"
        " if(sum(conversations_started) = 0, NULL, 100 * sum(conversations_handed_off) / sum(conversations_started)) AS handoff"
        f" FROM switchboard.metrics_per_minute WHERE {span} GROUP BY t ORDER BY t",
        ("bot_resolution", "handoff"),
        "Bot resolution: closed with no handoff, of those closed. Handoff: handed off, of those started.",
    )
    series(
        "CSAT",
        "score",
        f"SELECT {at_bucket} AS t, avg(value) AS average, toFloat64(count()) AS ratings"
        f" FROM switchboard.metric_points WHERE {at_span} AND metric = 'csat_score' GROUP BY t ORDER BY t",
        ("average", "ratings"),
    )
    replies_span = f"{who.replace('tenant_id', 'r.tenant_id')} AND r.occurred_at >= {_lit(since)} AND r.occurred_at <= {_lit(until)}"
    series(
        "Pipeline lag",
        "ms",
        f"SELECT toStartOfInterval(r.occurred_at, INTERVAL {bucket_s} second) AS t,"
        " quantileExact(0.5)(toFloat64(dateDiff('millisecond', m.occurred_at, r.occurred_at))) AS p50,"
        " quantileExact(0.9)(toFloat64(dateDiff('millisecond', m.occurred_at, r.occurred_at))) AS p90,"
        " quantileExact(0.9)(toFloat64(r.latency_ms)) AS gateway_p90"
        " FROM switchboard.replies AS r INNER JOIN switchboard.messages AS m"
        " ON m.tenant_id = r.tenant_id AND m.event_id = r.message_event_id"
        f" WHERE {replies_span} GROUP BY t ORDER BY t",
        ("p50", "p90", "gateway_p90"),
        "Customer message to the bot's reply event: through Kafka, the assistant and the gateway "
        "(gateway_p90: the model gateway's own share).",
    )

    intents = query(
        "SELECT intent, sum(classifications) AS messages,"
        " round(sum(avg_confidence * classifications) / sum(classifications), 3) AS mean_confidence"
        f" FROM switchboard.intent_mix_per_minute WHERE {span} GROUP BY intent ORDER BY messages DESC, intent"
    )
    report.bars.append(
        Table(
            "Intent mix",
            ["intent", "messages", "mean_confidence"],
            [[r["intent"] or "(none)", int(r["messages"]), _num(r["mean_confidence"])] for r in intents],
        )
    )
    channels = query(
        "SELECT channel, sum(conversations_started) AS started, sum(conversations_closed) AS closed,"
        " sum(customer_messages) AS customer_messages, sum(bot_resolved) AS bot_resolved,"
        " sum(conversations_handed_off) AS handed_off, sum(csat_count) AS ratings,"
        " if(sum(csat_count) = 0, NULL, round(sum(csat_avg * csat_count) / sum(csat_count), 2)) AS csat"
        f" FROM switchboard.metrics_per_minute WHERE {span} GROUP BY channel ORDER BY started DESC, channel"
    )
    columns = [
        "channel",
        "started",
        "closed",
        "customer_messages",
        "bot_resolved",
        "handed_off",
        "ratings",
        "csat",
    ]
    report.tables.append(
        Table(
            "By channel",
            columns,
            [[r["channel"] or "(unknown)", *(_num(r[c]) for c in columns[1:])] for r in channels],
        )
    )
    reasons = query(
        "SELECT reason, queue, count() AS handoffs, countIf(assigned_at IS NULL) AS still_waiting,"
        " round(avg(wait_ms) / 1000, 1) AS avg_wait_s FROM switchboard.handoff_waits"
        f" WHERE {who} AND requested_at >= {_lit(since)} AND requested_at <= {_lit(until)}"
        " GROUP BY reason, queue ORDER BY handoffs DESC, reason"
    )
    report.tables.append(
        Table(
            "Handoffs",
            ["reason", "queue", "handoffs", "still_waiting", "avg_wait_s"],
            [
                [r["reason"], r["queue"], int(r["handoffs"]), int(r["still_waiting"]), _num(r["avg_wait_s"])]
                for r in reasons
            ],
        )
    )
    unanswered = query(
        "SELECT m.text AS question, count() AS times_asked, countIf(r.event_id = '') AS never_answered"
        " FROM switchboard.messages AS m LEFT JOIN switchboard.replies AS r"
        " ON r.tenant_id = m.tenant_id AND r.message_event_id = m.event_id"
        f" WHERE {who.replace('tenant_id', 'm.tenant_id')} AND m.sender = 'customer'"
        f" AND m.occurred_at >= {_lit(since)} AND m.occurred_at <= {_lit(until)}"
        " AND (r.event_id = '' OR NOT r.grounded)"
        " GROUP BY question ORDER BY times_asked DESC, question LIMIT 15"
    )
    report.tables.append(
        Table(
            "Top unanswered questions",
            ["question", "times_asked", "never_answered"],
            [[redact(r["question"]), int(r["times_asked"]), int(r["never_answered"])] for r in unanswered],
            "Not answered, or answered without a knowledge-base source. PII is masked.",
        )
    )
    events = query(
        f"SELECT type, sum(events) AS events FROM switchboard.events_per_minute WHERE {span}"
        " GROUP BY type ORDER BY events DESC, type"
    )
    report.tables.append(
        Table("Events in the log", ["type", "events"], [[r["type"], int(r["events"])] for r in events])
    )
    return report


# --- HTML ---------------------------------------------------------------------------------------


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if unit == "%":
            return f"{value:.1f} %"
        if unit == "ratio":
            return f"{100 * value:.1f} %"
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    return next(m * exp for m in (1, 2, 2.5, 5, 10) if m * exp >= value)


def line_chart(series: Series, width: int = 720, height: int = 240) -> str:
    """An inline SVG line chart; points where a value is None are skipped."""
    left, right, top, bottom = 56, 28, 12, 44
    w, h = width - left - right, height - top - bottom
    e = html.escape
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{e(series.title)}" xmlns="http://www.w3.org/2000/svg">'
    ]
    values = [v for line in series.lines.values() for v in line if v is not None]
    if not series.times or not values:
        parts.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="empty">no data in this range</text></svg>'
        )
        return "".join(parts)
    y_max = _nice_max(max(values))
    t0, t1 = series.times[0].timestamp(), series.times[-1].timestamp()
    span = (t1 - t0) or 1.0

    def x(t: dt.datetime) -> float:
        return left + (w / 2 if t1 == t0 else (t.timestamp() - t0) / span * w)

    def y(v: float) -> float:
        return top + h - v / y_max * h

    for i in range(5):
        v = y_max * i / 4
        parts.append(f'<line x1="{left}" x2="{left + w}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="grid"/>')
        parts.append(
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end" class="tick">{e(_fmt(float(v)))}</text>'
        )
    ticks = (
        series.times
        if len(series.times) <= 6
        else [series.times[round(i * (len(series.times) - 1) / 5)] for i in range(6)]
    )
    same_day = series.times[0].date() == series.times[-1].date()
    for t in ticks:
        label = t.strftime("%H:%M" if same_day else "%m-%d %H:%M")
        parts.append(
            f'<text x="{x(t):.1f}" y="{top + h + 16}" text-anchor="middle" class="tick">{label}</text>'
        )
    for i, (name, line) in enumerate(series.lines.items()):
        color = _COLORS[i % len(_COLORS)]
        points = [(x(t), y(v)) for t, v in zip(series.times, line, strict=True) if v is not None]
        if len(points) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for px, py in points:
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.5" fill="{color}"/>')
        lx = left + i * 130
        parts.append(f'<rect x="{lx}" y="{height - 14}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{lx + 14}" y="{height - 5}" class="legend">{e(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(table: Table, width: int = 720) -> str:
    """Horizontal bars of the table's second column, labelled by its first."""
    e = html.escape
    rows = table.rows[:20]
    bar_h, left = 22, 160
    height = max(1, len(rows)) * bar_h + 10
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{e(table.title)}" xmlns="http://www.w3.org/2000/svg">'
    ]
    if not rows:
        parts.append(
            f'<text x="{width / 2}" y="16" text-anchor="middle" class="empty">no data in this range</text></svg>'
        )
        return "".join(parts)
    top = max(float(r[1]) for r in rows) or 1.0
    total = sum(float(r[1]) for r in table.rows) or 1.0
    for i, r in enumerate(rows):
        y0 = 5 + i * bar_h
        bw = (width - left - 120) * float(r[1]) / top
        parts.append(
            f'<text x="{left - 8}" y="{y0 + 15}" text-anchor="end" class="tick">{e(str(r[0]))}</text>'
        )
        parts.append(
            f'<rect x="{left}" y="{y0 + 3}" width="{bw:.1f}" height="{bar_h - 6}" fill="{_COLORS[i % len(_COLORS)]}"/>'
        )
        parts.append(
            f'<text x="{left + bw + 6:.1f}" y="{y0 + 15}" class="tick">{e(_fmt(r[1]))} ({100 * float(r[1]) / total:.0f} %)</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _table(table: Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in table.columns)
    body = (
        "".join(
            "<tr>"
            + "".join(
                f'<td class="{"num" if isinstance(v, (int, float)) else ""}">{e(_fmt(v))}</td>' for v in row
            )
            + "</tr>"
            for row in table.rows
        )
        or f'<tr><td colspan="{len(table.columns)}" class="empty">no data in this range</td></tr>'
    )
    note = f'<p class="note">{e(table.note)}</p>' if table.note else ""
    return (
        f"<h2>{e(table.title)}</h2>{note}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI","Noto Sans CJK SC","PingFang SC",sans-serif;color:#111827;
max-width:1000px;margin:24px auto;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 6px}.meta,.note{color:#6b7280;margin:0 0 8px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px;margin:16px 0}
.card{border:1px solid #e5e7eb;border-radius:8px;padding:10px}.card b{display:block;font-size:20px}
.card span{color:#6b7280;font-size:12px}
table{border-collapse:collapse;width:100%;margin:4px 0}th,td{border-bottom:1px solid #e5e7eb;padding:4px 8px;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}th{background:#f9fafb}
svg.chart{max-width:100%;height:auto;display:block}svg .grid{stroke:#e5e7eb}
svg .tick,svg .legend{font-size:11px;fill:#4b5563}svg .empty,td.empty{fill:#9ca3af;color:#9ca3af}
@media print{.card{break-inside:avoid}svg{break-inside:avoid}}
"""

_CARDS = (
    ("conversations_started", "conversations started", ""),
    ("conversations_closed", "closed", ""),
    ("customer_messages", "customer messages", ""),
    ("bot_messages", "bot replies", ""),
    ("agent_messages", "agent messages", ""),
    ("frt_p50_ms", "first response p50 (ms)", ""),
    ("frt_p90_ms", "first response p90 (ms)", ""),
    ("bot_resolution_rate", "bot resolution", "ratio"),
    ("handoff_rate", "handoff rate", "ratio"),
    ("csat_avg", "CSAT average", ""),
    ("csat_count", "CSAT ratings", ""),
    ("llm_tokens", "LLM tokens", ""),
)


def render(report: Report) -> str:
    """The report as one HTML document: inline CSS and SVG, nothing fetched."""
    e = html.escape
    who = f"tenant {report.tenant}" if report.tenant else "all tenants"
    cards = "".join(
        f'<div class="card" data-metric="{key}"><b>{e(_fmt(report.totals.get(key), unit))}</b><span>{e(label)}</span></div>'
        for key, label, unit in _CARDS
    )
    body = [
        f"<h1>Switchboard report — {e(who)}</h1>",
        f'<p class="meta">{report.since:%Y-%m-%d %H:%M} to {report.until:%Y-%m-%d %H:%M} UTC · '
        f"buckets of {_duration(report.bucket_s)} · generated {report.generated_at:%Y-%m-%d %H:%M:%S} UTC</p>",
        f'<div class="cards">{cards}</div>',
    ]
    for chart in report.charts:
        body.append(
            f"<h2>{e(chart.title)}{f' ({e(chart.unit)})' if chart.unit not in ('count', 'score') else ''}</h2>"
        )
        if chart.note:
            body.append(f'<p class="note">{e(chart.note)}</p>')
        body.append(line_chart(chart))
    for bars in report.bars:
        body.append(f"<h2>{e(bars.title)}</h2>{bar_chart(bars)}")
        body.append(_table(Table(f"{bars.title}: table", bars.columns, bars.rows)))
    body.extend(_table(t) for t in report.tables)
    data = json.dumps({k: v for k, v in report.totals.items()}, ensure_ascii=False)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>Switchboard report — {e(who)}</title><style>{_CSS}</style></head><body>"
        + "".join(body)
        # The totals as data, for a script or a test that reads the file.
        + f'<script type="application/json" id="totals">{e(data, quote=False)}</script>'
        + "</body></html>"
    )


def _duration(seconds: int) -> str:
    for unit, size in (("week", 604800), ("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds % size == 0:
            n = seconds // size
            return f"{n} {unit}{'s' if n > 1 else ''}"
    return f"{seconds} s"


# --- the command --------------------------------------------------------------------------------


def query_through(settings: Any) -> Query:
    """Runs report queries wherever ClickHouse is (the analytics endpoint, chdb, or a server)."""
    from services.analytics import run_query

    def query(sql: str) -> list[dict[str, Any]]:
        return list(json.loads(run_query(settings, sql, "JSON"))["data"])

    return query


def write_report(
    settings: Any,
    *,
    tenant: str | None = None,
    since: str = "7d",
    out: Path | None = None,
    until: dt.datetime | None = None,
) -> Path:
    from streams.privacy import active_policy

    now = until or dt.datetime.now(dt.UTC)
    policy = active_policy()
    report = collect(
        query_through(settings),
        tenant=tenant,
        since=parse_since(since, now),
        until=now,
        # A report over all tenants masks with the default policy.
        redact=lambda text: policy.redact(tenant or "", text),
    )
    path = out or Path("report.html")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(report), encoding="utf-8")
    return path.resolve()


def demo_report(settings: Any) -> Path:
    """`make run`'s report: every tenant, the last day, under <data_dir>/reports/."""
    out = settings.data_dir / "reports" / f"report-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}.html"
    return write_report(settings, since="1d", out=out)


def _cmd_report(args: argparse.Namespace) -> int:
    import sys

    from services.analytics import AnalyticsError
    from services.cli import _settings

    try:
        path = write_report(_settings(), tenant=args.tenant, since=args.since, out=Path(args.out))
    except (AnalyticsError, ValueError) as exc:
        sys.exit(f"switchboard report: {exc}")
    print(path)
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "report", help="write a self-contained HTML report (charts and tables) from the metrics"
    )
    p.add_argument("--tenant", help="one tenant (default: all tenants)")
    p.add_argument("--since", default="7d", help="7d, 12h, 30m, or an ISO date/time (UTC); default 7d")
    p.add_argument("--out", default="report.html", help="where to write it (default: report.html)")
    p.set_defaults(func=_cmd_report)
