"""The projection as a pure function: events in, rows per table out. No servers."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from switchboard.v1 import events_pb2 as pb

from schemas.events import Event, LogPosition, new_event
from streams.projector import COLUMNS, TABLE_ORDER, project
from streams.projector._rows import (
    CONVERSATION_FACTS,
    CSAT,
    EVENTS,
    HANDOFFS,
    INTENTS,
    MESSAGES,
    NO_CLOSE,
    NO_INTENT,
    REPLIES,
    channel_label,
    occurred_at,
    sender_label,
)

T0 = 1_700_000_000_000_000_000  # ns


def at(event: Event, ns: int) -> Event:
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    event.occurred_at.CopyFrom(ts)
    return event


def conversation(tenant: str = "acme", conv: str = "c1") -> list[tuple[Event, LogPosition]]:
    """One conversation with every event type, in log order on partition 2."""
    events = [
        new_event(
            tenant,
            conv,
            conversation_started=pb.ConversationStarted(
                channel=pb.CHANNEL_WEB, customer_id="cust-1", locale="zh-CN", metadata={"k": "v"}
            ),
        ),
        new_event(
            tenant,
            conv,
            message_received=pb.MessageReceived(
                client_message_id="m1", text="我的订单在哪里？", sender=pb.SENDER_CUSTOMER
            ),
        ),
        new_event(
            tenant,
            conv,
            intent_classified=pb.IntentClassified(
                message_event_id="e-m1",
                intent="order_status",
                confidence=0.9,
                model="tfidf",
                stage="ngram",
                model_version="v3",
                language="zh",
            ),
        ),
        new_event(
            tenant,
            conv,
            reply_generated=pb.ReplyGenerated(
                message_event_id="e-m1",
                text="It ships today.",
                model="template",
                citations=[pb.Citation(document_id="d1", chunk_id="c", score=0.5)],
                latency_ms=12,
                prompt_tokens=30,
                completion_tokens=5,
                adapter="template",
                first_token_ms=4,
                language="en",
                grounded=True,
                intent="order_status",
            ),
        ),
        new_event(
            tenant,
            conv,
            handoff_requested=pb.HandoffRequested(reason="angry", queue="vip", message_event_id="e-m1"),
        ),
        new_event(tenant, conv, agent_assigned=pb.AgentAssigned(agent_id="agent-7", queue="vip")),
        new_event(
            tenant,
            conv,
            agent_message_sent=pb.AgentMessageSent(agent_id="agent-7", client_message_id="a1", text="Hi"),
        ),
        new_event(tenant, conv, message_received=pb.MessageReceived(text="no id", sender=pb.SENDER_CUSTOMER)),
        new_event(
            tenant,
            conv,
            conversation_closed=pb.ConversationClosed(resolution="answered", closed_by=pb.SENDER_AGENT),
        ),
        new_event(tenant, conv, csat_rated=pb.CsatRated(score=5, comment="great")),
    ]
    return [(at(e, T0 + i * 1_000_000_000), LogPosition(2, 100 + i)) for i, e in enumerate(events)]


def as_dicts(rows: list[list[object]], table: str) -> list[dict[str, Any]]:
    return [dict(zip(COLUMNS[table], row, strict=True)) for row in rows]


def test_every_row_matches_its_table_columns() -> None:
    batch = project(conversation())
    for table in TABLE_ORDER:
        for row in batch.rows[table]:
            assert len(row) == len(COLUMNS[table]), table
    assert batch.row_count == sum(len(batch.rows[t]) for t in TABLE_ORDER)


def test_events_table_gets_every_event_with_its_position_and_payload() -> None:
    records = conversation()
    rows = as_dicts(project(records).rows[EVENTS], EVENTS)
    assert [r["event_id"] for r in rows] == [e.event_id for e, _ in records]
    assert [r["offset"] for r in rows] == list(range(100, 110))
    assert {r["partition"] for r in rows} == {2}
    assert rows[0]["type"] == "conversation_started"
    assert rows[0]["schema_version"] == 1
    assert json.loads(str(rows[0]["payload_json"])) == {
        "channel": "CHANNEL_WEB",
        "customer_id": "cust-1",
        "locale": "zh-CN",
        "metadata": {"k": "v"},
    }
    assert json.loads(str(rows[1]["payload_json"]))["text"] == "我的订单在哪里？"
    assert rows[0]["occurred_at"] == datetime.fromtimestamp(T0 / 1e9, UTC)


def test_messages_are_customer_and_agent_messages_keyed_for_deduplication() -> None:
    records = conversation()
    rows = as_dicts(project(records).rows[MESSAGES], MESSAGES)
    assert [(r["sender"], r["text"]) for r in rows] == [
        ("customer", "我的订单在哪里？"),
        ("agent", "Hi"),
        ("customer", "no id"),
    ]
    no_id_event = records[7][0]
    # The client's idempotency key when there is one (an agent's in the agents' own id space), else
    # the event id.
    assert [r["message_key"] for r in rows] == ["m1", "\x00agent:a1", no_id_event.event_id]
    assert rows[1]["agent_id"] == "agent-7"


def test_decisions_go_to_their_tables() -> None:
    batch = project(conversation())
    (reply,) = as_dicts(batch.rows[REPLIES], REPLIES)
    assert reply["citation_document_ids"] == ["d1"] and reply["citation_count"] == 1
    assert reply["citation_chunk_ids"] == ["c"] and reply["citation_scores"] == [pytest.approx(0.5)]
    assert (reply["latency_ms"], reply["first_token_ms"]) == (12, 4)
    assert (reply["prompt_tokens"], reply["completion_tokens"]) == (30, 5)
    assert (reply["adapter"], reply["language"], reply["grounded"], reply["intent"]) == (
        "template",
        "en",
        True,
        "order_status",
    )
    # reply_id defaults to the event id (the proto says they are equal).
    assert reply["reply_id"] == reply["event_id"]
    (intent,) = as_dicts(batch.rows[INTENTS], INTENTS)
    assert intent["intent"] == "order_status" and intent["confidence"] == pytest.approx(0.9)
    assert (intent["stage"], intent["model_version"], intent["language"]) == ("ngram", "v3", "zh")
    handoffs = as_dicts(batch.rows[HANDOFFS], HANDOFFS)
    assert [(h["kind"], h["reason"], h["queue"], h["agent_id"], h["message_event_id"]) for h in handoffs] == [
        ("handoff_requested", "angry", "vip", "", "e-m1"),
        ("agent_assigned", "", "vip", "agent-7", ""),
    ]
    (csat,) = as_dicts(batch.rows[CSAT], CSAT)
    assert (csat["score"], csat["comment"]) == (5, "great")


def test_conversation_facts_combine_start_and_close() -> None:
    records = conversation()
    (facts,) = as_dicts(project(records).rows[CONVERSATION_FACTS], CONVERSATION_FACTS)
    assert facts["channel"] == "web" and facts["customer_id"] == "cust-1" and facts["locale"] == "zh-CN"
    assert facts["started_at"] == occurred_at(records[0][0])
    assert facts["closed_at"] == occurred_at(records[8][0])
    assert facts["resolution"] == "answered" and facts["closed_by"] == "agent"
    assert facts["first_event_at"] == occurred_at(records[0][0])
    assert facts["last_event_at"] == occurred_at(records[-1][0])


def test_a_batch_without_the_start_leaves_start_columns_neutral() -> None:
    records = conversation()[5:]
    (facts,) = as_dicts(project(records).rows[CONVERSATION_FACTS], CONVERSATION_FACTS)
    # Neutral for ClickHouse's max()/min(): '' and NULL never win over a real value.
    assert facts["channel"] == "" and facts["customer_id"] == "" and facts["started_at"] is None
    assert facts["resolution"] == "answered"


def test_one_facts_row_per_conversation_per_batch() -> None:
    records = conversation("acme", "c1") + conversation("acme", "c2") + conversation("other", "c1")
    facts = project(records).rows[CONVERSATION_FACTS]
    assert sorted((r[0], r[1]) for r in facts) == [("acme", "c1"), ("acme", "c2"), ("other", "c1")]


def test_projection_is_deterministic() -> None:
    records = conversation()
    assert project(records).rows == project(records).rows
    assert project(records + records).rows[EVENTS] == project(records).rows[EVENTS] * 2


def test_empty_batch() -> None:
    batch = project([])
    assert not batch and batch.row_count == 0


def test_enum_labels() -> None:
    assert channel_label(pb.CHANNEL_WECHAT) == "wechat"
    assert channel_label(pb.CHANNEL_UNSPECIFIED) == ""
    assert sender_label(pb.SENDER_BOT) == "bot"
    # A number from a newer writer than this reader is kept, not dropped.
    assert channel_label(99) == "99"


def test_occurred_at_keeps_microseconds() -> None:
    event = at(new_event("t", "c", csat_rated=pb.CsatRated(score=1)), T0 + 123_456_789)
    assert occurred_at(event) == datetime.fromtimestamp(T0 // 10**9, UTC).replace(microsecond=123_456)


def test_conversation_facts_carry_mode_assignee_response_handoff_csat_and_intent() -> None:
    records = conversation()
    (facts,) = as_dicts(project(records).rows[CONVERSATION_FACTS], CONVERSATION_FACTS)
    by_index = [occurred_at(e) for e, _ in records]
    assert facts["first_customer_message_at"] == by_index[1]
    assert facts["first_response_at"] == by_index[3]  # the bot reply
    assert facts["first_handoff_at"] == by_index[4] and facts["first_assigned_at"] == by_index[5]
    assert facts["mode_change"] == (by_index[5], records[5][0].event_id, "agent")
    assert facts["assignee_change"] == (by_index[5], records[5][0].event_id, "agent-7")
    assert facts["csat_change"] == (by_index[9], records[9][0].event_id, 5, "great")
    assert facts["first_intent"] == (by_index[2], records[2][0].event_id, "order_status")


def test_returned_to_bot_sets_mode_bot_and_clears_the_assignee() -> None:
    records = conversation()[:7]
    back = at(new_event("acme", "c1", returned_to_bot=pb.ReturnedToBot(agent_id="agent-7")), T0 + 60 * 10**9)
    rows = project([*records, (back, LogPosition(2, 200))]).rows
    (facts,) = as_dicts(rows[CONVERSATION_FACTS], CONVERSATION_FACTS)
    assert facts["mode_change"][2] == "bot" and facts["assignee_change"][2] == ""
    assert as_dicts(rows[HANDOFFS], HANDOFFS)[-1]["kind"] == "returned_to_bot"


def test_a_conversation_without_decisions_keeps_neutral_tuples() -> None:
    (facts,) = as_dicts(project(conversation()[:2]).rows[CONVERSATION_FACTS], CONVERSATION_FACTS)
    assert facts["mode_change"][1:] == ("", "") and facts["assignee_change"][1:] == ("", "")
    assert facts["csat_change"][1] == "" and facts["first_intent"] == NO_INTENT
    assert facts["first_response_at"] is None and facts["first_handoff_at"] is None


def closed(resolution: str, closed_by: pb.Sender, after_s: int) -> Event:
    payload = pb.ConversationClosed(resolution=resolution, closed_by=closed_by)
    return at(new_event("acme", "c1", conversation_closed=payload), T0 + after_s * 10**9)


def test_the_first_close_in_the_log_is_kept_with_its_time_resolution_and_closer() -> None:
    # The late copy of a stalled process's close: later in the log, earlier in time.
    first = (closed("resolved", pb.SENDER_AGENT, 30), LogPosition(0, 20))
    late = (closed("solved", pb.SENDER_SYSTEM, 20), LogPosition(0, 21))
    for batch in ([first, late], [late, first]):
        (facts,) = as_dicts(project(batch).rows[CONVERSATION_FACTS], CONVERSATION_FACTS)
        assert facts["first_close"] == (20, occurred_at(first[0]), "resolved", "agent")
        # The columns of before 0008 keep their rules (earliest time, max()).
        assert facts["closed_at"] == occurred_at(late[0]) and facts["resolution"] == "solved"
    (facts,) = as_dicts(project(conversation()[:2]).rows[CONVERSATION_FACTS], CONVERSATION_FACTS)
    assert facts["first_close"] == NO_CLOSE


def merge_facts(rows: list[list[object]]) -> dict[str, object]:
    """Merge partial conversation rows the way ClickHouse's aggregates do."""
    dicts = as_dicts(rows, CONVERSATION_FACTS)
    merged: dict[str, object] = {}
    mins = {"started_at", "closed_at", "first_event_at", "first_intent"} | {
        c for c in COLUMNS[CONVERSATION_FACTS] if c.startswith("first_")
    }
    for column in COLUMNS[CONVERSATION_FACTS]:
        values = [d[column] for d in dicts if d[column] is not None]
        if not values:
            merged[column] = None
        else:
            merged[column] = min(values) if column in mins else max(values)
    return merged


def test_facts_merge_to_the_same_conversation_however_batched_and_repeated() -> None:
    records = conversation()
    whole = merge_facts(project(records).rows[CONVERSATION_FACTS])
    # Redelivery (a batch twice), overlap after a crash, and a replay in another order.
    pieces = [records[6:], records[:4], records[2:8], records[:4], records[8:]]
    rows = [row for piece in pieces for row in project(piece).rows[CONVERSATION_FACTS]]
    assert merge_facts(rows) == whole


def test_payload_json_is_message_to_json_for_every_payload() -> None:
    from google.protobuf.json_format import MessageToJson

    from schemas.events import event_type
    from streams.projector._rows import payload_json

    samples = [
        pb.MessageReceived(client_message_id="m1", text='引号 " \\ \n', sender=pb.SENDER_CUSTOMER),
        pb.MessageReceived(text="unknown sender", sender=99),  # type: ignore[arg-type]
        pb.MessageReceived(),
        pb.ConversationClosed(resolution="solved", closed_by=pb.SENDER_AGENT),
        pb.HandoffRequested(reason="asked", queue="billing", message_event_id="e1"),
        pb.AgentAssigned(agent_id="bob", queue="billing", previous_agent_id="amy"),
        pb.ReturnedToBot(agent_id="bob"),
        pb.AgentMessageSent(agent_id="bob", client_message_id="a1", text="hi"),
        pb.CsatRated(score=5, comment="好"),
        pb.ConversationStarted(channel=pb.CHANNEL_WEB, metadata={"b": "1", "a": "2"}, locale="zh-CN"),
        pb.IntentClassified(intent="refund", confidence=0.25),
        pb.ReplyGenerated(text="ok", grounded=True, citations=[pb.Citation(document_id="d", score=0.5)]),
    ]
    for payload in samples:
        field = {f.message_type: f.name for f in pb.Event.DESCRIPTOR.oneofs_by_name["payload"].fields}[
            payload.DESCRIPTOR
        ]
        event = new_event("acme", "c1", **{field: payload})  # type: ignore[arg-type]
        assert event_type(event) == field
        expected = MessageToJson(
            payload, preserving_proto_field_name=True, indent=None, ensure_ascii=False, sort_keys=True
        )
        assert payload_json(event) == expected


def test_an_agent_message_with_a_customers_client_message_id_is_its_own_message() -> None:
    """Agents have their own client_message_id space (hotview.agent_claim): an agent's "1" and a
    customer's "1" in one conversation are two messages. Before, both were keyed "1" and the
    ReplacingMergeTree kept one of them (the `messages` view lost the other)."""
    events = [
        new_event(
            "acme",
            "c1",
            message_received=pb.MessageReceived(client_message_id="1", text="hi", sender=pb.SENDER_CUSTOMER),
        ),
        new_event(
            "acme",
            "c1",
            agent_message_sent=pb.AgentMessageSent(agent_id="a", client_message_id="1", text="yo"),
        ),
    ]
    rows = as_dicts(project([(e, LogPosition(0, i)) for i, e in enumerate(events)]).rows[MESSAGES], MESSAGES)
    assert len({r["message_key"] for r in rows}) == 2, rows
    assert [(r["sender"], r["client_message_id"]) for r in rows] == [("customer", "1"), ("agent", "1")]
