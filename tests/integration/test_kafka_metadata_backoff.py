"""The back-off between failed metadata updates (services/kafka_clients.py) leaves successful ones
alone: with a real broker answering, a forced update returns at once even when retry_backoff_ms
is far longer than the test's bound, and a client that starts fresh bootstraps without waiting."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.client import AIOKafkaClient

from services import kafka_clients
from services.settings import Settings

pytestmark = pytest.mark.integration

# Far beyond the bound below: an update that waited it would time out.
RETRY_BACKOFF_MS = 60_000
BOUND_S = 15.0


async def test_successful_metadata_updates_do_not_wait_the_back_off(local_stack: Settings) -> None:
    assert kafka_clients.METADATA_BACKOFF
    client = AIOKafkaClient(bootstrap_servers=local_stack.kafka_bootstrap, retry_backoff_ms=RETRY_BACKOFF_MS)
    try:
        await asyncio.wait_for(client.bootstrap(), BOUND_S)
        client.add_topic(local_stack.conversation_topic)
        for _ in range(3):
            assert await asyncio.wait_for(client.force_metadata_update(), BOUND_S)
        assert client.cluster.partitions_for_topic(local_stack.conversation_topic)
    finally:
        await client.close()
