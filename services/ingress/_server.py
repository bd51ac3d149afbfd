"""The grpc.aio server: ChatService handlers, health checking and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import redis.asyncio as aioredis
from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from switchboard.v1 import agent_pb2, chat_pb2, knowledge_pb2

from services import eventloop
from services.auth import IngressAuth, preflight
from services.ingress import _validation as v
from services.ingress._agents import AgentService
from services.ingress._errors import as_rejection, retry_metadata
from services.ingress._hotview import IngressHotView, live_pool, new_lease_id
from services.ingress._idle import IdleSweeper
from services.ingress._knowledge import KnowledgeService
from services.ingress._producer import EventProducer
from services.ingress._quotas import Quotas
from services.ingress._service import ChatService, MessageBatcher, WriteOrder
from services.ingress._supervisor import (
    CHILD_ENV,
    LEASE_ENV,
    Supervisor,
    dead_leases,
    end_earlier_leases,
    leases_file,
    process_count,
    record_leases,
)
from services.ingress._writes import once
from services.observability import metrics
from services.observability.tracing import traceparent_of
from services.settings import Settings
from streams._consumer import raise_if_cancelling

log = logging.getLogger(__name__)

SERVICE_NAME = "switchboard.v1.ChatService"
KNOWLEDGE_SERVICE_NAME = "switchboard.v1.KnowledgeService"
AGENT_SERVICE_NAME = "switchboard.v1.AgentService"
SERVICE_NAMES = (SERVICE_NAME, KNOWLEDGE_SERVICE_NAME, AGENT_SERVICE_NAME)
# Requests of one SendMessages stream processed together (one Redis round trip, one produce burst).
STREAM_BATCH = 256
# Batches of one stream in flight at once; responses still leave in request order.
STREAM_PIPELINE = 8
# Of those, how many may be being admitted (claimed in Redis and handed to the producer) at once.
# While one is, the requests read meanwhile wait and leave together as the next batch (group
# commit): a lone message is never delayed, and under load batches grow instead of each message
# paying its own round trips (grpc.aio hands the handler one request per loop iteration, so taking
# only what was already read made batches of one). Unary calls wait longer (BatchGate: until the
# batch under way is answered); for streams that measured no better end to end (RESULTS.md).
STREAM_ADMITTING = 1
# Messages of one stream taken but not answered yet. Beyond it the handler reads no more, so HTTP/2
# flow control slows the client down, instead of its backlog becoming writes in flight (which
# would crowd out other callers and meet the process's in-flight bound: RESOURCE_EXHAUSTED).
STREAM_WINDOW = 4 * STREAM_BATCH
# Calls gRPC may hold before the server takes them (see IngressServer's grpc.server options).
PENDING_CALLS = 10_000
# How often the health status follows the hot view's readiness.
READINESS_POLL_S = 0.5
# How long stop() waits for its background tasks to end once cancelled.
STOP_TASK_WAIT_S = 5.0

M = TypeVar("M", bound=Message)


def _deserializer(cls: type[M]) -> Callable[[bytes], M | v.MalformedRequest]:
    name = cls.DESCRIPTOR.full_name

    def parse(data: bytes) -> M | v.MalformedRequest:
        msg = cls()
        try:
            msg.ParseFromString(data)
        except DecodeError as exc:
            return v.MalformedRequest(name, str(exc))
        return msg

    return parse


async def _abort(context: grpc.aio.ServicerContext, exc: v.RequestRejected) -> None:
    await context.abort(exc.code, exc.message, trailing_metadata=retry_metadata(exc))


def _error_response(req: Any, rejection: v.RequestRejected) -> chat_pb2.SendMessageResponse:
    """A refused message of a stream: its code and message, with the ids it was sent with."""
    response = chat_pb2.SendMessageResponse(
        error_code=rejection.code.value[0], error_message=rejection.message
    )
    if isinstance(req, chat_pb2.SendMessageRequest):
        response.client_message_id = req.client_message_id
        response.conversation_id = req.conversation_id
    return response


def _checked(req: Any) -> Any:
    if isinstance(req, v.MalformedRequest):
        raise req.rejection()
    return req


class ChatServicer:
    """Adapts ChatService to grpc.aio: statuses for rejections, never a stack trace."""

    def __init__(self, service: ChatService) -> None:
        self._service = service
        self._settings = service.settings
        self._batcher = MessageBatcher(service.writes)
        self._draining = False
        # What each open SendMessages stream does when the process begins to drain.
        self._on_drain: set[Callable[[], None]] = set()

    def drain(self) -> None:
        """The process is stopping (called before the server's own stop, which waits for calls
        to end): long-lived calls end now instead of holding the drain until its grace runs out.
        A StreamConversation ends with UNAVAILABLE (its client follows again from its last cursor,
        on another process); a SendMessages stream reads no more requests, answers those it took,
        then ends with UNAVAILABLE (its client sends the unanswered ones again on a new stream)."""
        self._draining = True
        self._service.reads.end_follows()
        for stop_reading in list(self._on_drain):
            stop_reading()

    async def StartConversation(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await self._service.start_conversation(_checked(request), traceparent_of(context))
        except Exception as exc:
            await _abort(context, as_rejection(exc, "StartConversation"))

    async def SendMessage(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            outcome = await self._batcher.submit(request, traceparent_of(context))
        except Exception as exc:
            outcome = as_rejection(exc, "SendMessage")
        if isinstance(outcome, v.RequestRejected):
            await _abort(context, outcome)
        return outcome

    async def SendMessages(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[chat_pb2.SendMessageResponse]:
        traceparent = traceparent_of(context)
        batches: asyncio.Queue[tuple[list[Any], asyncio.Task[list[Any]]] | None] = asyncio.Queue(
            STREAM_PIPELINE
        )
        incoming: asyncio.Queue[Any] = asyncio.Queue(STREAM_BATCH * 2)
        done = object()
        broken: list[BaseException] = []
        unanswered = 0
        answered = asyncio.Event()
        started = False  # the reader's first step ran (a task cancelled before it never enters its try)
        reading = True
        drained = False  # the process began to drain and this stream stopped reading for it

        async def read() -> None:
            nonlocal started, reading
            started = True
            try:
                if not drained:
                    async for req in request_iterator:
                        if drained:  # the drain's cancel was swallowed below us: stop all the same
                            break
                        await incoming.put(req)
            except asyncio.CancelledError:
                # The drain's cancel, and only it: a cancel of the call itself (also one coalesced
                # with the drain's) ends the reader, whose marker nobody would read any more.
                me = asyncio.current_task()
                if not drained or me is None or me.cancelling() > 1:
                    raise
                me.uncancel()
                # A request read but not put is not answered: its client sends it again.
            except Exception as exc:
                # The request stream broke: answer what was read, then end the call.
                broken.append(exc)
            reading = False
            # Not in a `finally`: cancelled (the call is over), the queue may be full and nothing
            # reads it any more, so waiting to put the marker there would never end.
            await incoming.put(done)

        def stop_reading() -> None:
            nonlocal drained
            if reading and not drained:  # not once the marker is being put (it must get there)
                drained = True
                if started:  # else the reader sees `drained` at its first step
                    reader.cancel()

        async def batch() -> None:
            nonlocal unanswered
            order: WriteOrder | None = None
            admitting = asyncio.Semaphore(STREAM_ADMITTING)
            finished = False
            while not finished:
                first = await incoming.get()
                if first is done:
                    break
                while unanswered >= STREAM_WINDOW:
                    answered.clear()
                    await answered.wait()
                await admitting.acquire()
                items = [first]
                room = min(STREAM_BATCH, STREAM_WINDOW - unanswered)
                while len(items) < room and not incoming.empty():
                    item = incoming.get_nowait()
                    if item is done:
                        finished = True
                        break
                    items.append(item)
                unanswered += len(items)
                order = WriteOrder(order)
                admitted = once(admitting.release)
                task = asyncio.ensure_future(
                    self._service.accept_messages(items, traceparent, order, on_admitted=admitted)
                )
                # Also when the batch failed before it was admitted.
                task.add_done_callback(admitted)
                await batches.put((items, task))
            await batches.put(None)

        reader = asyncio.ensure_future(read())
        batcher = asyncio.ensure_future(batch())
        self._on_drain.add(stop_reading)
        if self._draining:
            stop_reading()
        try:
            while (queued := await batches.get()) is not None:
                items, task = queued
                try:
                    outcomes = await task
                except Exception as exc:
                    outcomes = [as_rejection(exc, "SendMessages")] * len(items)
                for req, outcome in zip(items, outcomes, strict=True):
                    if isinstance(outcome, v.RequestRejected):
                        yield _error_response(req, outcome)
                    else:
                        yield outcome
                unanswered -= len(items)
                answered.set()
            if broken:
                await _abort(context, as_rejection(broken[0], "SendMessages (request stream)"))
            elif drained:
                await _abort(
                    context,
                    v.RequestRejected(
                        grpc.StatusCode.UNAVAILABLE,
                        "this ingress process is stopping; every request answered on this stream is "
                        "done: send the others again on a new stream (the same client_message_id)",
                    ),
                )
        finally:
            self._on_drain.discard(stop_reading)
            for t in (reader, batcher):
                t.cancel()
            for t in (reader, batcher):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t

    async def SendMessageBatch(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """One result per message, in order; the batch is one `accept_messages` call with an order
        of its own, so a failed message ABORTs the later ones of its conversation (as a stream does)."""
        try:
            batch = _checked(request)
            limit = self._settings.max_batch_messages
            if len(batch.messages) > limit:
                raise v.invalid(
                    f"the batch has {len(batch.messages)} messages; at most {limit} are accepted "
                    "(SWITCHBOARD_MAX_BATCH_MESSAGES): split it"
                )
            requests = list(batch.messages)
            outcomes = await self._service.accept_messages(
                requests, traceparent_of(context), WriteOrder(None)
            )
        except Exception as exc:
            await _abort(context, as_rejection(exc, "SendMessageBatch"))
            return None
        response = chat_pb2.SendMessageBatchResponse()
        results = response.results
        for req, outcome in zip(requests, outcomes, strict=True):
            if isinstance(outcome, v.RequestRejected):
                results.add(
                    client_message_id=req.client_message_id,
                    conversation_id=req.conversation_id,
                    error_code=outcome.code.value[0],
                    error_message=outcome.message,
                )
            else:
                results.append(outcome)
        return response

    async def GetConversation(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await self._service.get_conversation(_checked(request))
        except Exception as exc:
            await _abort(context, as_rejection(exc, "GetConversation"))

    async def StreamConversation(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[chat_pb2.ConversationUpdate]:
        try:
            updates = await self._service.stream_conversation(_checked(request))
        except Exception as exc:
            await _abort(context, as_rejection(exc, "StreamConversation"))
            return
        try:
            async for update in updates:
                yield update
        except Exception as exc:
            # The caller resumes from the last cursor it received.
            await _abort(context, as_rejection(exc, "StreamConversation"))
        finally:
            await updates.aclose()

    async def CloseConversation(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await self._service.close_conversation(_checked(request), traceparent_of(context))
        except Exception as exc:
            await _abort(context, as_rejection(exc, "CloseConversation"))

    async def RateConversation(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await self._service.rate_conversation(_checked(request), traceparent_of(context))
        except Exception as exc:
            await _abort(context, as_rejection(exc, "RateConversation"))


def _unary(method: str, call: Callable[..., Awaitable[Any]], with_trace: bool) -> Any:
    """A unary handler over a service method: statuses for rejections, never a stack trace."""

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if with_trace:
                return await call(_checked(request), traceparent_of(context))
            return await call(_checked(request))
        except Exception as exc:
            await _abort(context, as_rejection(exc, method))

    return handle


class _MethodSymbols:
    """The descriptor pool for reflection, which also finds the file of a method's full name
    (`grpcurl describe switchboard.v1.ChatService.SendMessage`): Python's pool finds services and
    messages, not methods, so the reflection service answered NOT_FOUND (grpc/grpc#34743)."""

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str) -> Any:  # the pool's own name
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service_name, _, method = symbol.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                raise KeyError(symbol) from None
            if method not in service.methods_by_name:
                raise KeyError(symbol) from None
            return service.file


def _knowledge_handlers(service: KnowledgeService) -> grpc.GenericRpcHandler:
    methods: dict[str, tuple[Callable[..., Awaitable[Any]], type[Message]]] = {
        "UpsertDocuments": (service.upsert_documents, knowledge_pb2.UpsertDocumentsRequest),
        "DeleteDocument": (service.delete_document, knowledge_pb2.DeleteDocumentRequest),
        "GetDocument": (service.get_document, knowledge_pb2.GetDocumentRequest),
        "ListDocuments": (service.list_documents, knowledge_pb2.ListDocumentsRequest),
        "SearchKnowledge": (service.search_knowledge, knowledge_pb2.SearchKnowledgeRequest),
    }
    return _unary_handlers(KNOWLEDGE_SERVICE_NAME, methods, with_trace=False)


def _agent_handlers(service: AgentService) -> grpc.GenericRpcHandler:
    methods: dict[str, tuple[Callable[..., Awaitable[Any]], type[Message]]] = {
        "AcceptConversation": (service.accept_conversation, agent_pb2.AcceptConversationRequest),
        "SendAgentMessage": (service.send_agent_message, agent_pb2.SendAgentMessageRequest),
        "TransferConversation": (service.transfer_conversation, agent_pb2.TransferConversationRequest),
        "ReturnToBot": (service.return_to_bot, agent_pb2.ReturnToBotRequest),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            _unary(name, call, with_trace=True), _deserializer(cls), _serialize
        )
        for name, (call, cls) in methods.items()
    }
    handlers["ListQueue"] = grpc.unary_unary_rpc_method_handler(
        _unary("ListQueue", service.list_queue, with_trace=False),
        _deserializer(agent_pb2.ListQueueRequest),
        _serialize,
    )
    return grpc.method_handlers_generic_handler(AGENT_SERVICE_NAME, handlers)


def _unary_handlers(
    service_name: str,
    methods: dict[str, tuple[Callable[..., Awaitable[Any]], type[Message]]],
    with_trace: bool,
) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        service_name,
        {
            name: grpc.unary_unary_rpc_method_handler(
                _unary(name, call, with_trace), _deserializer(cls), _serialize
            )
            for name, (call, cls) in methods.items()
        },
    )


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _batch_deserializer(max_bytes: int) -> Callable[[bytes], Any]:
    """Refuses an oversized batch before parsing it (its size is the bytes on the wire)."""
    parse = _deserializer(chat_pb2.SendMessageBatchRequest)

    def check(data: bytes) -> Any:
        if len(data) > max_bytes:
            return _Oversized(
                f"the batch is {len(data)} bytes; at most {max_bytes} are accepted "
                "(SWITCHBOARD_MAX_BATCH_BYTES): split it"
            )
        return parse(data)

    return check


class _Oversized(v.MalformedRequest):
    def __init__(self, message: str) -> None:
        super().__init__(chat_pb2.SendMessageBatchRequest.DESCRIPTOR.full_name, message)

    def rejection(self) -> v.RequestRejected:
        return v.invalid(self.reason)


def _handlers(servicer: ChatServicer, settings: Settings) -> grpc.GenericRpcHandler:
    def ser(message: Message) -> bytes:
        return message.SerializeToString()

    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "StartConversation": grpc.unary_unary_rpc_method_handler(
                servicer.StartConversation, _deserializer(chat_pb2.StartConversationRequest), ser
            ),
            "SendMessage": grpc.unary_unary_rpc_method_handler(
                servicer.SendMessage, _deserializer(chat_pb2.SendMessageRequest), ser
            ),
            "SendMessages": grpc.stream_stream_rpc_method_handler(
                servicer.SendMessages, _deserializer(chat_pb2.SendMessageRequest), ser
            ),
            "SendMessageBatch": grpc.unary_unary_rpc_method_handler(
                servicer.SendMessageBatch, _batch_deserializer(settings.max_batch_bytes), ser
            ),
            "GetConversation": grpc.unary_unary_rpc_method_handler(
                servicer.GetConversation, _deserializer(chat_pb2.GetConversationRequest), ser
            ),
            "StreamConversation": grpc.unary_stream_rpc_method_handler(
                servicer.StreamConversation, _deserializer(chat_pb2.StreamConversationRequest), ser
            ),
            "CloseConversation": grpc.unary_unary_rpc_method_handler(
                servicer.CloseConversation, _deserializer(chat_pb2.CloseConversationRequest), ser
            ),
            "RateConversation": grpc.unary_unary_rpc_method_handler(
                servicer.RateConversation, _deserializer(chat_pb2.RateConversationRequest), ser
            ),
        },
    )


class ReadinessHealth(health.aio.HealthServicer):
    """Check answers from the hot view's readiness at the time of the call, not from the last poll:
    with N ingress processes behind one port, a new connection may reach any of them, and all must
    give the same answer (the readiness is one fact, in Redis). A process that has not read the
    erasure registry yet says NOT_SERVING too (IngressServer._serving). Watch follows the polled
    status; a draining process says NOT_SERVING."""

    def __init__(self, ready: Callable[[], Awaitable[bool]]) -> None:
        super().__init__()
        self._ready = ready
        self.draining = False
        self._watches_ended = asyncio.Event()

    def end_watches(self) -> None:
        """The process is draining: Watch calls end with UNAVAILABLE (they were told NOT_SERVING),
        so they do not hold the server's stop for its whole grace."""
        self._watches_ended.set()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        watching = asyncio.ensure_future(super().Watch(request, context))
        ending = asyncio.ensure_future(self._watches_ended.wait())
        try:
            await asyncio.wait([watching, ending], return_when=asyncio.FIRST_COMPLETED)
        finally:
            ending.cancel()
            if not watching.done():
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await watching
        if watching.cancelled() or watching.exception() is not None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "this ingress process is stopping; watch another"
            )

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:
        await super().Check(request, context)  # NOT_FOUND for a service we do not serve
        if self.draining:
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            ready = await self._ready()
        except Exception as exc:
            log.warning("readiness check failed: %r", exc)
            ready = False
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )


class IngressServer:
    """Owns the gRPC server and its Kafka producer and Redis pool."""

    def __init__(self, settings: Settings, *, reuse_port: bool = False) -> None:
        self.settings = settings
        # A dropped connection is retried once, pipelines too: after a Redis restart every pooled
        # connection fails once. Safe: settlements and touches are idempotent, and a claim script
        # run again sees its own marker as its. A timeout is not retried: redis-py's default
        # retries it (here once, by default 10 times), each attempt waiting the socket timeout
        # again, so a Redis that stopped answering (SIGSTOP, a partition, a long command) held
        # every call 2 x 5 s and readiness as long. Every command the ingress sends on this pool
        # takes milliseconds (short pipelines and scripts, SCAN pages; no blocking reads: live
        # streams have their own pools), so one timeout says Redis is not answering.
        self.redis = aioredis.Redis.from_url(
            settings.redis_url,
            max_connections=512,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        # Live streams share a few blocking connections of their own (services/ingress/_live.py);
        # this pool serves their short reads and wake-ups.
        self.live_redis = live_pool(settings.redis_url, 64)
        self.producer = EventProducer(settings)
        metrics.observe_producer(self.producer)
        self.hot = IngressHotView(
            self.redis,
            settings.idempotency_ttl_s,
            self.live_redis,
            lease_id=os.environ.get(LEASE_ENV) or None,
        )
        # Quotas read the tenants the auth follower keeps (self.auth, made below).
        self.quotas = Quotas(settings, lambda: self.auth.follower.registry)
        self.service = ChatService(settings, self.producer, self.hot, self.live_redis, self.quotas)
        self.knowledge = KnowledgeService(settings, self.redis, quotas=self.quotas)
        self.agents = AgentService(settings, self.redis, self.hot, self.service.reads, self.service.writes)
        self._readiness: asyncio.Task[None] | None = None
        self._readiness_error: Exception | None = None  # why the last readiness check failed
        # Closes conversations idle past the tenant's idle time (services/ingress/_idle.py).
        self.idle = IdleSweeper(
            settings,
            self.redis,
            self.service.writes,
            lambda: self.auth.follower.registry,
            lambda: self.hot.is_ready(settings.topic_partitions),
        )
        self._sweeping: asyncio.Task[None] | None = None
        self._leasing: asyncio.Task[None] | None = None
        self.health = ReadinessHealth(self._serving)
        # API keys and tenants (services/auth): checked per call by its interceptor.
        self.auth = IngressAuth(settings)
        # Writes in flight (bounded by the producer) plus every live stream it may hold.
        admitted = max(1000, settings.max_inflight_produce * 4) + settings.max_live_streams
        self.server = grpc.aio.server(
            maximum_concurrent_rpcs=admitted,
            interceptors=[metrics.MetricsInterceptor(), self.auth.interceptor],
            options=[
                # C-core queues calls that arrived before the server asked for them, and cancels
                # what passes 1,000 of them (3,000 for good), bare CANCELLED with nothing logged: a
                # burst of 3,000 on one connection (a reconnect storm of live streams) met that
                # (tests/integration/test_ingress_bursts.py). Not the admission bound (~28k): a
                # pending call holds its request's bytes before any check, up to ~1 MB each with
                # large bodies (review, twenty-eighth session).
                ("grpc.server.max_pending_requests", PENDING_CALLS),
                ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS),
                # Room above the batch limit, so an oversized batch gets our INVALID_ARGUMENT.
                (
                    "grpc.max_receive_message_length",
                    max(4 * 1024 * 1024, settings.max_batch_bytes + (1 << 20)),
                ),
                # Only the processes of one `switchboard ingress` share a port (see _supervisor).
                ("grpc.so_reuseport", 1 if reuse_port else 0),
            ],
        )
        self.chat = ChatServicer(self.service)
        self.server.add_generic_rpc_handlers(
            (
                _handlers(self.chat, settings),
                _knowledge_handlers(self.knowledge),
                _agent_handlers(self.agents),
            )
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
            pool=_MethodSymbols(descriptor_pool.Default()),
        )
        self._listening = False
        self.port = self.auth.add_port(self.server)  # TLS when configured
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {settings.grpc_listen} (port in use?)")

    async def start(self) -> None:
        """Start, or stop again whatever was started and raise: the port is bound from the
        constructor on, and a start that failed (Kafka not answering yet) kept it bound for the
        life of the object (in CI, every later ingress on that address failed to bind)."""
        try:
            await self._start()
        except BaseException:
            try:
                if not self._listening:
                    # gRPC releases a bound port only by stopping a started server (a stop, or
                    # the object's end, leave it bound): started and stopped at once, before
                    # anything is served (health says NOT_SERVING from the start).
                    await self.server.start()
                await self.stop(grace=0)
            except Exception as exc:
                log.warning("stopping an ingress whose start failed: %r", exc)
            raise

    async def _start(self) -> None:
        await self.redis.ping()
        # Alive before the first claim: a retry may take over claims of dead processes only.
        await self.hot.renew_lease()
        self._leasing = asyncio.ensure_future(self.hot.keep_lease())
        await self.producer.start()
        await self.auth.start()
        # Writes to conversations erased by `switchboard tenant erase` are refused (_writes.py);
        # before the server takes calls, or the first ones would not be checked at all.
        self.service.writes.follow_erasures()
        # Listen once writes can be checked against it (bounded): with SO_REUSEPORT the kernel
        # hands a listening process new connections at once, and a process started again beside
        # its siblings (a restart under load) got connections whose writes each waited for this
        # read and whose health said NOT_SERVING while the siblings said SERVING.
        if not await self.service.writes.erasures_read():
            log.warning(
                "listening before the erasure registry was read: writes wait for it, health NOT_SERVING"
            )
        await self.server.start()
        self._listening = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._readiness = asyncio.ensure_future(self._follow_readiness())
        self._sweeping = asyncio.ensure_future(self.idle.run())
        log.info("ingress listening for %s on %s", SERVICE_NAME, self.settings.grpc_listen)

    async def _serving(self) -> bool:
        """Whether writes can be taken: the hot view is complete and the erasure registry was
        read once (until then every write waits for it, up to produce_timeout_s, and is refused
        UNAVAILABLE: a load balancer should send it elsewhere)."""
        return self.service.writes.erasures_ready and await self.hot.is_ready(self.settings.topic_partitions)

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def _follow_readiness(self) -> None:
        """SERVING only while the hot view is complete and the erasure registry was read (the
        write gates themselves are checked with every write; this tells load balancers and
        `make run`)."""
        serving: bool | None = None
        while True:
            self._readiness_error = None
            try:
                ready = await self._serving()
            except Exception as exc:
                raise_if_cancelling(exc)  # redis-py may turn our cancel into an error of its own
                # Within redis_timeout_s when Redis hangs (the pool's timeouts are not retried).
                self._readiness_error = exc
                log.warning("readiness check failed: %r %s", exc, exc)
                ready = False
            if ready != serving:
                serving = ready
                await self._set_health(
                    health_pb2.HealthCheckResponse.SERVING
                    if ready
                    else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                log.info("ingress %s", "serving" if ready else f"NOT serving: {self._not_serving_why()}")
            await asyncio.sleep(READINESS_POLL_S)

    def _not_serving_why(self) -> str:
        if self._readiness_error is not None:
            error = self._readiness_error
            return (
                f"the readiness check failed ({type(error).__name__}: {error}; Redis away or not answering?)"
            )
        if not self.service.writes.erasures_ready:
            return f"the erasure registry (topic {self.settings.privacy_topic}) is not read yet"
        return "the hot view is incomplete (being rebuilt)"

    async def failed(self) -> BaseException:
        """Returns (only) once this process can no longer write: its Kafka producer's sender task
        ended (EventProducer._sender_ended). `serve` then stops the process with a failure exit
        code, so that its supervisor (or `switchboard run`, or the deployment) starts a fresh one."""
        return await self.producer.failed()

    async def stop(self, grace: float = 5.0) -> None:
        """Drain: report NOT_SERVING, close the listener and finish in-flight calls (up to
        `grace`), flush the producer."""
        self.health.draining = True
        # NOT_SERVING for good (Watch too): a readiness poll still ending cannot set SERVING again.
        # Bounded: it takes each service's lock, which a Watch writing to a client that stopped
        # reading holds (Check answers NOT_SERVING from `draining` anyway).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.health.enter_graceful_shutdown(), STOP_TASK_WAIT_S)
        background = [task for task in (self._readiness, self._sweeping) if task is not None]
        for task in background:
            task.cancel()
        # Long-lived streams end now (their clients go on on another process); the server's stop
        # below would otherwise wait its whole grace for them.
        try:
            self.chat.drain()
            self.health.end_watches()
        except Exception:
            log.exception("ingress stop: ending the long-lived streams failed; draining on")
        # The listener closes first, whatever the background tasks do: one slow to end its cancel
        # (a sweep's Kafka client stopping against a stalled broker) kept new connections coming
        # to this draining process and held its in-flight calls past the produce timeout. Either
        # side failing must not skip the rest of the drain (the producer's flush above all).
        for outcome in await asyncio.gather(
            self.server.stop(grace), self._background_ended(background), return_exceptions=True
        ):
            if isinstance(outcome, BaseException):
                log.warning("ingress stop: %r; draining on", outcome)
        await self.auth.stop()
        await self.producer.stop()
        # The producer flushed: let the writes' settlements record their acks in Redis (else a
        # retry would find a pending claim until it expires).
        await self.service.writes.drain(self.settings.produce_timeout_s)
        # Renewed through the drain (its writes are live); what is left pending now is abandoned:
        # retries elsewhere take it over at once.
        if self._leasing is not None:
            self._leasing.cancel()
            await asyncio.wait([self._leasing], timeout=STOP_TASK_WAIT_S)
        try:
            await self.hot.renew_lease(0)
        except Exception as exc:
            log.warning("ending this ingress process's lease failed (%r); it runs out by itself", exc)
        await self.service.writes.stop_erasures()
        await self.knowledge.close()
        await self.service.reads.close()
        await self.hot.close()
        await self.redis.aclose()
        await self.live_redis.aclose()

    @staticmethod
    async def _background_ended(tasks: list[asyncio.Task[None]]) -> None:
        # Bounded: a task that swallowed its cancellation must not hold the drain up (and
        # `await task` here would swallow a cancellation of stop() itself).
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=STOP_TASK_WAIT_S)
        for task in pending:
            log.warning("ingress stop: %r did not end within %.0fs of its cancel", task, STOP_TASK_WAIT_S)


# The exit code of an ingress process that stopped because it could no longer write (EX_SOFTWARE).
FAILED_EXIT_CODE = 70


async def serve(settings: Settings) -> int:
    """Run the ingress until SIGTERM or SIGINT, then drain and stop: N supervised processes on one
    port (settings.ingress_processes, default one per core), or this process alone when N is 1.
    Returns the exit code: FAILED_EXIT_CODE when the process stopped because it could no longer
    write (IngressServer.failed), 0 otherwise."""
    await preflight(settings)  # before binding: no keyless ingress on a public address
    child = os.environ.get(CHILD_ENV)
    count = process_count(settings)
    metrics.serve_metrics(settings, "ingress", child=child is not None, children=count)
    if child is None and count > 1:
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
        await Supervisor(settings, count, level).run()
        return 0
    ending: asyncio.Future[None] | None = None
    if child is None:
        # A lone ingress process: its own lease (always a new one), recorded as a supervisor
        # records its children's (a later start on this address ends it if this process died
        # without ending it), after it read the earlier run's record.
        earlier = dead_leases(leases_file(settings))
        os.environ[LEASE_ENV] = new_lease_id()
    server = IngressServer(settings, reuse_port=child is not None)
    await server.start()
    if child is None:
        record_leases(settings, [(os.environ[LEASE_ENV], os.getpid())])
        ending = asyncio.ensure_future(end_earlier_leases(settings, earlier))
    eventloop.freeze_heap()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        return await serve_until_stopped(server, stopping)
    finally:
        if ending is not None:
            ending.cancel()


async def serve_until_stopped(server: IngressServer, stopping: asyncio.Event) -> int:
    """Serve until `stopping` is set or the process can no longer write (IngressServer.failed),
    then drain and stop; the exit code (FAILED_EXIT_CODE after a failure, else 0)."""
    drain_s = server.settings.ingress_drain_s
    failing = asyncio.ensure_future(server.failed())
    signalled = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait([failing, signalled], return_when=asyncio.FIRST_COMPLETED)
        if failing.done():
            log.error(
                "stopping: this process can no longer write (%r); draining in-flight calls (up to "
                "%.0fs), then exiting with %d to be started afresh",
                failing.result(),
                drain_s,
                FAILED_EXIT_CODE,
            )
        else:
            log.info("stopping: draining in-flight calls (up to %.0fs)", drain_s)
    finally:
        for task in (failing, signalled):
            task.cancel()
        await server.stop(drain_s)
    return FAILED_EXIT_CODE if failing.done() and not failing.cancelled() else 0
