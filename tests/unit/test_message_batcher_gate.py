"""MessageBatcher: the next batch leaves once every call of the one before has its answer (a
review of 9f27454)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

from switchboard.v1 import chat_pb2

from services.ingress._writes import ConversationWrites, MessageBatcher


class EarlyWrites:
    """Tells on_outcome for the indices in `early` at once, then waits until the test answers."""

    def __init__(self, early: set[str]) -> None:
        self.early = early
        self.batches: list[list[str]] = []
        self.answers: list[asyncio.Future[None]] = []

    async def accept_messages(self, requests: Sequence[Any], traceparents: Any = "", **kw: Any) -> list[Any]:
        self.batches.append([r.client_message_id for r in requests])
        for i, r in enumerate(requests):
            if r.client_message_id in self.early:
                kw["on_outcome"](i, chat_pb2.SendMessageResponse(event_id=f"e-{r.client_message_id}"))
        answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.answers.append(answer)
        await answer
        return [chat_pb2.SendMessageResponse(event_id=f"e-{r.client_message_id}") for r in requests]


def _call(batcher: MessageBatcher, cmid: str) -> asyncio.Task[Any]:
    req = chat_pb2.SendMessageRequest(tenant_id="t", conversation_id="c", client_message_id=cmid, text="x")
    return asyncio.ensure_future(batcher.submit(req, ""))


async def _ticks(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_review_s22_a_batch_all_told_lets_the_next_one_go_before_it_ends() -> None:
    writes = EarlyWrites({"m1"})
    batcher = MessageBatcher(cast(ConversationWrites, writes), hold_s=60)
    first = _call(batcher, "m1")
    await _ticks()
    second = _call(batcher, "m2")
    await _ticks()
    assert (await asyncio.wait_for(first, 5)).event_id == "e-m1"
    assert writes.batches == [["m1"], ["m2"]]  # overlapping: the first batch has not returned
    for a in writes.answers:
        a.set_result(None)
    assert (await asyncio.wait_for(second, 5)).event_id == "e-m2"


async def test_review_s22_a_batch_with_a_call_never_told_holds_the_gate_until_it_ends() -> None:
    writes = EarlyWrites({"m1"})  # m1b never told early (a follower, say)
    batcher = MessageBatcher(cast(ConversationWrites, writes), hold_s=60)
    first = [_call(batcher, "m1"), _call(batcher, "m1b")]
    await _ticks()
    later = _call(batcher, "m2")
    await _ticks()
    assert writes.batches == [["m1", "m1b"]]
    writes.answers[0].set_result(None)
    await asyncio.wait_for(asyncio.gather(*first), 5)
    await _ticks()
    assert writes.batches == [["m1", "m1b"], ["m2"]]
    writes.answers[1].set_result(None)
    assert (await asyncio.wait_for(later, 5)).event_id == "e-m2"
