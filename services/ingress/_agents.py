"""AgentService: the human side of a handoff. Queues and states are read from the Redis hot view
(the sessions worker keeps them); every change is an event written through the write path.

Exactly one agent wins a waiting conversation: the winner is whoever sets the accept key of the
conversation's current handoff first (SET NX GET, one Redis step), so two ingress replicas racing
agree. A retry by the winner is answered from the same key; the key expires if its event never
lands (the process died), so a conversation cannot be stuck with an agent who never got it."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

import grpc
import redis.asyncio as aioredis
from google.protobuf.timestamp_pb2 import Timestamp
from switchboard.v1 import agent_pb2, chat_pb2, events_pb2

from schemas import hotview as hv
from schemas.events import new_event
from schemas.hotview import accept_key
from services.ingress import _validation as v
from services.ingress._hotview import CLAIM_TTL_S, IngressHotView, Registration, rebuilding
from services.ingress._producer import Unavailable
from services.ingress._reads import ConversationReads
from services.ingress._writes import ConversationWrites, ack_response
from services.settings import Settings
from streams.sessions import MODE_AGENT, STATUS_CLOSED, ConversationState

DEFAULT_QUEUE_LIMIT = 50
MAX_QUEUE_LIMIT = 500


def queue_pattern(tenant_id: str) -> str:
    # Tenant ids have no glob characters (see _validation), so the tenant matches literally.
    return hv.queue_key(tenant_id, "*")


def queue_of_key(tenant_id: str, key: str) -> str:
    return key[len(hv.queue_key(tenant_id, "")) :]


@dataclass(frozen=True, slots=True)
class Waiting:
    conversation_id: str
    queue: str
    since_ns: int


def oldest_first(waiting: list[Waiting], limit: int) -> list[Waiting]:
    return sorted(waiting, key=lambda w: (w.since_ns, w.conversation_id))[:limit]


def state_of(reg: Registration) -> ConversationState | None:
    return ConversationState.from_json(json.loads(reg.state_json)) if reg.state_json else None


def holder(state: ConversationState | None, accepted_by: str) -> str:
    """Who holds the conversation: the folded assignee, or the winner of the current handoff's
    accept whose AgentAssigned the worker has not folded yet."""
    if state is None or state.mode != MODE_AGENT:
        return ""
    if state.assignee:
        return state.assignee
    return accepted_by


def refuse_accept(state: ConversationState | None, conversation_id: str, agent_id: str) -> None:
    """Why `agent_id` cannot accept the conversation as folded, if it cannot; pure."""
    if state is None or state.mode != MODE_AGENT:
        raise v.RequestRejected(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"conversation {conversation_id!r} is not waiting for an agent (the bot is answering it)",
        )
    if state.assignee and state.assignee != agent_id:
        raise already_accepted(conversation_id, state.assignee)
    if not state.assignee and not state.queue:
        raise v.RequestRejected(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"conversation {conversation_id!r} is not waiting in a queue",
        )


def already_accepted(conversation_id: str, agent_id: str) -> v.RequestRejected:
    return v.RequestRejected(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"conversation {conversation_id!r} was already accepted by {agent_id!r}",
    )


class AgentService:
    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        hot: IngressHotView,
        reads: ConversationReads,
        writes: ConversationWrites,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._hot = hot
        self._reads = reads
        self._writes = writes

    # ------------------------------------------------------------------ queues

    async def list_queue(self, req: agent_pb2.ListQueueRequest) -> agent_pb2.ListQueueResponse:
        v.check_tenant(req.tenant_id, self._settings.allowed_tenants)
        if req.queue:
            v.check_queue(req.queue)
        if req.limit > MAX_QUEUE_LIMIT:
            raise v.invalid(f"limit is {req.limit}; at most {MAX_QUEUE_LIMIT}")
        limit = req.limit or DEFAULT_QUEUE_LIMIT
        if req.queue:
            keys = [hv.queue_key(req.tenant_id, req.queue)]
        else:
            keys = sorted(
                {
                    (k.decode() if isinstance(k, bytes) else str(k))
                    async for k in self._redis.scan_iter(match=queue_pattern(req.tenant_id), count=500)
                }
            )
        waiting: list[Waiting] = []
        for key in keys:
            queue = queue_of_key(req.tenant_id, key)
            rows: Any = await self._redis.zrange(key, 0, limit - 1, withscores=True)
            waiting.extend(Waiting(member.decode(), queue, int(score)) for member, score in rows)
        chosen = oldest_first(waiting, limit)
        states: list[Any] = []
        if chosen:
            async with self._redis.pipeline(transaction=False) as pipe:
                for w in chosen:
                    pipe.hget(hv.conversation_key(req.tenant_id, w.conversation_id), hv.F_STATE)
                states = await pipe.execute()
        response = agent_pb2.ListQueueResponse()
        for w, raw in zip(chosen, states, strict=True):
            state = ConversationState.from_json(json.loads(raw)) if raw else None
            since = Timestamp()
            since.FromNanoseconds(w.since_ns)
            response.conversations.append(
                agent_pb2.QueuedConversation(
                    conversation_id=w.conversation_id,
                    queue=w.queue,
                    reason=state.handoff_reason if state is not None else "",
                    waiting_since=since,
                )
            )
        return response

    # ------------------------------------------------------------------ accept

    async def accept_conversation(
        self, req: agent_pb2.AcceptConversationRequest, traceparent: str = ""
    ) -> chat_pb2.Conversation:
        v.check_tenant(req.tenant_id, self._settings.allowed_tenants)
        v.check_conversation_id(req.conversation_id)
        v.check_agent_id(req.agent_id)
        state = await self._open_state(req.tenant_id, req.conversation_id)
        refuse_accept(state, req.conversation_id, req.agent_id)
        assert state is not None
        if state.assignee == req.agent_id:
            return await self._view(req.tenant_id, req.conversation_id, assignee=req.agent_id)
        if not await self._hot.is_ready(self._settings.topic_partitions):
            raise rebuilding()
        key = accept_key(req.tenant_id, req.conversation_id, state.handoff_count)
        previous = await self._redis.set(key, req.agent_id, nx=True, get=True, ex=CLAIM_TTL_S)
        if previous is not None:
            winner = previous.decode() if isinstance(previous, bytes) else str(previous)
            if winner != req.agent_id:
                raise already_accepted(req.conversation_id, winner)
            # This agent's earlier attempt won; writing AgentAssigned again is harmless (the fold
            # sets the same assignee) and covers an attempt that died before Kafka had it.
        event = new_event(
            req.tenant_id,
            req.conversation_id,
            traceparent=traceparent,
            agent_assigned=events_pb2.AgentAssigned(agent_id=req.agent_id, queue=state.queue),
        )
        try:
            await self._writes.publish(event)
        except Unavailable as exc:
            if not exc.late_possible:
                # Nothing landed: let any agent (this one on retry) accept it again.
                await _delete_if(self._redis, key, req.agent_id)
            raise
        except v.RequestRejected as exc:
            if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                await _delete_if(self._redis, key, req.agent_id)
            raise
        await self._redis.expire(key, self._settings.idempotency_ttl_s)
        return await self._view(req.tenant_id, req.conversation_id, assignee=req.agent_id)

    # ------------------------------------------------------------------ the assignee's actions

    async def send_agent_message(
        self, req: agent_pb2.SendAgentMessageRequest, traceparent: str = ""
    ) -> chat_pb2.SendMessageResponse:
        v.check_tenant(req.tenant_id, self._settings.allowed_tenants)
        v.check_conversation_id(req.conversation_id)
        v.check_agent_id(req.agent_id)
        v.check_client_message_id(req.client_message_id)
        v.check_text(req.text, self._settings.max_message_bytes)
        await self._require_holder(req.tenant_id, req.conversation_id, req.agent_id)
        event = new_event(
            req.tenant_id,
            req.conversation_id,
            traceparent=traceparent,
            agent_message_sent=events_pb2.AgentMessageSent(
                agent_id=req.agent_id, client_message_id=req.client_message_id, text=req.text
            ),
        )
        # Claimed in the agents' own client_message_id space (hv.agent_claim): the fold dedups
        # and the sessions worker rebuilds agent claims under the same key.
        ack, duplicate = await self._writes.publish_claimed(
            event, (req.tenant_id, req.conversation_id, hv.agent_claim(req.client_message_id))
        )
        return ack_response(req, ack, duplicate)

    async def transfer_conversation(
        self, req: agent_pb2.TransferConversationRequest, traceparent: str = ""
    ) -> chat_pb2.Conversation:
        v.check_tenant(req.tenant_id, self._settings.allowed_tenants)
        v.check_conversation_id(req.conversation_id)
        v.check_agent_id(req.agent_id)
        if bool(req.to_agent_id) == bool(req.to_queue):
            raise v.invalid(
                "set exactly one of to_agent_id (another agent) or to_queue (wait in a queue again)"
            )
        if req.to_agent_id:
            v.check_agent_id(req.to_agent_id, "to_agent_id")
            if req.to_agent_id == req.agent_id:
                raise v.invalid(f"to_agent_id {req.to_agent_id!r} already holds the conversation")
        else:
            v.check_queue(req.to_queue, "to_queue")
        state = await self._require_holder(req.tenant_id, req.conversation_id, req.agent_id)
        if req.to_agent_id:
            event = new_event(
                req.tenant_id,
                req.conversation_id,
                traceparent=traceparent,
                agent_assigned=events_pb2.AgentAssigned(
                    agent_id=req.to_agent_id, queue=state.queue, previous_agent_id=req.agent_id
                ),
            )
            await self._writes.publish(event)
            return await self._view(req.tenant_id, req.conversation_id, assignee=req.to_agent_id)
        event = new_event(
            req.tenant_id,
            req.conversation_id,
            traceparent=traceparent,
            handoff_requested=events_pb2.HandoffRequested(reason="transfer", queue=req.to_queue),
        )
        await self._writes.publish(event)
        return await self._view(req.tenant_id, req.conversation_id, assignee="")

    async def return_to_bot(
        self, req: agent_pb2.ReturnToBotRequest, traceparent: str = ""
    ) -> chat_pb2.Conversation:
        v.check_tenant(req.tenant_id, self._settings.allowed_tenants)
        v.check_conversation_id(req.conversation_id)
        v.check_agent_id(req.agent_id)
        await self._require_holder(req.tenant_id, req.conversation_id, req.agent_id)
        event = new_event(
            req.tenant_id,
            req.conversation_id,
            traceparent=traceparent,
            returned_to_bot=events_pb2.ReturnedToBot(agent_id=req.agent_id),
        )
        await self._writes.publish(event)
        return await self._view(
            req.tenant_id, req.conversation_id, assignee="", mode=chat_pb2.CONVERSATION_MODE_BOT
        )

    # ------------------------------------------------------------------ helpers

    async def _open_state(self, tenant_id: str, conversation_id: str) -> ConversationState | None:
        # Erased: said so, as to the customer's writes (the hot view would only say NOT_FOUND).
        await self._writes.refuse_if_erased(tenant_id, conversation_id)
        reg = await self._reads.require(tenant_id, conversation_id)
        state = state_of(reg)
        if reg.closed_ns or (state is not None and state.status == STATUS_CLOSED):
            raise v.RequestRejected(
                grpc.StatusCode.FAILED_PRECONDITION, f"conversation {conversation_id!r} is closed"
            )
        return state

    async def _require_holder(self, tenant_id: str, conversation_id: str, agent_id: str) -> ConversationState:
        state = await self._open_state(tenant_id, conversation_id)
        if state is None or state.mode != MODE_AGENT:
            raise v.RequestRejected(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"conversation {conversation_id!r} is not in agent mode (the bot is answering it)",
            )
        accepted_by = ""
        if not state.assignee:
            raw = await self._redis.get(accept_key(tenant_id, conversation_id, state.handoff_count))
            accepted_by = raw.decode() if isinstance(raw, bytes) else (raw or "")
        current = holder(state, accepted_by)
        if current != agent_id:
            raise v.RequestRejected(
                grpc.StatusCode.PERMISSION_DENIED,
                f"agent {agent_id!r} does not hold conversation {conversation_id!r} "
                + (
                    f"(it is assigned to {current!r})"
                    if current
                    else "(nobody accepted it yet: AcceptConversation)"
                ),
            )
        return state

    async def _view(
        self,
        tenant_id: str,
        conversation_id: str,
        *,
        assignee: str,
        mode: int = chat_pb2.CONVERSATION_MODE_AGENT,
    ) -> chat_pb2.Conversation:
        """The conversation as GetConversation shows it, with the change just made folded in (the
        sessions worker may not have applied the event yet)."""
        view = await self._reads.read(tenant_id, conversation_id)
        view.assignee = assignee
        view.mode = mode  # type: ignore[assignment]
        return view


async def _delete_if(redis: aioredis.Redis, key: str, value: str) -> None:
    """Drop the accept key if it still names `value` (best effort: it expires anyway)."""
    with contextlib.suppress(Exception):
        current = await redis.get(key)
        if current is not None and (current.decode() if isinstance(current, bytes) else current) == value:
            await redis.delete(key)
