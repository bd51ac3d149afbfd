"""Tenants, API keys and the authorization decision. Pure: no I/O, no clock of its own.

A key is `sbk_<key id>_<secret>`: the key id is the visible prefix that names the key in logs and
in `switchboard keys list`; only an HMAC-SHA-256 of the secret (with a server-side pepper) is ever
stored. Records on the `tenants` topic carry the whole state of one tenant or one key (the topic
is compacted by record key, so the latest record of each entity is all that a reader needs).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

import grpc

TOKEN_PREFIX = "sbk_"
_TOKEN = re.compile(r"sbk_([0-9a-f]{12})_([A-Za-z0-9_\-]{43})")
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")

ROLE_CUSTOMER_APP = "customer-app"
ROLE_AGENT = "agent"
ROLE_KNOWLEDGE_ADMIN = "knowledge-admin"
ROLE_ADMIN = "admin"
ROLES = (ROLE_CUSTOMER_APP, ROLE_AGENT, ROLE_KNOWLEDGE_ADMIN, ROLE_ADMIN)

# Services that stay open whatever the keys: load balancers and grpcurl need them.
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
# Which roles may call a method: by service, with per-method additions (an agent console reads
# the conversations it works on through ChatService). `admin` may call anything.
_SERVICE_ROLES: Mapping[str, frozenset[str]] = {
    "switchboard.v1.ChatService": frozenset({ROLE_CUSTOMER_APP}),
    "switchboard.v1.AgentService": frozenset({ROLE_AGENT}),
    "switchboard.v1.KnowledgeService": frozenset({ROLE_KNOWLEDGE_ADMIN}),
}
_METHOD_ROLES: Mapping[str, frozenset[str]] = {
    "/switchboard.v1.ChatService/GetConversation": frozenset({ROLE_AGENT}),
    "/switchboard.v1.ChatService/StreamConversation": frozenset({ROLE_AGENT}),
}


class Status(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"  # tenants
    REVOKED = "revoked"  # keys


@dataclass(frozen=True, slots=True)
class TenantRecord:
    tenant_id: str
    status: Status = Status.ACTIVE
    created_at: float = 0.0
    updated_at: float = 0.0
    # Per-tenant settings (limits and the like), free-form for the features that read them.
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def record_key(self) -> str:
        return f"tenant/{self.tenant_id}"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    tenant_id: str
    roles: tuple[str, ...]
    # hex HMAC-SHA-256(pepper, secret); `pepper_id` names the pepper (never the pepper itself),
    # so a replica with another pepper says so instead of refusing every key in silence.
    secret_hash: str
    pepper_id: str
    status: Status = Status.ACTIVE
    created_at: float = 0.0
    # Set by rotation: the key keeps working until then (the overlap window), then it is refused.
    expires_at: float | None = None
    revoked_at: float | None = None
    label: str = ""

    @property
    def record_key(self) -> str:
        return f"key/{self.key_id}"


Record = TenantRecord | KeyRecord


# --- codec ---------------------------------------------------------------------------------------


def encode_record(record: Record) -> tuple[bytes, bytes]:
    """(Kafka key, value) of a record."""
    body = asdict(record)
    body["status"] = record.status.value
    body["type"] = "tenant" if isinstance(record, TenantRecord) else "key"
    if isinstance(record, KeyRecord):
        body["roles"] = list(record.roles)
    return record.record_key.encode(), json.dumps(body, sort_keys=True).encode()


def decode_record(value: bytes) -> Record:
    """A record from its value; raises ValueError on anything that is not one."""
    try:
        body = json.loads(value)
        if not isinstance(body, dict):
            raise ValueError(f"expected a JSON object, got {type(body).__name__}")
        kind = body.pop("type")
        body["status"] = Status(body["status"])
        if kind == "tenant":
            return TenantRecord(**body)
        if kind == "key":
            body["roles"] = tuple(body["roles"])
            return KeyRecord(**body)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"not a tenants-topic record: {exc}") from exc
    raise ValueError(f"unknown record type {kind!r}")


# --- secrets -------------------------------------------------------------------------------------


def pepper_id(pepper: bytes) -> str:
    return hashlib.sha256(b"switchboard-pepper-id:" + pepper).hexdigest()[:12]


def hash_secret(pepper: bytes, secret: str) -> str:
    return hmac.new(pepper, secret.encode(), hashlib.sha256).hexdigest()


def new_key(
    pepper: bytes, tenant_id: str, roles: Iterable[str], now: float, label: str = ""
) -> tuple[KeyRecord, str]:
    """A new key record and its token (the only time the secret exists outside the caller)."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    record = KeyRecord(
        key_id=key_id,
        tenant_id=tenant_id,
        roles=tuple(sorted(set(roles))),
        secret_hash=hash_secret(pepper, secret),
        pepper_id=pepper_id(pepper),
        created_at=now,
        label=label,
    )
    return record, f"{TOKEN_PREFIX}{key_id}_{secret}"


def parse_token(token: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed token, else None."""
    match = _TOKEN.fullmatch(token)
    return (match.group(1), match.group(2)) if match else None


def check_tenant_id(tenant_id: str) -> None:
    if not _TENANT.fullmatch(tenant_id):
        raise ValueError(
            f"tenant id {tenant_id[:80]!r} is malformed: 1-64 characters of letters, digits, '_', '.', '-'"
        )


def check_roles(roles: Iterable[str]) -> tuple[str, ...]:
    chosen = tuple(sorted(set(roles)))
    unknown = [r for r in chosen if r not in ROLES]
    if unknown or not chosen:
        raise ValueError(f"roles must be some of {', '.join(ROLES)}; got {', '.join(chosen) or 'none'}")
    return chosen


# --- the registry (the fold of the topic) --------------------------------------------------------


@dataclass
class Registry:
    """Tenants and keys as of some offset of the tenants topic."""

    tenants: dict[str, TenantRecord] = field(default_factory=dict)
    keys: dict[str, KeyRecord] = field(default_factory=dict)

    def apply(self, record_key: bytes | None, value: bytes | None) -> None:
        """Fold one record. A tombstone (no value) deletes its entity; garbage raises ValueError."""
        if value is None:
            name = (record_key or b"").decode(errors="replace")
            kind, _, ident = name.partition("/")
            (self.tenants if kind == "tenant" else self.keys).pop(ident, None)
            return
        record = decode_record(value)
        if isinstance(record, TenantRecord):
            self.tenants[record.tenant_id] = record
        else:
            self.keys[record.key_id] = record

    @property
    def has_keys(self) -> bool:
        """Once any key was issued (even if revoked since), calls without a key are refused."""
        return bool(self.keys)

    def keys_of(self, tenant_id: str | None = None) -> list[KeyRecord]:
        return sorted(
            (k for k in self.keys.values() if tenant_id is None or k.tenant_id == tenant_id),
            key=lambda k: (k.tenant_id, k.created_at),
        )


# --- the decision --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a call is: the key and the tenant it belongs to."""

    key_id: str
    tenant_id: str


@dataclass(frozen=True, slots=True)
class Refusal:
    code: grpc.StatusCode
    message: str


OPEN = Principal("", "")  # no key needed: open service, or no key exists yet (loopback only)


def roles_for(method: str) -> frozenset[str] | None:
    """Roles that may call `method` (`/package.Service/Method`); None: open to anyone."""
    service = method[1:].split("/", 1)[0]
    if service in OPEN_SERVICES:
        return None
    allowed = _SERVICE_ROLES.get(service, frozenset())
    return allowed | _METHOD_ROLES.get(method, frozenset()) | {ROLE_ADMIN}


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The key of `authorization: Bearer <key>`; "" for an authorization header in any other
    form; None without one."""
    for name, value in metadata or ():
        if name == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def authorize(
    registry: Registry, pepper: bytes, method: str, token: str | None, now: float
) -> Principal | Refusal:
    """Who may make this call: a principal, OPEN, or a refusal with the status to answer."""
    allowed = roles_for(method)
    if allowed is None:
        return OPEN
    if token is None:
        if not registry.has_keys:
            return OPEN
        return Refusal(
            grpc.StatusCode.UNAUTHENTICATED,
            "this call needs an API key: send `authorization: Bearer <key>` metadata "
            "(`switchboard keys issue --tenant T` makes one)",
        )
    if not token:  # an authorization header without "Bearer <key>" (bearer_token)
        return Refusal(
            grpc.StatusCode.UNAUTHENTICATED,
            "the authorization metadata must be `authorization: Bearer <key>` (the word Bearer, "
            "a space, then the key); it had another scheme, the key alone, or no key",
        )
    parsed = parse_token(token)
    key = registry.keys.get(parsed[0]) if parsed else None
    if parsed is None or key is None:
        return Refusal(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
    if not hmac.compare_digest(key.secret_hash, hash_secret(pepper, parsed[1])):
        if key.pepper_id != pepper_id(pepper):
            return Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                f"API key {key.key_id} was issued with another pepper than this ingress has "
                "(set SWITCHBOARD_AUTH_PEPPER to the same value everywhere)",
            )
        return Refusal(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
    if key.status is Status.REVOKED:
        return Refusal(grpc.StatusCode.UNAUTHENTICATED, f"API key {key.key_id} is revoked")
    if key.expires_at is not None and now >= key.expires_at:
        return Refusal(
            grpc.StatusCode.UNAUTHENTICATED,
            f"API key {key.key_id} expired (it was rotated): use its successor",
        )
    tenant = registry.tenants.get(key.tenant_id)
    if tenant is not None and tenant.status is Status.DISABLED:
        return Refusal(grpc.StatusCode.PERMISSION_DENIED, f"tenant {key.tenant_id!r} is disabled")
    if not allowed.intersection(key.roles):
        return Refusal(
            grpc.StatusCode.PERMISSION_DENIED,
            f"API key {key.key_id} has roles {', '.join(key.roles)}; {method} needs one of "
            f"{', '.join(sorted(allowed))}",
        )
    return Principal(key.key_id, key.tenant_id)


def tenant_mismatch(principal: Principal, requested: str) -> Refusal | None:
    """The request names another tenant than its key's (an empty tenant_id is filled instead)."""
    if not requested or requested == principal.tenant_id:
        return None
    return Refusal(
        grpc.StatusCode.PERMISSION_DENIED,
        f"API key {principal.key_id} belongs to tenant {principal.tenant_id!r}; "
        f"tenant_id {requested[:80]!r} is not yours (leave tenant_id empty to use the key's)",
    )


def with_status(record: Record, status: Status, now: float) -> Record:
    if isinstance(record, TenantRecord):
        return replace(record, status=status, updated_at=now)
    return replace(record, status=status, revoked_at=now if status is Status.REVOKED else record.revoked_at)
