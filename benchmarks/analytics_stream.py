"""A large result through the embedded analytics endpoint: streamed versus formatted whole.

Runs the endpoint in a child process over a fresh chdb directory and reads the same rows twice
over HTTP, in the same run: as TSV (streamed block by block) and as TSVWithNames (the same
bytes plus one header line, a format the endpoint formats whole). Prints time to first byte,
total time, throughput and the endpoint process's peak resident memory above its idle size
(sampled every 20 ms), and the ratios.

    .venv/bin/python benchmarks/analytics_stream.py [--rows 30000000]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

import psutil

SERVER = """
import asyncio, sys
from services.analytics import ChdbQueryEngine, QueryEndpoint

async def main() -> None:
    ep = QueryEndpoint(ChdbQueryEngine(sys.argv[1]), "127.0.0.1", int(sys.argv[2]))
    await ep.start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(port: int, process: psutil.Process, sql: str, fmt: str) -> dict[str, float]:
    idle = process.memory_info().rss
    peak = idle
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    url = f"http://127.0.0.1:{port}/?{urllib.parse.urlencode({'default_format': fmt})}"
    started = time.monotonic()
    first = 0.0
    total = 0
    with urllib.request.urlopen(urllib.request.Request(url, data=sql.encode()), timeout=600) as resp:
        while chunk := resp.read(1 << 20):
            if not total:
                first = time.monotonic() - started
            total += len(chunk)
    elapsed = time.monotonic() - started
    done.set()
    sampler.join()
    return {"first_s": first, "total_s": elapsed, "mb": total / 1e6, "peak_mb": (peak - idle) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=30_000_000)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as path:
        child = subprocess.Popen(
            [sys.executable, "-c", SERVER, path, str(port)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout is not None and child.stdout.readline().startswith("ready")
            process = psutil.Process(child.pid)
            sql = f"SELECT number, toString(number * 7919) FROM numbers({args.rows})"
            streamed = measure(port, process, sql, "TSV")
            whole = measure(port, process, sql, "TSVWithNames")
        finally:
            child.terminate()
            child.wait(30)
    print(f"{args.rows:,} rows, {streamed['mb']:.0f} MB of TSV")
    print("| format | first byte s | total s | MB/s | endpoint peak RSS above idle, MB |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in (("TSV (streamed)", streamed), ("TSVWithNames (formatted whole)", whole)):
        print(
            f"| {name} | {r['first_s']:.2f} | {r['total_s']:.2f} | {r['mb'] / r['total_s']:.0f} | {r['peak_mb']:.0f} |"
        )
    print(
        f"streamed/whole: first byte {streamed['first_s'] / whole['first_s']:.3f}, "
        f"total {streamed['total_s'] / whole['total_s']:.2f}, peak memory {streamed['peak_mb'] / max(whole['peak_mb'], 1):.3f}"
    )


if __name__ == "__main__":
    main()
