"""Retrying a batch until it is done — the one loop both Faust processors use.

Faust's `take_events` acks a batch when the agent's body finishes *or raises*, so nothing may
escape the body before the batch is done: failures are retried with backoff (folds and sinks are
idempotent, so a retry repeats the same work). A worker stopped between retries exits without
committing, so the batch is delivered again on restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

T = TypeVar("T")

# Exit status of a worker that stopped with a batch unfinished (EX_TEMPFAIL).
EXIT_UNFINISHED = 75


async def until_done(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    *,
    log: logging.Logger,
    initial_s: float,
    max_s: float,
    cancel_mid_attempt_is_safe: bool,
    on_failure: Callable[[BaseException], None] | None = None,
) -> T:
    """Run `attempt` until it succeeds. `cancel_mid_attempt_is_safe`: the attempt lets a
    cancellation through only once its work is complete, so acking then is right; otherwise a
    cancellation mid-attempt also exits without committing."""
    delay = initial_s
    while True:
        try:
            return await attempt()
        except asyncio.CancelledError:
            if cancel_mid_attempt_is_safe:
                raise
            _exit_unfinished(log, what)
        except Exception as exc:
            if on_failure is not None:
                on_failure(exc)
            log.error("%s failed, retrying in %.1fs: %r", what, delay, exc)
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            _exit_unfinished(log, what)
        delay = min(delay * 2, max_s)


def _exit_unfinished(log: logging.Logger, what: str) -> NoReturn:
    log.error("stopped while %s was unfinished; exiting without committing it", what)
    logging.shutdown()
    os._exit(EXIT_UNFINISHED)
