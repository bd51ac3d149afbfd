"""Every query of the cookbook in docs/analytics.md, read from the markdown itself (so the docs
and this test cannot drift), runs against the real schema with a support day of data in it,
the same through chdb and through the endpoint, and answers what it says."""

from __future__ import annotations

import re
import uuid
from typing import Any

import clickhouse_connect
import pytest

from services.settings import PROJECT_ROOT
from streams.projector import project, write_batch
from tests.integration.test_analytics import process_chdb, process_endpoint
from tests.integration.test_metrics import support_day

pytestmark = pytest.mark.integration

DOC = PROJECT_ROOT / "docs" / "analytics.md"


def cookbook_queries() -> list[tuple[str, str]]:
    """(heading, sql) for every ```sql block under the "## Cookbook" heading."""
    text = DOC.read_text(encoding="utf-8")
    cookbook = text[text.index("## Cookbook") :]
    found: list[tuple[str, str]] = []
    for section in re.split(r"^### ", cookbook, flags=re.MULTILINE)[1:]:
        title = section.splitlines()[0].strip()
        for sql in re.findall(r"```sql\n(.*?)```", section, re.DOTALL):
            found.append((title, sql.strip()))
    return found


QUERIES = cookbook_queries()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, str]:
    _, chdb_client, _ = process_chdb(tmp_path_factory)
    endpoint = process_endpoint(tmp_path_factory)
    tenant = f"k{uuid.uuid4().hex[:12]}"
    write_batch(chdb_client, project(support_day(tenant)))
    http_client = clickhouse_connect.get_client(host="127.0.0.1", port=endpoint.port)
    return chdb_client, http_client, tenant


def test_the_cookbook_has_the_questions_a_support_lead_asks() -> None:
    assert len(QUERIES) >= 10
    titles = " ".join(title.lower() for title, _ in QUERIES)
    for topic in (
        "volume by hour",
        "first response",
        "bot resolution",
        "unanswered",
        "handoff reasons",
        "csat",
    ):
        assert topic in titles, topic


@pytest.mark.parametrize(("title", "sql"), QUERIES, ids=[title for title, _ in QUERIES])
def test_cookbook_query_runs_with_data(loaded: tuple[Any, Any, str], title: str, sql: str) -> None:
    chdb_client, http_client, tenant = loaded
    result = http_client.query(sql, parameters={"tenant": tenant})
    assert result.result_rows, f"{title}: no rows"
    assert result.result_rows == chdb_client.query(sql, parameters={"tenant": tenant}).result_rows


def answer(loaded: tuple[Any, Any, str], number: int) -> list[dict[str, Any]]:
    _, client, tenant = loaded
    result = client.query(QUERIES[number - 1][1], parameters={"tenant": tenant})
    return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]


def test_cookbook_answers(loaded: tuple[Any, Any, str]) -> None:
    # support_day: 12 conversations; i % 3 == 0 bot-resolved, 1 handed off, 2 unanswered.
    volume = answer(loaded, 1)
    assert sum(r["conversations"] for r in volume) == 12
    assert sum(r["customer_messages"] for r in volume) == 16
    assert sum(r["responses"] for r in answer(loaded, 2)) == 8
    resolution = {r["intent"]: r["bot_resolution_rate"] for r in answer(loaded, 3)}
    # intent i % 4: bot-resolved i = 0, 3, 6, 9 -> greeting(3), order_status(0), shipping_cost(6), refund(9)
    assert sum(r["closed"] for r in answer(loaded, 3)) == 8 and set(resolution) == {
        "order_status",
        "refund",
        "shipping_cost",
        "greeting",
    }
    unanswered = answer(loaded, 4)
    assert sum(r["never_answered"] for r in unanswered) == 4 + 4  # 4 open + 4 "I want a human"
    assert sum(r["answered_without_grounding"] for r in unanswered) == 4
    assert {r["reason"]: r["handoffs"] for r in answer(loaded, 5)} == {
        "customer_asked": 2,
        "low_confidence": 2,
    }
    assert {r["channel"]: r["csat_avg"] for r in answer(loaded, 6)} == {"ios": 2.0, "web": 4.5}
    assert [(r["queue"], r["handoffs"], r["still_waiting"]) for r in answer(loaded, 7)] == [("general", 4, 0)]
    assert sum(r["messages"] for r in answer(loaded, 8)) == 12
    assert [(r["adapter"], r["replies"]) for r in answer(loaded, 9)] == [("template", 8)]
    assert {r["agent"]: r["conversations"] for r in answer(loaded, 10)} == {"agent-0": 2, "agent-1": 2}
    assert [(r["mode"], r["open_conversations"], r["unanswered"]) for r in answer(loaded, 11)] == [
        ("bot", 4, 4)
    ]
