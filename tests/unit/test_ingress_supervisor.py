"""The supervisor's port check before it starts N reuse-port ingress processes (real sockets on
127.0.0.1, no servers needed)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from services.ingress._supervisor import check_port_free


def _port_in_time_wait() -> int:
    """A port whose last connection the server side closed first: it sits in TIME_WAIT, as after
    a kill -9 of an ingress with clients connected."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = int(server.getsockname()[1])
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()
    time.sleep(0.05)
    client.close()
    server.close()
    return port


def test_connections_of_a_killed_ingress_in_time_wait_do_not_make_the_port_busy() -> None:
    # Without SO_REUSEADDR the check failed for a minute after a kill -9 under load, so a
    # restarted `switchboard ingress` gave up ("port in use") where gRPC itself would bind fine.
    check_port_free(f"127.0.0.1:{_port_in_time_wait()}", within_s=0.2)


def test_a_reuse_port_listener_makes_the_port_busy() -> None:
    # Another ingress (or a stray child of one) listening with SO_REUSEPORT would otherwise share
    # the port silently and take a share of the connections.
    port = _port_in_time_wait()
    stray = socket.socket()
    stray.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    stray.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    stray.bind(("127.0.0.1", port))
    stray.listen(1)
    try:
        with pytest.raises(RuntimeError, match="port in use"):
            check_port_free(f"127.0.0.1:{port}", within_s=0.2)
    finally:
        stray.close()


def test_the_leases_of_processes_that_are_gone_are_found(tmp_path: Path) -> None:
    """A supervisor (or a lone ingress) records its processes' leases; the next one on the same
    address ends those whose process is gone, also a pid reused by another process."""
    import os
    import subprocess
    import sys

    from services.ingress._supervisor import dead_leases, leases_file, record_leases
    from services.settings import Settings

    settings = Settings(data_dir=tmp_path, grpc_listen="127.0.0.1:45999")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    # Only processes alive when it writes are recorded.
    record_leases(settings, [("a" * 12, os.getpid()), ("b" * 12, gone.pid)])
    path = leases_file(settings)
    assert path.parent == tmp_path / "run" and "45999" in path.name
    assert [line.split()[0] for line in path.read_text().splitlines()] == ["a" * 12]
    assert dead_leases(path) == []
    with path.open("a") as f:
        f.write(f"{'b' * 12} {gone.pid} {time.time() - 5}\n")
    assert dead_leases(path) == ["b" * 12]
    # This pid, but started at another time: another process than the one recorded.
    lines = path.read_text().splitlines()
    lease, pid, started = lines[0].split()
    path.write_text(f"{lease} {pid} {float(started) - 100}\n")
    assert dead_leases(path) == [lease]
    assert dead_leases(tmp_path / "none.txt") == []
