"""KnowledgeService through the ingress on the real stack: upserts land on knowledge-events
(acknowledged with their partition/offset), the assistant's documents hash serves Get/List,
deletes remove, and search is forwarded to the assistant."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from switchboard.v1 import knowledge_pb2, knowledge_pb2_grpc

from tests.conftest import System, eventually

pytestmark = pytest.mark.integration


@pytest.fixture
async def knowledge(system: System) -> AsyncIterator[knowledge_pb2_grpc.KnowledgeServiceStub]:
    async with grpc.aio.insecure_channel(system.settings.grpc_listen) as channel:
        yield knowledge_pb2_grpc.KnowledgeServiceStub(channel)


async def record_at(
    system: System, partition: int, offset: int
) -> tuple[bytes, knowledge_pb2.KnowledgeEvent]:
    consumer = AIOKafkaConsumer(bootstrap_servers=system.settings.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(system.settings.knowledge_topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        record = await consumer.getone()
        assert record.offset == offset
        event = knowledge_pb2.KnowledgeEvent()
        event.ParseFromString(record.value)
        return record.key, event
    finally:
        await consumer.stop()


def faq(document_id: str, body: str, **fields: Any) -> knowledge_pb2.Document:
    return knowledge_pb2.Document(
        document_id=document_id, title=f"title of {document_id}", body=body, **fields
    )


@pytest.mark.timeout(240)
async def test_upsert_is_acknowledged_after_kafka_has_it(
    system: System, knowledge: knowledge_pb2_grpc.KnowledgeServiceStub, tenant: str
) -> None:
    reply = await knowledge.UpsertDocuments(
        knowledge_pb2.UpsertDocumentsRequest(
            tenant_id=tenant,
            documents=[faq("faq/refund", "退款会在 3 个工作日内原路退回。", language="zh", tags=["refund"])],
        )
    )
    (ack,) = reply.documents
    assert ack.document_id == "faq/refund"
    key, event = await record_at(system, ack.partition, ack.offset)
    assert key == f"{tenant}/faq/refund".encode()
    assert event.tenant_id == tenant and event.document_upserted.body.startswith("退款")
    assert event.document_upserted.tags == ["refund"] and event.document_upserted.updated_at.seconds > 0

    deleted = await knowledge.DeleteDocument(
        knowledge_pb2.DeleteDocumentRequest(tenant_id=tenant, document_id="faq/refund")
    )
    key, event = await record_at(system, deleted.ack.partition, deleted.ack.offset)
    assert key == f"{tenant}/faq/refund".encode() and event.document_deleted == "faq/refund"


@pytest.mark.timeout(240)
async def test_documents_are_readable_listed_in_pages_and_deleted(
    system: System, knowledge: knowledge_pb2_grpc.KnowledgeServiceStub, tenant: str
) -> None:
    ids = [f"doc-{i}" for i in range(5)]
    await knowledge.UpsertDocuments(
        knowledge_pb2.UpsertDocumentsRequest(
            tenant_id=tenant,
            documents=[faq(d, f"Body of {d}: returns within 30 days.") for d in reversed(ids)],
        )
    )

    async def get(document_id: str) -> knowledge_pb2.Document | grpc.StatusCode:
        try:
            return await knowledge.GetDocument(
                knowledge_pb2.GetDocumentRequest(tenant_id=tenant, document_id=document_id)
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()

    # The assistant folds knowledge-events into the documents hash (within seconds).
    got = await eventually(
        lambda: get("doc-4"), lambda d: isinstance(d, knowledge_pb2.Document), within_s=120
    )
    assert isinstance(got, knowledge_pb2.Document) and got.body == "Body of doc-4: returns within 30 days."
    await eventually(
        lambda: knowledge.ListDocuments(knowledge_pb2.ListDocumentsRequest(tenant_id=tenant, page_size=100)),
        lambda r: len(r.documents) == 5,
        within_s=60,
    )
    seen: list[str] = []
    token = ""
    while True:
        page = await knowledge.ListDocuments(
            knowledge_pb2.ListDocumentsRequest(tenant_id=tenant, page_size=2, page_token=token)
        )
        seen += [d.document_id for d in page.documents]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids

    assert await get("no-such-doc") == grpc.StatusCode.NOT_FOUND
    # Another tenant sees nothing of these.
    other = await knowledge.ListDocuments(knowledge_pb2.ListDocumentsRequest(tenant_id=tenant + "x"))
    assert list(other.documents) == []

    await knowledge.DeleteDocument(knowledge_pb2.DeleteDocumentRequest(tenant_id=tenant, document_id="doc-0"))
    await eventually(lambda: get("doc-0"), lambda d: d == grpc.StatusCode.NOT_FOUND, within_s=60)


@pytest.mark.timeout(240)
async def test_search_is_answered_by_the_assistant(
    system: System, knowledge: knowledge_pb2_grpc.KnowledgeServiceStub, tenant: str
) -> None:
    await knowledge.UpsertDocuments(
        knowledge_pb2.UpsertDocumentsRequest(
            tenant_id=tenant,
            documents=[
                faq("ship", "Orders ship within 48 hours; tracking numbers arrive by email.", language="en"),
                faq("pay", "We accept Visa, Mastercard, Alipay and WeChat Pay.", language="en"),
            ],
        )
    )

    async def search() -> knowledge_pb2.SearchKnowledgeResponse:
        try:
            return await knowledge.SearchKnowledge(
                knowledge_pb2.SearchKnowledgeRequest(tenant_id=tenant, query="which cards do you accept?")
            )
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
            return knowledge_pb2.SearchKnowledgeResponse()

    # Each document is its own event: the assistant may have indexed "ship" and not yet "pay".
    hits = await eventually(
        search, lambda r: len(r.hits) == 2, within_s=120, what="both documents searchable"
    )
    assert hits.hits[0].document_id == "pay"


@pytest.mark.timeout(120)
async def test_invalid_requests_name_the_problem(
    system: System, knowledge: knowledge_pb2_grpc.KnowledgeServiceStub, tenant: str
) -> None:
    cases = [
        (
            knowledge.UpsertDocuments,
            knowledge_pb2.UpsertDocumentsRequest(tenant_id=tenant),
            "documents is empty",
        ),
        (
            knowledge.UpsertDocuments,
            knowledge_pb2.UpsertDocumentsRequest(tenant_id=tenant, documents=[faq("a b", "x")]),
            "malformed",
        ),
        (
            knowledge.SearchKnowledge,
            knowledge_pb2.SearchKnowledgeRequest(tenant_id=tenant, query="q", limit=51),
            "at most 50",
        ),
        (
            knowledge.GetDocument,
            knowledge_pb2.GetDocumentRequest(tenant_id=tenant, document_id=str(uuid.uuid4()) + "\n"),
            "malformed",
        ),
    ]
    for call, request, words in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in (info.value.details() or "")


def test_reflection_and_health_list_the_new_services(system: System) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    names = {"switchboard.v1.KnowledgeService", "switchboard.v1.AgentService"}
    with grpc.insecure_channel(system.settings.grpc_listen) as channel:
        assert names <= set(ProtoReflectionDescriptorDatabase(channel).get_services())
        health = health_pb2_grpc.HealthStub(channel)
        for name in names:
            reply = health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
