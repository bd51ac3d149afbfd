"""`switchboard tenants create|list|disable|enable`: the tenants on the tenants topic."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else "-"


def _run(args: argparse.Namespace) -> int:
    from services.auth import Status
    from services.auth._admin import AdminError, create_tenant, registry, set_tenant_status
    from services.cli import _settings

    settings = _settings()
    try:
        if args.action == "create":
            record, created = asyncio.run(create_tenant(settings, args.tenant))
            print(f"tenant {record.tenant_id} {'created' if created else 'exists'} ({record.status.value})")
        elif args.action in ("disable", "enable"):
            status = Status.DISABLED if args.action == "disable" else Status.ACTIVE
            record = asyncio.run(set_tenant_status(settings, args.tenant, status))
            print(f"tenant {record.tenant_id} {record.status.value}")
        else:
            reg = asyncio.run(registry(settings))
            rows = sorted(reg.tenants.values(), key=lambda t: t.tenant_id)
            if args.json:
                print(json.dumps([_as_json(t, reg) for t in rows], indent=2))
                return 0
            print(f"{'TENANT':<24} {'STATUS':<9} {'KEYS':>4}  CREATED")
            for t in rows:
                active = sum(1 for k in reg.keys_of(t.tenant_id) if k.status is Status.ACTIVE)
                print(f"{t.tenant_id:<24} {t.status.value:<9} {active:>4}  {_when(t.created_at)}")
    except (AdminError, ValueError) as exc:
        print(f"switchboard tenants {args.action}: {exc}", file=sys.stderr)
        return 1
    return 0


def _as_json(tenant: Any, reg: Any) -> dict[str, Any]:
    return {
        "tenant_id": tenant.tenant_id,
        "status": tenant.status.value,
        "created_at": tenant.created_at,
        "active_keys": sum(1 for k in reg.keys_of(tenant.tenant_id) if k.status.value == "active"),
    }


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("tenants", help="tenants (API keys belong to one): create, list, disable, enable")
    actions = p.add_subparsers(dest="action", required=True)
    for name, text in (
        ("create", "create a tenant (nothing happens if it exists)"),
        ("disable", "refuse every key of the tenant (PERMISSION_DENIED) until enabled"),
        ("enable", "accept the tenant's keys again"),
    ):
        a = actions.add_parser(name, help=text)
        a.add_argument("tenant")
    a = actions.add_parser("list", help="tenants with their status and active keys")
    a.add_argument("--json", action="store_true")
    p.set_defaults(func=_run)
