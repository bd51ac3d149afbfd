"""ensure_topics retries Kafka's retriable errors (seen in CI: NodeNotReadyError from a broker
that had just been restarted by the previous test answering metadata without itself), and gives
up at once on any other error."""

from __future__ import annotations

import pytest
from aiokafka.errors import NodeNotReadyError, TopicAuthorizationFailedError

from services import kafka_topics
from services.settings import Settings


async def test_retriable_errors_are_retried_and_others_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    async def flaky(settings: Settings) -> list[str]:
        calls.append("try")
        if len(calls) < 3:
            raise NodeNotReadyError("Attempt to send a request to node which is not ready (node id None).")
        return ["created"]

    monkeypatch.setattr(kafka_topics, "_ensure_topics_once", flaky)
    assert await kafka_topics.ensure_topics(Settings()) == ["created"]
    assert len(calls) == 3

    async def refused(settings: Settings) -> list[str]:
        calls.append("refused")
        raise TopicAuthorizationFailedError()

    calls.clear()
    monkeypatch.setattr(kafka_topics, "_ensure_topics_once", refused)
    with pytest.raises(TopicAuthorizationFailedError):
        await kafka_topics.ensure_topics(Settings())
    assert calls == ["refused"]
