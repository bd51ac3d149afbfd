"""Operator commands with Kafka out of reach end with one clear line and exit 1, not a traceback;
a command that writes says what may have been recorded (its answer can be lost after the write)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services.settings import PROJECT_ROOT


@pytest.mark.parametrize(
    ("command", "says"),
    [
        (["keys", "issue", "--tenant", "acme"], "may or may not have been recorded"),
        (["keys", "list"], "Kafka failed"),
        (["dlq", "list"], "Kafka failed"),
    ],
)
def test_a_command_with_kafka_unreachable_says_so_in_one_line(
    command: list[str], says: str, tmp_path: os.PathLike[str]
) -> None:
    env = {
        **os.environ,
        # Nothing listens on port 1: the connection is refused at once.
        "SWITCHBOARD_KAFKA_BOOTSTRAP": "127.0.0.1:1",
        "SWITCHBOARD_DATA_DIR": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", *command],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr, done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.startswith(f"switchboard {' '.join(command[:2])}:")]
    assert says in line and "127.0.0.1" in line, line
    assert "Unclosed AIOKafkaConsumer" not in done.stderr, done.stderr
