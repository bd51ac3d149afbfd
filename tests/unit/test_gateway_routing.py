import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator

import pytest

from streams.assistant.gateway import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    TEMPLATE,
    AdapterConfig,
    AdapterError,
    AnswerRequest,
    CircuitBreaker,
    Citation,
    Draft,
    GatewayConfig,
    GatewayConfigError,
    GroundingPassage,
    ModelGateway,
    RouteRule,
    TemplateAnswerer,
)

PASSAGE = GroundingPassage("d1", "c1", "Refunds", "Refunds take 3-5 business days.", 0.9, "en")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Scripted:
    """An adapter whose calls follow a script: ("ok", parts) | ("fail", parts_before, retryable)."""

    def __init__(self, name: str, *script: tuple) -> None:
        self._name = name
        self.model = f"{name}-model"
        self.script = list(script)
        self.calls = 0

    @property
    def name(self) -> str:
        return self._name

    async def aclose(self) -> None:
        pass

    async def generate(self, request: AnswerRequest, draft: Draft) -> AsyncIterator[str]:
        step = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        for part in step[1]:
            yield part
        if step[0] == "fail":
            raise AdapterError(self._name, "scripted failure", retryable=step[2])
        draft.citations = [Citation("d1", "c1", 0.9)]
        draft.grounded = True
        draft.prompt_tokens, draft.completion_tokens = 42, len(step[1])


def request(**kw) -> AnswerRequest:
    base = AnswerRequest("how long for a refund", "en", [PASSAGE], intent="refund", tenant_id="acme")
    return dataclasses.replace(base, **kw)


def config(*adapters: AdapterConfig, routes=(), default_chain=(TEMPLATE,)) -> GatewayConfig:
    return GatewayConfig(adapters=adapters, routes=routes, default_chain=default_chain)


def llm(name: str, **kw) -> AdapterConfig:
    return AdapterConfig(name=name, base_url="http://127.0.0.1:9/v1", model=f"{name}-model", **kw)


async def no_sleep(delay: float) -> None:
    pass


# --- routing -------------------------------------------------------------------------------------


def test_first_matching_route_wins_and_every_chain_ends_at_the_template():
    cfg = config(
        llm("qwen"),
        llm("gpt"),
        routes=[
            RouteRule(chain=["qwen"], tenants=["acme"], intents=["complaint"], languages=["zh"]),
            RouteRule(chain=["gpt", "qwen", "gpt"], tenants=["acme"]),
            RouteRule(chain=["gpt"], min_chars=100),
            RouteRule(chain=["template", "qwen"], intents=["greeting"]),
        ],
        default_chain=["qwen"],
    )
    chain = lambda tenant, intent, language, chars=10: cfg.chain_for(  # noqa: E731
        tenant_id=tenant, intent=intent, language=language, question_chars=chars
    )
    assert chain("acme", "complaint", "zh") == ["qwen", "template"]
    assert chain("acme", "complaint", "en") == ["gpt", "qwen", "template"]
    assert chain("other", "refund", "en", chars=150) == ["gpt", "template"]
    assert chain("other", "greeting", "en") == ["qwen", "template"]
    assert chain("other", "refund", "en") == ["qwen", "template"]
    assert GatewayConfig().chain_for(tenant_id="x", intent="", language="en", question_chars=1) == [
        "template"
    ]


async def test_requests_without_passages_never_reach_an_llm_unless_configured():
    qwen = Scripted("qwen", ("ok", ["made up"]))
    gateway = ModelGateway(config(llm("qwen"), default_chain=["qwen"]), adapters={"qwen": qwen})
    answer = await gateway.answer(request(passages=[]))
    assert answer.adapter == TEMPLATE and not answer.grounded and qwen.calls == 0
    cfg = GatewayConfig(adapters=[llm("qwen")], default_chain=["qwen"], llm_without_passages=True)
    assert ModelGateway(cfg, adapters={"qwen": qwen}).route(request(passages=[])) == ["qwen", TEMPLATE]


def test_config_from_json_and_env_string_round_trip_and_validation(monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN_KEY", "sk-secret")
    raw = {
        "adapters": [
            {
                "name": "qwen",
                "kind": "openai",
                "base_url": "http://127.0.0.1:8000/v1",
                "model": "qwen2.5",
                "api_key_env": "QWEN_KEY",
                "first_token_timeout_s": 2,
                "breaker_failures": 3,
            }
        ],
        "routes": [{"tenants": ["acme"], "languages": ["zh"], "chain": ["qwen"]}],
        "default_chain": ["template"],
    }
    cfg = GatewayConfig.from_env_string(json.dumps(raw))
    assert cfg.adapter("qwen").resolved_api_key() == "sk-secret"
    assert cfg.adapter("qwen").first_token_timeout_s == 2
    assert cfg.chain_for(tenant_id="acme", intent="x", language="zh", question_chars=5) == [
        "qwen",
        "template",
    ]
    assert GatewayConfig.from_json(cfg.to_json()) == cfg
    assert "sk-secret" not in repr(cfg) and "sk-secret" not in cfg.to_json()
    path = tmp_path / "gw.json"
    path.write_text(json.dumps(raw))
    assert GatewayConfig.from_env_string(f"@{path}") == cfg
    assert GatewayConfig.from_env_string("") == GatewayConfig() == GatewayConfig.from_env_string(None)

    with pytest.raises(GatewayConfigError, match=r"routes\[0\]\.chain names unknown adapters \['nope'\]"):
        GatewayConfig.from_dict({"routes": [{"chain": ["nope"]}]})
    with pytest.raises(GatewayConfigError, match="unknown keys \\['modle'\\]"):
        GatewayConfig.from_dict({"adapters": [{"name": "a", "base_url": "http://x", "modle": "m"}]})
    with pytest.raises(GatewayConfigError, match="needs base_url and model"):
        GatewayConfig.from_dict({"adapters": [{"name": "a"}]})
    with pytest.raises(GatewayConfigError, match="not valid JSON"):
        GatewayConfig.from_env_string("{nope")


# --- fallback ------------------------------------------------------------------------------------


async def test_failure_before_any_text_falls_back_without_a_restart():
    qwen = Scripted("qwen", ("fail", [], False))
    gpt = Scripted("gpt", ("ok", ["Refunds ", "take ", "3-5 days [1]."]))
    gateway = ModelGateway(
        config(llm("qwen"), llm("gpt"), default_chain=["qwen", "gpt"]), adapters={"qwen": qwen, "gpt": gpt}
    )
    reply = gateway.stream(request())
    deltas = [d async for d in reply]
    assert [d.text for d in deltas] == ["Refunds ", "take ", "3-5 days [1]."]
    assert not any(d.restart for d in deltas)
    answer = reply.answer
    assert (answer.adapter, answer.model, answer.prompt_tokens, answer.completion_tokens) == (
        "gpt",
        "gpt-model",
        42,
        3,
    )
    assert [(a.adapter, a.outcome) for a in answer.attempts] == [("qwen", "error"), ("gpt", "ok")]
    assert qwen.calls == 1  # not retryable


async def test_mid_stream_failure_restarts_the_reply_and_the_answer_text_is_what_follows_the_restart():
    qwen = Scripted("qwen", ("fail", ["Refunds ", "are "], True))
    gateway = ModelGateway(
        config(llm("qwen"), default_chain=["qwen"]), adapters={"qwen": qwen}, sleep=no_sleep
    )
    reply = gateway.stream(request())
    deltas = [d async for d in reply]
    answer = reply.answer
    assert qwen.calls == 1  # text was streamed: never retried on the same adapter, even if retryable
    assert [d.index for d in deltas] == list(range(len(deltas)))
    restarts = [i for i, d in enumerate(deltas) if d.restart]
    assert restarts == [2]
    assert answer.adapter == TEMPLATE
    # What a client shows after applying restarts is exactly the authoritative text: nothing doubled.
    shown = ""
    for d in deltas:
        shown = d.text if d.restart else shown + d.text
    assert shown == answer.text == "".join(d.text for d in deltas[2:])
    assert "Refunds are" not in answer.text
    assert [a.outcome for a in answer.attempts] == ["error", "ok"]


async def test_retryable_failures_are_retried_with_growing_backoff_then_fall_back():
    slept: list[float] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)

    qwen = Scripted("qwen", ("fail", [], True))
    cfg = config(llm("qwen", max_retries=3, backoff_initial_s=0.1, backoff_max_s=0.3), default_chain=["qwen"])
    answer = await ModelGateway(cfg, adapters={"qwen": qwen}, sleep=sleep).answer(request())
    assert qwen.calls == 4 and answer.adapter == TEMPLATE
    assert len(slept) == 3
    for delay, cap in zip(slept, [0.1, 0.2, 0.3], strict=True):
        assert cap / 2 <= delay <= cap  # jittered exponential backoff, capped


async def test_retry_then_success_stays_on_the_same_adapter():
    qwen = Scripted("qwen", ("fail", [], True), ("ok", ["fine [1]"]))
    answer = await ModelGateway(
        config(llm("qwen"), default_chain=["qwen"]), adapters={"qwen": qwen}, sleep=no_sleep
    ).answer(request())
    assert answer.adapter == "qwen" and answer.text == "fine [1]" and qwen.calls == 2


async def test_unexpected_exceptions_in_an_adapter_fall_back_too():
    class Broken(Scripted):
        async def generate(self, request, draft):
            raise KeyError("bug")
            yield ""

    answer = await ModelGateway(
        config(llm("qwen"), default_chain=["qwen"]), adapters={"qwen": Broken("qwen")}
    ).answer(request())
    assert answer.adapter == TEMPLATE and "KeyError" in answer.attempts[0].detail


async def test_leaving_the_stream_early_closes_the_adapter_and_frees_a_half_open_probe():
    closed = asyncio.Event()

    class Endless(Scripted):
        async def generate(self, request, draft):
            try:
                while True:
                    yield "x"
                    await asyncio.sleep(0)
            finally:
                closed.set()

    clock = FakeClock()
    gateway = ModelGateway(
        config(llm("qwen", breaker_failures=1, breaker_cooldown_s=5), default_chain=["qwen"]),
        adapters={"qwen": Endless("qwen")},
        clock=clock,
    )
    breaker = gateway.breaker("qwen")
    breaker.record_failure()
    clock.now += 5
    assert breaker.state == HALF_OPEN
    reply = gateway.stream(request())
    async for _ in reply:
        break
    await reply.aclose()
    await asyncio.wait_for(closed.wait(), 1)
    assert breaker.try_acquire()  # the abandoned probe did not keep the half-open slot


# --- circuit breaker -----------------------------------------------------------------------------


def test_breaker_opens_after_n_consecutive_failures_and_half_opens_after_the_cooldown():
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=30, clock=clock)
    for _ in range(2):
        assert breaker.try_acquire()
        breaker.record_failure()
    breaker.record_success()  # a success resets the count: failures must be consecutive
    for _ in range(3):
        assert breaker.try_acquire()
        breaker.record_failure()
    assert breaker.state == OPEN and not breaker.try_acquire()
    clock.now += 29.9
    assert not breaker.try_acquire()
    clock.now += 0.1
    assert breaker.state == HALF_OPEN
    assert breaker.try_acquire()
    assert not breaker.try_acquire()  # one trial call at a time
    breaker.record_failure()  # the trial failed: open again for a full cool-down
    assert breaker.state == OPEN
    clock.now += 30
    assert breaker.try_acquire()
    breaker.record_success()
    assert breaker.state == CLOSED and breaker.try_acquire() and breaker.try_acquire()


async def test_open_breaker_skips_the_adapter_until_the_cooldown_then_a_trial_closes_it():
    clock = FakeClock()
    qwen = Scripted("qwen", ("fail", [], False), ("fail", [], False), ("ok", ["back [1]"]))
    gateway = ModelGateway(
        config(llm("qwen", breaker_failures=2, breaker_cooldown_s=10), default_chain=["qwen"]),
        adapters={"qwen": qwen},
        clock=clock,
    )
    for _ in range(2):
        assert (await gateway.answer(request())).adapter == TEMPLATE
    assert gateway.breaker("qwen").state == OPEN
    skipped = await gateway.answer(request())
    assert skipped.adapter == TEMPLATE and qwen.calls == 2
    assert [a.outcome for a in skipped.attempts] == ["skipped_open_circuit", "ok"]
    clock.now += 10
    recovered = await gateway.answer(request())
    assert recovered.adapter == "qwen" and gateway.breaker("qwen").state == CLOSED


async def test_the_template_answerer_is_always_there_even_if_config_names_none():
    gateway = ModelGateway(GatewayConfig())
    assert gateway.route(request()) == [TEMPLATE]
    assert isinstance(gateway._adapters[TEMPLATE], TemplateAnswerer)
    with pytest.raises(RuntimeError, match="not finished"):
        _ = gateway.stream(request()).answer
