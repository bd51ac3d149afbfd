"""The knowledge follower's read-ahead bound, on its bookkeeping alone (no servers: `_read` only
queues what a fetch returned; tests/integration/test_knowledge_read_ahead.py shows the reader
stopping at the bound against real Kafka)."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka import TopicPartition
from switchboard.v1 import knowledge_pb2

from services.ingress._knowledge import deleted, upserted
from services.settings import Settings
from streams.assistant._worker import FETCH_RECORDS, KnowledgeFollower
from streams.knowledge import KnowledgeBase

TP = TopicPartition("knowledge-events", 0)


def _upsert(tenant: str, document_id: str, body: str) -> bytes:
    doc = knowledge_pb2.Document(document_id=document_id, title="", body=body, language="en")
    return upserted(tenant, doc).SerializeToString()


def _follower(**bounds: Any) -> KnowledgeFollower:
    return KnowledgeFollower(Settings(), KnowledgeBase(), redis=None, **bounds)  # type: ignore[arg-type]


def test_the_reader_may_fetch_only_what_fits_under_the_document_bound() -> None:
    follower = _follower(read_ahead_documents=10)
    assert follower._fetchable() == 10
    follower._read([_upsert("a", f"d{i}", "x") for i in range(7)], TP)
    assert follower._fetchable() == 3
    # A newer version of a queued document and a deletion replace work in place: no more held.
    follower._read([_upsert("a", "d0", "y"), deleted("a", "d1").SerializeToString()], TP)
    assert follower.held == 7 and follower._fetchable() == 3
    follower._read([_upsert("b", f"d{i}", "x") for i in range(3)], TP)
    assert follower._fetchable() == 0 and follower.held_most == 10
    assert _follower()._fetchable() == FETCH_RECORDS  # never more than one fetch's worth


def test_the_reader_stops_once_the_queued_text_reaches_the_byte_bound() -> None:
    follower = _follower(read_ahead_bytes=1000)
    follower._read([_upsert("a", "big", "x" * 600)], TP)
    assert follower._fetchable() > 0
    follower._read([_upsert("a", "bigger", "x" * 500)], TP)
    assert follower._fetchable() == 0


def test_bounds_must_allow_something() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        _follower(read_ahead_documents=0)
