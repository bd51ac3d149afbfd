"""Operations behind `switchboard tenants …` and `switchboard keys …`: read the registry, append records."""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from services.auth._limits import check_limit_settings
from services.auth._log import append_records, load_pepper, read_registry
from services.auth._model import (
    TOKEN_PREFIX,
    KeyRecord,
    Record,
    Registry,
    Status,
    TenantRecord,
    check_roles,
    check_tenant_id,
    hash_secret,
    new_key,
    parse_token,
)
from services.settings import Settings


class AdminError(Exception):
    """An operation that cannot be done as asked; the message says why."""


def key_id_of(name: str) -> str:
    """A key id from `3f9a…`, `sbk_3f9a…` or a whole token."""
    name = name.strip().removeprefix(TOKEN_PREFIX)
    return name.split("_", 1)[0]


def _key(registry: Registry, name: str) -> KeyRecord:
    key = registry.keys.get(key_id_of(name))
    if key is None:
        raise AdminError(f"no API key {name!r} (see `switchboard keys list`)")
    return key


async def create_tenant(
    settings: Settings, tenant_id: str, limits: Mapping[str, float | None] | None = None
) -> tuple[TenantRecord, bool]:
    """The tenant, and whether it was created now (an existing one is left as it is)."""
    check_tenant_id(tenant_id)
    registry = await read_registry(settings)
    existing = registry.tenants.get(tenant_id)
    if existing is not None:
        return existing, False
    now = time.time()
    record = TenantRecord(tenant_id, created_at=now, updated_at=now, settings=_with_limits({}, limits or {}))
    await append_records(settings, [record])
    return record, True


def _with_limits(current: Mapping[str, Any], limits: Mapping[str, float | None]) -> dict[str, Any]:
    """`current` settings with the given limits set (None: back to the ingress's default)."""
    merged = {k: v for k, v in current.items() if not (k in limits and limits[k] is None)}
    merged.update(check_limit_settings({k: v for k, v in limits.items() if v is not None}))
    return merged


async def update_tenant_limits(
    settings: Settings, tenant_id: str, limits: Mapping[str, float | None]
) -> TenantRecord:
    """Set (or, with None, reset to the default) the tenant's rate limits; every ingress applies
    them as soon as it reads the record."""
    registry = await read_registry(settings)
    tenant = registry.tenants.get(tenant_id)
    if tenant is None:
        raise AdminError(f"no tenant {tenant_id!r} (see `switchboard tenants list`)")
    record = replace(tenant, settings=_with_limits(tenant.settings, limits), updated_at=time.time())
    await append_records(settings, [record])
    return record


async def set_tenant_status(settings: Settings, tenant_id: str, status: Status) -> TenantRecord:
    registry = await read_registry(settings)
    tenant = registry.tenants.get(tenant_id)
    if tenant is None:
        raise AdminError(f"no tenant {tenant_id!r} (see `switchboard tenants list`)")
    record = replace(tenant, status=status, updated_at=time.time())
    await append_records(settings, [record])
    return record


async def issue_key(
    settings: Settings, tenant_id: str, roles: list[str], label: str = ""
) -> tuple[KeyRecord, str, bool]:
    """A new key for the tenant (created when missing): the record, its token, tenant created?"""
    check_tenant_id(tenant_id)
    chosen = check_roles(roles)
    registry = await read_registry(settings)
    tenant = registry.tenants.get(tenant_id)
    if tenant is not None and tenant.status is Status.DISABLED:
        raise AdminError(f"tenant {tenant_id!r} is disabled (`switchboard tenants enable {tenant_id}`)")
    now = time.time()
    records: list[Record] = []
    if tenant is None:
        records.append(TenantRecord(tenant_id, created_at=now, updated_at=now))
    key, token = new_key(load_pepper(settings), tenant_id, chosen, now, label)
    records.append(key)
    await append_records(settings, records)
    return key, token, tenant is None


async def revoke_key(settings: Settings, name: str) -> KeyRecord:
    key = _key(await read_registry(settings), name)
    if key.status is Status.REVOKED:
        return key
    record = replace(key, status=Status.REVOKED, revoked_at=time.time())
    await append_records(settings, [record])
    return record


async def rotate_key(settings: Settings, name: str, overlap_s: float) -> tuple[KeyRecord, KeyRecord, str]:
    """A successor with the same tenant, roles and label; the old key keeps working for
    `overlap_s` seconds (time to deploy the new one), then it is refused. (old, new, new token)"""
    registry = await read_registry(settings)
    old = _key(registry, name)
    if old.status is Status.REVOKED:
        raise AdminError(f"API key {old.key_id} is revoked; issue a new one instead")
    now = time.time()
    successor, token = new_key(load_pepper(settings), old.tenant_id, old.roles, now, old.label)
    expires = now + max(0.0, overlap_s)
    retired = replace(old, expires_at=min(expires, old.expires_at or expires))
    await append_records(settings, [successor, retired])
    return retired, successor, token


async def registry(settings: Settings) -> Registry:
    return await read_registry(settings)


DEMO_KEY_LABEL = "make run demo"


def demo_key_path(settings: Settings) -> Path:
    """Where `make run` keeps its demo tenant's key (mode 0600), next to the data it serves."""
    check_tenant_id(settings.demo_tenant)  # a file name: no separators, no dot-dot
    return Path(settings.data_dir) / "secrets" / f"demo-api-key-{settings.demo_tenant}"


def _still_valid(registry: Registry, settings: Settings, token: str) -> bool:
    parsed = parse_token(token)
    key = registry.keys.get(parsed[0]) if parsed else None
    return (
        parsed is not None
        and key is not None
        and key.tenant_id == settings.demo_tenant
        and key.label == DEMO_KEY_LABEL
        and key.status is Status.ACTIVE
        and key.expires_at is None
        and hmac.compare_digest(key.secret_hash, hash_secret(load_pepper(settings), parsed[1]))
    )


async def _demo_key(settings: Settings) -> str:
    # The same key on every run over the same data: a client started against one run (its key
    # copied from the banner) keeps working after `make run` again, a restart after a kill -9
    # included. It used to be replaced on every run, which refused every such client
    # UNAUTHENTICATED ("revoked"). A new one is issued, and the demo tenant's other demo keys
    # revoked, when the saved one is missing or no longer valid (`switchboard keys revoke` it to
    # get a new one).
    current = await read_registry(settings)
    path = demo_key_path(settings)
    saved = path.read_text().strip() if path.exists() else ""
    if saved and _still_valid(current, settings, saved):
        return saved
    stale = [
        replace(k, status=Status.REVOKED, revoked_at=time.time())
        for k in current.keys_of(settings.demo_tenant)
        if k.label == DEMO_KEY_LABEL and k.status is Status.ACTIVE
    ]
    _, token, _ = await issue_key(
        # Every role a tenant's own backends use, so a first user can try each API with it.
        settings,
        settings.demo_tenant,
        ["customer-app", "agent", "knowledge-admin"],
        DEMO_KEY_LABEL,
    )
    if stale:
        await append_records(settings, stale)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    scratch = path.with_name(path.name + ".new")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    os.replace(scratch, path)
    return token


def issue_demo_key(settings: Settings) -> str:
    """The key `make run`'s demo presents: SWITCHBOARD_API_KEY when set, else a new one."""
    import asyncio

    return settings.api_key or asyncio.run(_demo_key(settings))
