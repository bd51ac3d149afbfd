"""Request validation. Pure: every check runs before anything is written anywhere."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

import grpc

# Whole-string patterns (used with fullmatch): `$` would also match before a trailing newline.
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_CONVERSATION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-:]{0,127}")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Single-line values (ids, locale, tags, a URL, metadata keys): no line breaks or tabs either; a
# CR/LF in a customer id reached the logs, ClickHouse and the report as a line of its own.
_CONTROL_ONE_LINE = re.compile(r"[\x00-\x1f\x7f]")
MAX_CLIENT_MESSAGE_ID = 128
MAX_RESOLUTION = 256
MAX_CUSTOMER_ID = 128
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_CSAT_COMMENT = 1000
MAX_AGENT_ID = 128


@dataclass(frozen=True)
class RequestRejected(Exception):
    """A request the ingress refuses; becomes a gRPC status with this code and message."""

    code: grpc.StatusCode
    message: str
    # How long the caller should wait (the retry-after-ms trailer); None: the usual 500 ms.
    retry_after_ms: int | None = field(default=None, kw_only=True)
    # False: waiting does not help (a tenant's quota: only a close or a raised quota makes room), so
    # a RESOURCE_EXHAUSTED goes without retry-after-ms, as gRPC's own size limits do.
    retryable: bool = field(default=True, kw_only=True)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def invalid(message: str) -> RequestRejected:
    return RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, message)


class MalformedRequest:
    """What the deserializer hands over when the bytes are not a valid request message."""

    def __init__(self, type_name: str, reason: str) -> None:
        self.type_name = type_name
        self.reason = reason

    def rejection(self) -> RequestRejected:
        # protobuf's reason names the cause ("String field had bad UTF-8", "Wire format was corrupt").
        hint = " (string fields must be valid UTF-8)" if "UTF-8" in self.reason else ""
        return invalid(f"request is not a valid {self.type_name}{hint}: {self.reason}")


def check_tenant(tenant_id: str, allowed: frozenset[str]) -> None:
    if not tenant_id:
        raise invalid("tenant_id is required")
    if not _TENANT.fullmatch(tenant_id):
        raise invalid(
            f"tenant_id {tenant_id[:80]!r} is malformed: 1-64 characters of letters, digits, '_', '.', '-'"
        )
    if allowed and tenant_id not in allowed:
        raise RequestRejected(
            grpc.StatusCode.PERMISSION_DENIED,
            f"tenant {tenant_id!r} is not served here (SWITCHBOARD_TENANTS lists the known tenants)",
        )


def check_conversation_id(conversation_id: str, *, required: bool = True) -> None:
    if not conversation_id:
        if required:
            raise invalid("conversation_id is required")
        return
    if not _CONVERSATION.fullmatch(conversation_id):
        raise invalid(
            f"conversation_id {conversation_id[:80]!r} is malformed: 1-128 characters of letters, "
            "digits, '_', '.', '-', ':'"
        )


def check_client_message_id(client_message_id: str) -> None:
    if not client_message_id:
        raise invalid("client_message_id is required: a key you keep across retries (for example a UUID)")
    if not client_message_id.strip():
        raise invalid("client_message_id is blank: a key you keep across retries (for example a UUID)")
    if (
        len(client_message_id) > MAX_CLIENT_MESSAGE_ID
        or not client_message_id.isprintable()
        or client_message_id != client_message_id.strip()
    ):
        # Spaces around a key made " m1" and "m1" two keys: a client trimming on retry sent twice.
        raise invalid(
            f"client_message_id must be 1-{MAX_CLIENT_MESSAGE_ID} printable characters without "
            f"surrounding spaces, got {client_message_id[:80]!r} ({len(client_message_id)} characters)"
        )


def check_text(text: str, max_bytes: int, field: str = "text") -> None:
    if not text or not text.strip():
        raise invalid(f"{field} is empty")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise invalid(
            f"{field} is {size} bytes of UTF-8; the limit is {max_bytes} (SWITCHBOARD_MAX_MESSAGE_BYTES)"
        )
    bad = _CONTROL.search(text)
    if bad:
        raise invalid(
            f"{field} contains control character U+{ord(bad.group()):04X} at position {bad.start()}"
        )


def check_metadata(metadata: dict[str, str], max_entries: int) -> None:
    if len(metadata) > max_entries:
        raise invalid(f"metadata has {len(metadata)} entries; at most {max_entries} are accepted")
    for key, value in metadata.items():
        if not key or len(key) > MAX_METADATA_KEY or _CONTROL_ONE_LINE.search(key):
            raise invalid(f"metadata key {key[:80]!r} must be 1-{MAX_METADATA_KEY} printable characters")
        if len(value) > MAX_METADATA_VALUE or _CONTROL.search(value):
            raise invalid(
                f"metadata[{key!r}] must be at most {MAX_METADATA_VALUE} characters without control characters"
            )


def check_short_text(value: str, field: str, limit: int) -> None:
    """A value of up to `limit` characters; line breaks and tabs allowed (a comment, a query)."""
    if len(value) > limit or _CONTROL.search(value):
        raise invalid(f"{field} must be at most {limit} characters without control characters")


def check_one_line(value: str, field: str, limit: int) -> None:
    """A single-line value of up to `limit` characters: no control character at all."""
    if len(value) > limit or _CONTROL_ONE_LINE.search(value):
        raise invalid(f"{field} must be at most {limit} characters on one line, without control characters")


_NOT_IN_IDS = frozenset({"Cc", "Cf", "Co", "Cs", "Cn", "Zl", "Zp"})


def check_customer_id(customer_id: str) -> None:
    """Optional; when given, printable (no control, format or bidi-override characters) and without
    surrounding spaces, like the other ids: it is shown to agents and grouped by in analytics."""
    check_one_line(customer_id, "customer_id", MAX_CUSTOMER_ID)
    # Spaces inside are names' (山田　太郎 has an ideographic one); format, bidi-override, private-use
    # and separator characters other than spaces are not.
    invisible = any(unicodedata.category(ch) in _NOT_IN_IDS for ch in customer_id)
    if customer_id and (invisible or customer_id != customer_id.strip()):
        raise invalid(
            f"customer_id must be visible characters without surrounding spaces (or empty), "
            f"got {customer_id[:80]!r}"
        )


def check_score(score: int) -> None:
    if not 1 <= score <= 5:
        raise invalid(f"score is {score}; a CSAT score is 1 (worst) to 5 (best)")


def check_agent_id(agent_id: str, field: str = "agent_id") -> None:
    if not agent_id:
        raise invalid(f"{field} is required")
    if len(agent_id) > MAX_AGENT_ID or not agent_id.isprintable() or agent_id != agent_id.strip():
        raise invalid(
            f"{field} must be 1-{MAX_AGENT_ID} printable characters without surrounding spaces, "
            f"got {agent_id[:80]!r}"
        )


def check_queue(queue: str, field: str = "queue") -> None:
    if not _TENANT.fullmatch(queue):
        raise invalid(
            f"{field} {queue[:80]!r} is malformed: 1-64 characters of letters, digits, '_', '.', '-'"
        )
