"""Bytes per live stream for each `stream-node-max-bytes`, against Redis's default (4096) in the
same run: why the local stack sets 1024 (services/stack/_components.py, REDIS_MEMORY_CONFIG).

Redis preallocates a stream's newest node at min(4096, stream-node-max-bytes), so at the default a
stream of a few entries costs ~4.3 KB; smaller nodes waste less in the last one but add a node's
overhead every stream-node-max-bytes. Where the balance lies depends on how many entries a
conversation has and how big they are, so this fills N streams of each length with entries shaped
like the sessions worker's (an event of the given sizes, status, message count, sequence) and
reads `used_memory_dataset` before and after. A scratch redis-server on 127.0.0.1, nothing else.

    .venv/bin/python benchmarks/stream_nodes.py [--streams 1000] [--port-offset 1750]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import redis

LENGTHS = (3, 6, 11, 21, 41, 81)
NODE_BYTES = (512, 768, 1024, 2048, 4096)
BASE_PORT = 9900  # + --port-offset


def customer_only(rng: random.Random, i: int) -> int:
    """A start (~70 B) and customer messages (~140-180 B, ids left out)."""
    return 69 if i == 0 else rng.randint(140, 180)


def bot_turns(rng: random.Random, i: int) -> int:
    """A start, then turns of a message, its intent and the bot's reply (400-800 B)."""
    return 69 if i == 0 else (160, 150, rng.randint(400, 800))[i % 3]


def fill(
    client: redis.Redis, streams: int, length: int, size_of: Callable[[random.Random, int], int]
) -> float:
    rng = random.Random(length)
    client.flushall()
    before = int(client.info("memory")["used_memory_dataset"])
    pipe = client.pipeline(transaction=False)
    for c in range(streams):
        key = f"sb:{{bench:01a22dc6-be39-7362-989e-{c:012d}}}:live"
        for i in range(length):
            fields: dict[str, bytes | str | int] = {"e": os.urandom(size_of(rng, i)), "s": "open", "n": i}
            if i:
                fields["q"] = i
            # Interleaved ids, as a partition's offsets are across its conversations.
            pipe.xadd(key, fields, id=f"{100_000 + i * streams + c}-1", maxlen=10_000, approximate=True)
        if c % 100 == 99:
            pipe.execute()
    pipe.execute()
    return (int(client.info("memory")["used_memory_dataset"]) - before) / streams


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--port-offset", type=int, default=1750)
    args = parser.parse_args(argv)
    exe = shutil.which("redis-server")
    if not exe:
        print("redis-server not found (apt-get install redis-server)", file=sys.stderr)
        return 1
    port = BASE_PORT + args.port_offset
    workdir = tempfile.mkdtemp(prefix="stream-nodes-")
    server = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        version = client.info("server")["redis_version"]
        print(f"Redis {version}; {args.streams:,} streams per cell; bytes per stream (`used_memory_dataset`)")
        for title, size_of in (("customer messages only", customer_only), ("bot turns", bot_turns)):
            print(f"\n{title}\n")
            print("| stream-node-max-bytes | " + " | ".join(f"{n} entries" for n in LENGTHS) + " |")
            print("|---|" + "---:|" * len(LENGTHS))
            rows = {}
            for node_bytes in NODE_BYTES:
                client.config_set("stream-node-max-bytes", node_bytes)
                rows[node_bytes] = [fill(client, args.streams, n, size_of) for n in LENGTHS]
            for node_bytes, row in rows.items():
                cells = [
                    f"{b:,.0f} ({b / d:.2f}×)" if node_bytes != 4096 else f"{b:,.0f}"
                    for b, d in zip(row, rows[4096], strict=True)
                ]
                label = f"{node_bytes} (default)" if node_bytes == 4096 else str(node_bytes)
                print(f"| {label} | " + " | ".join(cells) + " |")
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
