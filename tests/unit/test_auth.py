"""API keys, tenants and the authorization decision: pure, no server."""

from __future__ import annotations

import grpc
import pytest

from services.auth import (
    OPEN,
    KeyRecord,
    Principal,
    Refusal,
    Registry,
    Status,
    TenantRecord,
    authorize,
    bearer_token,
    decode_record,
    encode_record,
    is_loopback,
    listen_refusal,
    new_key,
    parse_token,
    roles_for,
    tenant_mismatch,
)
from services.auth._admin import key_id_of

PEPPER = b"unit-test-pepper"
CHAT = "/switchboard.v1.ChatService/SendMessage"
KNOWLEDGE = "/switchboard.v1.KnowledgeService/UpsertDocuments"
AGENT = "/switchboard.v1.AgentService/AcceptConversation"


def registry_with(*records: TenantRecord | KeyRecord) -> Registry:
    registry = Registry()
    for record in records:
        registry.apply(*encode_record(record))
    return registry


def issued(tenant: str = "acme", roles: tuple[str, ...] = ("customer-app",)) -> tuple[KeyRecord, str]:
    return new_key(PEPPER, tenant, roles, now=1000.0)


def test_a_token_names_its_key_and_only_a_hash_of_the_secret_is_kept() -> None:
    key, token = issued()
    key_id, secret = parse_token(token) or ("", "")
    assert key_id == key.key_id and token.startswith(f"sbk_{key.key_id}_")
    _, value = encode_record(key)
    assert secret not in value.decode() and token not in value.decode()
    assert decode_record(value) == key
    assert key_id_of(token) == key_id_of(f"sbk_{key_id}") == key_id_of(key_id) == key_id


def test_a_valid_key_is_its_tenant() -> None:
    key, token = issued()
    decision = authorize(registry_with(key), PEPPER, CHAT, token, now=2000.0)
    assert decision == Principal(key.key_id, "acme")


@pytest.mark.parametrize(
    "token",
    ["", "nonsense", "sbk_000000000000_" + "A" * 43, "Bearer x"],
)
def test_unknown_or_malformed_keys_are_unauthenticated(token: str) -> None:
    key, _ = issued()
    decision = authorize(registry_with(key), PEPPER, CHAT, token, now=2000.0)
    assert isinstance(decision, Refusal) and decision.code is grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("header", ["{token}", "Basic {token}", "Bearer", "Bearer   "])
def test_a_key_without_the_bearer_scheme_is_told_so(header: str) -> None:
    """A new user's walkthrough: `authorization: sbk_...` (the key alone, a valid one) was refused
    as "unknown API key", which sent them to check the key instead of the header."""
    key, token = issued()
    sent = bearer_token([("authorization", header.format(token=token))])
    decision = authorize(registry_with(key), PEPPER, CHAT, sent, now=2000.0)
    assert isinstance(decision, Refusal) and decision.code is grpc.StatusCode.UNAUTHENTICATED
    assert "`authorization: Bearer <key>`" in decision.message and "unknown" not in decision.message


def test_a_right_key_id_with_a_wrong_secret_is_unknown() -> None:
    key, token = issued()
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    decision = authorize(registry_with(key), PEPPER, CHAT, forged, now=2000.0)
    assert decision == Refusal(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")


def test_another_pepper_is_named_in_the_refusal() -> None:
    key, token = issued()
    decision = authorize(registry_with(key), b"other pepper", CHAT, token, now=2000.0)
    assert isinstance(decision, Refusal) and "SWITCHBOARD_AUTH_PEPPER" in decision.message


def test_no_key_is_open_only_while_no_key_exists() -> None:
    assert authorize(Registry(), PEPPER, CHAT, None, now=0) is OPEN
    key, _ = issued()
    decision = authorize(registry_with(key), PEPPER, CHAT, None, now=0)
    assert isinstance(decision, Refusal) and decision.code is grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in decision.message


def test_health_and_reflection_stay_open() -> None:
    key, _ = issued()
    for method in (
        "/grpc.health.v1.Health/Check",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ):
        assert roles_for(method) is None
        assert authorize(registry_with(key), PEPPER, method, None, now=0) is OPEN


def test_revoked_expired_and_disabled() -> None:
    from dataclasses import replace

    key, token = issued()
    revoked = replace(key, status=Status.REVOKED, revoked_at=1500.0)
    decision = authorize(registry_with(revoked), PEPPER, CHAT, token, now=2000.0)
    assert isinstance(decision, Refusal) and decision.code is grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in decision.message

    rotated = replace(key, expires_at=3000.0)
    assert isinstance(authorize(registry_with(rotated), PEPPER, CHAT, token, now=2999.0), Principal)
    late = authorize(registry_with(rotated), PEPPER, CHAT, token, now=3000.0)
    assert isinstance(late, Refusal) and "rotated" in late.message

    disabled = TenantRecord("acme", status=Status.DISABLED)
    decision = authorize(registry_with(disabled, key), PEPPER, CHAT, token, now=2000.0)
    assert isinstance(decision, Refusal) and decision.code is grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("roles", "method", "allowed"),
    [
        (("customer-app",), CHAT, True),
        (("customer-app",), KNOWLEDGE, False),
        (("customer-app",), AGENT, False),
        (("agent",), AGENT, True),
        (("agent",), "/switchboard.v1.ChatService/GetConversation", True),
        (("agent",), CHAT, False),
        (("knowledge-admin",), KNOWLEDGE, True),
        (("knowledge-admin",), CHAT, False),
        (("admin",), CHAT, True),
        (("admin",), KNOWLEDGE, True),
        (("admin",), AGENT, True),
        (("customer-app",), "/switchboard.v1.SomethingNew/Do", False),
    ],
)
def test_roles(roles: tuple[str, ...], method: str, allowed: bool) -> None:
    key, token = issued(roles=roles)
    decision = authorize(registry_with(key), PEPPER, method, token, now=2000.0)
    if allowed:
        assert isinstance(decision, Principal)
    else:
        assert isinstance(decision, Refusal) and decision.code is grpc.StatusCode.PERMISSION_DENIED


def test_tenant_of_the_request() -> None:
    me = Principal("abc", "acme")
    assert tenant_mismatch(me, "") is None
    assert tenant_mismatch(me, "acme") is None
    refusal = tenant_mismatch(me, "globex")
    assert refusal is not None and refusal.code is grpc.StatusCode.PERMISSION_DENIED


def test_bearer_metadata() -> None:
    assert bearer_token((("x", "y"),)) is None
    assert bearer_token((("authorization", "Bearer abc"),)) == "abc"
    assert bearer_token((("authorization", b"bearer  abc "),)) == "abc"
    assert bearer_token((("authorization", "Basic abc"),)) == ""


def test_fold_is_latest_record_wins_and_tombstones_delete() -> None:
    key, _ = issued()
    registry = registry_with(TenantRecord("acme"), key)
    from dataclasses import replace

    registry.apply(*encode_record(replace(key, status=Status.REVOKED)))
    assert registry.keys[key.key_id].status is Status.REVOKED
    registry.apply(f"key/{key.key_id}".encode(), None)
    assert key.key_id not in registry.keys and registry.tenants
    with pytest.raises(ValueError):
        registry.apply(b"key/x", b"not json")


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.0.0.2:50051", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        ("10.1.2.3:50051", False),
        ("ingress.example:50051", False),
    ],
)
def test_listen_rule(listen: str, loopback: bool) -> None:
    assert is_loopback(listen) is loopback
    assert (listen_refusal(listen, has_keys=False) is None) is loopback
    assert listen_refusal(listen, has_keys=True) is None


def test_batch_requests_are_checked_message_by_message() -> None:
    # SendMessageBatchRequest has no tenant_id of its own: each message's is the key's or empty.
    from switchboard.v1 import chat_pb2

    from services.auth._interceptor import _fill_tenant

    me = Principal("abc", "acme")
    batch = chat_pb2.SendMessageBatchRequest(
        messages=[chat_pb2.SendMessageRequest(tenant_id=""), chat_pb2.SendMessageRequest(tenant_id="acme")]
    )
    assert _fill_tenant(batch, me) is None
    assert [m.tenant_id for m in batch.messages] == ["acme", "acme"]
    batch.messages.add(tenant_id="globex")
    refusal = _fill_tenant(batch, me)
    assert refusal is not None and refusal.code is grpc.StatusCode.PERMISSION_DENIED
    single = chat_pb2.StartConversationRequest()
    assert _fill_tenant(single, me) is None and single.tenant_id == "acme"
    # A request that names no tenant cannot be confined to one: refused (fail closed).
    from grpc_health.v1 import health_pb2

    refused = _fill_tenant(health_pb2.HealthCheckRequest(), me)
    assert refused is not None and refused.code is grpc.StatusCode.PERMISSION_DENIED
