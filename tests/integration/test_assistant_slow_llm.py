"""A slow model does not stall the assistant: against a real local chat-completions server (SSE)
that takes 2 s per reply, many conversations' replies are in flight at once, each conversation's
replies follow the order of its messages, and no offset is committed before the decisions it
covers are in the log.

The session's assistant runs with the embedded gateway only, so this module stops it and runs its
own assistant process (same consumer group and instance id, so it takes over every partition) with
a gateway setting that routes this module's tenant to the slow server; the shared one is started
again afterwards.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from switchboard.v1 import chat_pb2, chat_pb2_grpc

from services.processes import Child
from tests.conftest import System, events_in_log, eventually, start_conversation
from tests.integration.test_assistant import load_faq

pytestmark = pytest.mark.integration

REPLY_S = 2.0
TOKENS = ["Refunds ", "are ", "handled ", "as ", "described ", "in ", "[1]", "."]
ASSISTANT_GROUP = "switchboard-assistant"


@dataclass
class SlowLLM:
    """Answers every chat-completions request in `REPLY_S` seconds, token by token, and records
    which questions were in flight together."""

    base_url: str = ""
    in_flight: set[str] = field(default_factory=set)
    most_in_flight: int = 0
    # (question, start, end) per request, in arrival order.
    calls: list[tuple[str, float, float]] = field(default_factory=list)
    # Every question ever asked (`calls` is cleared between phases).
    asked: list[str] = field(default_factory=list)
    # A question that arrived while another of its conversation was still being answered.
    overlaps: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        question = str(body["messages"][-1]["content"])
        self.asked.append(question)
        conversation = question.rsplit("#", 1)[-1].split("-")[0]
        if any(q.rsplit("#", 1)[-1].split("-")[0] == conversation for q in self.in_flight):
            self.overlaps.append(question)
        self.in_flight.add(question)
        self.most_in_flight = max(self.most_in_flight, len(self.in_flight))
        started = time.monotonic()
        try:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for token in TOKENS:
                await asyncio.sleep(REPLY_S / len(TOKENS))
                chunk = {"choices": [{"index": 0, "delta": {"content": token}}]}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            self.in_flight.discard(question)
            self.calls.append((question, started, time.monotonic()))


@pytest.fixture(scope="module")
async def slow_llm() -> AsyncIterator[SlowLLM]:
    server = SlowLLM()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.base_url = f"http://{host}:{port}/v1"
    try:
        yield server
    finally:
        await runner.cleanup()


HANDOFF_THEN_QUESTION = ("我要人工客服", "how long does a refund take? #handoff-2")


@dataclass(frozen=True)
class SlowTenant:
    tenant: str
    # A conversation whose "我要人工客服" and next question wait in the log for the assistant.
    handed_off: str
    handed_off_messages: list[str]


@pytest.fixture(scope="module")
async def slow_tenant(system: System, slow_llm: SlowLLM) -> AsyncIterator[SlowTenant]:
    """A tenant with the demo FAQ whose replies come from the slow server, served by an assistant
    process of this module's own."""
    tenant = f"slow{uuid.uuid4().hex[:8]}"
    await load_faq(system, tenant)
    gateway = {
        "adapters": [
            {
                "name": "slow",
                "base_url": slow_llm.base_url,
                "model": "slow-test-model",
                "timeout_s": 30,
                "first_token_timeout_s": 10,
                "max_retries": 0,
            }
        ],
        "routes": [{"tenants": [tenant], "chain": ["slow"]}],
    }
    shared = system.children["assistant"]
    own = Child(
        "assistant-slow-llm",
        shared.args,
        system.settings.data_dir / "logs" / "assistant-slow-llm.log",
        {**system.env, "SWITCHBOARD_GATEWAY": json.dumps(gateway)},
    )
    await asyncio.to_thread(shared.stop)
    # While no assistant runs: a conversation whose first message asks for a person and whose
    # second follows at once, so the assistant finds both in one batch.
    async with grpc.aio.insecure_channel(system.settings.grpc_listen) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        cid = await start_conversation(stub, tenant)
        acks = [await send(stub, tenant, cid, f"h{n}", text) for n, text in enumerate(HANDOFF_THEN_QUESTION)]
    own.start()
    try:
        yield SlowTenant(tenant, cid, [a.event_id for a in acks])
    finally:
        await asyncio.to_thread(own.stop)
        shared.start()


async def send(
    stub: chat_pb2_grpc.ChatServiceStub, tenant: str, cid: str, client_id: str, text: str
) -> chat_pb2.SendMessageResponse:
    return await stub.SendMessage(
        chat_pb2.SendMessageRequest(
            tenant_id=tenant, conversation_id=cid, client_message_id=client_id, text=text
        )
    )


async def bot_replies(stub: chat_pb2_grpc.ChatServiceStub, tenant: str, cid: str) -> list[str]:
    conv = await stub.GetConversation(chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=cid))
    return [m.text for m in conv.messages if m.sender == 2]


class CommitWatch:
    """Samples the assistant group's committed offsets, each followed by the log end offsets: a
    decision that was durable before its message's offset was committed sits below that end."""

    def __init__(self, system: System) -> None:
        self._settings = system.settings
        self.samples: list[tuple[dict[int, int], dict[int, int]]] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        topic = self._settings.conversation_topic
        admin = AIOKafkaAdminClient(bootstrap_servers=self._settings.kafka_bootstrap)
        ends_client = AIOKafkaConsumer(bootstrap_servers=self._settings.kafka_bootstrap)
        await admin.start()
        await ends_client.start()
        try:
            partitions = [TopicPartition(topic, p) for p in range(self._settings.topic_partitions)]
            while not self._stop.is_set():
                offsets = await admin.list_consumer_group_offsets(ASSISTANT_GROUP)
                committed = {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}
                ends = await ends_client.end_offsets(partitions)
                self.samples.append((committed, {tp.partition: int(o) for tp, o in ends.items()}))
                await asyncio.sleep(0.05)
        finally:
            await ends_client.stop()
            await admin.close()

    def stop(self) -> None:
        self._stop.set()


async def decision_offsets(system: System, tenant: str) -> dict[str, dict[str, tuple[int, int]]]:
    """message event id → {"intent" | "reply" | "handoff": (partition, offset)} for `tenant`, read
    from the log."""
    names = {"intent_classified": "intent", "reply_generated": "reply", "handoff_requested": "handoff"}
    found: dict[str, dict[str, tuple[int, int]]] = {}
    for partition, offset, event in await events_in_log(system.settings):
        kind = event.WhichOneof("payload")
        if event.tenant_id == tenant and kind in names:
            message = getattr(event, kind).message_event_id
            found.setdefault(message, {})[names[kind]] = (partition, offset)
    return found


QUESTIONS = ("how long does a refund take? #{c}-1", "how long does a refund take to arrive? #{c}-2")


@pytest.mark.timeout(600)
async def test_a_slow_model_answers_many_conversations_at_once_in_order_and_commits_after_durable(
    system: System, stub: chat_pb2_grpc.ChatServiceStub, slow_llm: SlowLLM, slow_tenant: SlowTenant
) -> None:
    tenant = slow_tenant.tenant
    # Warm-up: the module's assistant has loaded its models and knowledge base and answers.
    warm = await start_conversation(stub, tenant)
    await send(stub, tenant, warm, "w", "how long does a refund take? #warm-1")
    await eventually(
        lambda: bot_replies(stub, tenant, warm), lambda r: len(r) == 1, within_s=240, what="the warm-up reply"
    )
    assert slow_llm.calls, "the warm-up reply did not come from the slow server"

    n = 40
    conversations = [await start_conversation(stub, tenant) for _ in range(n)]
    watch = CommitWatch(system)
    watching = asyncio.create_task(watch.run())
    slow_llm.calls.clear()
    started = time.monotonic()

    async def converse(i: int, cid: str) -> list[chat_pb2.SendMessageResponse]:
        # Both messages at once: the second arrives while the first is being answered.
        return [await send(stub, tenant, cid, f"m{k}", q.format(c=i)) for k, q in enumerate(QUESTIONS, 1)]

    acks = await asyncio.gather(*(converse(i, cid) for i, cid in enumerate(conversations)))
    replies = await asyncio.gather(
        *(
            eventually(
                lambda cid=cid: bot_replies(stub, tenant, cid),  # type: ignore[misc]
                lambda r: len(r) == 2,
                within_s=120,
                what=f"two replies in {cid}",
            )
            for cid in conversations
        )
    )
    elapsed = time.monotonic() - started
    # The decisions of the last reply are in the log once GetConversation shows it; a last commit
    # sample after that shows the group's final position.
    await asyncio.sleep(0.3)
    watch.stop()
    await watching

    # 80 replies of 2 s each, two per conversation in order: 160 s one at a time, 4 s at best.
    assert elapsed < 30, f"80 slow replies took {elapsed:.1f}s"
    assert slow_llm.most_in_flight >= 10, f"at most {slow_llm.most_in_flight} replies were in flight at once"
    assert len(slow_llm.calls) == 2 * n
    # Per conversation, the second question went to the model only after the first was answered.
    assert slow_llm.overlaps == []
    assert all(len(texts) == 2 and all(texts) for texts in replies)
    order: dict[str, list[str]] = {}
    for question, _, _ in sorted(slow_llm.calls, key=lambda c: c[1]):
        order.setdefault(question.rsplit("#", 1)[-1].split("-")[0], []).append(question)
    assert all(qs == [q.format(c=c) for q in QUESTIONS] for c, qs in order.items() if c != "warm"), order

    # Every message has its intent and reply in the log, the reply after the intent, and the
    # second message's reply after the first's.
    decisions = await decision_offsets(system, tenant)
    for pair in acks:
        first, second = (decisions[a.event_id] for a in pair)
        assert set(first) == set(second) == {"intent", "reply"}
        assert first["intent"][1] < first["reply"][1] < second["reply"][1]
        assert second["intent"][1] < second["reply"][1]

    # Commits: whenever a message's offset was committed, its decisions were already in the log.
    messages = [(a.partition, a.offset, a.event_id) for pair in acks for a in pair]
    checked = 0
    for committed, ends in watch.samples:
        for partition, offset, event_id in messages:
            if committed.get(partition, -1) > offset:
                for where in decisions[event_id].values():
                    assert where[1] < ends[where[0]], (
                        f"offset {offset} of partition {partition} was committed before its decision "
                        f"at {where} was in the log (end then {ends[where[0]]})"
                    )
                checked += 1
    assert checked > 0, "no commit was seen while the replies were generated"
    # ...and while replies were in flight, their messages were not committed yet.
    assert any(
        any(committed.get(p, -1) <= o for p, o, _ in messages)
        and any(committed.get(p, -1) > o for p, o, _ in messages)
        for committed, _ in watch.samples
    ), "never saw a state with some messages committed and others still pending"


@pytest.mark.timeout(300)
async def test_a_question_in_the_batch_after_a_handoff_is_left_to_the_agents(
    system: System, stub: chat_pb2_grpc.ChatServiceStub, slow_llm: SlowLLM, slow_tenant: SlowTenant
) -> None:
    tenant, cid = slow_tenant.tenant, slow_tenant.handed_off
    conv = await eventually(
        lambda: stub.GetConversation(chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=cid)),
        lambda c: c.mode == chat_pb2.CONVERSATION_MODE_AGENT,
        within_s=240,
        what="the handoff",
    )
    # A later conversation's reply shows the assistant is past the handoff's batch.
    later = await start_conversation(stub, tenant)
    await send(stub, tenant, later, "l1", "how long does a refund take? #later-1")
    await eventually(lambda: bot_replies(stub, tenant, later), lambda r: len(r) == 1, within_s=120)
    conv = await stub.GetConversation(chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=cid))
    assert [m.sender for m in conv.messages if m.sender == 2] == []
    assert not [q for q in slow_llm.asked if "#handoff" in q]
    decisions = await decision_offsets(system, tenant)
    first, second = slow_tenant.handed_off_messages
    assert set(decisions[first]) == {"intent", "handoff"}
    assert second not in decisions, f"the question after the handoff got decisions: {decisions[second]}"
