"""Failures of an adapter, classified so the gateway knows whether to retry or move on."""

from __future__ import annotations


class AdapterError(Exception):
    """An adapter could not produce (the rest of) an answer.

    `retryable`: the same adapter may succeed if asked again (429, 5xx, connection refused).
    `retry_after_s`: the server's Retry-After, when it sent one.
    """

    outcome = "error"

    def __init__(
        self,
        adapter: str,
        message: str,
        *,
        retryable: bool = False,
        retry_after_s: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(f"adapter {adapter!r}: {message}")
        self.adapter = adapter
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.status = status


class AdapterTimeout(AdapterError):
    """No first token, or no finished answer, within the adapter's configured time."""

    outcome = "timeout"


class StreamInterrupted(AdapterError):
    """The response stream ended before the server said it was done."""

    outcome = "interrupted"


class GatewayConfigError(ValueError):
    """The gateway configuration is inconsistent; the message says which field and why."""
