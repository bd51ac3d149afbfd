"""A synthetic, mixed conversation workload with every event type, for the replay and archive
tests and the replay benchmark. Pure: it builds events; the caller produces them."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator

from switchboard.v1 import events_pb2

from schemas.events import Event, new_event

_CHANNELS = [
    events_pb2.CHANNEL_WEB,
    events_pb2.CHANNEL_IOS,
    events_pb2.CHANNEL_WECHAT,
    events_pb2.CHANNEL_EMAIL,
]
_QUESTIONS = [
    ("zh", "亲，我的订单到哪了？单号 SB20261130", "order_status"),
    ("zh", "退款多久能到账？", "refund"),
    ("en", "how long does a refund take?", "refund"),
    ("en", "I want to change my shipping address", "shipping"),
]


def conversation_events(
    tenant: str, rng: random.Random, conversation_id: str | None = None
) -> Iterator[Event]:
    """One conversation: start, customer messages with intents and bot replies, sometimes a
    handoff with an agent (assignment, agent message, return to the bot), a close and a rating."""
    cid = conversation_id or f"c-{uuid.UUID(int=rng.getrandbits(128)).hex[:16]}"
    language, text, intent = rng.choice(_QUESTIONS)
    yield new_event(
        tenant,
        cid,
        conversation_started=events_pb2.ConversationStarted(
            channel=rng.choice(_CHANNELS), customer_id=f"cust-{rng.randint(1, 500)}", locale=language
        ),
    )
    for turn in range(rng.randint(1, 3)):
        message = new_event(
            tenant,
            cid,
            message_received=events_pb2.MessageReceived(
                client_message_id=f"m{turn}", text=f"{text} ({turn})", sender=events_pb2.SENDER_CUSTOMER
            ),
        )
        yield message
        yield new_event(
            tenant,
            cid,
            causation_id=message.event_id,
            intent_classified=events_pb2.IntentClassified(
                message_event_id=message.event_id,
                intent=intent,
                confidence=round(rng.uniform(0.5, 0.99), 3),
                model="cascade",
                stage=rng.choice(["ngram", "encoder"]),
                model_version="v1",
                language=language,
            ),
        )
        yield new_event(
            tenant,
            cid,
            causation_id=message.event_id,
            reply_generated=events_pb2.ReplyGenerated(
                message_event_id=message.event_id,
                text=f"answer about {intent}",
                model="template",
                adapter="template",
                citations=[events_pb2.Citation(document_id=f"{language}-{intent}", chunk_id="0", score=0.8)],
                latency_ms=rng.randint(5, 900),
                first_token_ms=rng.randint(1, 50),
                prompt_tokens=rng.randint(50, 400),
                completion_tokens=rng.randint(10, 200),
                language=language,
                grounded=True,
                reply_id=f"r-{message.event_id}",
                intent=intent,
            ),
        )
    if rng.random() < 0.4:
        ask = new_event(
            tenant,
            cid,
            message_received=events_pb2.MessageReceived(
                client_message_id="human", text="我要人工客服", sender=events_pb2.SENDER_CUSTOMER
            ),
        )
        yield ask
        yield new_event(
            tenant,
            cid,
            causation_id=ask.event_id,
            handoff_requested=events_pb2.HandoffRequested(
                reason="customer_asked", queue="general", message_event_id=ask.event_id
            ),
        )
        agent = f"agent-{rng.randint(1, 9)}"
        yield new_event(tenant, cid, agent_assigned=events_pb2.AgentAssigned(agent_id=agent, queue="general"))
        yield new_event(
            tenant,
            cid,
            agent_message_sent=events_pb2.AgentMessageSent(
                agent_id=agent, client_message_id="a1", text="您好，我来处理"
            ),
        )
        if rng.random() < 0.5:
            yield new_event(tenant, cid, returned_to_bot=events_pb2.ReturnedToBot(agent_id=agent))
    if rng.random() < 0.8:
        yield new_event(
            tenant,
            cid,
            conversation_closed=events_pb2.ConversationClosed(
                resolution="resolved", closed_by=events_pb2.SENDER_CUSTOMER
            ),
        )
        if rng.random() < 0.6:
            yield new_event(
                tenant, cid, csat_rated=events_pb2.CsatRated(score=rng.randint(1, 5), comment="谢谢")
            )


def mixed_workload(tenant: str, conversations: int, seed: int = 1) -> list[Event]:
    """Conversations interleaved round-robin (as concurrent traffic is), each in its own order."""
    rng = random.Random(seed)
    streams = [list(conversation_events(tenant, rng)) for _ in range(conversations)]
    out: list[Event] = []
    depth = max((len(s) for s in streams), default=0)
    for i in range(depth):
        out.extend(s[i] for s in streams if i < len(s))
    return out
