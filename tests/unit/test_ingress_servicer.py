"""The SendMessages handler over in-memory fakes: it ends when its request stream breaks, and every
refused message's response names the message it refuses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from switchboard.v1 import chat_pb2

from services.ingress._server import STREAM_WINDOW, ChatServicer
from services.ingress._service import ChatService
from services.settings import Settings
from tests.unit.test_ingress_write_path import A, FakeHotView, FakeProducer, T, make, msg, until


class FakeContext:
    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any = ()) -> None:
        self.aborted = (code, details)
        raise asyncio.CancelledError  # what grpc.aio does: the handler ends here


async def test_a_broken_request_stream_ends_the_call() -> None:
    service, _, _ = make()
    servicer = ChatServicer(service)

    async def requests() -> AsyncIterator[chat_pb2.SendMessageRequest]:
        yield msg("m1")
        raise ConnectionResetError("client went away mid-stream")

    context = FakeContext()
    responses: list[chat_pb2.SendMessageResponse] = []

    async def consume() -> None:
        async for response in servicer.SendMessages(requests(), context):
            responses.append(response)

    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(consume(), timeout=5)
    assert [r.client_message_id for r in responses] == ["m1"]  # what was read is answered
    assert context.aborted is not None


async def test_refused_messages_echo_their_ids() -> None:
    service, _, _ = make()
    servicer = ChatServicer(service)

    async def requests() -> AsyncIterator[chat_pb2.SendMessageRequest]:
        yield msg("empty", text="")
        yield msg("nowhere", conversation_id="conv-missing")

    responses = [r async for r in servicer.SendMessages(requests(), FakeContext())]
    assert [(r.error_code, r.client_message_id, r.conversation_id) for r in responses] == [
        (grpc.StatusCode.INVALID_ARGUMENT.value[0], "empty", A),
        (grpc.StatusCode.NOT_FOUND.value[0], "nowhere", "conv-missing"),
    ]
    assert all(r.error_message for r in responses)
    assert T


async def test_requests_read_while_a_batch_is_admitted_leave_together() -> None:
    """Group commit: while one batch of a stream is being claimed, what the stream reads meanwhile
    waits and is claimed as one batch (one round trip), not one batch per request."""
    service, hot, _ = make()
    servicer = ChatServicer(service)
    hot.hold_claims["m0"] = asyncio.Event()
    batches: list[list[str]] = []
    claim_many = hot.claim_many

    async def recording(keys: Any, *args: Any, **kwargs: Any) -> Any:
        batches.append([k[2] for k in keys])
        return await claim_many(keys, *args, **kwargs)

    hot.claim_many = recording  # type: ignore[method-assign]
    sent = [f"m{i}" for i in range(6)]

    async def requests() -> AsyncIterator[chat_pb2.SendMessageRequest]:
        yield msg(sent[0])
        await until(lambda: "m0" in hot.claiming, "the first batch claiming")
        for cmid in sent[1:]:
            yield msg(cmid)
            await asyncio.sleep(0)  # grpc.aio hands the handler one request per loop iteration
        for _ in range(50):  # every chance for the rest to leave on their own
            await asyncio.sleep(0)
        hot.hold_claims["m0"].set()

    responses = [r async for r in servicer.SendMessages(requests(), FakeContext())]
    assert [(r.client_message_id, r.error_code) for r in responses] == [(m, 0) for m in sent]
    assert batches == [["m0"], sent[1:]]


async def test_a_stream_holds_at_most_its_window_of_unanswered_messages() -> None:
    """A client writing faster than Kafka acknowledges is slowed by flow control (the handler stops
    reading), not turned into thousands of writes in flight."""
    settings = Settings(max_inflight_produce=100_000, produce_timeout_s=30, topic_partitions=1)
    hot = FakeHotView()
    producer = FakeProducer(settings)
    producer.auto_ack = False
    servicer = ChatServicer(ChatService(settings, producer, hot))
    sent = [f"m{i}" for i in range(3 * STREAM_WINDOW)]
    read: list[str] = []

    async def requests() -> AsyncIterator[chat_pb2.SendMessageRequest]:
        for cmid in sent:
            read.append(cmid)
            yield msg(cmid)

    responses: list[chat_pb2.SendMessageResponse] = []

    async def consume() -> None:
        async for response in servicer.SendMessages(requests(), FakeContext()):
            responses.append(response)

    consumer = asyncio.ensure_future(consume())
    await until(lambda: len(producer.order) >= STREAM_WINDOW, "a window's worth handed to Kafka")
    for _ in range(200):  # every chance to take more
        await asyncio.sleep(0)
    assert len(producer.order) == STREAM_WINDOW
    assert len(read) < len(sent)  # beyond the window and the read-ahead, the rest waits with the client
    producer.auto_ack = True
    for name in list(producer.deliveries):
        producer.ack(name)
    await asyncio.wait_for(consumer, 10)
    assert [(r.client_message_id, r.error_code) for r in responses] == [(m, 0) for m in sent]


async def test_a_client_cancelling_a_stream_held_back_by_its_window_ends_the_call() -> None:
    """Found by review: with the window full (the handler reads no more) and its read-ahead full,
    a client's cancellation (or deadline) reached the reader blocked putting into the full queue;
    its `finally` then waited to put the end marker into that queue, which nothing read any more,
    and the handler's own `finally` waited for the reader: the call never ended (its tasks and
    buffered requests held for good)."""
    settings = Settings(max_inflight_produce=100_000, produce_timeout_s=30, topic_partitions=1)
    producer = FakeProducer(settings)
    producer.auto_ack = False
    servicer = ChatServicer(ChatService(settings, producer, FakeHotView()))
    read: list[str] = []

    async def requests() -> AsyncIterator[chat_pb2.SendMessageRequest]:
        for i in range(4 * STREAM_WINDOW):
            read.append(f"m{i}")
            yield msg(f"m{i}")

    async def consume() -> None:
        async for _ in servicer.SendMessages(requests(), FakeContext()):
            pass

    consumer = asyncio.ensure_future(consume())
    await until(lambda: len(producer.order) >= STREAM_WINDOW, "a window's worth handed to Kafka")
    for _ in range(200):  # the reader fills its read-ahead and blocks
        await asyncio.sleep(0)
    assert len(read) < 4 * STREAM_WINDOW
    consumer.cancel()  # the client cancels the call
    done, _ = await asyncio.wait({consumer}, timeout=5)
    assert done, "the cancelled call never ended"
