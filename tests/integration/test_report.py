"""`switchboard report` over a support day in the real schema: the numbers it shows are the
metrics views' own, every chart has data, PII is masked, nothing is fetched from anywhere, and
Debian's chromium renders it (a headless screenshot shows the charts' colours)."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import struct
import subprocess
import uuid
import zlib
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest
from switchboard.v1 import events_pb2 as pb

from schemas.events import Event, LogPosition
from services.commands.report import collect, demo_report, parse_since, query_through, render, write_report
from services.settings import Settings
from streams.privacy import RedactionPolicy, use_policy
from streams.projector import project, write_batch
from tests.integration.test_analytics import process_chdb, process_endpoint
from tests.integration.test_metrics import T0, support_day

pytestmark = pytest.mark.integration

DAY_START = dt.datetime.fromtimestamp(T0 // 10**9, dt.UTC).replace(hour=0, minute=0, second=0)
UNTIL = DAY_START + dt.timedelta(days=1)
PHONE = "13812345678"


def _leaky_question(tenant: str) -> tuple[Event, LogPosition]:
    """An unanswered question with a phone number, projected for a tenant that opted out of
    redaction in analytics: the report must still mask it."""
    event = Event(event_id=f"leak-{tenant}", tenant_id=tenant, conversation_id="conv-leak", schema_version=1)
    event.occurred_at.FromNanoseconds(T0 + 5 * 60 * 10**9)
    event.message_received.CopyFrom(
        pb.MessageReceived(client_message_id="leak-1", text=f"请回电 {PHONE}", sender=pb.SENDER_CUSTOMER)
    )
    return event, LogPosition(0, 10_000)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Any, str]:
    path, chdb_client, _ = process_chdb(tmp_path_factory)
    tenant = f"rp{uuid.uuid4().hex[:10]}"
    use_policy(RedactionPolicy.parse("all", f"{tenant}=none"))
    try:
        write_batch(chdb_client, project([*support_day(tenant), _leaky_question(tenant)]))
    finally:
        use_policy(RedactionPolicy.parse("all"))
    port = process_endpoint(tmp_path_factory).port
    settings = Settings(clickhouse_dsn=f"chdb://{path}", analytics_listen=f"127.0.0.1:{port}")
    return settings, clickhouse_connect.get_client(host="127.0.0.1", port=port), tenant


@pytest.fixture(scope="module")
def report_file(loaded: tuple[Settings, Any, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    settings, _, tenant = loaded
    out = tmp_path_factory.mktemp("report") / "report.html"
    return write_report(settings, tenant=tenant, since=DAY_START.isoformat(), out=out, until=UNTIL)


def test_the_report_shows_the_numbers_of_the_metrics_views(
    loaded: tuple[Settings, Any, str], report_file: Path
) -> None:
    _, client, tenant = loaded
    page = report_file.read_text(encoding="utf-8")
    found = re.search(r'<script type="application/json" id="totals">(.*?)</script>', page)
    assert found is not None
    totals = json.loads(found.group(1))
    expected = client.query(
        "SELECT sum(conversations_started), sum(conversations_closed), sum(customer_messages), sum(bot_resolved),"
        " sum(conversations_handed_off), sum(csat_count) FROM switchboard.metrics_per_minute WHERE tenant_id = {t:String}",
        parameters={"t": tenant},
    ).result_rows[0]
    assert [
        totals[k]
        for k in (
            "conversations_started",
            "conversations_closed",
            "customer_messages",
            "bot_resolved",
            "conversations_handed_off",
            "csat_count",
        )
    ] == [float(v) for v in expected]
    # The support day (tests/integration/test_metrics.py): 13 conversations with the leaky one's
    # message... which has no start: 12 started, 8 closed, 4 of them by the bot alone.
    assert totals["conversations_started"] == 12 and totals["conversations_closed"] == 8
    assert totals["bot_resolution_rate"] == pytest.approx(0.5)
    frt = client.query(
        "SELECT quantileExact(0.5)(value) FROM switchboard.metric_points"
        " WHERE tenant_id = {t:String} AND metric = 'first_response_ms'",
        parameters={"t": tenant},
    ).result_rows[0][0]
    assert totals["frt_p50_ms"] == pytest.approx(frt)
    # The same numbers are on the page, in its cards.
    assert re.search(r'data-metric="conversations_started"><b>12</b>', page)
    assert re.search(r'data-metric="bot_resolution_rate"><b>50.0 %</b>', page)


def test_every_chart_and_table_has_data(loaded: tuple[Settings, Any, str]) -> None:
    settings, _, tenant = loaded
    report = collect(query_through(settings), tenant=tenant, since=DAY_START, until=UNTIL)
    titles = [c.title for c in report.charts]
    assert titles == [
        "Volume",
        "First response time",
        "Bot resolution and handoff rate",
        "CSAT",
        "Pipeline lag",
    ]
    for chart in report.charts:
        assert chart.times and any(v is not None for line in chart.lines.values() for v in line), chart.title
    intents = {row[0]: row[1] for row in report.bars[0].rows}
    # A mean of confidences (support_day: 0.6 + 0.03 i) stays a confidence.
    assert all(0.6 <= row[2] <= 1 for row in report.bars[0].rows), report.bars[0].rows
    assert (
        set(intents) == {"order_status", "refund", "shipping_cost", "greeting"}
        and sum(intents.values()) == 12
    )
    tables = {t.title: t for t in report.tables}
    assert {r[0] for r in tables["By channel"].rows} == {"web", "ios", "wechat", "(unknown)"}
    assert {r[0]: r[2] for r in tables["Handoffs"].rows} == {"customer_asked": 2, "low_confidence": 2}
    assert all(t.rows for t in report.tables)


def test_the_file_is_self_contained_and_masks_pii(report_file: Path) -> None:
    page = report_file.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 6
    # Nothing to fetch: no scripts to run, no stylesheets, images or fonts from elsewhere.
    assert not re.search(r"<script(?! type=\"application/json\")|<link|<img|@import|url\(", page)
    assert re.findall(r"https?://[^\"' )]+", page) == ["http://www.w3.org/2000/svg"] * 6
    assert PHONE not in page and "138****5678" in page


def test_an_empty_range_renders_placeholders(loaded: tuple[Settings, Any, str]) -> None:
    settings, _, _ = loaded
    report = collect(query_through(settings), tenant="nobody-here", since=DAY_START, until=UNTIL)
    page = render(report)
    assert page.count("no data in this range") >= 5 and 'data-metric="conversations_started"><b>0</b>' in page


def test_make_runs_demo_report_lands_under_the_data_dir(
    loaded: tuple[Settings, Any, str], tmp_path: Path
) -> None:
    settings, _, _ = loaded
    path = demo_report(settings.model_copy(update={"data_dir": tmp_path}))
    assert path.parent == tmp_path / "reports" and path.read_text(encoding="utf-8").startswith(
        "<!DOCTYPE html>"
    )


def test_since_accepts_durations_and_dates() -> None:
    now = dt.datetime(2026, 11, 30, 8, 0, tzinfo=dt.UTC)
    assert parse_since("7d", now) == now - dt.timedelta(days=7)
    assert parse_since("12h", now) == now - dt.timedelta(hours=12)
    assert parse_since("2026-11-01", now) == dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    with pytest.raises(ValueError, match="--since"):
        parse_since("last week", now)


# --- rendering in a real browser ----------------------------------------------------------------


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and RGB(A) rows of a non-interlaced 8-bit PNG (what chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    height = channels = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, chunk = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and color in (2, 6)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        row_filter = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b = previous[i]
            c = previous[i - channels] if i >= channels else 0
            if row_filter == 1:
                line[i] = (line[i] + a) & 0xFF
            elif row_filter == 2:
                line[i] = (line[i] + b) & 0xFF
            elif row_filter == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif row_filter == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, channels, rows


def test_chromium_renders_the_charts(report_file: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is needed to check the report renders (apt-get install chromium)"
    shot = tmp_path / "report.png"
    done = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            "--window-size=1100,2400",
            report_file.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.exists(), done.stderr[-2000:]
    _, channels, rows = png_pixels(shot.read_bytes())
    pixels = {row[i : i + 3] for row in rows for i in range(0, len(row), channels)}
    # The first two series colours of the charts (#2563eb, #dc2626) are on screen.
    assert bytes.fromhex("2563eb") in pixels and bytes.fromhex("dc2626") in pixels
