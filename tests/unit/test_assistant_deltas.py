"""The assistant's small pure parts: how a reply's deltas are grouped for the reply stream, and
the encoder that serves a batch's precomputed vectors."""

import numpy as np

from streams.assistant._worker import PrimedEncoder, merge_deltas
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


class CountingEncoder:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.array([[float(len(t)), 1.0] for t in texts], dtype=np.float32).reshape(len(texts), 2)


def test_a_primed_encoder_answers_from_the_batch_and_asks_the_model_for_anything_else() -> None:
    inner = CountingEncoder()
    encoder = PrimedEncoder(inner)
    vectors = np.array([[9.0, 9.0], [8.0, 8.0]], dtype=np.float32)
    with encoder.primed(["退款多久", "where is my order"], vectors):
        assert encoder.encode(["where is my order"]).tolist() == [[8.0, 8.0]]
        assert inner.calls == []
        encoder.encode(["where is my order", "new text"])  # one unknown: the model encodes all
    assert inner.calls == [["where is my order", "new text"]]
    encoder.encode(["退款多久"])  # outside the batch: the model again
    assert inner.calls[-1] == ["退款多久"]
