"""While the erasure registry cannot be read, the follower says so once, not once per caller.

Found by review: every ingress process waits for the registry in each write until it was read
once (services/ingress/_writes.py `_erased`), and each caller that gave up logged the same
warning: an ingress under 2k msg/s with Kafka away at its start wrote one warning per write.
Kafka away here is a port on 127.0.0.1 nothing listens on (connection refused, no mock).
"""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from services.settings import Settings
from streams.privacy.erasures import ErasureFollower, ErasuresUnavailable

CALLERS = 20


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_callers_refused_together_while_the_registry_is_unread_log_it_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(kafka_bootstrap=f"127.0.0.1:{closed_port()}")
    follower = ErasureFollower(settings, start_timeout_s=0.5)
    caplog.set_level(logging.WARNING, logger="streams.privacy.erasures")
    try:
        outcomes = await asyncio.gather(*(follower.start() for _ in range(CALLERS)), return_exceptions=True)
        # Every caller is refused, each with the reason (it becomes its UNAVAILABLE message).
        assert all(isinstance(o, ErasuresUnavailable) for o in outcomes), outcomes
        assert all(settings.privacy_topic in str(o) for o in outcomes)
        said = [r for r in caplog.records if "erasures not read within" in r.getMessage()]
        assert len(said) == 1, f"{len(said)} warnings for {CALLERS} callers refused together"
    finally:
        await follower.stop()
