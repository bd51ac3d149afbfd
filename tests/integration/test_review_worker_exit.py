"""A worker process (not just its BatchConsumer) ends promptly on SIGTERM while Kafka does not answer.

Review of 3b5567e (streams/_consumer.py): its tests time `run()` and `close()` inside one event
loop; what `switchboard run` (services/runner.py, Child.stop: SIGTERM, then SIGKILL after 20 s)
and the README's Ctrl-C depend on is the process's exit, after `asyncio.run` has also cancelled and
awaited every task left behind (aiokafka's background tasks, the abandoned client stops).
Kafka not answering here is the test stack's own broker stopped with SIGSTOP (its connections
stay open and nothing is answered, as with a hung or partitioned broker); it is continued after.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from services import stack
from services.kafka_topics import ensure_topics
from services.processes import Child
from services.settings import Settings
from tests.conftest import eventually, free_port

pytestmark = pytest.mark.integration

# CLOSE_BOUND_S (3) + STOP_GRACE_S (2) + a poll, with slack for a small machine; far below the
# runner's 20 s before SIGKILL.
EXIT_WITHIN_S = 12.0
# The log line that says the process is up and talking to Kafka: a worker's first assignment, of
# whichever partitions (in the full suite the test system's own workers are in the same groups,
# so partition 0 may well be theirs, and the assignment may even be empty).
JOINED = {False: "assigned partitions [", True: "ingress listening for"}


def _own_places(args: list[str], tmp_path: Path) -> dict[str, str]:
    """In the full suite the test system's own processes run beside this one: an analytics of its
    own needs its own embedded ClickHouse (one process per chdb path) and ports, an ingress its own
    ports."""
    if args == ["analytics"]:
        return {
            "SWITCHBOARD_DATA_DIR": str(tmp_path),
            "SWITCHBOARD_ANALYTICS_LISTEN": f"127.0.0.1:{free_port()}",
            "SWITCHBOARD_ANALYTICS_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
        }
    if args == ["ingress"]:
        return {
            "SWITCHBOARD_GRPC_LISTEN": f"127.0.0.1:{free_port()}",
            "SWITCHBOARD_INGRESS_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
            "SWITCHBOARD_INGRESS_PROCESSES": "1",
        }
    return {}


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "args",
    [["worker", "sessions"], ["worker", "assistant"], ["worker", "archiver"], ["analytics"], ["ingress"]],
    ids=" ".join,
)
async def test_a_worker_exits_promptly_on_sigterm_while_kafka_hangs(
    local_stack: Settings, test_env: dict[str, str], args: list[str], tmp_path: Path
) -> None:
    settings = local_stack
    member = f"rv-{uuid.uuid4().hex[:6]}"
    env = {
        **test_env,
        "SWITCHBOARD_WORKER_INSTANCE_ID": member,
        "SWITCHBOARD_SESSIONS_PROCESSES": "1",
        **_own_places(args, tmp_path),
    }
    child = Child(f"rv-{args[-1]}", args, settings.data_dir / "logs" / f"{member}.log", env)
    if args == ["worker", "assistant"]:
        # An assistant answers nothing before it has indexed the whole knowledge topic, which in
        # the full suite holds every earlier test's documents: on a slow machine that took over
        # the 90 s below (CI at b26a3fa). A topic of its own, empty, makes the join this test's
        # own matter.
        own = settings.model_copy(update={"knowledge_topic": f"knowledge-{uuid.uuid4().hex[:8]}"})
        await ensure_topics(own)
        env["SWITCHBOARD_KNOWLEDGE_TOPIC"] = own.knowledge_topic
    kafka_pid = (await stack.status(settings))["kafka"]["pid"]
    assert kafka_pid is not None
    stopped_kafka = False
    try:
        child.start()
        # Joined: its partitions assigned (the group's first join, on a fresh member id).
        await eventually(
            lambda: asyncio.to_thread(child.log_tail, 200),
            lambda text: JOINED[args[-1] == "ingress"] in text or not child.alive,
            within_s=90,
            what=f"{args[-1]} to join its group",
        )
        os.kill(kafka_pid, signal.SIGSTOP)
        stopped_kafka = True
        assert child.alive, child.log_tail()
        asked = time.monotonic()
        assert child.proc is not None
        child.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(_wait, child, EXIT_WITHIN_S + 30)
        took = time.monotonic() - asked
        print(f"{args[-1]} exit after SIGTERM with Kafka stopped: {took:.1f}s (code {code})")
        assert code is not None and took <= EXIT_WITHIN_S, (
            f"the worker took {took:.1f}s to exit (code {code}) after SIGTERM while Kafka hung; "
            f"its log:\n{child.log_tail(60)}"
        )
    finally:
        if stopped_kafka:
            os.kill(kafka_pid, signal.SIGCONT)
        child.kill()


def _wait(child: Child, within_s: float) -> int | None:
    assert child.proc is not None
    try:
        return child.proc.wait(within_s)
    except Exception:
        return None
