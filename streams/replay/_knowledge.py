"""Replay of the knowledge base: the documents hashes in Redis, rebuilt from `knowledge-events`.

The topic is compacted by document id (the latest version of each document is kept forever), so
it is read from Kafka alone. Each tenant's documents are rebuilt under a scratch database and
copied over the live key with `COPY … REPLACE` (atomic per tenant); tenants left with no
documents lose their key. The assistant's retrieval index is another fold of the same topic that
each assistant rebuilds in memory when it starts: restart the assistants to rebuild theirs.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis
from switchboard.v1 import knowledge_pb2

from schemas import hotview as hv
from services.settings import Settings
from streams._consumer import Record
from streams.replay._sessions import live_db, redis_for


def _documents_key_tenant(key: str) -> str:
    # sb:{tenant}:documents
    return key[len("sb:{") : -len("}:documents")]


class KnowledgeTarget:
    def __init__(self, scratch: aioredis.Redis, tenant: str | None = None) -> None:
        self.scratch = scratch
        self.tenant = tenant
        self.tenants: set[str] = set()

    async def apply(self, records: Sequence[Record]) -> tuple[int, int]:
        from streams.assistant._worker import stored_document

        pipe = self.scratch.pipeline(transaction=False)
        applied = rejected = 0
        for r in records:
            record = knowledge_pb2.KnowledgeEvent()
            try:
                record.ParseFromString(r.value or b"")
                kind = record.WhichOneof("payload")
                if self.tenant is not None and record.tenant_id != self.tenant:
                    continue
                # The same writes as the assistant's KnowledgeFollower.
                if kind == "document_upserted":
                    document, stored = stored_document(record)
                    pipe.hset(hv.documents_key(record.tenant_id), document.document_id, stored)
                elif kind == "document_deleted":
                    pipe.hdel(hv.documents_key(record.tenant_id), record.document_deleted)
                else:
                    continue
            except Exception:
                rejected += 1
                continue
            self.tenants.add(record.tenant_id)
            applied += 1
        await pipe.execute()
        return applied, rejected

    async def swap(self, settings: Settings) -> int:
        """Copy each rebuilt tenant's documents over the live ones; returns the tenants replaced."""
        live = redis_for(settings, live_db(settings))
        try:
            live_tenants = {
                _documents_key_tenant(k.decode())
                async for k in live.scan_iter(match=hv.documents_key(self.tenant or "*"), count=1000)
            }
            for tenant in sorted(self.tenants | live_tenants):
                key = hv.documents_key(tenant)
                if await self.scratch.exists(key):
                    await self.scratch.copy(key, key, destination_db=str(live_db(settings)), replace=True)
                else:
                    await live.delete(key)
            return len(self.tenants | live_tenants)
        finally:
            await live.aclose()
