"""A "did you mean" offer read back from the conversation's live stream when the assistant lost it
(a restart): `AssistantProcessor._offer_from_log` on a stand-in for the stream (the integration test
`test_yes_to_did_you_mean_after_an_assistant_restart_is_answered_from_the_log` runs the real one)."""

from __future__ import annotations

from typing import Any

import pytest
from switchboard.v1 import events_pb2

from schemas import hotview as hv
from schemas.events import Event, encode_event
from services.settings import Settings
from streams._consumer import Record
from streams.assistant._worker import AssistantProcessor, _Job
from streams.assistant.gateway import TEMPLATE_MODEL
from streams.assistant.gateway._template import _TITLES, DID_YOU_MEAN
from streams.knowledge import Document, KnowledgeBase

T, C = "t1", "c1"


def event(event_id: str, **payload: Any) -> Event:
    e = Event(event_id=event_id, tenant_id=T, conversation_id=C)
    ((field, value),) = payload.items()
    getattr(e, field).CopyFrom(value)
    return e


class Stream:
    """XREVRANGE over entries at offsets 0, 1, 2 … (ids as the sessions worker writes them)."""

    def __init__(self, events: list[Event]) -> None:
        self.entries = [
            (hv.live_stream_id(i).encode(), {hv.S_EVENT.encode(): hv.compact_live_event(encode_event(e))})
            for i, e in enumerate(events)
        ]

    async def xrevrange(
        self, key: str, max: str = "+", min: str = "-", count: int | None = None
    ) -> list[Any]:
        assert max.startswith("(")
        below = int(max[1:].split("-")[0])
        newer_first = [e for e in reversed(self.entries) if int(e[0].split(b"-")[0]) < below]
        return newer_first[:count]


def doc(document_id: str, title: str, language: str = "en") -> Document:
    return Document(document_id=document_id, title=title, body=f"{title}: the answer.", language=language)


async def offer_read_back(
    titles: list[str],
    documents: list[Document],
    between: list[Event] = (),  # type: ignore[assignment]
    question: str = "pro plan price?",
):
    knowledge = KnowledgeBase()
    knowledge.upsert(T, documents)
    quote, joiner = _TITLES["en"]
    text = DID_YOU_MEAN["en"].format(titles=joiner.join(quote.format(t) for t in titles))
    asked = event("q", message_received=events_pb2.MessageReceived(text=question))
    reply = event(
        "r",
        reply_generated=events_pb2.ReplyGenerated(
            message_event_id="q",
            text=text,
            model=TEMPLATE_MODEL,
            grounded=False,
            language="en",
            intent="billing",
        ),
    )
    yes = event("y", message_received=events_pb2.MessageReceived(text="yes please"))
    log = [asked, reply, *between, yes]
    processor = AssistantProcessor(Settings(), Stream(log), None, knowledge, None, None)  # type: ignore[arg-type]
    job = _Job(yes, Record("conversation-events", 0, len(log) - 1, None, None, 0))
    try:
        return await processor._offer_from_log(job)
    finally:
        processor._models.shutdown(wait=True)


async def test_the_offer_is_read_back_in_order_with_its_question_language_and_intent() -> None:
    offer = await offer_read_back(["Plans", "Refunds"], [doc("plans", "Plans"), doc("refunds", "Refunds")])
    assert offer is not None
    assert [h.document_id for h in offer.hits] == ["plans", "refunds"]
    assert (offer.question, offer.language, offer.intent) == ("pro plan price?", "en", "billing")


@pytest.mark.parametrize(
    ("titles", "documents"),
    [
        # A review's cases where a shifted list answered "yes" from the second article:
        (["The “Pro” plan", "Refunds"], [doc("pro", "The “Pro” plan"), doc("refunds", "Refunds")]),  # quotes
        (["Plans", "Refunds"], [doc("refunds", "Refunds")]),  # the first deleted since
        (
            ["Returns", "Refunds"],
            [doc("ret-a", "Returns"), doc("ret-b", "Returns"), doc("refunds", "Refunds")],
        ),
        (["Plans"], [doc("plans-zh", "Plans", "zh")]),  # only in another language
    ],
)
async def test_a_title_that_matches_no_single_document_of_its_language_recovers_no_offer(
    titles: list[str], documents: list[Document]
) -> None:
    assert await offer_read_back(titles, documents) is None


async def test_anything_but_decisions_between_the_offer_and_the_yes_recovers_no_offer() -> None:
    agent = event("a", message_received=events_pb2.MessageReceived(text="hi", sender=events_pb2.SENDER_AGENT))
    handoff = event("h", handoff_requested=events_pb2.HandoffRequested(reason="x", queue="general"))
    documents = [doc("plans", "Plans")]
    assert await offer_read_back(["Plans"], documents, [agent]) is None
    assert await offer_read_back(["Plans"], documents, [handoff]) is None
    decision = event("i", intent_classified=events_pb2.IntentClassified(intent="billing"))
    assert await offer_read_back(["Plans"], documents, [decision]) is not None


async def test_a_long_article_is_read_back_with_its_chunk_that_answers_the_question() -> None:
    # A review: the first chunk was taken, though the question was about a later part of the article.
    intro = " ".join(f"Our plans come in many sizes and colours, number {i}." for i in range(40))
    body = f"{intro}\n\nTo cancel your plan and get your money back, open Settings and choose Cancel."
    long_article = Document(document_id="long", title="Plans", body=body, language="en")
    knowledge_doc = [long_article, doc("refunds", "Refunds")]
    offer = await offer_read_back(
        ["Plans"], knowledge_doc, question="how do I cancel my plan and get my money back"
    )
    assert offer is not None and offer.hits[0].chunk_id != "long#0", offer
    assert "Cancel" in offer.hits[0].snippet
