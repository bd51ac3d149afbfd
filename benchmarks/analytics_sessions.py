"""What a session costs on the embedded analytics endpoint.

Runs the endpoint over a fresh chdb directory (in this process, as the analytics process does)
and measures, in the same run:
- the latency of `SELECT 1` over HTTP without a session (the baseline), in a session with two
  remembered SETs (replayed on a fresh connection per request), and in a session holding its
  own connection (it created a temporary table);
- opening N clickhouse-connect clients at once (each opens a session and queries), and the
  sessions held afterwards;
- with `--reader`: `SELECT 1` as a reader (user `default`) and as the admin of an endpoint with a
  policy, in the same run: a reader's statement is parsed by the engine first (canonical).

    .venv/bin/python benchmarks/analytics_sessions.py [--requests 300] [--clients 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import clickhouse_connect

from services.analytics import ChdbQueryEngine, QueryEndpoint
from services.analytics._guard import EndpointPolicy


def serve(path: str, policy: EndpointPolicy | None = None) -> QueryEndpoint:
    ready = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        async def main() -> None:
            ep = QueryEndpoint(ChdbQueryEngine(path), "127.0.0.1", 0, policy=policy)
            await ep.start()
            box["ep"] = ep
            ready.set()
            await asyncio.Event().wait()

        asyncio.run(main())

    threading.Thread(target=run, daemon=True).start()
    ready.wait(60)
    return box["ep"]  # type: ignore[no-any-return]


def post(url: str, sql: str, **params: str) -> bytes:
    request = urllib.request.Request(
        f"{url}/?{urllib.parse.urlencode(params)}", data=sql.encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        return bytes(resp.read())


def latency_ms(url: str, n: int, **params: str) -> float:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        post(url, "SELECT 1", **params)
        samples.append((time.perf_counter() - t) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--reader", action="store_true", help="reader vs admin on an endpoint with a policy")
    args = parser.parse_args()
    if args.reader:
        reader_vs_admin(args.requests)
        return
    ep = serve(tempfile.mkdtemp(prefix="sb-bench-sessions-"))
    url = ep.url

    cheap = f"cheap-{uuid.uuid4().hex}"
    post(url, "SET max_block_size = 1234, max_threads = 2", session_id=cheap)
    stateful = f"own-{uuid.uuid4().hex}"
    post(url, "CREATE TEMPORARY TABLE t (x UInt8)", session_id=stateful)
    latency_ms(url, 20)  # warm-up
    base = latency_ms(url, args.requests)
    in_cheap = latency_ms(url, args.requests, session_id=cheap)
    in_own = latency_ms(url, args.requests, session_id=stateful)
    print(f"SELECT 1 median over {args.requests} requests:")
    print(f"  no session                       {base:7.2f} ms  (baseline)")
    print(f"  session, 2 SETs replayed         {in_cheap:7.2f} ms  x{in_cheap / base:.2f}")
    print(f"  session with its own connection  {in_own:7.2f} ms  x{in_own / base:.2f}")

    def one(i: int) -> Any:
        c = clickhouse_connect.get_client(host="127.0.0.1", port=ep.port)
        c.query(f"SELECT {i}")
        return c

    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=32) as pool:
        clients = list(pool.map(one, range(args.clients)))
    took = time.perf_counter() - t
    sessions, own = ep.engine.session_count
    print(
        f"{args.clients} clickhouse-connect clients opened at once (32 threads): {took:.1f} s, "
        f"{args.clients / took:.0f} clients/s; sessions held {sessions}, with their own connection {own}"
    )
    for c in clients:
        c.close()


def reader_vs_admin(n: int) -> None:
    ep = serve(tempfile.mkdtemp(prefix="sb-bench-reader-"), EndpointPolicy(admin_password="bench"))
    admin = {"user": "admin", "password": "bench"}
    latency_ms(ep.url, 20, **admin)  # warm-up
    latency_ms(ep.url, 20)
    rounds = []
    for _ in range(3):  # alternated: the machine's speed drifts
        rounds.append((latency_ms(ep.url, n // 3, **admin), latency_ms(ep.url, n // 3)))
    as_admin = statistics.median(a for a, _ in rounds)
    as_reader = statistics.median(r for _, r in rounds)
    print(f"SELECT 1 median, {n // 3} requests x 3 alternated rounds:")
    print(f"  admin (runs the statement as sent)       {as_admin:7.2f} ms  (baseline)")
    print(f"  reader (parsed by the engine, checked)   {as_reader:7.2f} ms  x{as_reader / as_admin:.2f}")


if __name__ == "__main__":
    main()
