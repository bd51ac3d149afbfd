"""`switchboard keys issue|list|revoke|rotate`: API keys on the tenants topic.

`issue` and `rotate` print the secret alone on stdout (scripts capture it), everything else on
stderr: the secret is shown once and never stored anywhere but as a hash.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict
from typing import Any


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else "-"


def _run(args: argparse.Namespace) -> int:
    from aiokafka.errors import KafkaError

    from services.auth._admin import AdminError, issue_key, registry, revoke_key, rotate_key
    from services.cli import _settings
    from services.commands import kafka_failed

    settings = _settings()
    try:
        if args.action == "issue":
            key, token, created = asyncio.run(
                issue_key(settings, args.tenant, args.role or ["customer-app"], args.label)
            )
            if created:
                print(f"tenant {key.tenant_id} created", file=sys.stderr)
            print(
                f"issued API key sbk_{key.key_id} for tenant {key.tenant_id} (roles: {', '.join(key.roles)})",
                file=sys.stderr,
            )
            print(token, flush=True)
        elif args.action == "revoke":
            key = asyncio.run(revoke_key(settings, args.key))
            print(f"API key sbk_{key.key_id} of tenant {key.tenant_id} revoked", file=sys.stderr)
        elif args.action == "rotate":
            old, new, token = asyncio.run(rotate_key(settings, args.key, args.overlap))
            print(
                f"API key sbk_{new.key_id} replaces sbk_{old.key_id} (tenant {new.tenant_id}); "
                f"the old key works until {_when(old.expires_at)}",
                file=sys.stderr,
            )
            print(token, flush=True)
        else:
            reg = asyncio.run(registry(settings))
            keys = reg.keys_of(args.tenant)
            if args.json:
                rows = []
                for k in keys:
                    row = asdict(k)
                    row.pop("secret_hash")
                    row["status"] = k.status.value
                    rows.append(row)
                print(json.dumps(rows, indent=2))
                return 0
            print(f"{'KEY':<17} {'TENANT':<20} {'STATUS':<8} {'ROLES':<30} {'CREATED':<20} EXPIRES")
            now = time.time()
            for k in keys:
                status = k.status.value
                if status == "active" and k.expires_at is not None and k.expires_at <= now:
                    status = "expired"
                print(
                    f"sbk_{k.key_id:<13} {k.tenant_id:<20} {status:<8} {','.join(k.roles):<30} "
                    f"{_when(k.created_at):<20} {_when(k.expires_at)}"
                )
    except (AdminError, ValueError) as exc:
        print(f"switchboard keys {args.action}: {exc}", file=sys.stderr)
        return 1
    except KafkaError as exc:
        return kafka_failed(
            f"keys {args.action}",
            exc,
            "the change may or may not have been recorded: see `switchboard keys list` (an issued key "
            "whose token was not printed is unusable: revoke it)"
            if args.action != "list"
            else "",
        )
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("keys", help="API keys: issue, list, revoke, rotate")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("issue", help="a new key (the tenant is created when missing); prints the secret")
    a.add_argument("--tenant", required=True)
    a.add_argument(
        "--role",
        action="append",
        choices=["customer-app", "agent", "knowledge-admin", "admin"],
        help="repeatable; default customer-app",
    )
    a.add_argument("--label", default="", help="a note shown in `keys list`")
    a = actions.add_parser("list", help="keys (never their secrets)")
    a.add_argument("--tenant")
    a.add_argument("--json", action="store_true")
    a = actions.add_parser("revoke", help="refuse the key from now on (every ingress within a second)")
    a.add_argument("key", help="key id (sbk_… prefix shown by `keys list`)")
    a = actions.add_parser("rotate", help="a successor key; the old one works for --overlap seconds more")
    a.add_argument("key")
    a.add_argument("--overlap", type=float, default=24 * 3600.0, help="seconds (default 86400)")
    p.set_defaults(func=_run)
