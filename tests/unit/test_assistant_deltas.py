"""How the assistant groups a reply's deltas for the reply stream (pure)."""

from streams.assistant._worker import merge_deltas
from streams.assistant.gateway import ReplyDelta


def test_deltas_produced_together_become_one_part_at_the_first_index() -> None:
    deltas = [ReplyDelta(3, "Refunds ", False), ReplyDelta(4, "take ", False), ReplyDelta(5, "3 days", False)]
    assert merge_deltas(deltas) == [(3, "Refunds take 3 days", False)]


def test_a_restart_starts_a_new_part_so_clients_drop_only_what_came_before_it() -> None:
    deltas = [
        ReplyDelta(0, "Ref", False),
        ReplyDelta(1, "unds", False),
        ReplyDelta(2, "退款", True),
        ReplyDelta(3, "3天", False),
    ]
    assert merge_deltas(deltas) == [(0, "Refunds", False), (2, "退款3天", True)]


def test_nothing_to_merge() -> None:
    assert merge_deltas([]) == []
