"""`switchboard status`: every process's address and Prometheus endpoint, and whether each answers.

    switchboard status [--json]

The local stack (Kafka, Redis, S3) is `switchboard stack status`; this lists Switchboard's own
processes: the gRPC ingress, the sessions and assistant workers, the analytics process (and its
ClickHouse HTTP endpoint in embedded mode), each with the /metrics address a Prometheus scrapes
(infra/grafana/prometheus.yml has the same list).
"""

from __future__ import annotations

import argparse
import json
import socket
import urllib.error
import urllib.request
from typing import Any

# role -> (what it is, the settings field of its service address or None)
PROCESSES: dict[str, tuple[str, str | None]] = {
    "ingress": ("gRPC API (switchboard ingress)", "grpc_listen"),
    "sessions": ("sessions worker (hot view in Redis)", None),
    "assistant": ("assistant worker (internal search endpoint)", "assistant_listen"),
    "analytics": ("projector + ClickHouse HTTP endpoint (switchboard analytics)", "analytics_listen"),
}


def _tcp_open(address: str, timeout_s: float = 1.0) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def _metrics_answer(address: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout_s) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def process_status(settings: Any) -> dict[str, dict[str, Any]]:
    from services.observability.metrics import metrics_listen

    out: dict[str, dict[str, Any]] = {}
    for role, (what, field) in PROCESSES.items():
        address = str(getattr(settings, field)) if field else None
        if role == "analytics" and not settings.embedded_clickhouse:
            address = None  # with a ClickHouse server, analytics only projects
        metrics = metrics_listen(settings, role) or None
        out[role] = {
            "what": what,
            "address": address,
            "answers": _tcp_open(address) if address else None,
            "metrics": f"http://{metrics}/metrics" if metrics else None,
            "metrics_answer": _metrics_answer(metrics) if metrics else None,
        }
    return out


def _cmd_status(args: argparse.Namespace) -> int:
    from services.cli import _settings

    status = process_status(_settings())
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(f"{'process':<10} {'address':<22} {'up':<4} {'metrics':<36} up")
        for role, s in status.items():
            up = {True: "yes", False: "no", None: "-"}
            print(
                f"{role:<10} {s['address'] or '-':<22} {up[s['answers']]:<4} "
                f"{s['metrics'] or '(off)':<36} {up[s['metrics_answer']]}"
            )
    # Exit 1 when a process does not answer on its metrics endpoint (it is down, or metrics are off).
    return 0 if all(s["metrics_answer"] in (True, None) for s in status.values()) else 1


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "status", help="Switchboard's processes: addresses, Prometheus endpoints, whether they answer"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_status)
