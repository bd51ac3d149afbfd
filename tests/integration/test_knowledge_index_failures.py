"""A document whose indexing fails is retried, and one that keeps failing does not block the
others and is reported (real Kafka and Redis; the failures are induced in the knowledge base).

The follower indexed a tenant's documents in turns and, when a turn raised (the encoder failing
on a loaded machine, or one document the tokenizer chokes on), logged it and wrote the turn's
documents to the documents hash anyway: ListDocuments/GetDocument showed them, SearchKnowledge
and the bot never found them, and nothing retried them until the assistant restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterable

import grpc
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from switchboard.v1 import knowledge_pb2

from schemas import hotview as hv
from services.ingress._knowledge import KnowledgeService, record_key, upserted
from services.ingress._validation import RequestRejected
from services.settings import Settings
from streams.assistant._worker import KnowledgeFollower
from streams.knowledge import Document, KnowledgeBase
from tests.conftest import eventually
from tests.integration.knowledge_rig import cancel_quietly, knowledge_topic

pytestmark = pytest.mark.integration

POISON = "<<the tokenizer chokes on this>>"


class FlakyKnowledgeBase(KnowledgeBase):
    """Indexing fails its first `failures` calls (the encoder's allocation failing under load), and
    always for a batch holding a poison document."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__()
        self.failures = failures

    def upsert(self, tenant_id: str, documents: Iterable[Document]) -> int:
        batch = list(documents)
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("onnxruntime: failed to allocate memory for the batch")
        for d in batch:
            if POISON in d.body:
                raise ValueError(f"cannot tokenize document {d.document_id}")
        return super().upsert(tenant_id, batch)


async def _send(producer: AIOKafkaProducer, topic: str, tenant: str, document_id: str, body: str) -> None:
    doc = knowledge_pb2.Document(
        document_id=document_id, title=f"About {document_id}", body=body, language="en"
    )
    await (
        await producer.send(
            topic, key=record_key(tenant, document_id), value=upserted(tenant, doc).SerializeToString()
        )
    )


@contextlib.asynccontextmanager
async def following(
    local_stack: Settings,
    knowledge: KnowledgeBase,
    produce_first: list[tuple[str, str]] = (),  # type: ignore[assignment]
) -> AsyncIterator[tuple[KnowledgeFollower, AIOKafkaProducer, aioredis.Redis, Settings, str]]:
    tenant = f"kf{uuid.uuid4().hex[:8]}"
    async with knowledge_topic(local_stack) as (settings, producer, redis):
        follower = KnowledgeFollower(settings, knowledge, redis, retry_delay_s=0.05, report_after=3)
        task = None
        try:
            for document_id, body in produce_first:
                await _send(producer, settings.knowledge_topic, tenant, document_id, body)
            task = asyncio.create_task(follower.run())
            await asyncio.wait_for(follower.ready.wait(), 30)
            yield follower, producer, redis, settings, tenant
        finally:
            await cancel_quietly(task)


async def _keys(redis: aioredis.Redis, key: str) -> set[str]:
    return {k.decode() if isinstance(k, bytes) else k for k in await redis.hkeys(key)}


async def _listed(redis: aioredis.Redis, tenant: str) -> set[str]:
    return await _keys(redis, hv.documents_key(tenant))


@pytest.mark.timeout(120)
async def test_documents_of_a_turn_that_failed_once_are_indexed_on_a_retry(local_stack: Settings) -> None:
    knowledge = FlakyKnowledgeBase(failures=1)
    async with following(local_stack, knowledge) as (follower, producer, redis, settings, tenant):
        for i in range(3):
            await _send(
                producer, settings.knowledge_topic, tenant, f"doc-{i}", f"Parcel {i} ships in 2 days."
            )
        wanted = {f"doc-{i}" for i in range(3)}

        async def searchable() -> set[str]:
            return (
                {d.document_id for d in knowledge.index(tenant).documents()} if knowledge.tenants() else set()
            )

        await eventually(
            searchable, lambda s: s == wanted, within_s=30, what="the documents indexed on a retry"
        )
        assert await _listed(redis, tenant) == wanted
        assert knowledge.failures == 0  # the failure did happen
        assert follower.failed == 0 and follower.held == 0
        assert knowledge.search(tenant, "when does parcel 1 ship", 3)[0].document_id == "doc-1"


@pytest.mark.timeout(120)
async def test_a_poison_document_does_not_block_the_others_and_is_reported(local_stack: Settings) -> None:
    knowledge = FlakyKnowledgeBase()
    start_up = [
        ("good-1", "Refunds take 5 days."),
        ("bad", f"Returns {POISON}"),
        ("good-2", "We ship to Macau."),
    ]
    # The poison document is in the start-up read: the follower still becomes ready.
    async with following(local_stack, knowledge, start_up) as (follower, producer, redis, settings, tenant):

        async def state() -> tuple[set[str], set[str], set[str]]:
            indexed = {d.document_id for d in knowledge.index(tenant).documents()}
            failed = await _keys(redis, hv.failed_documents_key(tenant))
            return indexed, await _listed(redis, tenant), failed

        indexed, listed, _ = await eventually(
            state, lambda s: s[2] == {"bad"}, within_s=30, what="the poison document reported"
        )
        assert indexed == listed == {"good-1", "good-2"}
        assert follower.failed == 1
        raw = await redis.hget(hv.failed_documents_key(tenant), "bad")
        assert raw is not None
        report = json.loads(raw)
        assert "cannot tokenize document bad" in report["error"] and report["attempts"] >= 3

        # GetDocument says why it is not there instead of "not indexed yet".
        service = KnowledgeService(settings, redis)
        with pytest.raises(RequestRejected) as rejected:
            await service.get_document(knowledge_pb2.GetDocumentRequest(tenant_id=tenant, document_id="bad"))
        assert rejected.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert (
            "could not be indexed" in rejected.value.message and "cannot tokenize" in rejected.value.message
        )

        # Fixed and upserted again: indexed, listed, and no longer reported.
        await _send(producer, settings.knowledge_topic, tenant, "bad", "Returns are free within 30 days.")
        await eventually(
            state,
            lambda s: s == ({"good-1", "good-2", "bad"}, {"good-1", "good-2", "bad"}, set()),
            within_s=30,
            what="the fixed document indexed and its report cleared",
        )
