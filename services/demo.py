"""A short bilingual demo through the public gRPC API, the way a client backend would call it."""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from switchboard.v1 import chat_pb2, chat_pb2_grpc, events_pb2

from services.auth import ingress_channel
from services.settings import Settings

T = TypeVar("T")
# A system that is still starting (the sessions worker rebuilding the hot view, Kafka electing
# leaders) answers UNAVAILABLE for a while: the demo retries for this long, like a careful client.
RETRY_WITHIN_S = 90.0
_RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)


async def with_retries(call: Callable[[], Awaitable[T]], within_s: float = RETRY_WITHIN_S) -> T:
    """`call()`, retried with backoff while it fails with a status a retry can fix."""
    deadline = time.monotonic() + within_s
    delay = 0.1
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as err:
            if err.code() not in _RETRYABLE or time.monotonic() + delay > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


CONVERSATIONS: list[tuple[events_pb2.Channel, str, list[str]]] = [
    (
        events_pb2.CHANNEL_IOS,
        "zh-CN",
        ["你好，我的订单三天了还没发货，怎么回事？", "订单号是 SB20261123001", "好的，谢谢"],
    ),
    (
        events_pb2.CHANNEL_WEB,
        "en-US",
        ["Hi, I was charged twice for my subscription.", "Can I get a refund?"],
    ),
    (events_pb2.CHANNEL_ANDROID, "zh-CN", ["怎么修改收货地址？", "我想改成上海市浦东新区"]),
    (events_pb2.CHANNEL_WEB, "en-US", ["How do I reset my password?", "I never got the email.", "Thanks!"]),
]


@dataclass(frozen=True)
class DemoResult:
    tenant_id: str
    conversation_ids: list[str]
    # Events the demo wrote: starts, accepted messages (the retry and the refused one write
    # nothing) and one close.
    events: int


async def run_demo(settings: Settings, tenant_id: str = "demo") -> int:
    """`switchboard demo`: play the demo, then show what landed in ClickHouse."""
    await load_demo_faq_indexed(settings, tenant_id)
    result = await play_demo(settings, tenant_id)
    print(await asyncio.to_thread(show_landed, settings, result))
    return 0


def show_landed(settings: Settings, result: DemoResult, within_s: float = 60.0) -> str:
    """Wait until ClickHouse has every event the demo wrote, then describe them."""
    from services.analytics import run_query

    ids = ", ".join(f"'{c}'" for c in result.conversation_ids)
    count_sql = f"SELECT count() FROM switchboard.events WHERE conversation_id IN ({ids})"
    deadline = time.monotonic() + within_s
    while int(run_query(settings, count_sql, "TSV").strip() or 0) < result.events:
        if time.monotonic() > deadline:
            return (
                f"  ClickHouse does not have all {result.events} demo events yet (see var/logs/analytics.log)"
            )
        time.sleep(0.2)
    demo = run_query(
        settings,
        "SELECT conversation_id, channel, status, message_count, event_count "
        f"FROM switchboard.conversations WHERE conversation_id IN ({ids}) ORDER BY started_at",
        "PrettyCompactMonoBlock",
    )
    totals = run_query(
        settings,
        "SELECT (SELECT count() FROM switchboard.events) AS events_total, "
        "(SELECT count() FROM switchboard.messages) AS messages_total, "
        "(SELECT count() FROM switchboard.conversations) AS conversations_total",
        "PrettyCompactMonoBlock",
    )
    return f"{demo}{totals}"


async def play_demo(settings: Settings, tenant_id: str = "demo") -> DemoResult:
    async with ingress_channel(settings) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        started: list[tuple[str, int]] = []
        for channel_kind, locale, texts in CONVERSATIONS:
            start = chat_pb2.StartConversationRequest(
                tenant_id=tenant_id,
                # Client-chosen id: a retried start is idempotent.
                conversation_id=str(uuid.uuid4()),
                channel=channel_kind,
                customer_id=f"cust-{uuid.uuid4().hex[:6]}",
                locale=locale,
            )
            conv = await with_retries(functools.partial(stub.StartConversation, start, timeout=15))
            for text in texts:
                req = chat_pb2.SendMessageRequest(
                    tenant_id=tenant_id,
                    conversation_id=conv.conversation_id,
                    client_message_id=str(uuid.uuid4()),
                    text=text,
                )
                ack = await with_retries(functools.partial(stub.SendMessage, req, timeout=15))
                print(f"  [{locale}] partition {ack.partition} offset {ack.offset:<6} {text}")
            started.append((conv.conversation_id, len(texts)))

        first_id, first_count = started[0]
        # A retry with the same client_message_id is acknowledged once.
        retry = chat_pb2.SendMessageRequest(
            tenant_id=tenant_id, conversation_id=first_id, client_message_id="demo-retry", text="还在吗？"
        )
        a = await with_retries(functools.partial(stub.SendMessage, retry, timeout=15))
        b = await with_retries(functools.partial(stub.SendMessage, retry, timeout=15))
        print(f"  retry of one message: same offset {a.offset} == {b.offset}, duplicate={b.duplicate}")
        started[0] = (first_id, first_count + 1)
        # Garbage is refused with a precise status, and nothing is written.
        try:
            await stub.SendMessage(
                chat_pb2.SendMessageRequest(
                    tenant_id=tenant_id, conversation_id=first_id, client_message_id="x", text=""
                )
            )
        except grpc.aio.AioRpcError as err:
            print(f"  empty text refused: {err.code().name}: {err.details()}")
        close = chat_pb2.CloseConversationRequest(
            tenant_id=tenant_id, conversation_id=started[1][0], resolution="refunded"
        )
        await with_retries(functools.partial(stub.CloseConversation, close, timeout=15))

        # Watch the state catch up (the sessions worker folds the log into Redis).
        deadline = time.monotonic() + 60
        for conversation_id, expected in started:
            while True:
                get = chat_pb2.GetConversationRequest(tenant_id=tenant_id, conversation_id=conversation_id)
                conv = await with_retries(functools.partial(stub.GetConversation, get, timeout=15))
                if conv.message_count >= expected or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            status = chat_pb2.ConversationStatus.Name(conv.status).removeprefix("CONVERSATION_STATUS_")
            last = conv.messages[-1].text if conv.messages else ""
            print(f"  {conversation_id}: {status}, {conv.message_count} messages, last: {last[:30]}")

        updates = stub.StreamConversation(
            chat_pb2.StreamConversationRequest(tenant_id=tenant_id, conversation_id=first_id)
        )
        seen, cursor = 0, ""
        async with asyncio.timeout(30):
            async for update in updates:
                seen, cursor = seen + 1, update.cursor
                if update.message_count >= started[0][1]:
                    break
        updates.cancel()
        print(f"  StreamConversation replayed {seen} updates of {first_id}, live from cursor {cursor}")
    messages = sum(expected for _, expected in started)
    return DemoResult(tenant_id, [c for c, _ in started], events=len(started) + messages + 1)


ASSISTANT_QUESTIONS = (
    "亲，在吗？我的订单到哪了，单号 SB20261130",
    "How long does a refund take after you get my return?",
    "Can I pay with Klarna?",
    "我要人工客服",
)


async def load_demo_faq(settings: Settings, tenant_id: str) -> int:
    """The bilingual shop FAQ for the demo tenant, through KnowledgeService.UpsertDocuments."""
    from switchboard.v1 import knowledge_pb2, knowledge_pb2_grpc

    from streams.knowledge import load_demo_documents

    documents = [
        knowledge_pb2.Document(
            document_id=d.document_id,
            title=d.title,
            body=d.body,
            language=d.language,
            tags=list(d.tags),
            url=d.url,
        )
        for d in load_demo_documents()
    ]
    async with ingress_channel(settings) as channel:
        stub = knowledge_pb2_grpc.KnowledgeServiceStub(channel)
        request = knowledge_pb2.UpsertDocumentsRequest(tenant_id=tenant_id, documents=documents)
        reply = await with_retries(functools.partial(stub.UpsertDocuments, request, timeout=30))
        return len(reply.documents)


async def load_demo_faq_indexed(settings: Settings, tenant_id: str = "demo") -> int:
    """The demo FAQ loaded and indexed by the assistant. Before the chat demo too: the bot answers
    a tenant only once it has a knowledge base, and a new user's first `make run` showed its own
    demo conversations unanswered (trial, twenty-ninth session)."""
    import redis.asyncio as aioredis

    from schemas import hotview as hv

    loaded = await load_demo_faq(settings, tenant_id)
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        deadline = time.monotonic() + RETRY_WITHIN_S
        while await redis.hlen(hv.documents_key(tenant_id)) < loaded:
            if time.monotonic() > deadline:
                raise TimeoutError("the assistant did not index the FAQ (see var/logs/assistant.log)")
            await asyncio.sleep(0.2)
    finally:
        await redis.aclose()
    print(f"  knowledge base: {loaded} FAQ documents indexed for tenant {tenant_id!r}")
    return loaded


async def play_assistant_demo(
    settings: Settings, tenant_id: str = "demo", *, faq_loaded: bool = False
) -> None:
    """Questions in Chinese and English get cited answers; asking for a person hands off."""
    if not faq_loaded:
        await load_demo_faq_indexed(settings, tenant_id)
    async with ingress_channel(settings) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        for question in ASSISTANT_QUESTIONS:
            start = chat_pb2.StartConversationRequest(
                tenant_id=tenant_id, conversation_id=str(uuid.uuid4()), channel=events_pb2.CHANNEL_WEB
            )
            conv = await with_retries(functools.partial(stub.StartConversation, start, timeout=15))
            send = chat_pb2.SendMessageRequest(
                tenant_id=tenant_id,
                conversation_id=conv.conversation_id,
                client_message_id=str(uuid.uuid4()),
                text=question,
            )
            await with_retries(functools.partial(stub.SendMessage, send, timeout=15))
            print(f"\n  customer: {question}")
            follow = stub.StreamConversation(
                chat_pb2.StreamConversationRequest(tenant_id=tenant_id, conversation_id=conv.conversation_id),
                timeout=60,
            )
            async for update in follow:
                kind = update.event.WhichOneof("payload")
                if kind == "intent_classified":
                    i = update.event.intent_classified
                    print(f"  intent:   {i.intent} ({i.confidence:.2f}, {i.stage} stage, {i.language})")
                elif kind == "reply_generated":
                    r = update.event.reply_generated
                    cited = ", ".join(c.document_id for c in r.citations) or "none"
                    print(f"  bot:      {r.text[:160]}{'…' if len(r.text) > 160 else ''}")
                    print(f"            cites {cited}; {r.adapter}, {r.latency_ms} ms")
                    break
                elif kind == "handoff_requested":
                    h = update.event.handoff_requested
                    print(
                        f"  handoff:  to queue {h.queue!r} ({h.reason}); the conversation is in agent mode now"
                    )
                    break
            follow.cancel()
