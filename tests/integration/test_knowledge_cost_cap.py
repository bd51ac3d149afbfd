"""A knowledge document larger than the tenant's burst (one token per started 8 KiB) is upserted
once the bucket is full, taking all of it; it was refused INVALID_ARGUMENT ("split the upsert")
for ever, although one document cannot be split and the API accepts bodies up to 64 KiB (real
ingress replica, Redis buckets)."""

from __future__ import annotations

import asyncio
import os
import uuid

import grpc
import pytest
from switchboard.v1 import knowledge_pb2, knowledge_pb2_grpc

from tests.conftest import System
from tests.integration.test_auth import cli, issue, keyed_replicas
from tests.integration.test_knowledge_fairness import upsert_outcome

pytestmark = pytest.mark.integration

REPLICA_PORT = 25098 + int(os.environ.get("SWITCHBOARD_TEST_PORT_OFFSET", "0"))


@pytest.mark.timeout(180)
async def test_a_document_larger_than_the_burst_takes_the_whole_bucket(system: System) -> None:
    async with keyed_replicas(system, "kc", (REPLICA_PORT,)) as replicas:
        tenant = f"kc-{uuid.uuid4().hex[:8]}"
        # --rate 0.1: a burst of 1 token, an 8 KiB bucket; the bucket barely refills meanwhile.
        done = await asyncio.to_thread(cli, replicas.env, "tenants", "create", tenant, "--rate", "0.1")
        assert done.returncode == 0, done.stderr
        key = await issue(replicas, tenant, "knowledge-admin")
        # 40 KiB: five tokens by size, more than the whole bucket.
        large = knowledge_pb2.Document(document_id="large", title="Returns", body="Returns are free. " * 2400)
        async with replicas.channel(0, key) as channel:
            stub = knowledge_pb2_grpc.KnowledgeServiceStub(channel)
            code, details, _ = await upsert_outcome(stub, [large])
            assert code is grpc.StatusCode.OK, (code, details)
            # It took the whole bucket: the next one waits for it to refill.
            small = knowledge_pb2.Document(document_id="small", title="t", body="Ships in 2 days.")
            code, details, retry_after_ms = await upsert_outcome(stub, [small])
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
            assert retry_after_ms is not None and retry_after_ms > 0
