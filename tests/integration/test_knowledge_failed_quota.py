"""A document the assistant could not index still counts against the tenant's document quota.

Found by review of the failed-documents change (f508c38): a failed document is no longer written
to the documents hash (only indexed ones are), so the quota counted it only while its pending
reservation lived (PENDING_DOCUMENT_TTL_S, an hour). After that a tenant at its quota could add
more, although every assistant still holds each failed document and retries it every few minutes.
"""

from __future__ import annotations

import grpc
import pytest
from switchboard.v1 import knowledge_pb2

from schemas import hotview as hv
from services.ingress._knowledge import KnowledgeService
from services.ingress._validation import RequestRejected
from services.settings import Settings
from tests.conftest import eventually
from tests.integration.test_knowledge_index_failures import POISON, FlakyKnowledgeBase, _keys, following

pytestmark = pytest.mark.integration


def _upsert(tenant: str, document_id: str, body: str) -> knowledge_pb2.UpsertDocumentsRequest:
    doc = knowledge_pb2.Document(
        document_id=document_id, title=f"About {document_id}", body=body, language="en"
    )
    return knowledge_pb2.UpsertDocumentsRequest(tenant_id=tenant, documents=[doc])


@pytest.mark.timeout(120)
async def test_a_document_reported_failed_counts_against_the_quota(local_stack: Settings) -> None:
    knowledge = FlakyKnowledgeBase()
    async with following(local_stack, knowledge) as (_, _producer, redis, settings, tenant):
        service = KnowledgeService(settings.model_copy(update={"max_knowledge_documents": 2}), redis)
        try:
            # Two documents through the ingress (reserved, then on the topic): one indexes, one
            # the assistant cannot index.
            for document_id, body in (("good", "Refunds take 5 days."), ("bad", f"Returns {POISON}")):
                await service.upsert_documents(_upsert(tenant, document_id, body))
            await eventually(
                lambda: _keys(redis, hv.failed_documents_key(tenant)),
                lambda failed: failed == {"bad"},
                within_s=30,
                what="the poison document reported failed",
            )
            assert await _keys(redis, hv.documents_key(tenant)) == {"good"}
            # An hour on, the failed document's reservation has expired (the assistant still
            # holds it and retries it).
            await redis.zadd(hv.pending_documents_key(tenant), {"bad": 0})

            with pytest.raises(RequestRejected) as refused:
                await service._check_quota(_upsert(tenant, "third", "We ship to Macau."))
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "would have 3 knowledge documents, its quota is 2" in refused.value.message
            # Replacing the failed document (the fix for it) adds nothing: allowed, no reservation.
            assert await service._check_quota(_upsert(tenant, "bad", "Returns are free.")) == []
        finally:
            await service.close()
            await redis.delete(
                hv.documents_key(tenant), hv.pending_documents_key(tenant), hv.failed_documents_key(tenant)
            )
