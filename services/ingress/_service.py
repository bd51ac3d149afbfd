"""ChatService: the RPCs in one place; writes live in `_writes`, reads in `_reads`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc
import redis.asyncio as aioredis
from switchboard.v1 import chat_pb2

from services.ingress import _validation as v
from services.ingress._hotview import IngressHotView
from services.ingress._producer import EventProducer
from services.ingress._quotas import Quotas
from services.ingress._reads import ConversationReads, LiveFollow
from services.ingress._writes import ConversationWrites, MessageBatcher, Outcome, WriteOrder
from services.settings import Settings

__all__ = ["ChatService", "MessageBatcher", "WriteOrder"]


class ChatService:
    def __init__(
        self,
        settings: Settings,
        producer: EventProducer,
        hot: IngressHotView,
        live: aioredis.Redis | None = None,
        quotas: Quotas | None = None,
    ) -> None:
        self.settings = settings
        self.reads = ConversationReads(settings, hot, live)
        self.writes = ConversationWrites(settings, producer, hot, self.reads.read, quotas)

    async def start_conversation(
        self, req: chat_pb2.StartConversationRequest, traceparent: str = ""
    ) -> chat_pb2.Conversation:
        return await self.writes.start_conversation(req, traceparent)

    async def accept_messages(
        self,
        requests: Sequence[chat_pb2.SendMessageRequest | v.MalformedRequest],
        traceparents: Sequence[str] | str = "",
        order: WriteOrder | None = None,
        on_admitted: Callable[[], None] | None = None,
    ) -> list[Outcome]:
        return await self.writes.accept_messages(requests, traceparents, order, on_admitted)

    async def close_conversation(
        self, req: chat_pb2.CloseConversationRequest, traceparent: str = ""
    ) -> chat_pb2.Conversation:
        return await self.writes.close_conversation(req, traceparent)

    async def rate_conversation(
        self, req: chat_pb2.RateConversationRequest, traceparent: str = ""
    ) -> chat_pb2.Conversation:
        return await self.writes.rate_conversation(req, traceparent)

    async def get_conversation(self, req: chat_pb2.GetConversationRequest) -> chat_pb2.Conversation:
        return await self.reads.get_conversation(req)

    async def stream_conversation(self, req: chat_pb2.StreamConversationRequest) -> LiveFollow:
        return await self.reads.stream_conversation(req)


def traceparent_of(context: grpc.aio.ServicerContext | None) -> str:
    if context is None:
        return ""
    for key, value in context.invocation_metadata() or ():
        if key == "traceparent" and isinstance(value, str):
            return value[:128]
    return ""
