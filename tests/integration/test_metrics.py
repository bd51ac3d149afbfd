"""Per-minute metrics on real chdb: correct on a mixed workload, and unchanged by redelivery
(the same batch twice), by overlapping batches after a crash, by a replay of the whole log in
other batches and order, and by merges. Through both ways in (in-process chdb, HTTP endpoint).
No Kafka needed: the projector's pure `project` and its sink `write_batch` are what the
consumer runs.
"""

from __future__ import annotations

import functools
import statistics
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from switchboard.v1 import events_pb2 as pb

from schemas.events import Event, LogPosition, new_event
from streams.projector import project, write_batch
from tests.integration.test_analytics import process_chdb, process_endpoint

pytestmark = pytest.mark.integration

T0 = 1_760_000_000 * 10**9  # 2025-10-09 08:53:20 UTC, ns
SECOND = 10**9

CHANNELS = (pb.CHANNEL_WEB, pb.CHANNEL_IOS, pb.CHANNEL_WECHAT)
INTENTS = ("order_status", "refund", "shipping_cost", "greeting")
QUESTIONS = {
    "order_status": ("我的订单在哪里？", "zh"),
    "refund": ("How do I get a refund?", "en"),
    "shipping_cost": ("运费多少钱？", "zh"),
    "greeting": ("hello", "en"),
}


def _stamp(event: Event, ns: int) -> Event:
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    event.occurred_at.CopyFrom(ts)
    return event


def _add(out: list[Event], tenant: str, conv: str, start: int, seconds: float, **payload: Any) -> Event:
    event = _stamp(new_event(tenant, conv, **payload), start + int(seconds * SECOND))
    out.append(event)
    return event


def support_day(tenant: str, conversations: int = 12) -> list[tuple[Event, LogPosition]]:
    """A mixed workload in log order: per conversation i (channel i % 3, intent i % 4)
    - i % 3 == 0: the bot answers and closes it (bot-resolved), rated 5 or 4;
    - i % 3 == 1: an ungrounded answer, a second question, a handoff, an agent after 20 + i s,
      an agent reply, closed by the agent, rated 2; one retried client message (a second event
      id for the same client_message_id);
    - i % 3 == 2: a question nobody answered (open).
    Conversations start 40 s apart, so they span several minutes.
    """
    out: list[Event] = []
    for i in range(conversations):
        conv = f"conv-{i:03d}"
        intent = INTENTS[i % len(INTENTS)]
        question, language = QUESTIONS[intent]
        add = functools.partial(_add, out, tenant, conv, T0 + i * 40 * SECOND)

        add(0, conversation_started=pb.ConversationStarted(channel=CHANNELS[i % 3], customer_id=f"cust-{i}"))
        asked = add(
            1,
            message_received=pb.MessageReceived(
                client_message_id=f"{conv}-m1", text=question, sender=pb.SENDER_CUSTOMER
            ),
        )
        add(
            1.01,
            intent_classified=pb.IntentClassified(
                message_event_id=asked.event_id,
                intent=intent,
                confidence=0.6 + 0.03 * i,
                model="tfidf",
                stage="ngram" if i % 2 else "encoder",
                model_version="v1",
                language=language,
            ),
        )
        if i % 3 == 2:
            continue
        grounded = i % 3 == 0
        add(
            1 + 0.2 * (i + 1),
            reply_generated=pb.ReplyGenerated(
                message_event_id=asked.event_id,
                text="Here is how." if grounded else "I am not sure.",
                model="template-v1",
                adapter="template",
                latency_ms=200 * (i + 1),
                first_token_ms=50 * (i + 1),
                prompt_tokens=100 + i,
                completion_tokens=20 + i,
                language=language,
                grounded=grounded,
                intent=intent,
                citations=[pb.Citation(document_id=f"doc-{intent}", chunk_id="c0", score=0.8)]
                if grounded
                else [],
            ),
        )
        if grounded:
            add(10, conversation_closed=pb.ConversationClosed(resolution="answered", closed_by=pb.SENDER_BOT))
            add(12, csat_rated=pb.CsatRated(score=5 if i % 2 == 0 else 4, comment="快"))
            continue
        again = pb.MessageReceived(
            client_message_id=f"{conv}-m2", text="I want a human", sender=pb.SENDER_CUSTOMER
        )
        second = add(5, message_received=again)
        add(5.5, message_received=again)  # the client's retry after a lost ack: a new event id
        add(
            6,
            handoff_requested=pb.HandoffRequested(
                reason="customer_asked" if i % 2 else "low_confidence",
                queue="general",
                message_event_id=second.event_id,
            ),
        )
        add(6 + 20 + i, agent_assigned=pb.AgentAssigned(agent_id=f"agent-{i % 2}", queue="general"))
        add(
            30 + i,
            agent_message_sent=pb.AgentMessageSent(
                agent_id=f"agent-{i % 2}", client_message_id=f"{conv}-a1", text="Hi"
            ),
        )
        add(
            35 + i,
            conversation_closed=pb.ConversationClosed(resolution="resolved", closed_by=pb.SENDER_AGENT),
        )
        add(36 + i, csat_rated=pb.CsatRated(score=2, comment="slow"))
    # One partition per conversation's key would do; offsets only need to be increasing.
    out.sort(key=lambda e: e.occurred_at.ToNanoseconds())
    return [(event, LogPosition(0, offset)) for offset, event in enumerate(out)]


def chunks(records: Sequence[tuple[Event, LogPosition]], size: int) -> list[list[tuple[Event, LogPosition]]]:
    return [list(records[i : i + size]) for i in range(0, len(records), size)]


SNAPSHOTS = {
    "metrics_per_minute": "SELECT * FROM switchboard.metrics_per_minute WHERE tenant_id = {t:String} "
    "ORDER BY channel, minute",
    "intent_mix_per_minute": "SELECT * FROM switchboard.intent_mix_per_minute WHERE tenant_id = {t:String} "
    "ORDER BY channel, minute, intent, stage",
    "events_per_minute": "SELECT * FROM switchboard.events_per_minute WHERE tenant_id = {t:String} "
    "ORDER BY minute, type",
    "conversations": "SELECT * EXCEPT (first_event_at, last_event_at) FROM switchboard.conversations "
    "WHERE tenant_id = {t:String} ORDER BY conversation_id",
    "handoff_waits": "SELECT * FROM switchboard.handoff_waits WHERE tenant_id = {t:String} ORDER BY event_id",
    "conversation_messages": "SELECT * FROM switchboard.conversation_messages WHERE tenant_id = {t:String} "
    "ORDER BY event_id",
    "counts": "SELECT (SELECT count() FROM switchboard.events WHERE tenant_id = {t:String}), "
    "(SELECT count() FROM switchboard.messages WHERE tenant_id = {t:String}), "
    "(SELECT count() FROM switchboard.replies WHERE tenant_id = {t:String}), "
    "(SELECT count() FROM switchboard.intents WHERE tenant_id = {t:String}), "
    "(SELECT count() FROM switchboard.handoffs WHERE tenant_id = {t:String}), "
    "(SELECT count() FROM switchboard.csat WHERE tenant_id = {t:String})",
}


def snapshot(client: Any, tenant: str) -> dict[str, list[tuple[Any, ...]]]:
    return {name: client.query(sql, parameters={"t": tenant}).result_rows for name, sql in SNAPSHOTS.items()}


@pytest.fixture(scope="module")
def chdb_client(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return process_chdb(tmp_path_factory)[1]


@pytest.fixture(scope="module")
def http_client(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import clickhouse_connect

    endpoint = process_endpoint(tmp_path_factory)
    return clickhouse_connect.get_client(host="127.0.0.1", port=endpoint.port)


@pytest.fixture(params=["chdb", "endpoint"])
def writer(request: pytest.FixtureRequest, chdb_client: Any, http_client: Any) -> Any:
    return chdb_client if request.param == "chdb" else http_client


@pytest.fixture
def tenant() -> str:
    return f"m{uuid.uuid4().hex[:12]}"


def test_metrics_are_right_on_a_mixed_workload(writer: Any, tenant: str) -> None:
    records = support_day(tenant)
    write_batch(writer, project(records))
    rows = writer.query(
        "SELECT sum(conversations_started), sum(conversations_closed), sum(customer_messages), "
        "sum(bot_messages), sum(agent_messages), sum(bot_resolved), sum(conversations_handed_off), "
        "sum(handoff_requests), sum(agent_assignments), sum(csat_count), sum(llm_tokens) "
        "FROM switchboard.metrics_per_minute WHERE tenant_id = {t:String}",
        parameters={"t": tenant},
    ).result_rows
    # 12 conversations: 4 bot-resolved (i = 0, 3, 6, 9), 4 handed off (1, 4, 7, 10), 4 open.
    # Customer messages: 12 first questions + 4 second ones (their retries count once).
    tokens = sum(100 + i + 20 + i for i in range(12) if i % 3 != 2)
    assert rows == [(12, 8, 16, 8, 4, 4, 4, 4, 4, 8, tokens)]

    # First response time: question at +1 s, answer at +1 + 0.2 (i + 1) s, for the 8 answered.
    frts = sorted(200 * (i + 1) for i in range(12) if i % 3 != 2)
    points = writer.query(
        "SELECT quantileExact(0.5)(value), avg(value) FROM switchboard.metric_points "
        "WHERE tenant_id = {t:String} AND metric = 'first_response_ms'",
        parameters={"t": tenant},
    ).result_rows
    assert points[0][1] == pytest.approx(statistics.mean(frts))
    assert points[0][0] in frts
    waits = writer.query(
        "SELECT groupArray(wait_ms) FROM (SELECT wait_ms FROM switchboard.handoff_waits "
        "WHERE tenant_id = {t:String} ORDER BY wait_ms)",
        parameters={"t": tenant},
    ).result_rows[0][0]
    assert waits == [(20 + i) * 1000 for i in (1, 4, 7, 10)]
    by_channel = writer.query(
        "SELECT channel, sum(conversations_started), "
        "if(sum(conversations_closed) = 0, NULL, sum(bot_resolved) / sum(conversations_closed)), "
        "sum(csat_count), round(sumIf(csat_avg * csat_count, csat_count > 0) / sum(csat_count), 3) "
        "FROM switchboard.metrics_per_minute WHERE tenant_id = {t:String} GROUP BY channel ORDER BY channel",
        parameters={"t": tenant},
    ).result_rows
    # Channel i % 3: web = bot-resolved ones, ios = handed off, wechat = open.
    assert by_channel == [("ios", 4, 0.0, 4, 2.0), ("web", 4, 1.0, 4, 4.5), ("wechat", 4, None, 0, None)]
    mode = writer.query(
        "SELECT mode, assignee, count() FROM switchboard.conversations WHERE tenant_id = {t:String} "
        "GROUP BY mode, assignee ORDER BY mode, assignee",
        parameters={"t": tenant},
    ).result_rows
    assert mode == [("agent", "agent-0", 2), ("agent", "agent-1", 2), ("bot", "", 8)]
    mix = writer.query(
        "SELECT intent, sum(classifications) FROM switchboard.intent_mix_per_minute "
        "WHERE tenant_id = {t:String} GROUP BY intent ORDER BY intent",
        parameters={"t": tenant},
    ).result_rows
    assert mix == [("greeting", 3), ("order_status", 3), ("refund", 3), ("shipping_cost", 3)]


def test_redelivery_and_replay_never_double_count(writer: Any, tenant: str, chdb_client: Any) -> None:
    records = support_day(tenant)
    batch = project(records)
    write_batch(writer, batch)
    first = snapshot(writer, tenant)
    assert first["counts"] == [(len(records), 16 + 4, 8, 12, 8 + 0, 8)]

    # Redelivery: the very same batch again.
    write_batch(writer, batch)
    assert snapshot(writer, tenant) == first

    # A crash mid-way: the consumer resumes from an earlier committed offset, with other cuts.
    for piece in chunks(records[len(records) // 3 :], 7):
        write_batch(writer, project(piece))
    assert snapshot(writer, tenant) == first

    # Replay from offset 0 in small batches, and once more in reverse batch order.
    for piece in chunks(records, 5):
        write_batch(writer, project(piece))
    for piece in reversed(chunks(records, 11)):
        write_batch(writer, project(piece))
    assert snapshot(writer, tenant) == first

    # Background merges (forced here) collapse the raw duplicates; the answers do not move.
    for table in ("raw_events", "raw_messages", "raw_replies", "raw_intents", "raw_handoffs", "raw_csat"):
        chdb_client.command(f"OPTIMIZE TABLE switchboard.{table} FINAL")
    chdb_client.command("OPTIMIZE TABLE switchboard.conversation_facts FINAL")
    chdb_client.command("OPTIMIZE TABLE switchboard.event_counts FINAL")
    assert snapshot(writer, tenant) == first
    assert snapshot(chdb_client, tenant) == first


def test_the_same_answer_through_chdb_and_through_the_endpoint(
    chdb_client: Any, http_client: Any, tenant: str
) -> None:
    write_batch(chdb_client, project(support_day(tenant)))
    assert snapshot(http_client, tenant) == snapshot(chdb_client, tenant)


def test_a_partial_log_then_the_rest_gives_the_whole_answer(writer: Any, tenant: str) -> None:
    records = support_day(tenant)
    other = f"{tenant}x"
    write_batch(writer, project(support_day(other)))
    expected = snapshot(writer, other)
    # The start of every conversation arrives last: channel, FRT and rates settle when it does.
    write_batch(writer, project(records[len(records) // 2 :]))
    write_batch(writer, project(records[: len(records) // 2]))
    got = snapshot(writer, tenant)
    for name in ("metrics_per_minute", "intent_mix_per_minute", "events_per_minute"):
        assert [row[1:] for row in got[name]] == [row[1:] for row in expected[name]], name
    assert got["counts"] == expected["counts"]
