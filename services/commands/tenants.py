"""`switchboard tenants create|update|list|disable|enable`: the tenants on the tenants topic."""

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
    from services.auth._admin import (
        AdminError,
        create_tenant,
        registry,
        set_tenant_status,
        update_tenant_limits,
    )
    from services.cli import _settings

    settings = _settings()
    try:
        if args.action == "create":
            record, created = asyncio.run(create_tenant(settings, args.tenant, _limits(args)))
            print(
                f"tenant {record.tenant_id} {'created' if created else 'exists'} ({record.status.value})"
                f"{_describe_limits(record.settings)}"
            )
            if not created and _limits(args):
                print(f"(limits unchanged: `switchboard tenants update {args.tenant} ...` changes them)")
        elif args.action == "update":
            limits = _limits(args)
            retention = getattr(args, "retention_days", ...)
            if retention is not ...:
                # Per-tenant retention (streams/privacy/_retention.py), applied by `tenant retention`.
                from streams.privacy._retention import set_tenant_retention

                record = asyncio.run(set_tenant_retention(settings, args.tenant, retention))
                shown = f"{retention:g} days" if retention is not None else "none"
                print(f"tenant {record.tenant_id} retention: {shown}")
                if not limits:
                    return 0
            if not limits:
                raise ValueError("nothing to update: give --rate, --burst, --key-rate or --key-burst")
            record = asyncio.run(update_tenant_limits(settings, args.tenant, limits))
            print(
                f"tenant {record.tenant_id} updated{_describe_limits(record.settings) or ' (default limits)'}"
            )
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
            print(f"{'TENANT':<24} {'STATUS':<9} {'KEYS':>4}  {'CREATED':<20}  LIMITS")
            for t in rows:
                active = sum(1 for k in reg.keys_of(t.tenant_id) if k.status is Status.ACTIVE)
                shown = _describe_limits(t.settings).strip(" ()") or "default"
                print(
                    f"{t.tenant_id:<24} {t.status.value:<9} {active:>4}  {_when(t.created_at):<20}  {shown}"
                )
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
        "settings": tenant.settings,
    }


# CLI option -> tenant setting (services/auth/_limits.py); "default" resets one to the settings'.
_LIMIT_OPTIONS = (
    ("rate", "rate_per_s"),
    ("burst", "burst"),
    ("key_rate", "key_rate_per_s"),
    ("key_burst", "key_burst"),
    ("max_open_conversations", "max_open_conversations"),
    ("max_knowledge_documents", "max_knowledge_documents"),
    ("idle_close_after", "idle_close_after_s"),
)


def _limit_value(text: str) -> float | None:
    if text == "default":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'default', got {text!r}") from None
    if value < 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'default', got {text!r}")
    return value


def _limits(args: argparse.Namespace) -> dict[str, float | None]:
    return {name: getattr(args, opt) for opt, name in _LIMIT_OPTIONS if getattr(args, opt, ...) is not ...}


def _describe_limits(settings: dict[str, Any]) -> str:
    parts = [f"{name}={settings[name]:g}" for _, name in _LIMIT_OPTIONS if name in settings]
    return f" ({', '.join(parts)})" if parts else ""


def _setting_name(opt: str) -> str:
    if opt.startswith("max_"):
        return opt.upper()
    if opt == "idle_close_after":
        return "IDLE_CLOSE_AFTER_S"
    return f"{'TENANT_' if not opt.startswith('key') else ''}{opt.upper().replace('RATE', 'RATE_PER_S')}"


def _add_limit_options(a: argparse.ArgumentParser) -> None:
    for opt, text in (
        ("rate", "the tenant's messages/s over all its keys (0: unlimited)"),
        ("burst", "messages the tenant may send at once (0: one second's worth of --rate)"),
        ("key_rate", "each key's own messages/s (0: unlimited)"),
        ("key_burst", "each key's burst (0: one second's worth of --key-rate)"),
        ("max_open_conversations", "conversations the tenant may have open at once (0: unlimited)"),
        ("max_knowledge_documents", "documents in the tenant's knowledge base (0: unlimited)"),
        ("idle_close_after", "seconds without activity after which a conversation is closed (0: never)"),
    ):
        a.add_argument(
            f"--{opt.replace('_', '-')}",
            dest=opt,
            type=_limit_value,
            default=...,
            metavar="N|default",
            help=f"{text}; 'default': the ingress's SWITCHBOARD_{_setting_name(opt)} setting",
        )


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "tenants", help="tenants (API keys belong to one): create, update, list, disable, enable"
    )
    actions = p.add_subparsers(dest="action", required=True)
    for name, text in (
        ("create", "create a tenant (nothing happens if it exists)"),
        ("update", "change a tenant's rate limits and quotas (every ingress applies them within seconds)"),
        ("disable", "refuse every key of the tenant (PERMISSION_DENIED) until enabled"),
        ("enable", "accept the tenant's keys again"),
    ):
        a = actions.add_parser(name, help=text)
        a.add_argument("tenant")
        if name in ("create", "update"):
            _add_limit_options(a)
        if name == "update":
            a.add_argument(
                "--retention-days",
                dest="retention_days",
                type=_limit_value,
                default=...,
                metavar="N|default",
                help="keep the tenant's analytics rows and archived events N days ('default': forever); "
                "applied by `switchboard tenant retention`",
            )
    a = actions.add_parser("list", help="tenants with their status and active keys")
    a.add_argument("--json", action="store_true")
    p.set_defaults(func=_run)
