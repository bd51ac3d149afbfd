"""`make run`'s demo: it rides out a system that is still starting, and its failure never stops
the system (one line says why)."""

from __future__ import annotations

import grpc
import pytest

from services import runner
from services.demo import with_retries
from services.settings import Settings


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="starting")


async def test_unavailable_is_retried_until_the_system_answers() -> None:
    answers = [rpc_error(grpc.StatusCode.UNAVAILABLE), rpc_error(grpc.StatusCode.UNAVAILABLE), "ok"]

    async def call() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert await with_retries(call, within_s=10) == "ok"


async def test_a_refusal_is_not_retried_and_retries_are_bounded() -> None:
    calls = 0

    async def refused() -> None:
        nonlocal calls
        calls += 1
        raise rpc_error(grpc.StatusCode.INVALID_ARGUMENT)

    with pytest.raises(grpc.aio.AioRpcError):
        await with_retries(refused)
    assert calls == 1

    async def down() -> None:
        raise rpc_error(grpc.StatusCode.UNAVAILABLE)

    with pytest.raises(grpc.aio.AioRpcError):
        await with_retries(down, within_s=0.5)


def test_a_failed_demo_is_one_line_and_the_runner_goes_on(monkeypatch, capsys) -> None:
    async def broken(settings: Settings) -> None:
        raise rpc_error(grpc.StatusCode.UNAVAILABLE)

    async def loaded(settings: Settings) -> int:
        return 50

    monkeypatch.setattr(runner, "load_demo_faq_indexed", loaded)
    monkeypatch.setattr(runner, "play_demo", broken)
    assert runner.run_demo_step(Settings()) is False
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[-1].startswith("demo failed (AioRpcError: UNAVAILABLE: starting); the system keeps serving")


def test_the_demo_faq_is_indexed_before_the_chat_demo_plays(monkeypatch) -> None:
    """Trial (twenty-ninth session): on a first `make run` the chat demo ran before the FAQ was
    loaded, and the bot, which answers a tenant once it has a knowledge base, never answered it."""
    calls: list[str] = []

    async def loaded(settings: Settings) -> int:
        calls.append("faq")
        return 50

    async def played(settings: Settings) -> None:
        calls.append("chat")
        raise rpc_error(grpc.StatusCode.UNAVAILABLE)  # ends the step here

    monkeypatch.setattr(runner, "load_demo_faq_indexed", loaded)
    monkeypatch.setattr(runner, "play_demo", played)
    runner.run_demo_step(Settings())
    assert calls == ["faq", "chat"]
