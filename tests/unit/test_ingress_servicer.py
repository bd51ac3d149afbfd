"""The SendMessages handler over in-memory fakes: it ends when its request stream breaks, and every
refused message's response names the message it refuses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from switchboard.v1 import chat_pb2

from services.ingress._server import ChatServicer
from tests.unit.test_ingress_write_path import A, T, make, msg


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
