"""KnowledgeService in the ingress: document writes become records on the compacted
`knowledge-events` topic (acknowledged only once Kafka has them), reads come from the tenant's
documents hash in Redis (written by the assistant, which indexes the topic), and searches are
forwarded to the assistant's internal KnowledgeService."""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import grpc
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from google.protobuf.message import DecodeError
from switchboard.v1 import knowledge_pb2, knowledge_pb2_grpc

from schemas import hotview as hv
from schemas.events import new_event_id, now_timestamp
from services.ingress import _validation as v
from services.ingress._producer import unavailable
from services.ingress._quotas import Quotas, too_many_documents
from services.kafka_clients import FATAL_PRODUCER_ERRORS, sender_ended
from services.settings import Settings

log = logging.getLogger(__name__)

_DOCUMENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/\-]{0,127}")
_LANGUAGE = re.compile(r"[A-Za-z]{2,3}([_\-][A-Za-z0-9]{1,8})*")
MAX_TITLE = 512
MAX_BODY_BYTES = 64 * 1024
MAX_DOCUMENTS = 100
MAX_REQUEST_BYTES = 1024 * 1024
MAX_TAGS = 32
MAX_TAG = 64
MAX_URL = 2048
MAX_QUERY = 2048
# How long a new document acknowledged but not yet indexed counts against the quota: longer than
# any indexing backlog should last; past it (the assistant down for an hour) it stops counting.
PENDING_DOCUMENT_TTL_S = 3600
# The document quota, atomically (KEYS: the documents hash the assistant keeps, the pending set,
# the failed documents hash; ARGV: quota, pending TTL ms, the upsert's distinct ids): the tenant
# has the indexed documents, plus those the assistant reported it could not index (it holds and
# retries them: not counting them once their reservation expired let a tenant past its quota),
# plus the pending ones neither; ids it has no way are new. Over the quota: {0, would have}; else
# the new ones become pending: {1, would have, the new ids...}.
_RESERVE_DOCUMENTS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local count = redis.call('HLEN', KEYS[1])
for _, id in ipairs(redis.call('HKEYS', KEYS[3])) do
  if redis.call('HEXISTS', KEYS[1], id) == 0 then
    count = count + 1
  end
end
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if redis.call('HEXISTS', KEYS[1], id) == 1 then
    redis.call('ZREM', KEYS[2], id)
  elseif redis.call('HEXISTS', KEYS[3], id) == 0 then
    count = count + 1
  end
end
local added = {}
for i = 3, #ARGV do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 and redis.call('HEXISTS', KEYS[3], ARGV[i]) == 0
      and not redis.call('ZSCORE', KEYS[2], ARGV[i]) then
    added[#added + 1] = ARGV[i]
  end
end
if #added > 0 and count + #added > tonumber(ARGV[1]) then
  return {0, count + #added}
end
local reply = {1, count + #added}
for _, id in ipairs(added) do
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), id)
  reply[#reply + 1] = id
end
return reply
"""
DEFAULT_LIMIT = 5
MAX_LIMIT = 50
DEFAULT_PAGE = 100
MAX_PAGE = 500
# How long the ingress waits for the assistant's search.
SEARCH_DEADLINE_S = 5.0

HEADER_TYPE = "sb-type"
HEADER_TENANT = "sb-tenant"


# ---------------------------------------------------------------------- validation (pure)


def check_document_id(document_id: str, field: str = "document_id") -> None:
    if not document_id:
        raise v.invalid(f"{field} is required")
    if not _DOCUMENT_ID.fullmatch(document_id):
        raise v.invalid(
            f"{field} {document_id[:80]!r} is malformed: 1-128 characters of letters, digits, "
            "'_', '.', ':', '/', '-', starting with a letter or digit"
        )


def check_document(doc: knowledge_pb2.Document, position: int) -> None:
    where = f"documents[{position}]"
    check_document_id(doc.document_id, f"{where}.document_id")
    name = f"{where} ({doc.document_id!r})"
    try:
        v.check_short_text(doc.title, f"{name}.title", MAX_TITLE)
        v.check_text(doc.body, MAX_BODY_BYTES, f"{name}.body")
    except v.RequestRejected as exc:
        if "SWITCHBOARD_MAX_MESSAGE_BYTES" in exc.message:
            size = len(doc.body.encode("utf-8", "surrogatepass"))
            raise v.invalid(f"{name}.body is {size} bytes of UTF-8; the limit is {MAX_BODY_BYTES}") from None
        raise
    if doc.language and (len(doc.language) > 35 or not _LANGUAGE.fullmatch(doc.language)):
        raise v.invalid(f"{name}.language {doc.language[:40]!r} is not a language tag such as 'zh' or 'en'")
    if len(doc.tags) > MAX_TAGS:
        raise v.invalid(f"{name} has {len(doc.tags)} tags; at most {MAX_TAGS}")
    for i, tag in enumerate(doc.tags):
        if not tag.strip():
            raise v.invalid(f"{name}.tags[{i}] is empty")
        v.check_one_line(tag, f"{name}.tags[{i}]", MAX_TAG)
    v.check_one_line(doc.url, f"{name}.url", MAX_URL)
    if doc.url and not _web_link(doc.url):
        raise v.invalid(
            f"{name}.url {doc.url[:40]!r} is not a web link: an http(s) URL with a host, or a path "
            "starting with '/' (citations hand it to customers' apps, which link it)"
        )


def _web_link(url: str) -> bool:
    if url.startswith("/"):
        # Not "//host" (another site), nor "/\\host", which browsers read as "//host".
        return len(url) == 1 or url[1] not in "/\\"
    parts = urlsplit(url)
    return parts.scheme.lower() in ("http", "https") and bool(parts.netloc)


def check_upsert(req: knowledge_pb2.UpsertDocumentsRequest, allowed_tenants: frozenset[str]) -> None:
    v.check_tenant(req.tenant_id, allowed_tenants)
    if not req.documents:
        raise v.invalid("documents is empty: send 1 to 100 documents")
    if len(req.documents) > MAX_DOCUMENTS:
        raise v.invalid(f"{len(req.documents)} documents in one request; at most {MAX_DOCUMENTS}")
    size = req.ByteSize()
    if size > MAX_REQUEST_BYTES:
        raise v.invalid(f"the request is {size} bytes; at most {MAX_REQUEST_BYTES} (split it)")
    seen: dict[str, int] = {}
    for i, doc in enumerate(req.documents):
        check_document(doc, i)
        if doc.document_id in seen:
            raise v.invalid(
                f"document_id {doc.document_id!r} appears twice (documents[{seen[doc.document_id]}] "
                f"and documents[{i}]); send each document once"
            )
        seen[doc.document_id] = i


def check_search(req: knowledge_pb2.SearchKnowledgeRequest, allowed_tenants: frozenset[str]) -> int:
    """The limit to ask for, once the request is valid."""
    v.check_tenant(req.tenant_id, allowed_tenants)
    if not req.query.strip():
        raise v.invalid("query is empty")
    if len(req.query) > MAX_QUERY:
        raise v.invalid(f"query is {len(req.query)} characters; at most {MAX_QUERY}")
    v.check_short_text(req.query, "query", MAX_QUERY)
    if req.limit > MAX_LIMIT:
        raise v.invalid(f"limit is {req.limit}; at most {MAX_LIMIT}")
    return req.limit or DEFAULT_LIMIT


def check_page(req: knowledge_pb2.ListDocumentsRequest, allowed_tenants: frozenset[str]) -> int:
    v.check_tenant(req.tenant_id, allowed_tenants)
    if req.page_size > MAX_PAGE:
        raise v.invalid(f"page_size is {req.page_size}; at most {MAX_PAGE}")
    if req.page_token:
        check_document_id(req.page_token, "page_token")
    return req.page_size or DEFAULT_PAGE


def record_key(tenant_id: str, document_id: str) -> bytes:
    return f"{tenant_id}/{document_id}".encode()


def page_of(ids: Sequence[str], after: str, size: int) -> tuple[list[str], str]:
    """The sorted ids after `after` (a page token: the last id of the previous page), at most
    `size` of them, and the next token (empty on the last page)."""
    ordered = sorted(ids)
    start = bisect.bisect_right(ordered, after) if after else 0
    page = ordered[start : start + size]
    more = start + size < len(ordered)
    return page, (page[-1] if page and more else "")


def upserted(tenant_id: str, doc: knowledge_pb2.Document) -> knowledge_pb2.KnowledgeEvent:
    stamped = knowledge_pb2.Document()
    stamped.CopyFrom(doc)
    now = now_timestamp()
    stamped.updated_at.CopyFrom(now)
    return knowledge_pb2.KnowledgeEvent(
        event_id=new_event_id(), tenant_id=tenant_id, occurred_at=now, document_upserted=stamped
    )


def deleted(tenant_id: str, document_id: str) -> knowledge_pb2.KnowledgeEvent:
    return knowledge_pb2.KnowledgeEvent(
        event_id=new_event_id(),
        tenant_id=tenant_id,
        occurred_at=now_timestamp(),
        document_deleted=document_id,
    )


# ---------------------------------------------------------------------- I/O


class KnowledgeProducer:
    """Idempotent, acks=all producer for `knowledge-events`, with the ingress's in-flight bound."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self._inflight = 0

    async def _started(self) -> AIOKafkaProducer:
        async with self._lock:
            if self._producer is None:
                producer = AIOKafkaProducer(
                    bootstrap_servers=self._settings.kafka_bootstrap,
                    client_id="switchboard-ingress-knowledge",
                    enable_idempotence=True,
                    acks="all",
                    max_request_size=2 * MAX_REQUEST_BYTES,
                    max_batch_size=2 * MAX_REQUEST_BYTES,
                    request_timeout_ms=int(self._settings.produce_timeout_s * 1000) + 20_000,
                    retry_backoff_ms=100,
                )
                try:
                    await producer.start()
                except KafkaError as exc:
                    await producer.stop()
                    raise unavailable(
                        f"Kafka at {self._settings.kafka_bootstrap} is not reachable: {exc}; retry"
                    ) from exc
                self._producer = producer
            return self._producer

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def _replace(self, broken: AIOKafkaProducer | None) -> None:
        """Drop `broken` (the next write starts a new producer), unless another write did already."""
        if broken is None:
            return
        async with self._lock:
            if self._producer is None or self._producer is not broken:
                return
            self._producer = None
        log.warning("replacing the knowledge producer (its idempotence state is broken, or its sender ended)")
        try:
            await asyncio.wait_for(broken.stop(), timeout=10)
        except Exception as exc:
            log.warning("closing the replaced knowledge producer: %r", exc)

    async def write(self, records: Sequence[knowledge_pb2.KnowledgeEvent]) -> list[knowledge_pb2.DocumentAck]:
        """Produce the records in order and return Kafka's acks; UNAVAILABLE unless every one landed
        (upserts and deletes are idempotent by document id, so the whole request may be retried)."""
        limit = self._settings.max_inflight_produce
        if self._inflight + len(records) > limit:
            raise v.RequestRejected(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"ingress is at its in-flight limit ({limit} writes awaiting Kafka); retry with backoff",
            )
        self._inflight += len(records)
        timeout = self._settings.produce_timeout_s
        producer: AIOKafkaProducer | None = None
        try:
            producer = await self._started()
            deliveries = []
            for record in records:
                kind = record.WhichOneof("payload") or ""
                document_id = (
                    record.document_upserted.document_id
                    if kind == "document_upserted"
                    else record.document_deleted
                )
                deliveries.append(
                    await asyncio.wait_for(
                        producer.send(
                            self._settings.knowledge_topic,
                            record.SerializeToString(),
                            key=record_key(record.tenant_id, document_id),
                            headers=[
                                (HEADER_TYPE, kind.encode()),
                                (HEADER_TENANT, record.tenant_id.encode()),
                            ],
                        ),
                        timeout=timeout,
                    )
                )
            _, pending = await asyncio.wait(deliveries, timeout=timeout)
            if pending:
                raise unavailable(
                    f"Kafka did not acknowledge within {timeout:.0f}s; the documents may still land — "
                    "retry the same request (it is idempotent)",
                    late_possible=True,
                )
            acks = []
            for record, delivery in zip(records, deliveries, strict=True):
                if isinstance(delivery.exception(), FATAL_PRODUCER_ERRORS):
                    # Its sequence state is broken for good (seen after a broker restart).
                    await self._replace(producer)
                meta: Any = delivery.result()
                document_id = record.document_upserted.document_id or record.document_deleted
                acks.append(
                    knowledge_pb2.DocumentAck(
                        document_id=document_id, partition=meta.partition, offset=meta.offset
                    )
                )
            return acks
        except (TimeoutError, KafkaError) as exc:
            if sender_ended(producer):
                # Its sender ended (an error aiokafka did not expect): every later send would fail.
                # No claims hang on documents (idempotent by id), so a new producer is enough.
                await self._replace(producer)
            raise unavailable(f"Kafka did not take the documents ({exc!r}); retry the same request") from exc
        finally:
            self._inflight -= len(records)


class KnowledgeService:
    """The KnowledgeService RPCs; raise `RequestRejected` for anything the caller gets as a status."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        producer: KnowledgeProducer | None = None,
        quotas: Quotas | None = None,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._quotas = quotas or Quotas(settings)
        self.producer = producer or KnowledgeProducer(settings)
        self._channel: grpc.aio.Channel | None = None
        self._assistant: knowledge_pb2_grpc.KnowledgeServiceStub | None = None

    async def close(self) -> None:
        await self.producer.stop()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def upsert_documents(
        self, req: knowledge_pb2.UpsertDocumentsRequest
    ) -> knowledge_pb2.UpsertDocumentsResponse:
        check_upsert(req, self._settings.allowed_tenants)
        reserved = await self._check_quota(req)
        records = [upserted(req.tenant_id, doc) for doc in req.documents]
        try:
            acks = await self.producer.write(records)
        except BaseException:
            if reserved:
                # Not written: the new ids it reserved do not count.
                await asyncio.shield(self._release(req.tenant_id, reserved))
            raise
        return knowledge_pb2.UpsertDocumentsResponse(documents=acks)

    async def _release(self, tenant_id: str, ids: Sequence[str]) -> None:
        try:
            await self._redis.zrem(hv.pending_documents_key(tenant_id), *ids)
        except Exception as exc:  # they expire after PENDING_DOCUMENT_TTL_S
            log.warning("releasing %d pending documents of %r failed: %r", len(ids), tenant_id, exc)

    async def _check_quota(self, req: knowledge_pb2.UpsertDocumentsRequest) -> list[str]:
        """Refuse an upsert that would take the tenant past its document quota; the new ids it
        reserved (pending until indexed).

        The tenant has what the assistant indexed, what it reported it could not index (the
        failed documents hash), and what was acknowledged and is not indexed yet (the pending
        set), so a backlog, a stopped assistant or failing documents do not let upserts pass it.
        Replacing a document it has adds nothing: allowed even at (or past) the quota."""
        quota = self._quotas.knowledge_documents(req.tenant_id)
        if quota <= 0:
            return []
        ids = list(dict.fromkeys(doc.document_id for doc in req.documents))
        keys = [
            hv.documents_key(req.tenant_id),
            hv.pending_documents_key(req.tenant_id),
            hv.failed_documents_key(req.tenant_id),
        ]
        ok, would_have, *added = await self._redis.eval(
            _RESERVE_DOCUMENTS, len(keys), *keys, quota, PENDING_DOCUMENT_TTL_S * 1000, *ids
        )
        if not ok:
            raise too_many_documents(req.tenant_id, int(would_have), quota)
        return [a.decode() if isinstance(a, bytes) else str(a) for a in added]

    async def delete_document(
        self, req: knowledge_pb2.DeleteDocumentRequest
    ) -> knowledge_pb2.DeleteDocumentResponse:
        v.check_tenant(req.tenant_id, self._settings.allowed_tenants)
        check_document_id(req.document_id)
        # Deleting an unknown document writes a deletion all the same: the hash may lag an upsert
        # acknowledged a moment ago, and a deletion of nothing is harmless.
        (ack,) = await self.producer.write([deleted(req.tenant_id, req.document_id)])
        if self._quotas.knowledge_documents(req.tenant_id) > 0:
            # Not indexed yet and deleted: it no longer counts (an indexed one counts until its
            # deletion is indexed).
            await self._release(req.tenant_id, [req.document_id])
        return knowledge_pb2.DeleteDocumentResponse(ack=ack)

    async def get_document(self, req: knowledge_pb2.GetDocumentRequest) -> knowledge_pb2.Document:
        v.check_tenant(req.tenant_id, self._settings.allowed_tenants)
        check_document_id(req.document_id)
        raw: Any = await self._redis.hget(hv.documents_key(req.tenant_id), req.document_id)
        if raw is None:
            failure: Any = await self._redis.hget(hv.failed_documents_key(req.tenant_id), req.document_id)
            if failure is not None:
                raise v.RequestRejected(grpc.StatusCode.FAILED_PRECONDITION, not_indexed(req, failure))
            raise v.RequestRejected(
                grpc.StatusCode.NOT_FOUND,
                f"document {req.document_id!r} of tenant {req.tenant_id!r} does not exist (or was "
                "upserted a moment ago and is not indexed yet; documents appear within seconds)",
            )
        return _document(raw, req.tenant_id, req.document_id)

    async def list_documents(
        self, req: knowledge_pb2.ListDocumentsRequest
    ) -> knowledge_pb2.ListDocumentsResponse:
        size = check_page(req, self._settings.allowed_tenants)
        key = hv.documents_key(req.tenant_id)
        keys: Any = await self._redis.hkeys(key)
        ids = [k.decode() for k in keys]
        page, token = page_of(ids, req.page_token, size)
        response = knowledge_pb2.ListDocumentsResponse(next_page_token=token)
        if page:
            for document_id, raw in zip(page, await self._hmget(key, page), strict=True):
                if raw is not None:  # deleted between the two reads
                    response.documents.append(_document(raw, req.tenant_id, document_id))
        return response

    async def search_knowledge(
        self, req: knowledge_pb2.SearchKnowledgeRequest
    ) -> knowledge_pb2.SearchKnowledgeResponse:
        limit = check_search(req, self._settings.allowed_tenants)
        forwarded = knowledge_pb2.SearchKnowledgeRequest(
            tenant_id=req.tenant_id, query=req.query, limit=limit
        )
        address = self._settings.assistant_listen
        try:
            response: knowledge_pb2.SearchKnowledgeResponse = await self._assistant_stub().SearchKnowledge(
                forwarded, timeout=SEARCH_DEADLINE_S
            )
            return response
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                raise unavailable(
                    f"the assistant is not running or not reachable at {address} (start `switchboard worker "
                    "assistant`); retry"
                ) from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise unavailable(
                    f"the assistant at {address} did not answer within {SEARCH_DEADLINE_S:.0f}s; retry"
                ) from None
            if code in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.NOT_FOUND,
            ):
                raise v.RequestRejected(code, exc.details() or code.name) from None
            raise RuntimeError(
                f"the assistant's SearchKnowledge failed: {code.name}: {exc.details()}"
            ) from exc

    async def _hmget(self, key: str, fields: list[str]) -> list[Any]:
        rows: Any = await self._redis.hmget(key, fields)
        return list(rows)

    def _assistant_stub(self) -> knowledge_pb2_grpc.KnowledgeServiceStub:
        if self._assistant is None:
            self._channel = grpc.aio.insecure_channel(self._settings.assistant_listen)
            self._assistant = knowledge_pb2_grpc.KnowledgeServiceStub(self._channel)
        return self._assistant


def not_indexed(req: knowledge_pb2.GetDocumentRequest, failure: bytes) -> str:
    """GetDocument's message for a document the assistant reported it could not index."""
    try:
        report = json.loads(failure)
        error, attempts = str(report["error"]), int(report["attempts"])
    except (ValueError, KeyError, TypeError):
        error, attempts = failure.decode(errors="replace"), 0
    return (
        f"document {req.document_id!r} of tenant {req.tenant_id!r} was acknowledged but could not be "
        f"indexed ({attempts} attempts; last error: {error}); it is not searchable. The assistant "
        "retries it every few minutes: upsert a corrected version or delete it"
    )


def _document(raw: bytes, tenant_id: str, document_id: str) -> knowledge_pb2.Document:
    doc = knowledge_pb2.Document()
    try:
        doc.ParseFromString(raw)
    except DecodeError as exc:
        raise RuntimeError(
            f"document {document_id!r} of tenant {tenant_id!r} in Redis is not a Document"
        ) from exc
    return doc
