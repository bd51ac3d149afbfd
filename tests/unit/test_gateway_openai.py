"""The OpenAI-compatible adapter against a real HTTP server on 127.0.0.1 that speaks the
chat-completions streaming protocol (SSE), driven through the gateway."""

import asyncio
import email.utils
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from streams.assistant.gateway import (
    OPEN,
    TEMPLATE,
    AdapterConfig,
    Answer,
    AnswerRequest,
    GatewayConfig,
    GroundingPassage,
    ModelGateway,
    ReplyDelta,
    cited_passages,
)
from streams.assistant.gateway._openai import parse_retry_after

PASSAGES = [
    GroundingPassage("doc-refund", "c0", "Refund policy", "Refunds take 3-5 business days.", 0.9, "en"),
    GroundingPassage("doc-ship", "c3", "配送说明", "标准快递2到4天送达。", 0.5, "zh"),
]
REQUEST = AnswerRequest(
    "How long does a refund take?",
    "en",
    PASSAGES,
    intent="refund",
    tenant_id="acme",
    conversation_id="conv-1",
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class FakeLLM:
    """A chat-completions server whose responses follow a script, one handler per request
    (the last one repeats)."""

    script: list[Handler] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    base_url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        self.headers.append(dict(request.headers))
        handler = self.script[min(len(self.requests), len(self.script)) - 1]
        return await handler(request)

    # --- behaviours ---

    def ok(self, tokens: list[str], *, usage: dict | None = None, noise: bool = False) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            response = await self._start(request)
            if noise:
                # Keep-alive comments, event/id fields, CRLF endings and a role-only first chunk.
                await response.write(b": keep-alive\r\n\r\nevent: message\r\nid: 1\r\n")
                await response.write(
                    _event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}, crlf=True)
                )
            for token in tokens:
                await response.write(_event({"choices": [{"index": 0, "delta": {"content": token}}]}))
            await response.write(_event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
            if usage is not None:
                await response.write(_event({"choices": [], "usage": usage}))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response

        return handler

    def status(self, status: int, *, retry_after: str | None = None) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            headers = {"Retry-After": retry_after} if retry_after is not None else {}
            return web.json_response(
                {"error": {"message": f"scripted {status}"}}, status=status, headers=headers
            )

        return handler

    def stall(self, tokens: Sequence[str] = ()) -> Handler:
        """Send headers (and `tokens`), then nothing until the test releases the server."""

        async def handler(request: web.Request) -> web.StreamResponse:
            response = await self._start(request)
            for token in tokens:
                await response.write(_event({"choices": [{"index": 0, "delta": {"content": token}}]}))
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                # aiohttp cancels the handler when the client goes away.
                self.disconnected.set()
                raise
            return response

        return handler

    def die_mid_stream(self, tokens: list[str]) -> Handler:
        """Stream some tokens, then drop the connection without finishing the response."""

        async def handler(request: web.Request) -> web.StreamResponse:
            response = await self._start(request)
            for token in tokens:
                await response.write(_event({"choices": [{"index": 0, "delta": {"content": token}}]}))
            assert request.transport is not None
            request.transport.close()
            return response

        return handler

    async def _start(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        return response


def _event(payload: dict, *, crlf: bool = False) -> bytes:
    end = "\r\n" if crlf else "\n"
    return f"data: {json.dumps(payload, ensure_ascii=False)}{end}{end}".encode()


@pytest.fixture
async def llm() -> AsyncIterator[FakeLLM]:
    server = FakeLLM()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", server.handle)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.base_url = f"http://{host}:{port}/v1"
    try:
        yield server
    finally:
        server.release.set()
        await runner.cleanup()


class RecordingSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def gateway_for(server: FakeLLM, sleep: RecordingSleep | None = None, **adapter: Any) -> ModelGateway:
    settings: dict[str, Any] = {
        "name": "llm",
        "base_url": server.base_url,
        "model": "qwen2.5-7b-instruct",
        "api_key": "sk-test",
        "first_token_timeout_s": 5.0,
        "timeout_s": 10.0,
        **adapter,
    }
    config = GatewayConfig(adapters=[AdapterConfig(**settings)], default_chain=["llm"])
    return ModelGateway(config, sleep=sleep or RecordingSleep())


async def run(gateway: ModelGateway, request: AnswerRequest = REQUEST) -> tuple[list[ReplyDelta], Answer]:
    try:
        reply = gateway.stream(request)
        deltas = [d async for d in reply]
        return deltas, reply.answer
    finally:
        await gateway.aclose()


async def test_streams_tokens_with_citations_usage_and_the_request_it_sent(llm: FakeLLM):
    tokens = ["Refunds ", "take ", "3-5 ", "business ", "days ", "[1]", "."]
    llm.script = [
        llm.ok(tokens, usage={"prompt_tokens": 321, "completion_tokens": 7, "total_tokens": 328}, noise=True)
    ]
    deltas, answer = await run(gateway_for(llm))

    assert [d.text for d in deltas] == tokens
    assert answer.text == "Refunds take 3-5 business days [1]."
    assert (answer.adapter, answer.model) == ("llm", "qwen2.5-7b-instruct")
    assert (answer.prompt_tokens, answer.completion_tokens) == (321, 7)
    assert [(c.document_id, c.chunk_id) for c in answer.citations] == [("doc-refund", "c0")]
    assert answer.grounded
    assert 0 <= answer.first_token_ms <= answer.latency_ms

    sent = llm.requests[0]
    assert sent["model"] == "qwen2.5-7b-instruct" and sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    system, user = sent["messages"]
    assert system["role"] == "system" and user == {"role": "user", "content": REQUEST.question}
    assert "[1] Refund policy (language: en)\nRefunds take 3-5 business days." in system["content"]
    assert "[2] 配送说明 (language: zh)" in system["content"]
    assert "Answer in English" in system["content"]
    assert llm.headers[0]["Authorization"] == "Bearer sk-test"


async def test_without_usage_from_the_server_tokens_are_estimated(llm: FakeLLM):
    llm.script = [llm.ok(["退款", "需要", "3到5个工作日【1】"])]
    zh = AnswerRequest("退款要多久", "zh", PASSAGES, intent="refund")
    _, answer = await run(gateway_for(llm, include_usage=False), zh)
    assert "stream_options" not in llm.requests[0]
    assert "Answer in Simplified Chinese" in llm.requests[0]["messages"][0]["content"]
    assert answer.prompt_tokens > 20 and answer.completion_tokens >= 8
    assert answer.citations[0].document_id == "doc-refund"


async def test_stalled_server_hits_the_first_token_timeout_and_falls_back(llm: FakeLLM):
    llm.script = [llm.stall()]
    started = time.perf_counter()
    deltas, answer = await run(gateway_for(llm, first_token_timeout_s=0.3))
    elapsed = time.perf_counter() - started
    assert answer.adapter == TEMPLATE and answer.grounded
    assert not any(d.restart for d in deltas)  # nothing had been shown yet
    assert answer.attempts[0].outcome == "timeout" and "first token within 0.3 s" in answer.attempts[0].detail
    assert 0.3 <= elapsed < 2.0
    assert len(llm.requests) == 1  # a timeout is not retried on the same adapter
    await asyncio.wait_for(llm.disconnected.wait(), 5)  # and the HTTP request was abandoned


async def test_total_timeout_after_some_tokens_restarts_with_the_fallback(llm: FakeLLM):
    llm.script = [llm.stall(["Refunds ", "take "])]
    deltas, answer = await run(gateway_for(llm, first_token_timeout_s=2, timeout_s=0.4))
    assert [d.text for d in deltas[:2]] == ["Refunds ", "take "]
    assert deltas[2].restart and answer.adapter == TEMPLATE
    assert answer.text == "".join(d.text for d in deltas[2:])
    assert "answer not finished within 0.4 s" in answer.attempts[0].detail
    assert answer.attempts[0].outcome == "timeout"


async def test_429_is_retried_after_the_servers_retry_after_then_succeeds(llm: FakeLLM):
    llm.script = [llm.status(429, retry_after="2"), llm.ok(["Refunds take 3-5 days [1]."])]
    sleep = RecordingSleep()
    _, answer = await run(gateway_for(llm, sleep, backoff_initial_s=0.01), REQUEST)
    assert sleep.delays == [2.0]  # Retry-After honoured, not the 10 ms backoff
    assert len(llm.requests) == 2
    assert answer.adapter == "llm" and answer.text == "Refunds take 3-5 days [1]."
    assert [a.outcome for a in answer.attempts] == ["error", "ok"]
    assert "HTTP 429" in answer.attempts[0].detail


async def test_retry_after_longer_than_allowed_falls_back_at_once(llm: FakeLLM):
    llm.script = [llm.status(429, retry_after="120")]
    sleep = RecordingSleep()
    _, answer = await run(gateway_for(llm, sleep, max_retry_after_s=10))
    assert sleep.delays == [] and len(llm.requests) == 1 and answer.adapter == TEMPLATE


async def test_500s_are_retried_then_open_the_breaker_after_n_failures(llm: FakeLLM):
    llm.script = [llm.status(500)]
    sleep = RecordingSleep()
    gateway = gateway_for(llm, sleep, max_retries=1, breaker_failures=3, breaker_cooldown_s=60)
    try:
        first = await gateway.answer(REQUEST)  # two tries, both 500
        assert first.adapter == TEMPLATE and len(llm.requests) == 2 and len(sleep.delays) == 1
        second = await gateway.answer(REQUEST)  # the third failure opens the breaker: no retry after it
        assert len(llm.requests) == 3 and gateway.breaker("llm").state == OPEN
        assert [a.outcome for a in second.attempts] == ["error", "skipped_open_circuit", "ok"]
        third = await gateway.answer(REQUEST)
        assert len(llm.requests) == 3  # the server is left alone while the breaker is open
        assert [a.outcome for a in third.attempts] == ["skipped_open_circuit", "ok"]
        assert third.adapter == TEMPLATE and third.grounded
    finally:
        await gateway.aclose()


async def test_client_errors_are_not_retried(llm: FakeLLM):
    llm.script = [llm.status(401)]
    sleep = RecordingSleep()
    _, answer = await run(gateway_for(llm, sleep))
    assert len(llm.requests) == 1 and sleep.delays == [] and answer.adapter == TEMPLATE
    assert "HTTP 401" in answer.attempts[0].detail


async def test_connection_closed_mid_stream_falls_back_without_duplicated_text(llm: FakeLLM):
    llm.script = [llm.die_mid_stream(["Refunds ", "usually ", "take "])]
    deltas, answer = await run(gateway_for(llm))

    streamed_by_llm = [d for d in deltas if d.index < 3]
    assert [d.text for d in streamed_by_llm] == ["Refunds ", "usually ", "take "]
    assert [d.index for d in deltas] == list(range(len(deltas)))
    assert [d.index for d in deltas if d.restart] == [3]
    assert answer.adapter == TEMPLATE
    assert answer.attempts[0].outcome == "interrupted"
    assert len(llm.requests) == 1  # never retried once text was out

    shown = ""
    for d in deltas:
        shown = d.text if d.restart else shown + d.text
    assert shown == answer.text
    assert "usually" not in answer.text and answer.text.count("Refunds take 3-5 business days.") == 1


async def test_stream_ending_without_done_counts_as_interrupted(llm: FakeLLM):
    async def no_done(request: web.Request) -> web.StreamResponse:
        response = await llm._start(request)
        await response.write(_event({"choices": [{"delta": {"content": "Refunds"}}]}))
        await response.write_eof()
        return response

    llm.script = [no_done]
    deltas, answer = await run(gateway_for(llm))
    assert answer.adapter == TEMPLATE and deltas[1].restart
    assert "without [DONE]" in answer.attempts[0].detail


async def test_error_event_inside_the_stream_falls_back(llm: FakeLLM):
    async def error_event(request: web.Request) -> web.StreamResponse:
        response = await llm._start(request)
        await response.write(_event({"error": {"message": "CUDA out of memory", "code": 500}}))
        await response.write_eof()
        return response

    llm.script = [error_event]
    _, answer = await run(gateway_for(llm))
    assert answer.adapter == TEMPLATE and "CUDA out of memory" in answer.attempts[0].detail


async def test_connection_refused_is_retried_with_backoff_then_falls_back():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on `port` now.
    sleep = RecordingSleep()
    server = FakeLLM(base_url=f"http://127.0.0.1:{port}/v1")
    _, answer = await run(gateway_for(server, sleep, max_retries=2, backoff_initial_s=0.05))
    assert answer.adapter == TEMPLATE
    assert [a.outcome for a in answer.attempts] == ["interrupted"] * 3 + ["ok"]
    assert len(sleep.delays) == 2 and sleep.delays[0] <= 0.05 < sleep.delays[1] * 2


def test_retry_after_and_citation_parsing():
    assert parse_retry_after("3") == 3.0 and parse_retry_after("0.5") == 0.5
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= (parse_retry_after(in_a_minute) or 0) <= 61
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert [p.document_id for p in cited_passages("a [2] b [1, 2] c [9]", PASSAGES)] == [
        "doc-ship",
        "doc-refund",
    ]
    assert [p.document_id for p in cited_passages("标准快递【2】", PASSAGES)] == ["doc-ship"]
    # No markers: passages sharing enough of the answer's terms are cited, unrelated text is not.
    assert [p.document_id for p in cited_passages("Refunds take 3-5 business days.", PASSAGES)] == [
        "doc-refund"
    ]
    assert cited_passages("I could not find that, sorry.", PASSAGES) == []


async def test_many_replies_stream_concurrently_through_one_gateway(llm: FakeLLM):
    started = asyncio.Event()
    in_flight = 0

    async def held(request: web.Request) -> web.StreamResponse:
        # Every request waits until all 20 are open at once: proof that none blocks another.
        nonlocal in_flight
        in_flight += 1
        if in_flight == 20:
            started.set()
        await started.wait()
        return await llm.ok(["Refunds take 3-5 days [1]."])(request)

    llm.script = [held]
    gateway = gateway_for(llm)
    try:
        answers = await asyncio.wait_for(asyncio.gather(*(gateway.answer(REQUEST) for _ in range(20))), 10)
    finally:
        await gateway.aclose()
    assert {a.adapter for a in answers} == {"llm"} and len(llm.requests) == 20
