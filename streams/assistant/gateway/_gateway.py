"""The gateway: routing, deadlines, retries, circuit breakers and the fallback chain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

from ._breaker import CircuitBreaker
from ._config import TEMPLATE, AdapterConfig, GatewayConfig
from ._errors import AdapterError, AdapterTimeout
from ._openai import OpenAICompatibleAdapter
from ._template import TemplateAnswerer
from ._types import Answer, Answerer, AnswerRequest, AttemptRecord, Draft, ReplyDelta

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]


@dataclass(slots=True)
class _Attempt:
    """Progress of one try, visible to the gateway even when the try fails part-way."""

    draft: Draft
    parts: list[str]
    first_token_at: float | None = None


class ReplyStream:
    """One reply in the making: iterate it for `ReplyDelta`s, then read `answer`.

    Iterate it once. Leaving the loop early (break, cancellation) closes the adapter's request.
    """

    def __init__(self, deltas: AsyncGenerator[ReplyDelta, None], holder: list[Answer]) -> None:
        self._deltas = deltas
        self._holder = holder

    def __aiter__(self) -> AsyncIterator[ReplyDelta]:
        return self._deltas

    async def aclose(self) -> None:
        await self._deltas.aclose()

    @property
    def answer(self) -> Answer:
        if not self._holder:
            raise RuntimeError(
                "the reply has not finished streaming; iterate the ReplyStream to the end first"
            )
        return self._holder[0]


class ModelGateway:
    """Answers questions through the configured adapter chain; see the package docstring for the contract."""

    def __init__(
        self,
        config: GatewayConfig | None = None,
        *,
        adapters: Mapping[str, Answerer] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        """`adapters` overrides or supplements what `config` describes (by name): tests and
        callers with their own answerers pass them here. The template answerer is always present."""
        self._config = config or GatewayConfig()
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._adapters: dict[str, Answerer] = {TEMPLATE: TemplateAnswerer()}
        for a in self._config.adapters:
            if a.kind == TEMPLATE:
                self._adapters[a.name] = TemplateAnswerer(name=a.name)
            elif a.kind == "openai":
                self._adapters[a.name] = OpenAICompatibleAdapter(
                    name=a.name,
                    base_url=a.base_url,
                    model=a.model,
                    api_key=a.resolved_api_key(),
                    temperature=a.temperature,
                    max_tokens=a.max_tokens,
                    connect_timeout_s=a.connect_timeout_s,
                    include_usage=a.include_usage,
                    headers=a.headers,
                )
        self._adapters.update(adapters or {})
        named = {*self._config.default_chain, *(n for r in self._config.routes for n in r.chain)}
        missing = named - set(self._adapters)
        if missing:
            raise ValueError(
                f"routes name adapters that are neither configured nor passed in: {sorted(missing)}"
            )
        self._breakers = {
            name: CircuitBreaker(
                failure_threshold=self._adapter_config(name).breaker_failures,
                cooldown_s=self._adapter_config(name).breaker_cooldown_s,
                clock=clock,
            )
            for name in self._adapters
            if name != TEMPLATE
        }

    @property
    def config(self) -> GatewayConfig:
        return self._config

    def breaker(self, adapter: str) -> CircuitBreaker:
        return self._breakers[adapter]

    def route(self, request: AnswerRequest) -> list[str]:
        """The adapter names this request would try, in order (always ending with the template)."""
        if not request.passages and not self._config.llm_without_passages:
            return [TEMPLATE]
        return self._config.chain_for(
            tenant_id=request.tenant_id,
            intent=request.intent,
            language=request.language,
            question_chars=len(request.question),
        )

    def stream(self, request: AnswerRequest) -> ReplyStream:
        holder: list[Answer] = []
        return ReplyStream(self._run(request, holder), holder)

    async def answer(self, request: AnswerRequest) -> Answer:
        """The whole answer without streaming."""
        reply = self.stream(request)
        async for _ in reply:
            pass
        return reply.answer

    async def aclose(self) -> None:
        for adapter in self._adapters.values():
            await adapter.aclose()

    def _adapter_config(self, name: str) -> AdapterConfig:
        try:
            return self._config.adapter(name)
        except KeyError:
            # An adapter passed in without a config entry runs with the defaults.
            return AdapterConfig(name=name)

    async def _run(self, request: AnswerRequest, holder: list[Answer]) -> AsyncGenerator[ReplyDelta, None]:
        started = time.perf_counter()
        index = 0
        emitted = False
        records: list[AttemptRecord] = []
        for name in self.route(request):
            adapter = self._adapters[name]
            settings = self._adapter_config(name)
            breaker = self._breakers.get(name)
            retry = 0
            while True:
                if breaker is not None and not breaker.try_acquire():
                    records.append(AttemptRecord(name, "skipped_open_circuit"))
                    break
                attempt = _Attempt(Draft(model=getattr(adapter, "model", "")), [])
                restart = emitted
                verdict = False
                try:
                    async with contextlib.aclosing(
                        self._deadlined(adapter, request, attempt, settings)
                    ) as deltas:
                        async for text in deltas:
                            yield ReplyDelta(index, text, restart)
                            index += 1
                            restart = False
                            emitted = True
                    verdict = True
                    if breaker is not None:
                        breaker.record_success()
                    records.append(AttemptRecord(name, "ok"))
                    holder.append(self._finish(request, name, attempt, started, records))
                    return
                except Exception as e:
                    verdict = True
                    if breaker is not None:
                        breaker.record_failure()
                    error = (
                        e
                        if isinstance(e, AdapterError)
                        else AdapterError(name, f"unexpected {type(e).__name__}: {e}", retryable=False)
                    )
                    records.append(AttemptRecord(name, error.outcome, str(error)))
                    log.warning(
                        "gateway: %s failed for tenant %s conversation %s (attempt %d, %d deltas streamed): %s",
                        name,
                        request.tenant_id,
                        request.conversation_id,
                        retry + 1,
                        len(attempt.parts),
                        error,
                        exc_info=not isinstance(e, AdapterError),
                    )
                    delay = self._retry_delay(error, settings, retry, streamed=bool(attempt.parts))
                    if delay is None:
                        break
                    retry += 1
                    await self._sleep(delay)
                finally:
                    if breaker is not None and not verdict:
                        breaker.release()
        raise AssertionError("unreachable: the template answerer ends every chain and does not fail")

    async def _deadlined(
        self, adapter: Answerer, request: AnswerRequest, attempt: _Attempt, settings: AdapterConfig
    ) -> AsyncGenerator[str, None]:
        """The adapter's deltas under the first-token and total deadlines of its settings."""
        loop = asyncio.get_running_loop()
        begun = loop.time()
        total_deadline = begun + settings.timeout_s
        first_deadline = min(total_deadline, begun + settings.first_token_timeout_s)
        deltas = adapter.generate(request, attempt.draft)
        # An in-process answerer never waits on I/O, so the clock checked after each delta keeps
        # the same deadlines; a timer per delta cost more than the template answer itself.
        in_process = bool(getattr(adapter, "in_process", False))
        try:
            while True:
                waiting_first = not attempt.parts
                deadline = first_deadline if waiting_first else total_deadline
                try:
                    if in_process:
                        text = await anext(deltas)
                        if loop.time() > deadline:
                            raise TimeoutError
                    else:
                        async with asyncio.timeout_at(deadline):
                            text = await anext(deltas)
                except StopAsyncIteration:
                    return
                except TimeoutError as e:
                    if waiting_first:
                        message = f"no first token within {settings.first_token_timeout_s:g} s"
                    else:
                        message = f"answer not finished within {settings.timeout_s:g} s"
                    raise AdapterTimeout(adapter.name, message) from e
                if not text:
                    continue
                if attempt.first_token_at is None:
                    attempt.first_token_at = time.perf_counter()
                attempt.parts.append(text)
                yield text
        finally:
            aclose = getattr(deltas, "aclose", None)
            if aclose is not None:
                await aclose()

    def _retry_delay(
        self, error: AdapterError, settings: AdapterConfig, retry: int, *, streamed: bool
    ) -> float | None:
        """Seconds to wait before trying the same adapter again, or None to move down the chain.
        Text already streamed is never retried on the same adapter: the next adapter restarts it."""
        if streamed or not error.retryable or retry >= settings.max_retries:
            return None
        if error.retry_after_s is not None:
            if error.retry_after_s > settings.max_retry_after_s:
                return None
            return error.retry_after_s
        backoff = min(settings.backoff_max_s, settings.backoff_initial_s * 2**retry)
        return backoff * (0.5 + self._rng.random() / 2)

    def _finish(
        self,
        request: AnswerRequest,
        name: str,
        attempt: _Attempt,
        started: float,
        records: list[AttemptRecord],
    ) -> Answer:
        now = time.perf_counter()
        draft = attempt.draft
        text = "".join(attempt.parts)
        first = attempt.first_token_at if attempt.first_token_at is not None else now
        return Answer(
            text=text,
            citations=tuple(draft.citations),
            adapter=name,
            model=draft.model,
            prompt_tokens=draft.prompt_tokens or 0,
            completion_tokens=draft.completion_tokens or 0,
            latency_ms=round((now - started) * 1000),
            first_token_ms=round((first - started) * 1000),
            grounded=draft.grounded,
            language=request.language,
            attempts=tuple(records),
        )
