"""The erasure registry and the archive rewrite's segment builder (pure parts)."""

from __future__ import annotations

from switchboard.v1 import events_pb2

from schemas.events import encode_event, event_headers, event_key, new_event
from streams._consumer import Record
from streams.archive._segment import open_segment
from streams.privacy._archive import segment_for
from streams.privacy._erase import erasure_event, quote
from streams.privacy.erasures import Erasures


def record(event: events_pb2.Event, offset: int = 0) -> Record:
    return Record(
        "conversation-events",
        0,
        offset,
        event_key(event),
        encode_event(event),
        1_000 + offset,
        tuple(event_headers(event)),
    )


def message(tenant: str, conversation: str) -> events_pb2.Event:
    return new_event(tenant, conversation, message_received=events_pb2.MessageReceived(text="hi"))


def test_a_customer_erasure_skips_its_conversations_only() -> None:
    erasures = Erasures()
    assert erasures.keeps(record(message("acme", "c1")))
    erasures.apply(erasure_event("acme", "bob", ["c1", "c2"], "ops", now_ns=0))
    assert not erasures.keeps(record(message("acme", "c1")))
    assert not erasures.keeps_event(message("acme", "c2"))
    assert erasures.keeps(record(message("acme", "c3")))
    # Ids are per tenant.
    assert erasures.keeps(record(message("other", "c1")))
    # Undecodable records are kept for the processor to refuse as before, unless their key says
    # they belong to an erased conversation.
    assert erasures.keeps(Record("t", 0, 9, b"c3", b"\xffno", 0, (("sb-tenant", b"acme"),)))
    assert erasures.keeps(Record("t", 0, 9, b"c1", b"\xffno", 0, ()))
    assert not erasures.keeps(Record("t", 0, 9, b"c1", b"\xffno", 0, (("sb-tenant", b"acme"),)))


def test_a_whole_tenant_erasure_skips_what_occurred_before_it() -> None:
    earlier = message("acme", "c1")
    erasures = Erasures()
    event = erasure_event("acme", None, [], "ops", now_ns=earlier.occurred_at.ToNanoseconds() + 1)
    assert event.customer_erased.whole_tenant
    erasures.apply(event)
    assert not erasures.keeps(record(earlier))
    later = message("acme", "c9")
    later.occurred_at.FromNanoseconds(earlier.occurred_at.ToNanoseconds() + 10)
    assert erasures.keeps(record(later))
    assert erasures.keeps(record(message("other", "c1")))


def test_a_rewritten_segment_keeps_its_range_and_verifies_even_empty() -> None:
    records = [record(message("acme", f"c{i}"), offset=10 + i) for i in range(3)]
    stored, manifest = segment_for("archive", "t", 0, 10, 14, records[1:], 3, name="archive/x.g1.seg.zst")
    assert (manifest.first_offset, manifest.last_offset, manifest.count) == (10, 14, 2)
    assert manifest.segment == "archive/x.g1.seg.zst"
    assert [r.offset for r in open_segment(stored, manifest)] == [11, 12]
    stored, empty = segment_for("archive", "t", 0, 10, 14, [], 3)
    assert empty.count == 0 and open_segment(stored, empty) == []


def test_quote_escapes_what_would_end_the_literal() -> None:
    assert quote("a'b\\c") == "'a\\'b\\\\c'"
