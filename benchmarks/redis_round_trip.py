"""Client CPU per Redis round trip: redis-py's Pipeline against the ingress's TickPipeline.

The ingress sends its claims and settlements as one round trip per event-loop tick
(services/ingress/_hotview.py, TickPipeline); at 1 call in flight that is two round trips per
unary SendMessage. This runs the same round trips both ways, in one process (uvloop, as the
ingress), against a redis-server of its own, rounds alternated, and prints the client's CPU and
wall time per round trip: an EVALSHA shaped like a claim of one message (4 keys), sequentially,
as at 1 call in flight; `--messages 50` makes each a claim of 50 messages (a batch under load).

    .venv/bin/python benchmarks/redis_round_trip.py [--trips 5000] [--rounds 5] [--messages 1] [--port-offset 1400]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services import eventloop
from services.ingress._hotview import TickPipeline

REDIS_PORT = 46600
SCRIPT = """
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[1], 'NX', 'GET', 'EX', 120)
end
return #KEYS
"""


async def _pipeline(redis: aioredis.Redis, sha: str, keys: list[str]) -> Any:
    # The ingress's round trip before the seventeenth session (TickPipeline._execute then).
    async with redis.pipeline(transaction=False) as pipe:
        pipe.execute_command("EVALSHA", sha, len(keys), *keys, "pending:x")
        return await pipe.execute(raise_on_error=False)


async def _measure(trips: int, rounds: int, port: int, messages: int) -> str:
    redis = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{port}/0",
        max_connections=512,
        socket_timeout=5.0,
        socket_connect_timeout=5.0,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )
    tick = TickPipeline(redis)
    sha = await redis.script_load(SCRIPT)
    results: dict[str, list[tuple[float, float]]] = {"redis-py Pipeline": [], "TickPipeline": []}
    try:
        for r in range(rounds + 1):  # the first round warms both up and is not counted
            for name in results:
                cpu, wall = time.process_time(), time.perf_counter()
                for n in range(trips):
                    keys = [
                        f"sb:{{t:c{n % 200}}}:m{r}-{n}",
                        "ready",
                        "leases",
                        f"sb:{{t:c{n % 200}}}:inflight",
                    ]
                    if name == "TickPipeline":
                        (reply,) = await tick.run(
                            lambda pipe, k=keys: pipe.execute_command(
                                "EVALSHA", sha, len(k), *k, "pending:x"
                            ),
                            1,
                        )
                    else:
                        (reply,) = await _pipeline(redis, sha, keys)
                    assert reply == len(keys), reply
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                if r:
                    results[name].append((cpu / trips * 1e6, wall / trips * 1e6))
    finally:
        await tick.close()
        await redis.aclose()
    lines = [
        f"{trips:,} sequential round trips per round (a claim of {messages} message(s), {4 * messages} keys), "
        f"{rounds} rounds alternated (median, then each round):"
    ]
    for name, per in results.items():
        cpus = [c for c, _ in per]
        walls = [w for _, w in per]
        lines.append(
            f"  {name:<18} CPU {statistics.median(cpus):6.1f} µs  wall {statistics.median(walls):6.1f} µs"
            f"  per round trip  (CPU by round: {', '.join(f'{c:.0f}' for c in cpus)})"
        )
    base = statistics.median(c for c, _ in results["redis-py Pipeline"])
    new = statistics.median(c for c, _ in results["TickPipeline"])
    lines.append(f"  TickPipeline / Pipeline CPU: {new / base:.2f}×")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--trips", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=1, help="messages per claim (4 keys each)")
    parser.add_argument("--port-offset", type=int, default=0)
    args = parser.parse_args(argv)
    binary = shutil.which("redis-server")
    if binary is None:
        print("redis-server is not installed (make install brings it)", file=sys.stderr)
        return 2
    port = REDIS_PORT + args.port_offset
    with tempfile.TemporaryDirectory(prefix="redis-rt-") as directory:
        server = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                directory,
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                if server.poll() is not None or time.monotonic() > deadline:
                    print(f"redis-server did not start on 127.0.0.1:{port}", file=sys.stderr)
                    return 1
                time.sleep(0.02)
            eventloop.install()
            print(asyncio.run(_measure(args.trips, args.rounds, port, args.messages)))
        finally:
            server.terminate()
            server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
