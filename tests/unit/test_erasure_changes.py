"""An erasure follower hands its user only what changed, and the ingress forgets only that.

Found by review: the ingress's `_forget_erased` was handed the whole registry and scanned every
conversation it remembers (up to 200,000) against it on every erasure record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiokafka import TopicPartition

from schemas.events import encode_event
from services.ingress._writes import ConversationWrites
from services.settings import Settings
from streams.privacy._erase import erasure_event
from streams.privacy.erasures import ErasureChange, ErasureFollower, Erasures

T0 = 1_700_000_000_000_000_000


@dataclass
class Message:  # what the follower reads of a consumer record
    value: bytes
    offset: int = 0


def test_apply_returns_what_an_erasure_added() -> None:
    erasures = Erasures()
    first = erasures.apply(erasure_event("acme", "bob", ["c1", "c2"], "ops", now_ns=T0))
    assert first == ErasureChange(frozenset({("acme", "c1"), ("acme", "c2")}))
    # The same customer again, with one more conversation: only that one is new.
    again = erasures.apply(erasure_event("acme", "bob", ["c2", "c3"], "ops", now_ns=T0))
    assert again == ErasureChange(frozenset({("acme", "c3")}))
    assert not erasures.apply(erasure_event("acme", "bob", ["c1"], "ops", now_ns=T0))
    # A tenant erased whole: new once, and again only up to a later instant.
    assert erasures.apply(erasure_event("other", None, [], "ops", now_ns=T0)) == ErasureChange(
        tenants=frozenset({"other"})
    )
    assert not erasures.apply(erasure_event("other", None, [], "ops", now_ns=T0 - 1))
    assert erasures.apply(erasure_event("other", None, [], "ops", now_ns=T0 + 1)).tenants == {"other"}
    assert erasures.applied == 6
    assert erasures.conversation_erased("acme", "c3") and erasures.tenants["other"] == T0 + 1


def test_the_follower_hands_on_change_the_batchs_delta_only() -> None:
    changes: list[ErasureChange] = []
    follower = ErasureFollower(Settings(), changes.append)
    tp = TopicPartition("privacy", 0)
    follower._apply(
        {
            tp: [
                Message(encode_event(erasure_event("acme", "bob", ["c1"], "ops", now_ns=T0))),
                Message(encode_event(erasure_event("acme", "eve", ["c2"], "ops", now_ns=T0))),
                Message(b"\xffnot an event"),
                Message(encode_event(erasure_event("gone", None, [], "ops", now_ns=T0))),
            ]
        }
    )
    assert changes == [ErasureChange(frozenset({("acme", "c1"), ("acme", "c2")}), frozenset({"gone"}))]
    # A batch that adds nothing (a repeat) calls nobody.
    follower._apply({tp: [Message(encode_event(erasure_event("acme", "bob", ["c1"], "ops", now_ns=T0)))]})
    assert len(changes) == 1
    follower._apply({tp: [Message(encode_event(erasure_event("acme", "bob", ["c9"], "ops", now_ns=T0)))]})
    assert changes[1] == ErasureChange(frozenset({("acme", "c9")}))


class Unscannable(dict[tuple[str, str], bool]):
    """A registry that fails when it is scanned (looking keys up is fine)."""

    def __iter__(self) -> Any:
        raise AssertionError("the whole registry was scanned")


def test_the_ingress_forgets_only_the_erased_conversations() -> None:
    writes = ConversationWrites(Settings(), producer=None, hot=None, read_conversation=None)  # type: ignore[arg-type]
    remembered = {("acme", f"c{i}"): False for i in range(1000)} | {
        ("gone", "g1"): True,
        ("gone", "g2"): False,
    }
    writes._registry = Unscannable(remembered)
    writes._forget_erased(ErasureChange(frozenset({("acme", "c1"), ("acme", "c2"), ("acme", "never-seen")})))
    assert ("acme", "c1") not in writes._registry and ("acme", "c2") not in writes._registry
    assert len(writes._registry) == len(remembered) - 2
    # A tenant erased whole: its conversations go (looked up again), the others stay.
    writes._registry = dict(writes._registry)
    writes._forget_erased(ErasureChange(tenants=frozenset({"gone"})))
    assert not any(tenant == "gone" for tenant, _ in writes._registry)
    assert len(writes._registry) == len(remembered) - 4
