"""The bot says nothing in a conversation the hot view has closed: `AssistantProcessor._undecided`
on a stand-in for Redis (the integration test `test_the_bot_says_nothing_after_a_conversation_is_closed`
runs the real stack, with the close in the message's batch)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from switchboard.v1 import events_pb2

from schemas import hotview as hv
from schemas.events import Event
from services.settings import Settings
from streams._consumer import Record
from streams.assistant._worker import AssistantProcessor, _Job

T, C = "t1", "c1"


class Redis:
    """The hot view's conversation states, read through a pipeline as the assistant reads them."""

    def __init__(self, states: dict[str, dict[str, Any]]) -> None:
        self.states = states

    def pipeline(self, transaction: bool = True) -> Redis.Pipeline:
        return Redis.Pipeline(self)

    class Pipeline:
        def __init__(self, redis: Redis) -> None:
            self.redis = redis
            self.keys: list[str] = []

        async def __aenter__(self) -> Redis.Pipeline:
            return self

        async def __aexit__(self, *_: object) -> None:
            return None

        def hget(self, key: str, field: str) -> None:
            assert field == hv.F_STATE
            self.keys.append(key)

        async def execute(self) -> list[bytes | None]:
            return [
                json.dumps(self.redis.states[k]).encode() if k in self.redis.states else None
                for k in self.keys
            ]


def message(event_id: str, conversation: str = C) -> Event:
    e = Event(event_id=event_id, tenant_id=T, conversation_id=conversation)
    e.message_received.CopyFrom(
        events_pb2.MessageReceived(text="how long does a refund take?", client_message_id=event_id)
    )
    return e


@pytest.mark.parametrize(("status", "answered"), [("open", True), ("closed", False)])
async def test_a_message_of_a_conversation_the_hot_view_has_closed_is_not_answered(
    status: str, answered: bool
) -> None:
    """The assistant has the conversation open in memory (its close is not in this batch: it was
    written after the message and is in a later one), the hot view has folded the close."""
    redis = Redis(
        {hv.conversation_key(T, C): {"status": status}, hv.conversation_key(T, "other"): {"status": "open"}}
    )
    processor = AssistantProcessor(Settings(), redis, None, None, None, None)  # type: ignore[arg-type]
    try:
        jobs = [_Job(message("m1"), Record("conversation-events", 0, 7, None, None, 0))]
        jobs.append(_Job(message("m2", "other"), Record("conversation-events", 0, 8, None, None, 0)))
        for job in jobs:
            assert processor._observe(job.event)  # open in memory: the bot would answer it
        left = await processor._undecided(jobs)
        assert [j.event.event_id for j in left] == (["m1", "m2"] if answered else ["m2"])
        # ...and its later messages in memory too, until the log's close is seen.
        assert processor._observe(message("m3")) is answered
    finally:
        processor._models.shutdown(wait=True)
