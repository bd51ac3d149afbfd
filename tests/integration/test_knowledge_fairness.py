"""Knowledge indexing is fair across tenants (issue 9, fair use): the assistant indexed every
tenant's documents in one queue in log order, so a few hundred upserts of one tenant delayed
every other tenant's indexing until all of them were embedded."""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis
from switchboard.v1 import knowledge_pb2, knowledge_pb2_grpc

from schemas import hotview as hv
from tests.conftest import System, eventually
from tests.integration.test_auth import cli, issue, keyed_replicas

pytestmark = pytest.mark.integration

# Tenant A's backlog: sized so that embedding it takes many seconds even on a fast machine
# (each document is ~15 chunks), so "B is indexed while A's backlog is still mostly queued" is
# not a matter of probe timing.
BACKLOG = 300
REPLICA_PORT = 25097 + int(os.environ.get("SWITCHBOARD_TEST_PORT_OFFSET", "0"))
WORDS = "refund order parcel courier invoice warranty account password voucher delivery".split()


@pytest.fixture
async def knowledge(system: System) -> AsyncIterator[knowledge_pb2_grpc.KnowledgeServiceStub]:
    async with grpc.aio.insecure_channel(system.settings.grpc_listen) as channel:
        yield knowledge_pb2_grpc.KnowledgeServiceStub(channel)


def article(document_id: str, rng: random.Random, sentences: int) -> knowledge_pb2.Document:
    body = "\n\n".join(
        " ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "." for _ in range(sentences)
    )
    return knowledge_pb2.Document(
        document_id=document_id, title=f"About {document_id}", body=body, language="en"
    )


@pytest.mark.timeout(600)
async def test_one_tenants_backlog_does_not_hold_up_another_tenants_document(
    system: System, knowledge: knowledge_pb2_grpc.KnowledgeServiceStub, tenant: str
) -> None:
    a, b = f"{tenant}a", f"{tenant}b"
    rng = random.Random(9)
    for start in range(0, BACKLOG, 100):
        await knowledge.UpsertDocuments(
            knowledge_pb2.UpsertDocumentsRequest(
                tenant_id=a, documents=[article(f"a-{i}", rng, 40) for i in range(start, start + 100)]
            )
        )
    acked = time.monotonic()
    await knowledge.UpsertDocuments(
        knowledge_pb2.UpsertDocumentsRequest(
            tenant_id=b,
            documents=[
                knowledge_pb2.Document(
                    document_id="b-cards",
                    title="Payment cards",
                    body="We accept Visa, Mastercard, Alipay and WeChat Pay.",
                    language="en",
                )
            ],
        )
    )
    redis = aioredis.Redis.from_url(system.settings.redis_url)
    try:

        async def indexed() -> tuple[bool, int]:
            """(B's document is in its hash, how many of A's are in A's)."""
            async with redis.pipeline(transaction=False) as pipe:
                pipe.hexists(hv.documents_key(b), "b-cards")
                pipe.hlen(hv.documents_key(a))
                there, count = await pipe.execute()
            return bool(there), int(count)

        _, a_count = await eventually(indexed, lambda r: r[0], within_s=300, what="B's document indexed")
        waited_s = time.monotonic() - acked
        # The documents hash is written once a document is indexed, so B is searchable now.
        reply = await knowledge.SearchKnowledge(
            knowledge_pb2.SearchKnowledgeRequest(tenant_id=b, query="which cards do you accept?")
        )
        assert [h.document_id for h in reply.hits] == ["b-cards"]
        print(f"B indexed {waited_s:.2f}s after its ack, with {a_count}/{BACKLOG} of A's backlog indexed")
        # B went ahead of most of A's backlog (one queue in log order indexed all of A's first).
        assert a_count < BACKLOG // 2, (a_count, waited_s)
        # ...and A's backlog is indexed all the same.
        await eventually(indexed, lambda r: r[1] == BACKLOG, within_s=400, what="A's backlog indexed")
    finally:
        await redis.aclose()


async def upsert_outcome(
    stub: knowledge_pb2_grpc.KnowledgeServiceStub, documents: list[knowledge_pb2.Document]
) -> tuple[grpc.StatusCode, str, int | None]:
    """(code, details, retry-after-ms trailer) of an UpsertDocuments call."""
    try:
        await stub.UpsertDocuments(knowledge_pb2.UpsertDocumentsRequest(documents=documents))
    except grpc.aio.AioRpcError as err:
        trailer = dict(err.trailing_metadata() or ()).get("retry-after-ms")
        return err.code(), err.details() or "", int(trailer) if trailer is not None else None
    return grpc.StatusCode.OK, "", None


@pytest.mark.timeout(180)
async def test_knowledge_upserts_spend_the_tenants_rate_limit_tokens_by_size(system: System) -> None:
    async with keyed_replicas(system, "kn", (REPLICA_PORT,)) as replicas:
        tenant = f"kn-{uuid.uuid4().hex[:8]}"
        # 0.5 tokens/s: the bucket barely refills while the test runs, whatever the machine's load.
        done = await asyncio.to_thread(
            cli, replicas.env, "tenants", "create", tenant, "--rate", "0.5", "--burst", "10"
        )
        assert done.returncode == 0, done.stderr
        key = await issue(replicas, tenant, "knowledge-admin")
        rng = random.Random(1)
        small = [
            knowledge_pb2.Document(document_id=f"s{i}", title="t", body="Returns within 30 days.")
            for i in range(3)
        ]
        # 20 KiB: three tokens (one per started 8 KiB).
        large = knowledge_pb2.Document(
            document_id="large", title="t", body=" ".join(rng.choice(WORDS) for _ in range(2600))
        )
        async with replicas.channel(0, key) as channel:
            stub = knowledge_pb2_grpc.KnowledgeServiceStub(channel)
            started = time.monotonic()
            assert (await upsert_outcome(stub, small))[0] is grpc.StatusCode.OK
            assert (await upsert_outcome(stub, [large]))[0] is grpc.StatusCode.OK
            # 6 of 10 spent: ten more documents are refused, with when to retry.
            ten = [
                knowledge_pb2.Document(document_id=f"t{i}", title="t", body="Ships in 2 days.")
                for i in range(10)
            ]
            code, details, retry_after_ms = await upsert_outcome(stub, ten)
            elapsed = time.monotonic() - started
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
            assert f"tenant {tenant!r}" in details and "needs 10 tokens" in details, details
            # (10 - (4 + 0.5 * elapsed)) / 0.5 s
            assert retry_after_ms is not None and 0 < retry_after_ms <= (12 - elapsed) * 1000 + 500, (
                retry_after_ms,
                elapsed,
            )
            # An upsert larger than the burst could never pass: INVALID_ARGUMENT saying so.
            eleven = [*ten, knowledge_pb2.Document(document_id="t10", title="t", body="x")]
            code, details, retry_after_ms = await upsert_outcome(stub, eleven)
            assert code is grpc.StatusCode.INVALID_ARGUMENT and "split the upsert" in details, details
            # Two documents fit in what is left: the refusals took nothing.
            code, details, _ = await upsert_outcome(stub, ten[:2])
            assert code is grpc.StatusCode.OK, details
