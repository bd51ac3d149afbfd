"""PII redaction for what leaves the log for analytics and reports.

`redact` and `RedactionPolicy` are pure; `redact_event` applies this process's policy (from
settings: ``pii_redact``, ``pii_redact_tenants``) to an event's free text before it is projected.
"""

from __future__ import annotations

from typing import Any

from streams.privacy.redact import (
    CARD,
    CN_ID,
    EMAIL,
    KINDS,
    PHONE,
    Match,
    RedactionPolicy,
    cn_id_valid,
    find_pii,
    luhn_valid,
    parse_kinds,
    redact,
)

__all__ = [
    "CARD",
    "CN_ID",
    "EMAIL",
    "KINDS",
    "PHONE",
    "Match",
    "RedactionPolicy",
    "active_policy",
    "cn_id_valid",
    "find_pii",
    "luhn_valid",
    "parse_kinds",
    "redact",
    "redact_event",
    "redact_for_tenant",
    "use_policy",
]

# The free-text fields of event payloads (message and reply text, CSAT comments). Ids, such as a
# customer id, are identifiers the system joins and erases by, and are left alone.
TEXT_FIELDS = ("text", "comment")

_active: list[RedactionPolicy] = []
_fields_of: dict[Any, tuple[str, ...]] = {}


def _text_fields(payload: Any) -> tuple[str, ...]:
    """The free-text string fields a payload type has (cached per type: asking a protobuf
    message for a field it lacks raises, which costs more than the redaction itself)."""
    descriptor = payload.DESCRIPTOR
    fields = _fields_of.get(descriptor)
    if fields is None:
        by_name = descriptor.fields_by_name
        fields = _fields_of[descriptor] = tuple(
            n for n in TEXT_FIELDS if n in by_name and by_name[n].type == by_name[n].TYPE_STRING
        )
    return fields


def active_policy() -> RedactionPolicy:
    """This process's policy, read from settings on first use."""
    if not _active:
        from services.settings import load_settings

        settings = load_settings()
        _active.append(RedactionPolicy.parse(settings.pii_redact, settings.pii_redact_tenants))
    return _active[0]


def use_policy(policy: RedactionPolicy) -> None:
    """Replace this process's policy (tests; a process that builds its own)."""
    _active[:] = [policy]


def redact_for_tenant(tenant: str, text: str) -> str:
    return active_policy().redact(tenant, text)


def redact_event(event: Any) -> Any:
    """The event itself when its free text holds no PII the tenant's policy masks; else a copy
    with that text masked. Deterministic, so projecting a batch twice gives the same rows."""
    kind = event.WhichOneof("payload")
    if kind is None:
        return event
    payload = getattr(event, kind)
    fields = _text_fields(payload)
    if not fields:
        return event
    kinds = active_policy().kinds_for(event.tenant_id)
    if not kinds:
        return event
    changed: dict[str, str] = {}
    for name in fields:
        value = getattr(payload, name)
        if value:
            masked = redact(value, kinds)
            if masked != value:
                changed[name] = masked
    if not changed:
        return event
    copy = type(event)()
    copy.CopyFrom(event)
    target = getattr(copy, kind)
    for name, masked in changed.items():
        setattr(target, name, masked)
    return copy
