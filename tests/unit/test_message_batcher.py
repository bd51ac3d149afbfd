"""How unary SendMessage calls are grouped into batches (services/ingress/_writes.MessageBatcher).

The writes behind it are a fake that records each batch and answers it when the test says so; the
same path on real servers is in tests/integration/test_ingress_*.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

import grpc
from switchboard.v1 import chat_pb2

from services.ingress import RequestRejected
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
    assert (await asyncio.wait_for(call, 5)).event_id == "e-m1"


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
    await asyncio.wait_for(first, 5)
    await asyncio.wait_for(writes.batch_count(2), 5)
    assert writes.batches[1] == ["m2", "m3", "m4", "m5"]
    writes.answers[1].set_result(None)
    assert [(await asyncio.wait_for(c, 5)).event_id for c in later] == ["e-m2", "e-m3", "e-m4", "e-m5"]


async def test_a_batch_under_way_longer_than_the_hold_no_longer_holds_the_next() -> None:
    writes = FakeWrites()
    batcher = _batcher(writes, hold_s=0.01)
    first = [_call(batcher, f"m{i}") for i in range(1, 4)]
    await asyncio.wait_for(writes.batch_count(1), 5)
    second = _call(batcher, "m4")  # one waiting, three under way: it waits, for the hold at most
    # The first batch is never answered before the second leaves (a slow partition, say).
    await asyncio.wait_for(writes.batch_count(2), 5)
    assert writes.batches == [["m1", "m2", "m3"], ["m4"]]
    for answer in writes.answers:
        answer.set_result(None)
    assert [(await asyncio.wait_for(c, 5)).event_id for c in first] == ["e-m1", "e-m2", "e-m3"]
    assert (await asyncio.wait_for(second, 5)).event_id == "e-m4"


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
    await asyncio.wait_for(first, 5)
    assert [(await asyncio.wait_for(c, 5)).event_id for c in waiting] == ["e-m2", "e-m3", "e-m4"]


async def test_a_failed_batch_fails_its_calls_and_holds_nothing_back() -> None:
    writes = FakeWrites()
    batcher = _batcher(writes, hold_s=60)
    first = _call(batcher, "m1")
    await asyncio.wait_for(writes.batch_count(1), 5)
    second = _call(batcher, "m2")
    writes.answers[0].set_exception(RuntimeError("boom"))
    failed = await asyncio.wait_for(first, 5)
    assert isinstance(failed, RequestRejected) and failed.code == grpc.StatusCode.INTERNAL
    await asyncio.wait_for(writes.batch_count(2), 5)
    writes.answers[1].set_result(None)
    assert (await asyncio.wait_for(second, 5)).event_id == "e-m2"


async def test_a_batch_released_by_its_hold_and_then_answered_holds_nothing_back() -> None:
    # Released twice (the timer, then the answer), the gate would count one batch too few and
    # every later call would wait for good.
    writes = FakeWrites()
    batcher = _batcher(writes, hold_s=0.01)
    first = [_call(batcher, f"m{i}") for i in range(1, 4)]
    await asyncio.wait_for(writes.batch_count(1), 5)
    second = _call(batcher, "m4")
    await asyncio.wait_for(writes.batch_count(2), 5)  # the hold ran out
    for answer in writes.answers:
        answer.set_result(None)
    await asyncio.wait_for(asyncio.gather(*first, second), 5)
    third = [_call(batcher, "m5"), _call(batcher, "m6")]
    await asyncio.wait_for(writes.batch_count(3), 5)
    assert writes.batches[2] == ["m5", "m6"]  # left together, at once: nothing held
    writes.answers[2].set_result(None)
    assert [(await asyncio.wait_for(c, 5)).event_id for c in third] == ["e-m5", "e-m6"]


async def test_a_caller_gone_before_its_batch_leaves_is_not_written_and_strands_no_one() -> None:
    writes = FakeWrites()
    batcher = _batcher(writes, hold_s=60)
    first = _call(batcher, "m1")
    await asyncio.wait_for(writes.batch_count(1), 5)
    gone, stays = _call(batcher, "m2"), _call(batcher, "m3")
    await asyncio.sleep(0)  # both submitted
    gone.cancel()
    writes.answers[0].set_result(None)
    await asyncio.wait_for(first, 5)
    await asyncio.wait_for(writes.batch_count(2), 5)
    assert writes.batches[1] == ["m3"]
    writes.answers[1].set_result(None)
    assert (await asyncio.wait_for(stays, 5)).event_id == "e-m3"
    assert gone.cancelled()


async def test_more_than_max_batch_waiting_leave_in_batches_of_at_most_max_batch() -> None:
    writes = FakeWrites()
    batcher = _batcher(writes, hold_s=60, max_batch=2)
    first = _call(batcher, "m1")
    await asyncio.wait_for(writes.batch_count(1), 5)
    waiting = [_call(batcher, f"m{i}") for i in range(2, 7)]
    await asyncio.wait_for(writes.batch_count(3), 5)
    assert writes.batches == [["m1"], ["m2", "m3"], ["m4", "m5"]]  # m6 alone waits for a batch
    for answer in writes.answers:
        answer.set_result(None)
    await asyncio.wait_for(writes.batch_count(4), 5)
    assert writes.batches[3] == ["m6"]
    writes.answers[3].set_result(None)
    assert [(await asyncio.wait_for(c, 5)).event_id for c in waiting] == [f"e-m{i}" for i in range(2, 7)]
    await asyncio.wait_for(first, 5)


async def test_a_batch_cancelled_before_it_ran_answers_its_calls_and_holds_nothing_back() -> None:
    writes = FakeWrites()
    batcher = _batcher(writes, hold_s=60)
    first = _call(batcher, "m1")
    await asyncio.sleep(0)  # the call is submitted and the flush scheduled (callbacks run in order)
    await asyncio.sleep(0)  # the flush ran: the batch's task exists and has not run yet
    assert batcher._running and writes.batches == []
    for task in list(batcher._running):
        task.cancel()
    answer = await asyncio.wait_for(first, 5)
    assert isinstance(answer, RequestRejected) and answer.code == grpc.StatusCode.UNAVAILABLE
    assert writes.batches == []
    later = _call(batcher, "m2")
    await asyncio.wait_for(writes.batch_count(1), 5)
    writes.answers[0].set_result(None)
    assert (await asyncio.wait_for(later, 5)).event_id == "e-m2"


class SettlingWrites(FakeWrites):
    """Answers every call early (on_outcome), then waits for the test before returning: the
    settlement, the acks recorded in Redis after the callers have theirs."""

    async def accept_messages(self, requests: Sequence[Any], traceparents: Any = "", **kw: Any) -> list[Any]:
        responses = [chat_pb2.SendMessageResponse(event_id=f"e-{r.client_message_id}") for r in requests]
        for i, response in enumerate(responses):
            kw["on_outcome"](i, response)
        return await super().accept_messages(requests, traceparents)


async def test_a_batch_whose_calls_all_have_their_answers_holds_nothing_back_while_it_settles() -> None:
    writes = SettlingWrites()
    batcher = _batcher(writes, hold_s=60)
    first = _call(batcher, "m1")
    await asyncio.wait_for(writes.batch_count(1), 5)
    assert (await asyncio.wait_for(first, 5)).event_id == "e-m1"  # answered, not yet settled
    second = _call(batcher, "m2")
    await asyncio.wait_for(writes.batch_count(2), 5)  # leaves at once, not after the hold
    assert writes.batches == [["m1"], ["m2"]]
    assert (await asyncio.wait_for(second, 5)).event_id == "e-m2"
    for answer in writes.answers:
        answer.set_result(None)


async def test_a_batch_with_a_call_still_unanswered_holds_the_next() -> None:
    writes = SettlingWrites()
    batcher = _batcher(writes, hold_s=60)
    first = _call(batcher, "m1")
    await asyncio.wait_for(writes.batch_count(1), 5)
    await asyncio.wait_for(first, 5)
    pair = [_call(batcher, "m2"), _call(batcher, "m3")]
    await asyncio.wait_for(writes.batch_count(2), 5)
    assert writes.batches[1] == ["m2", "m3"]
    # A batch whose early answers stop short of its last call (a slow partition) keeps holding.
    original = writes.accept_messages

    async def partial(requests: Sequence[Any], traceparents: Any = "", **kw: Any) -> list[Any]:
        kw["on_outcome"](0, chat_pb2.SendMessageResponse(event_id=f"e-{requests[0].client_message_id}"))
        return await FakeWrites.accept_messages(writes, requests, traceparents)

    writes.accept_messages = partial  # type: ignore[method-assign]
    for answer in writes.answers:
        answer.set_result(None)
    await asyncio.wait_for(asyncio.gather(*pair), 5)
    third = [_call(batcher, "m4"), _call(batcher, "m5")]
    await asyncio.wait_for(writes.batch_count(3), 5)
    await asyncio.wait_for(third[0], 5)
    late = _call(batcher, "m6")
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(writes.batches) == 3  # m5 is not answered yet: m6 waits
    writes.accept_messages = original  # type: ignore[method-assign]
    writes.answers[2].set_result(None)
    await asyncio.wait_for(writes.batch_count(4), 5)
    assert writes.batches[3] == ["m6"]
    assert (await asyncio.wait_for(third[1], 5)).event_id == "e-m5"
    assert (await asyncio.wait_for(late, 5)).event_id == "e-m6"
    writes.answers[3].set_result(None)
