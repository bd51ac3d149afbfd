"""How unary SendMessage calls are grouped into batches (services/ingress/_writes.MessageBatcher).

The writes behind it are a fake that records each batch and answers it when the test says so; the
same path on real servers is in tests/integration/test_ingress_*.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

import pytest
from switchboard.v1 import chat_pb2

from services.ingress._writes import ConversationWrites, MessageBatcher


class FakeWrites:
    """accept_messages records its batch (client_message_ids) and waits until the test answers it."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.answers: list[asyncio.Future[None]] = []
        self.arrived = asyncio.Event()

    async def accept_messages(self, requests: Sequence[Any], traceparents: Any = "", **_: Any) -> list[Any]:
        self.batches.append([r.client_message_id for r in requests])
        answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.answers.append(answer)
        self.arrived.set()
        await answer
        return [chat_pb2.SendMessageResponse(event_id=f"e-{r.client_message_id}") for r in requests]

    async def batch_count(self, n: int) -> None:
        while len(self.batches) < n:
            self.arrived.clear()
            await self.arrived.wait()


def _batcher(writes: FakeWrites, **kwargs: Any) -> MessageBatcher:
    return MessageBatcher(cast(ConversationWrites, writes), **kwargs)


def _call(batcher: MessageBatcher, cmid: str) -> asyncio.Task[Any]:
    req = chat_pb2.SendMessageRequest(tenant_id="t", conversation_id="c", client_message_id=cmid, text="x")
    return asyncio.ensure_future(batcher.submit(req, ""))


async def test_a_lone_call_leaves_at_once() -> None:
    writes = FakeWrites()
    batcher = _batcher(writes, hold_s=60)
    call = _call(batcher, "m1")
    await asyncio.wait_for(writes.batch_count(1), 5)
    writes.answers[0].set_result(None)
    assert (await call).event_id == "e-m1"


async def test_calls_arriving_while_a_batch_is_under_way_leave_together_once_it_is_answered() -> None:
    writes = FakeWrites()
    batcher = _batcher(writes, hold_s=60)
    first = _call(batcher, "m1")
    await asyncio.wait_for(writes.batch_count(1), 5)
    later = [_call(batcher, f"m{i}") for i in range(2, 6)]
    for _ in range(5):
        await asyncio.sleep(0)  # give a wrongly early flush every chance to happen
    assert writes.batches == [["m1"]]
    writes.answers[0].set_result(None)
    await first
    await asyncio.wait_for(writes.batch_count(2), 5)
    assert writes.batches[1] == ["m2", "m3", "m4", "m5"]
    writes.answers[1].set_result(None)
    assert [(await c).event_id for c in later] == ["e-m2", "e-m3", "e-m4", "e-m5"]


async def test_a_batch_under_way_longer_than_the_hold_no_longer_holds_the_next() -> None:
    writes = FakeWrites()
    batcher = _batcher(writes, hold_s=0.01)
    first = _call(batcher, "m1")
    await asyncio.wait_for(writes.batch_count(1), 5)
    second = _call(batcher, "m2")
    # The first batch is never answered before the second leaves (a slow partition, say).
    await asyncio.wait_for(writes.batch_count(2), 5)
    assert writes.batches == [["m1"], ["m2"]]
    for answer in writes.answers:
        answer.set_result(None)
    assert (await first).event_id == "e-m1"
    assert (await second).event_id == "e-m2"


async def test_a_full_batch_of_waiting_calls_leaves_while_another_is_under_way() -> None:
    writes = FakeWrites()
    batcher = _batcher(writes, hold_s=60, max_batch=3)
    first = _call(batcher, "m1")
    await asyncio.wait_for(writes.batch_count(1), 5)
    waiting = [_call(batcher, f"m{i}") for i in range(2, 5)]
    await asyncio.wait_for(writes.batch_count(2), 5)
    assert writes.batches == [["m1"], ["m2", "m3", "m4"]]
    for answer in writes.answers:
        answer.set_result(None)
    await first
    assert [(await c).event_id for c in waiting] == ["e-m2", "e-m3", "e-m4"]


async def test_a_failed_batch_fails_its_calls_and_holds_nothing_back() -> None:
    writes = FakeWrites()
    batcher = _batcher(writes, hold_s=60)
    first = _call(batcher, "m1")
    await asyncio.wait_for(writes.batch_count(1), 5)
    second = _call(batcher, "m2")
    writes.answers[0].set_exception(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        await first
    await asyncio.wait_for(writes.batch_count(2), 5)
    writes.answers[1].set_result(None)
    assert (await second).event_id == "e-m2"
