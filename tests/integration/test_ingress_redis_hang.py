"""The ingress does not hang on a Redis that does not answer.

Seen in the last session: with Redis stopped (SIGSTOP: connections accepted, nothing answered, as
in a network partition or a Redis stuck in a long command), a SendMessage waited until its
caller's own deadline and the health service kept saying SERVING, so a load balancer kept sending
traffic. redis-py's defaults are behind it: every command and pipeline is retried on a timeout,
10 times with backoff, each attempt waiting out the socket timeout (5 s): about a minute per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from switchboard.v1 import chat_pb2, chat_pb2_grpc, events_pb2

from services import stack
from services.processes import wait_for_ingress
from tests.integration.conftest import System, eventually

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# The caller's own deadline: the ingress must answer well before it.
CLIENT_DEADLINE_S = 60.0
# From SIGSTOP to UNAVAILABLE and to NOT_SERVING, in Redis timeouts (SWITCHBOARD_REDIS_TIMEOUT_S,
# 2 s in the tests: tests/conftest.py): slack for a loaded machine, far below the deadline. Before
# the fix it was two 5 s timeouts (one retry of a timeout) per Redis command.
ANSWER_WITHIN_TIMEOUTS = 3


def _sent(tenant: str, conversation_id: str, cmid: str, text: str) -> chat_pb2.SendMessageRequest:
    return chat_pb2.SendMessageRequest(
        tenant_id=tenant, conversation_id=conversation_id, client_message_id=cmid, text=text
    )


@pytest.mark.timeout(240)
async def test_a_redis_that_does_not_answer_gets_unavailable_and_not_serving_then_heals(
    system: System, tenant: str
) -> None:
    settings = system.settings
    answer_within_s = ANSWER_WITHIN_TIMEOUTS * settings.redis_timeout_s
    await wait_for_ingress(settings)  # a test before may have left it recovering
    redis_server = psutil.Process((await stack.status(settings))["redis"]["pid"])
    # One channel: the calls and the health checks reach the same ingress process.
    async with grpc.aio.insecure_channel(settings.grpc_listen) as channel:
        chat = chat_pb2_grpc.ChatServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        async def status() -> int | grpc.StatusCode:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            except grpc.aio.AioRpcError as err:
                return err.code()
            return int(reply.status)

        conv = await chat.StartConversation(
            chat_pb2.StartConversationRequest(
                tenant_id=tenant, channel=events_pb2.CHANNEL_WEB, customer_id="c"
            )
        )
        conversation_id = conv.conversation_id
        # A message first: Redis has the claim script then (EVALSHA), as it has in any run but
        # the first, so the refused attempt's claim can run in Redis after SIGCONT (see below).
        await chat.SendMessage(_sent(tenant, conversation_id, "before", "before Redis hangs"), timeout=10)
        cmid = f"hang-{uuid.uuid4().hex[:8]}"
        assert await status() == SERVING
        # Watch follows the readiness loop's status (Check asks Redis at the time of the call).
        watched: list[tuple[float, int]] = []

        async def watch() -> None:
            async for reply in health.Watch(health_pb2.HealthCheckRequest(service="")):
                watched.append((time.monotonic(), int(reply.status)))

        watching = asyncio.ensure_future(watch())
        await eventually(lambda: asyncio.sleep(0, watched), lambda w: w[-1:] != [] and w[-1][1] == SERVING)

        def watched_since(since: float, wanted: int) -> float | None:
            return next((t - since for t, s in watched if t >= since and s == wanted), None)

        redis_server.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await chat.SendMessage(
                    _sent(tenant, conversation_id, cmid, "sent while Redis hangs"), timeout=CLIENT_DEADLINE_S
                )
            to_unavailable = time.monotonic() - stopped_at
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, (to_unavailable, refused.value)
            assert to_unavailable < answer_within_s, f"UNAVAILABLE only after {to_unavailable:.1f}s"
            assert "redis did not answer" in (refused.value.details() or "").lower(), refused.value.details()
            await eventually(
                status,
                lambda s: s == NOT_SERVING,
                within_s=answer_within_s - (time.monotonic() - stopped_at),
                what="NOT_SERVING while Redis does not answer",
            )
            to_not_serving = time.monotonic() - stopped_at
            polled_not_serving = await eventually(
                lambda: asyncio.sleep(0, watched_since(stopped_at, NOT_SERVING)),
                lambda t: t is not None,
                within_s=answer_within_s,
                what="the readiness loop's NOT_SERVING (Watch)",
            )
            assert polled_not_serving is not None and polled_not_serving < answer_within_s
        finally:
            redis_server.send_signal(signal.SIGCONT)
        resumed_at = time.monotonic()
        await eventually(status, lambda s: s == SERVING, within_s=60, what="SERVING again after SIGCONT")
        to_serving = time.monotonic() - resumed_at
        polled_serving = await eventually(
            lambda: asyncio.sleep(0, watched_since(resumed_at, SERVING)),
            lambda t: t is not None,
            within_s=30,
            what="the readiness loop's SERVING again (Watch)",
        )
        watching.cancel()
        with contextlib.suppress(BaseException):
            await watching

        # The retry of the refused message: acked once. The refused attempt's claim may have run in
        # Redis after SIGCONT (its bytes were in Redis's socket buffer); it must not leave the id
        # pending for the claim's whole TTL (120 s), so the bound here is far below it.
        async def retry() -> chat_pb2.SendMessageResponse | grpc.StatusCode:
            try:
                return await chat.SendMessage(
                    _sent(tenant, conversation_id, cmid, "sent while Redis hangs"), timeout=10
                )
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                return err.code()

        acked = await eventually(
            retry, lambda r: not isinstance(r, grpc.StatusCode), within_s=30, what="the retry acked"
        )
        assert isinstance(acked, chat_pb2.SendMessageResponse)
        assert acked.event_id
        fresh = f"after-{uuid.uuid4().hex[:8]}"
        await chat.SendMessage(_sent(tenant, conversation_id, fresh, "after Redis answers again"), timeout=10)

        async def view() -> chat_pb2.Conversation:
            return await chat.GetConversation(
                chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=conversation_id), timeout=10
            )

        folded = await eventually(
            view,
            lambda c: any(m.client_message_id == fresh for m in c.messages),
            within_s=60,
            what="the message sent after SIGCONT folded",
        )
        ids = [m.client_message_id for m in folded.messages]
        assert ids.count(cmid) == 1, ids
        assert [m.event_id for m in folded.messages if m.client_message_id == cmid] == [acked.event_id]
        print(
            f"Redis stopped: UNAVAILABLE after {to_unavailable:.2f}s, NOT_SERVING after "
            f"{to_not_serving:.2f}s (Check; Watch {polled_not_serving:.2f}s); after SIGCONT: SERVING "
            f"after {to_serving:.2f}s (Check; Watch {polled_serving:.2f}s); retry acked, "
            f"duplicate={acked.duplicate}"
        )
