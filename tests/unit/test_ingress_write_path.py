"""The write path's guarantees, with the hot view and Kafka replaced by in-memory fakes.

What is checked here is ordering and bookkeeping logic (claims, turns, failure sets, the close
gate); the same guarantees on real servers are in tests/integration/test_ingress_*.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from aiokafka.errors import OutOfOrderSequenceNumber
from switchboard.v1 import chat_pb2

from schemas import hotview as hv
from schemas.events import Event, event_type
from services.ingress import RequestRejected
from services.ingress._hotview import Claim, HeldClaim, IngressHotView, Registration
from services.ingress._producer import Ack, EventProducer
from services.ingress._service import ChatService, MessageBatcher, WriteOrder
from services.settings import Settings

T = "acme"
A = "conv-a"
B = "conv-b"


class FakeHotView(IngressHotView):
    """Claims, registrations and closes in dicts; `hold_claims` makes claim_many wait."""

    def __init__(self) -> None:
        self.claims: dict[tuple[str, str, str], bytes] = {}
        self.closed: dict[tuple[str, str], int] = {}
        self.registered: set[tuple[str, str]] = {(T, A), (T, B)}
        self.hold_claims: dict[str, asyncio.Event] = {}  # client_message_id -> released when set
        self.claiming: set[str] = set()
        self.fresh = True  # lease_fresh()

    def lease_fresh(self) -> bool:
        return self.fresh

    async def lookup_many(self, keys: Sequence[tuple[str, str]]) -> list[Registration | None]:
        await asyncio.sleep(0)
        return [
            Registration(1, self.closed.get(k, 0), 1, "c", None, "") if k in self.registered else None
            for k in keys
        ]

    async def is_ready(self, partitions: int) -> bool:
        return True

    async def claim_many(
        self,
        keys: Sequence[tuple[str, str, str]],
        partitions: int = 0,
        *,
        unless_closed: bool = False,
        take_over: bool = False,
        dead_if_ended: bool = False,
    ) -> list[Claim]:
        for key in keys:
            self.claiming.add(key[2])
            if key[2] in self.hold_claims:
                await self.hold_claims[key[2]].wait()
        out = []
        for key in keys:
            if unless_closed and (key[0], key[1]) in self.closed:
                out.append(Claim(claimed=False, closed=True))
                continue
            previous = self.claims.get(key)
            if previous is None:
                self.claims[key] = hv.CLAIM_PENDING
                out.append(Claim(claimed=True))
            else:
                decoded = hv.decode_claim(previous)
                out.append(Claim(claimed=False, earlier=Ack(*decoded) if decoded else None))
        return out

    async def touch_claims(self, keys: Sequence[HeldClaim]) -> None:
        pass

    async def settle_many(
        self, outcomes: Sequence[tuple[HeldClaim, Ack | None]], *, within_s: float = 0.0
    ) -> None:
        for held, ack in outcomes:
            key = (held.tenant_id, held.conversation_id, held.client_message_id)
            if ack is None:
                self.claims.pop(key, None)
            else:
                self.claims[key] = hv.encode_claim(ack.event_id, ack.partition, ack.offset).encode()

    async def register(self, tenant_id: str, conversation_id: str, **_: Any) -> None:
        self.registered.add((tenant_id, conversation_id))

    async def mark_closed(self, tenant_id: str, conversation_id: str, closed_ns: int) -> None:
        self.closed[(tenant_id, conversation_id)] = closed_ns

    async def clear_closed(self, tenant_id: str, conversation_id: str) -> None:
        self.closed.pop((tenant_id, conversation_id), None)

    async def hold_for_close(self, tenant_id: str, conversation_id: str, owner: bytes) -> int:
        return 0  # in one process the gate orders sends and closes (Redis's set: integration tests)

    async def release_close(self, tenant_id: str, conversation_id: str, owner: bytes) -> None:
        pass

    async def recent_entries(self, *_: Any, **__: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
        return []


def label(event: Event) -> str:
    kind = event_type(event)
    if kind == "message_received":
        return event.message_received.client_message_id
    return kind


class _Client:
    """Stands in for the AIOKafkaProducer, so `_replace_producer` swaps it out as for real."""

    async def stop(self) -> None:
        pass


class FakeProducer(EventProducer):
    """Records the order records were handed over; each delivery is a future the test resolves."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._producer = _Client()
        self.order: list[str] = []
        self.deliveries: dict[str, asyncio.Future[object]] = {}
        self.raise_on: set[str] = set()
        self.hold_enqueue: dict[str, asyncio.Event] = {}
        self.auto_ack = True
        self._offset = 0

    async def enqueue(self, event: Event, *, bounded: bool = True) -> asyncio.Future[object]:
        name = label(event)
        if name in self.hold_enqueue:
            await self.hold_enqueue[name].wait()
        if name in self.raise_on:
            raise RuntimeError(f"boom on {name}")
        if self._producer is None:
            self._producer = _Client()  # replaced: the send starts a new one
        self.order.append(name)
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self.deliveries[name] = fut
        if self.auto_ack:
            self.ack(name)
        return fut

    def ack(self, name: str) -> None:
        self._offset += 1
        self.deliveries[name].set_result(SimpleNamespace(partition=0, offset=self._offset))


def make(
    max_inflight: int = 100, produce_timeout_s: float = 0.5
) -> tuple[ChatService, FakeHotView, FakeProducer]:
    settings = Settings(
        max_inflight_produce=max_inflight, produce_timeout_s=produce_timeout_s, topic_partitions=1
    )
    hot = FakeHotView()
    producer = FakeProducer(settings)
    return ChatService(settings, producer, hot), hot, producer


def msg(cmid: str, conversation_id: str = A, text: str = "hi") -> chat_pb2.SendMessageRequest:
    return chat_pb2.SendMessageRequest(
        tenant_id=T, conversation_id=conversation_id, client_message_id=cmid, text=text
    )


def code(outcome: object) -> grpc.StatusCode | None:
    return outcome.code if isinstance(outcome, RequestRejected) else None


async def until(condition: Any, what: str) -> None:
    """Let the event loop run until `condition()` holds (no wall-clock sleeps)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


async def test_a_batch_with_nothing_to_write_still_waits_for_the_previous_batch() -> None:
    service, hot, producer = make()
    hot.hold_claims["m1"] = asyncio.Event()
    first = WriteOrder(None)
    second = WriteOrder(first)
    third = WriteOrder(second)
    b1 = asyncio.ensure_future(service.accept_messages([msg("m1")], "", first))
    await until(lambda: "m1" in hot.claiming, "batch 1 claiming")
    b2 = asyncio.ensure_future(service.accept_messages([msg("bad", text="")], "", second))
    b3 = asyncio.ensure_future(service.accept_messages([msg("m2")], "", third))
    await until(lambda: "m2" in hot.claiming, "batch 3 claiming")
    for _ in range(200):  # give batch 3 every chance to jump the queue
        await asyncio.sleep(0)
    hot.hold_claims["m1"].set()
    await asyncio.gather(b1, b2, b3)
    assert producer.order == ["m1", "m2"]


async def test_resource_exhausted_aborts_later_messages_of_the_conversation() -> None:
    service, _, producer = make(max_inflight=1)
    producer.auto_ack = False
    first = WriteOrder(None)
    b1 = asyncio.ensure_future(service.accept_messages([msg("m1"), msg("m2")], "", first))
    await until(lambda: "m1" in producer.deliveries, "m1 enqueued")
    producer.ack("m1")
    out1 = await b1
    assert code(out1[1]) == grpc.StatusCode.RESOURCE_EXHAUSTED
    producer.auto_ack = True
    (out2,) = await service.accept_messages([msg("m3")], "", WriteOrder(first))
    assert code(out2) == grpc.StatusCode.ABORTED
    assert producer.order == ["m1"]


async def test_an_in_flight_refusal_aborts_later_messages_of_the_conversation() -> None:
    service, hot, producer = make()
    hot.claims[(T, A, "m1")] = hv.CLAIM_PENDING  # an earlier attempt is still being written
    out = await service.accept_messages([msg("m1"), msg("m2"), msg("b1", B)], "", WriteOrder(None))
    assert [code(o) for o in out] == [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, None]
    assert producer.order == ["b1"]
    assert (T, A, "m2") not in hot.claims  # nothing written, so nothing claimed


async def test_a_process_whose_lease_is_not_fresh_hands_nothing_to_kafka() -> None:
    # Its claims may be another process's by now (taken over as a dead process's): writing them
    # too would put a second copy in the log. It answers UNAVAILABLE and drops its claims.
    service, hot, producer = make()
    hot.fresh = False
    (out,) = await service.accept_messages([msg("m1")], "", WriteOrder(None))
    assert code(out) == grpc.StatusCode.UNAVAILABLE
    assert "lease" in str(out), out
    assert producer.order == [] and (T, A, "m1") not in hot.claims
    hot.fresh = True
    (out,) = await service.accept_messages([msg("m1")], "", WriteOrder(None))
    assert code(out) is None and producer.order == ["m1"]


async def test_an_exception_aborts_later_messages_of_the_conversation() -> None:
    service, _, producer = make()
    producer.raise_on.add("m1")
    first = WriteOrder(None)
    out1 = await service.accept_messages([msg("m1")], "", first)
    assert code(out1[0]) == grpc.StatusCode.INTERNAL
    (out2,) = await service.accept_messages([msg("m2")], "", WriteOrder(first))
    assert code(out2) == grpc.StatusCode.ABORTED
    assert producer.order == []


async def test_a_stream_message_is_not_written_behind_an_earlier_one_that_failed_meanwhile() -> None:
    # Review finding: batch N's m1 fails with a fatal producer error (a broker restart) and the
    # producer is replaced; batch N+1 (admitted once N was handed over, its claim slow) passed the
    # `failed` check, which is filled only once all of N's acks are in (b1 still pending), and was
    # written by the new producer: m2 acked, m1 UNAVAILABLE, so the resent m1 landed after m2.
    service, hot, producer = make()
    producer.auto_ack = False
    first = WriteOrder(None)
    batch_n = asyncio.ensure_future(service.accept_messages([msg("m1"), msg("b1", B)], "", first))
    await until(lambda: "b1" in producer.deliveries, "batch N handed over")
    hot.hold_claims["m2"] = asyncio.Event()
    batch_n1 = asyncio.ensure_future(service.accept_messages([msg("m2")], "", WriteOrder(first)))
    await until(lambda: "m2" in hot.claiming, "batch N+1 claiming")
    producer.deliveries["m1"].set_exception(OutOfOrderSequenceNumber())
    await until(lambda: producer.generation == 1, "the broken producer replaced")
    producer.auto_ack = True
    hot.hold_claims["m2"].set()
    (out2,) = await batch_n1
    producer.ack("b1")
    out1, _ = await batch_n
    assert code(out1) == grpc.StatusCode.UNAVAILABLE
    assert code(out2) == grpc.StatusCode.ABORTED, "m2 acked ahead of the failed m1"
    assert producer.order == ["m1", "b1"]
    assert (T, A, "m2") not in hot.claims, "the refused message's claim was kept"


async def test_a_stream_message_waits_out_an_earlier_one_left_on_a_replaced_producer() -> None:
    # m1 is still unacknowledged on a producer that another caller's fatal error replaced: the old
    # one may yet deliver it (while it is closed) or fail it, after m2 went out on the new one.
    service, _, producer = make()
    producer.auto_ack = False
    first = WriteOrder(None)
    batch_n = asyncio.ensure_future(service.accept_messages([msg("m1")], "", first))
    await until(lambda: "m1" in producer.deliveries, "m1 handed over")
    other = asyncio.ensure_future(service.accept_messages([msg("b1", B)], ""))
    await until(lambda: "b1" in producer.deliveries, "b1 handed over")
    producer.deliveries["b1"].set_exception(OutOfOrderSequenceNumber())
    await other
    assert producer.generation == 1
    producer.auto_ack = True
    second = WriteOrder(first)
    (out2,) = await service.accept_messages([msg("m2")], "", second)
    assert code(out2) == grpc.StatusCode.ABORTED, "m2 written by the new producer while m1 was in doubt"
    producer.ack("m1")  # the old producer delivered it after all
    (out1,) = await batch_n
    assert isinstance(out1, chat_pb2.SendMessageResponse)
    # m2 was refused, so m3 must not go ahead of its resend either.
    (out3,) = await service.accept_messages([msg("m3")], "", WriteOrder(second))
    assert code(out3) == grpc.StatusCode.ABORTED
    assert producer.order == ["m1", "b1"]


async def test_a_batch_does_not_split_a_conversation_across_a_producer_replacement() -> None:
    # SendMessageBatch: one WriteOrder; m1 is in the old producer's send when a fatal error of
    # another caller replaces it, so m2 (same batch, same conversation) would go to the new one.
    service, hot, producer = make()
    producer.auto_ack = False
    producer.hold_enqueue["m1"] = asyncio.Event()
    batch = asyncio.ensure_future(service.accept_messages([msg("m1"), msg("m2")], "", WriteOrder(None)))
    await until(lambda: (T, A, "m2") in hot.claims, "the batch claimed")
    for _ in range(20):
        await asyncio.sleep(0)  # m1 is inside the producer's send
    other = asyncio.ensure_future(service.accept_messages([msg("b1", B)], ""))
    await until(lambda: "b1" in producer.deliveries, "b1 handed over")
    producer.deliveries["b1"].set_exception(OutOfOrderSequenceNumber())
    await other
    producer.hold_enqueue["m1"].set()
    await until(lambda: "m1" in producer.deliveries, "m1 handed over (to the old producer)")
    for _ in range(20):
        await asyncio.sleep(0)
    for name in ("m1", "m2"):
        if name in producer.deliveries:
            producer.ack(name)
    out1, out2 = await batch
    assert isinstance(out1, chat_pb2.SendMessageResponse)
    assert code(out2) == grpc.StatusCode.ABORTED
    assert producer.order == ["b1", "m1"]


async def test_cancelling_a_stream_batch_keeps_the_claim_of_a_record_handed_to_kafka() -> None:
    service, hot, producer = make()
    producer.auto_ack = False
    batch = asyncio.ensure_future(service.accept_messages([msg("m1")], "", WriteOrder(None)))
    await until(lambda: "m1" in producer.deliveries, "m1 handed to the producer")
    batch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await batch
    for _ in range(100):
        await asyncio.sleep(0)
    assert hot.claims.get((T, A, "m1")) == hv.CLAIM_PENDING, "the claim was dropped on cancel"
    producer.ack("m1")  # Kafka took it after all
    await until(lambda: hot.claims[(T, A, "m1")] != hv.CLAIM_PENDING, "claim settled with the ack")
    (retry,) = await service.accept_messages([msg("m1")], "")
    assert isinstance(retry, chat_pb2.SendMessageResponse) and retry.duplicate
    assert producer.order == ["m1"]


async def test_a_close_marks_the_hot_view_closed_only_once_its_event_is_durable() -> None:
    service, hot, producer = make()
    producer.auto_ack = False
    close = asyncio.ensure_future(
        service.close_conversation(chat_pb2.CloseConversationRequest(tenant_id=T, conversation_id=A))
    )
    await until(lambda: "conversation_closed" in producer.deliveries, "close handed to the producer")
    assert (T, A) not in hot.closed, "closed in the hot view before the close event is durable"
    close.cancel()
    with pytest.raises(asyncio.CancelledError):
        await close
    producer.ack("conversation_closed")
    await until(lambda: (T, A) in hot.closed, "closed once durable, although the caller went away")


async def test_a_close_that_kafka_refused_leaves_the_conversation_open() -> None:
    service, hot, producer = make()
    producer.auto_ack = False
    close = asyncio.ensure_future(
        service.close_conversation(chat_pb2.CloseConversationRequest(tenant_id=T, conversation_id=A))
    )
    await until(lambda: "conversation_closed" in producer.deliveries, "close handed to the producer")
    producer.deliveries["conversation_closed"].set_exception(ConnectionError("broker gone"))
    with pytest.raises(RequestRejected) as info:
        await close
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert (T, A) not in hot.closed
    assert (T, A, hv.CLOSE_CLAIM) not in hot.claims
    producer.auto_ack = True
    (out,) = await service.accept_messages([msg("after")], "")
    assert isinstance(out, chat_pb2.SendMessageResponse)


async def test_a_send_racing_a_close_lands_before_it_or_is_refused() -> None:
    service, _, producer = make()
    producer.hold_enqueue["m1"] = asyncio.Event()
    send1 = asyncio.ensure_future(service.accept_messages([msg("m1")], ""))
    await until(
        lambda: "m1" in producer.hold_enqueue and send1 is not None and not send1.done(), "m1 sending"
    )
    for _ in range(50):
        await asyncio.sleep(0)  # m1 is inside the producer's send
    close = asyncio.ensure_future(
        service.close_conversation(chat_pb2.CloseConversationRequest(tenant_id=T, conversation_id=A))
    )
    for _ in range(50):
        await asyncio.sleep(0)
    send2 = asyncio.ensure_future(service.accept_messages([msg("m2")], ""))
    for _ in range(50):
        await asyncio.sleep(0)
    producer.hold_enqueue["m1"].set()
    (out1,), conv, (out2,) = await asyncio.gather(send1, close, send2)
    assert isinstance(out1, chat_pb2.SendMessageResponse)
    assert conv.status == chat_pb2.CONVERSATION_STATUS_CLOSED
    assert code(out2) in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE)
    assert producer.order == ["m1", "conversation_closed"]


async def test_a_message_claimed_before_a_close_is_refused_after_it() -> None:
    # Review finding: a stream batch claims its messages, then waits for its turn; a close that
    # completes meanwhile reopened the gate, and the stale claim let the message be written after
    # ConversationClosed (acked, then dropped by the fold).
    service, hot, producer = make()
    producer.hold_enqueue["b1"] = asyncio.Event()  # the previous batch is slow to hand over
    first = WriteOrder(None)
    b1 = asyncio.ensure_future(service.accept_messages([msg("b1", B)], "", first))
    await until(lambda: "b1" in hot.claiming, "batch 1 claimed")
    b2 = asyncio.ensure_future(service.accept_messages([msg("m1")], "", WriteOrder(first)))
    await until(lambda: (T, A, "m1") in hot.claims, "batch 2 claimed m1 and waits for its turn")
    conv = await service.close_conversation(chat_pb2.CloseConversationRequest(tenant_id=T, conversation_id=A))
    assert conv.status == chat_pb2.CONVERSATION_STATUS_CLOSED
    producer.hold_enqueue["b1"].set()
    (out1,), (out2,) = await asyncio.gather(b1, b2)
    assert isinstance(out1, chat_pb2.SendMessageResponse)
    assert code(out2) == grpc.StatusCode.FAILED_PRECONDITION, out2
    assert producer.order == ["conversation_closed", "b1"]
    assert (T, A, "m1") not in hot.claims, "the refused message's claim was kept"


async def test_the_live_stream_limit_is_counted_with_its_check() -> None:
    settings = Settings(max_live_streams=2)
    hot = FakeHotView()
    service = ChatService(settings, FakeProducer(settings), hot)
    request = chat_pb2.StreamConversationRequest(tenant_id=T, conversation_id=A)

    async def open_one() -> grpc.StatusCode | None:
        try:
            updates = await service.stream_conversation(request)
            await asyncio.wait_for(updates.__anext__(), 0.01)
        except RequestRejected as exc:
            return exc.code
        except (TimeoutError, StopAsyncIteration, AttributeError):
            return None
        return None

    async def never(*_: Any, **__: Any) -> list[Any]:
        await asyncio.Event().wait()
        return []

    hot.read_live = never  # type: ignore[method-assign]
    codes = await asyncio.gather(*(open_one() for _ in range(5)))
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 3


async def test_a_unary_call_is_answered_when_its_own_record_is_acked_not_when_its_whole_batch_is() -> None:
    # One unary batch, two conversations: while one record waits for Kafka (its partition's
    # leader is away, say), the other's caller already has its ack; and a refusal in the same
    # batch is answered at once too.
    service, _, producer = make(produce_timeout_s=60)
    producer.auto_ack = False
    batcher = MessageBatcher(service.writes, hold_s=60)
    slow = asyncio.ensure_future(batcher.submit(msg("m1", A), ""))
    fast = asyncio.ensure_future(batcher.submit(msg("m2", B), ""))
    refused = asyncio.ensure_future(batcher.submit(msg("m3", "conv-unknown"), ""))
    await until(lambda: "m1" in producer.deliveries and "m2" in producer.deliveries, "both handed over")
    producer.ack("m2")
    answer = await asyncio.wait_for(fast, 5)
    assert isinstance(answer, chat_pb2.SendMessageResponse) and not answer.duplicate
    assert code(await asyncio.wait_for(refused, 5)) == grpc.StatusCode.NOT_FOUND
    assert not slow.done()
    producer.ack("m1")
    assert isinstance(await asyncio.wait_for(slow, 5), chat_pb2.SendMessageResponse)


async def test_a_caller_gone_while_its_refusal_is_found_does_not_break_its_batch() -> None:
    service, _, _ = make()
    batcher = MessageBatcher(service.writes, hold_s=60)
    gone = asyncio.ensure_future(batcher.submit(msg("m1", "conv-unknown"), ""))
    stays = asyncio.ensure_future(batcher.submit(msg("m2", A), ""))
    await until(lambda: bool(batcher._running), "the batch under way")
    gone.cancel()
    answer = await asyncio.wait_for(stays, 5)
    assert isinstance(answer, chat_pb2.SendMessageResponse), answer


async def test_a_repeated_client_message_id_in_a_batch_is_not_answered_early_with_a_failure() -> None:
    # A write failing unexpectedly refuses what it had not written; a repeat of an id written
    # before the failure is answered from that write (duplicate), early answers included.
    service, _, _ = make()
    writes = service.writes
    real = writes._write_one

    async def write_one(req: Any, claim: Any, order: Any, traceparent: str) -> Any:
        if req.client_message_id == "boom":
            raise RuntimeError("unexpected")
        return await real(req, claim, order, traceparent)

    writes._write_one = write_one  # type: ignore[method-assign]
    early: dict[int, object] = {}

    def answer(i: int, outcome: object) -> None:
        early.setdefault(i, outcome)

    final = await writes.accept_messages([msg("m1", A), msg("m1", A), msg("boom", B)], "", on_outcome=answer)
    assert 1 not in early or code(early[1]) == code(final[1])
    assert code(early[2]) == code(final[2]) == grpc.StatusCode.INTERNAL
