"""Ingest benchmark: how many writes per second Switchboard acknowledges, at what latency, and how many
events per second the sessions + analytics pipeline folds before its lag grows.

    .venv/bin/python benchmarks/ingest.py             # about 5-8 minutes
    .venv/bin/python benchmarks/ingest.py --quick     # about 2 minutes, smaller and shorter
    .venv/bin/python benchmarks/ingest.py --seconds 10 --keep-data

It brings up its own local stack (Kafka, Redis, SeaweedFS) and Switchboard's processes on 4xxxx ports
in a fresh data directory `var/bench-*`, so it never touches a `make run` stack or the integration
tests' stack, and tears all of it down at the end, also on an error or Ctrl-C. Everything listens on
127.0.0.1 only.

1. Write path. Unary `SendMessage` (N concurrent calls, each awaiting its ack) and streaming
   `SendMessages` (one stream, at most N requests unacknowledged) at N = 1, 10, 100 (and a stream
   1000 deep), and `SendMessageBatch` (N calls of 500 messages in flight, N = 1, 4), against two
   baselines measured in the same run at the same N: a bare grpc.aio echo server
   (`benchmarks/echo_server.py`) and a raw aiokafka producer (idempotent, acks=all) writing events of
   the same size to the same topic. The sessions worker and analytics are stopped meanwhile, so every
   target sees the same machine.
2. Pipeline catch-up. The consumers' committed offsets are moved past what phase 1 wrote (its volume
   only reflects how fast phase 1 was), a backlog of the planned size is produced straight to Kafka
   (ConversationStarted for new conversations, then MessageReceived round-robin), and the sessions
   worker (Redis) and then analytics (ClickHouse) are started on it, each alone; events/s per
   consumer group, done when Redis / ClickHouse show the last events, and each one's own CPU per
   event. Their results are cross-checked at the end.
3. Sustained rate. Load offered to Kafka at increasing rates with both consumers running; the
   highest rate at which their lag stays bounded. Then the consistency check.
4. End to end (`benchmarks/end_to_end.py`): 3,000 msg/s offered through the API (SendMessages
   streams, open loop) with every process running; ack latency and the time until each message
   is in the hot view and in ClickHouse.

The report ends with every row of issue 7's target table: the figure the issue was filed with,
this run's, the target, and whether it is met.

Results go to stdout as markdown tables; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import clickhouse_connect
import grpc
import psutil
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from switchboard.v1 import chat_pb2, chat_pb2_grpc, events_pb2

from schemas import hotview as hv
from schemas.events import encode_event, event_headers, event_key, new_event
from services import stack
from services.ingress._supervisor import process_count
from services.kafka_topics import ensure_topics
from services.processes import Child, switchboard_children, wait_for_analytics, wait_for_ingress
from services.settings import PROJECT_ROOT, Settings

BENCH_DIR = Path(__file__).resolve().parent
TENANT = "bench"
SESSIONS_GROUP = "switchboard-sessions"

# Ports of this benchmark's own stack: 4xxxx, clear of `make run` (default ports) and the integration
# tests (2xxxx); `--port-offset` shifts them all. SeaweedFS's gRPC ports are explicit so they stay
# 4xxxx, except the admin server's: `weed mini`'s worker dials admin port + 10000 whatever
# -admin.port.grpc says, so that one keeps SeaweedFS's rule (58334).
BENCH_PORTS = {
    "KAFKA_PORT": 49092,
    "KAFKA_CONTROLLER_PORT": 49093,
    "REDIS_PORT": 46479,
    "S3_PORT": 48333,
    "S3_GRPC_PORT": 48343,
    "S3_MASTER_PORT": 49333,
    "S3_MASTER_GRPC_PORT": 49343,
    "S3_VOLUME_PORT": 48080,
    "S3_VOLUME_GRPC_PORT": 48090,
    "S3_FILER_PORT": 48888,
    "S3_FILER_GRPC_PORT": 48898,
    "S3_ADMIN_PORT": 48334,
    "GRPC_PORT": 45051,
    "ECHO_PORT": 45052,
    "ANALYTICS_PORT": 48123,
}


def bench_env(port_offset: int) -> dict[str, str]:
    """SWITCHBOARD_* variables for this run's processes (the data dir is added by BenchSystem)."""
    port = {name: value + port_offset for name, value in BENCH_PORTS.items()}
    env = {
        "SWITCHBOARD_KAFKA_BOOTSTRAP": f"127.0.0.1:{port['KAFKA_PORT']}",
        "SWITCHBOARD_REDIS_URL": f"redis://127.0.0.1:{port['REDIS_PORT']}/0",
        "SWITCHBOARD_S3_ENDPOINT": f"127.0.0.1:{port['S3_PORT']}",
        "SWITCHBOARD_GRPC_LISTEN": f"127.0.0.1:{port['GRPC_PORT']}",
        "SWITCHBOARD_ANALYTICS_LISTEN": f"127.0.0.1:{port['ANALYTICS_PORT']}",
        "SWITCHBOARD_TOPIC_PARTITIONS": "4",
    }
    for name in BENCH_PORTS:
        if name.startswith(("KAFKA_CONTROLLER", "S3_")) and name != "S3_PORT":
            env[f"SWITCHBOARD_{name}"] = str(port[name])
    return env


# Customer messages as they arrive: Chinese, English and mixed, 60-200 bytes of UTF-8 each.
TEXTS = (
    "你好，我的订单 SB2026{n:06d} 三天了还没发货，能帮我查一下物流吗？",
    "Hi, I was charged twice for order #{n} — can you refund the duplicate payment, please?",
    "我想把收货地址改成上海市浦东新区世纪大道 100 号，订单号 {n}，现在还来得及吗？",
    "The app keeps logging me out since the last update (v3.2.{n}). Is this a known issue?",
    "请问会员自动续费怎么取消？我在设置里找不到这个选项。账号尾号 {n}",
    "Can I move the delivery of order {n} to Saturday morning? 周六上午家里有人。",
    "收到的商品有破损，外包装也压坏了，需要退货还是换货？照片已经拍好了 #{n}",
    "My promo code SPRING{n} says it has expired, but the email says it is valid until Friday.",
    "发票抬头写错了，能重新开一张吗？公司名称是星河科技有限公司，订单 {n}",
    "Where can I download the invoice for my March subscription? Account reference {n}.",
    "客服你好，我的退款申请已经提交一周了，状态一直是处理中，订单号 {n}，麻烦催一下。",
    "I'd like to upgrade to the family plan. Will the days left on my current plan carry over? ({n})",
)


def requests_for(
    tenant: str, conversations: Sequence[str], messages: int
) -> list[chat_pb2.SendMessageRequest]:
    """`messages` rounds of one message to each conversation (Chinese and English texts)."""
    return [
        chat_pb2.SendMessageRequest(
            tenant_id=tenant,
            conversation_id=c,
            client_message_id=f"m{n}-{i}",
            text=TEXTS[(i + n) % len(TEXTS)].format(n=i * 100 + n),
        )
        for n in range(messages)
        for i, c in enumerate(conversations)
    ]


# clickhouse_connect logs every refused connection while analytics starts; the polls expect those.
logging.getLogger("clickhouse_connect").setLevel(logging.CRITICAL)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    seconds: float  # measured window of each write-path run
    warmup: float  # unmeasured lead-in of each run
    levels: tuple[int, ...]  # in-flight levels, every target
    deep_stream: tuple[int, ...]  # extra, deeper streaming windows (with the raw producer beside them)
    batch_levels: tuple[int, ...]  # SendMessageBatch calls in flight (BATCH_MESSAGES messages each)
    conversations: int  # started through the API before phase 1
    backlog: int  # phase 2 catches up at least this many events
    backlog_conversations: int
    catchup_limit_s: float
    probe_rates: tuple[int, ...]
    probe_seconds: float
    drain_limit_s: float
    e2e_rate: int = 3000  # phase 4: messages/s offered through the API (0: not run)
    e2e_seconds: float = 10.0


def make_plan(quick: bool, seconds: float | None) -> Plan:
    if quick:
        return Plan(
            seconds=seconds or 2.0,
            warmup=0.5,
            levels=(1, 10, 100),
            deep_stream=(1000,),
            batch_levels=(1, 4),
            conversations=200,
            # As large as the full run's: at 60k the projector's three 20k-event batches were
            # done 1.2 s after the first, too short for a steady rate (10% -> 90% in >= 1.5 s),
            # so its row was the rate including the process's start-up. At 100k, once the
            # projector inserted during the next batch's build, it was 1.3-1.75 s (five batches,
            # its count read between inserts): 200k.
            backlog=200_000,
            backlog_conversations=2_500,
            catchup_limit_s=120.0,
            probe_rates=(2_000, 5_000, 10_000),
            probe_seconds=8.0,
            drain_limit_s=20.0,
            e2e_seconds=8.0,
        )
    return Plan(
        seconds=seconds or 5.0,
        warmup=1.0,
        levels=(1, 10, 100),
        deep_stream=(1000,),
        batch_levels=(1, 4),
        conversations=200,
        backlog=200_000,
        backlog_conversations=2_500,
        catchup_limit_s=300.0,
        probe_rates=(2_000, 5_000, 10_000),
        probe_seconds=10.0,
        drain_limit_s=30.0,
    )


# ------------------------------------------------------------------------------ the system under test


class BenchSystem:
    """This run's own stack, Switchboard processes and echo server, and their teardown."""

    def __init__(self, keep_data: bool, port_offset: int) -> None:
        var = PROJECT_ROOT / "var"
        var.mkdir(exist_ok=True)
        self.data_dir = Path(tempfile.mkdtemp(prefix="bench-", dir=var))
        self.keep_data = keep_data
        self.env = {**bench_env(port_offset), "SWITCHBOARD_DATA_DIR": str(self.data_dir)}
        self.echo_listen = f"127.0.0.1:{BENCH_PORTS['ECHO_PORT'] + port_offset}"
        fields = {k.removeprefix("SWITCHBOARD_").lower(): v for k, v in self.env.items()}
        known = {k: v for k, v in fields.items() if k in Settings.model_fields}
        self.settings = Settings(**known)  # type: ignore[arg-type]
        self.children: dict[str, Child] = switchboard_children(self.settings, self.env)
        self.echo: subprocess.Popen[bytes] | None = None
        self.stack_started = False

    def _reuse_kafka_jars(self) -> None:
        # A fresh data dir would fetch Kafka's jars again; point it at the default stack's if present.
        version = self.settings.kafka_version
        installed = PROJECT_ROOT / "var" / "kafka" / f"libs-{version}"
        if (installed / ".installed").exists():
            target = self.data_dir / "kafka" / f"libs-{version}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(installed, target_is_directory=True)

    def _check_ports_free(self) -> None:
        # The stack checks its own ports; these are the processes'.
        s = self.settings
        for address in (s.grpc_listen, s.analytics_listen, self.echo_listen):
            host, port = address.rsplit(":", 1)
            with socket.socket() as sock:
                if sock.connect_ex((host, int(port))) == 0:
                    raise RuntimeError(f"{address} is already in use; stop that or pass --port-offset")

    async def up(self) -> None:
        self._check_ports_free()
        self._reuse_kafka_jars()
        log(f"starting the local stack in {self.data_dir}")
        self.stack_started = True
        await stack.up(self.settings)
        created = await ensure_topics(self.settings)
        log(f"stack up; topics created: {', '.join(created) or 'none'}")
        self.start_echo()

    def start_echo(self) -> None:
        log_path = self.data_dir / "logs" / "echo.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as out:
            self.echo = subprocess.Popen(
                [sys.executable, str(BENCH_DIR / "echo_server.py"), "--listen", self.echo_listen],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def stop(self, *names: str) -> None:
        await asyncio.gather(*(asyncio.to_thread(self.children[n].stop) for n in names))

    def log_excerpts(self, per_file: int = 8) -> str:
        """Warnings, errors and tracebacks in every process log, grouped by message with counts (the
        data dir goes at the end)."""
        parts = []
        for path in sorted((self.data_dir / "logs").glob("*.log")):
            seen: Counter[str] = Counter()
            example: dict[str, str] = {}
            for line in path.read_text(errors="replace").splitlines():
                if not re.search(r"WARNING|ERROR|CRITICAL|Traceback|Exception|Error:", line):
                    continue
                # Timestamps, pids and numbers differ between repeats of one message.
                key = re.sub(r"\d+", "N", line.split("]", 3)[-1] if line.startswith("[") else line)[:160]
                seen[key] += 1
                example.setdefault(key, line)
            if seen:
                parts.append(f"==> {path.name}: {sum(seen.values())} warning/error lines")
                for key, count in seen.most_common(per_file):
                    parts.append(f"    {count:>6} × {example[key].strip()[:240]}")
        return "\n".join(parts)

    async def down(self) -> None:
        """Stop everything this run started; each step runs even if an earlier one failed."""
        with contextlib.suppress(Exception):
            await self.stop(*reversed(list(self.children)))
        if self.echo is not None and self.echo.poll() is None:
            self.echo.terminate()
            try:
                await asyncio.to_thread(self.echo.wait, 10)
            except subprocess.TimeoutExpired:
                self.echo.kill()
        if self.stack_started:
            try:
                await stack.down(self.settings)
            except Exception as exc:
                log(f"stack down failed: {exc!r}")
        if self.keep_data:
            log(f"data kept in {self.data_dir}")
        else:
            shutil.rmtree(self.data_dir, ignore_errors=True)


class CpuMeter:
    """CPU used by each process of this run over an interval, in cores (1.0 = one core busy)."""

    def __init__(self, system: BenchSystem) -> None:
        self.system = system
        self.stack_pids: dict[str, int] = {}

    async def refresh(self) -> None:
        status = await stack.status(self.system.settings)
        self.stack_pids = {name: int(info["pid"]) for name, info in status.items() if info.get("pid")}

    def pids(self) -> dict[str, int]:
        pids = {"bench": os.getpid(), **self.stack_pids}
        if self.system.echo is not None and self.system.echo.poll() is None:
            pids["echo"] = self.system.echo.pid
        for name, child in self.system.children.items():
            if child.alive and child.proc is not None:
                pids[name] = child.proc.pid
        return pids

    def snapshot(self) -> tuple[float, dict[str, float]]:
        used: dict[str, float] = {}
        for name, pid in self.pids().items():
            try:
                # The process itself: this one's children are the other rows.
                proc = psutil.Process(pid)
                times = proc.cpu_times()
                used[name] = times.user + times.system
                if name == "ingress":
                    # `switchboard ingress` supervises N server processes: theirs is its CPU.
                    for child in proc.children(recursive=True):
                        with contextlib.suppress(psutil.Error):
                            t = child.cpu_times()
                            used[name] += t.user + t.system
            except psutil.Error:
                continue
        machine = psutil.cpu_times()
        used["machine"] = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
        return time.perf_counter(), used

    @staticmethod
    def cores(start: tuple[float, dict[str, float]], end: tuple[float, dict[str, float]]) -> dict[str, float]:
        wall = end[0] - start[0]
        if wall <= 0:
            return {}
        cores = {name: (end[1][name] - start[1][name]) / wall for name in end[1] if name in start[1]}
        # Whatever else ran on the machine meanwhile (other test suites, builds): the noise.
        machine = cores.pop("machine", 0.0)
        cores["others"] = max(machine - sum(cores.values()), 0.0)
        return cores


def cores_text(cores: dict[str, float], names: Sequence[str]) -> str:
    return " / ".join(f"{cores[n]:.2f}" if n in cores else "–" for n in names)


def other_processes(mine: set[int], sample_s: float = 1.0) -> str:
    """Processes not of this run that used CPU over `sample_s` (the machine is shared)."""
    procs = []
    for proc in psutil.process_iter(["pid", "cmdline", "name"]):
        try:
            proc.cpu_percent(None)
            procs.append(proc)
        except psutil.Error:
            continue
    time.sleep(sample_s)
    busy = []
    for proc in procs:
        try:
            if proc.pid in mine:
                continue
            pct = proc.cpu_percent(None)
            if pct >= 5:
                cmd = " ".join(proc.info["cmdline"] or [proc.info["name"] or "?"])
                busy.append((pct, f"{pct:5.0f}%  pid {proc.pid}  {cmd[:110]}"))
        except psutil.Error:
            continue
    busy.sort(reverse=True)
    return "\n".join(line for _, line in busy[:10]) or "(none above 5% CPU)"


def my_pids(meter: CpuMeter) -> set[int]:
    mine: set[int] = set()
    for pid in meter.pids().values():
        mine.add(pid)
        with contextlib.suppress(psutil.Error):
            mine.update(c.pid for c in psutil.Process(pid).children(recursive=True))
    return mine


# --------------------------------------------------------------------------------- requests and events


class Traffic:
    """Realistic requests and events: many conversations, bilingual texts, unique client message ids."""

    def __init__(self, conversations: Sequence[str]) -> None:
        self.conversations = list(conversations)
        self._run = uuid.uuid4().hex[:8]
        self._seq = itertools.count()

    def _next(self) -> tuple[str, str, str]:
        n = next(self._seq)
        conversation = self.conversations[n % len(self.conversations)]
        text = TEXTS[n % len(TEXTS)].format(n=n)
        return conversation, f"{self._run}-{n}", text

    def request(self) -> chat_pb2.SendMessageRequest:
        conversation, cmid, text = self._next()
        return chat_pb2.SendMessageRequest(
            tenant_id=TENANT, conversation_id=conversation, client_message_id=cmid, text=text
        )

    def event(self) -> events_pb2.Event:
        conversation, cmid, text = self._next()
        return new_event(
            TENANT,
            conversation,
            message_received=events_pb2.MessageReceived(
                client_message_id=cmid, text=text, sender=events_pb2.SENDER_CUSTOMER
            ),
        )


def started_event(conversation: str, n: int) -> events_pb2.Event:
    return new_event(
        TENANT,
        conversation,
        conversation_started=events_pb2.ConversationStarted(
            channel=(events_pb2.CHANNEL_WEB, events_pb2.CHANNEL_IOS, events_pb2.CHANNEL_ANDROID)[n % 3],
            customer_id=f"cust-{n:05d}",
            locale=("zh-CN", "en-US")[n % 2],
        ),
    )


async def send_event(producer: AIOKafkaProducer, topic: str, event: events_pb2.Event) -> asyncio.Future[Any]:
    fut: asyncio.Future[Any] = await producer.send(
        topic, encode_event(event), key=event_key(event), headers=event_headers(event)
    )
    return fut


def raw_producer(settings: Settings, client_id: str) -> AIOKafkaProducer:
    # Configured like the ingress's producer (services/ingress/_producer.py).
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        client_id=client_id,
        enable_idempotence=True,
        acks="all",
        linger_ms=settings.producer_linger_ms,
        max_batch_size=256 * 1024,
    )


# ------------------------------------------------------------------------------------ the write path

_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
# Client connections of the unary and batch runs (a stream is one connection): the kernel spreads
# connections over the ingress processes (SO_REUSEPORT), so one connection would use one of them.
CONNECTIONS = 4
# Messages per SendMessageBatch call in the batch runs.
BATCH_MESSAGES = 500


@dataclass
class Run:
    target: str  # "echo", "ingress" or "kafka"
    mode: str  # "unary", "stream" or "produce"
    inflight: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    cpu: dict[str, float] = field(default_factory=dict)  # cores per process over the run

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile_ms(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    def summary(self) -> str:
        errors = f", errors {dict(self.errors)}" if self.errors else ""
        return (
            f"{self.target:<7} {self.mode:<7} n={self.inflight:<4} {self.rate:>9,.0f}/s "
            f"p50 {self.percentile_ms(0.5):7.2f} ms  p99 {self.percentile_ms(0.99):7.2f} ms{errors}"
        )


class Window:
    """The measured interval: completions inside it count, the warm-up before it does not."""

    def __init__(self, warmup: float, seconds: float) -> None:
        self.start = time.perf_counter() + warmup
        self.end = self.start + seconds

    def record(self, run: Run, sent: float, acked: float) -> None:
        if self.start <= acked <= self.end:
            run.latencies.append(acked - sent)


async def run_together(coros: Sequence[Coroutine[Any, Any, None]], within_s: float) -> None:
    """Run coroutines concurrently; the first failure, a timeout or a cancel stops all of them."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    gathered = asyncio.gather(*tasks)
    try:
        await asyncio.wait_for(gathered, within_s)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if gathered.done() and not gathered.cancelled():
            gathered.exception()  # retrieved: asyncio would log it as never retrieved


async def unary_run(
    target: str, stubs: Sequence[chat_pb2_grpc.ChatServiceStub], traffic: Traffic, n: int, plan: Plan
) -> Run:
    """N callers, each awaiting its ack; caller i uses connection i mod CONNECTIONS (the kernel
    spreads connections, not calls, over the ingress processes)."""
    run = Run(target, "unary", n, plan.seconds)
    window = Window(plan.warmup, plan.seconds)

    async def caller(stub: chat_pb2_grpc.ChatServiceStub) -> None:
        while (sent := time.perf_counter()) < window.end:
            try:
                reply = await stub.SendMessage(traffic.request(), timeout=30)
            except grpc.aio.AioRpcError as exc:
                run.errors[exc.code().name] += 1
                await asyncio.sleep(0.05)
                continue
            window.record(run, sent, time.perf_counter())
            if reply.duplicate:
                run.errors["duplicate=true"] += 1

    await run_together([caller(stubs[i % len(stubs)]) for i in range(n)], plan.warmup + plan.seconds + 60)
    return run


async def batch_run(
    target: str, stubs: Sequence[chat_pb2_grpc.ChatServiceStub], traffic: Traffic, n: int, plan: Plan
) -> Run:
    """N callers, each sending SendMessageBatch of BATCH_MESSAGES and awaiting the results; every
    message acked in the window counts, with its batch's round trip as its latency."""
    run = Run(target, "batch", n, plan.seconds)
    window = Window(plan.warmup, plan.seconds)

    async def caller(stub: chat_pb2_grpc.ChatServiceStub) -> None:
        while (sent := time.perf_counter()) < window.end:
            request = chat_pb2.SendMessageBatchRequest(
                messages=[traffic.request() for _ in range(BATCH_MESSAGES)]
            )
            try:
                reply = await stub.SendMessageBatch(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                run.errors[exc.code().name] += 1
                await asyncio.sleep(0.05)
                continue
            acked = time.perf_counter()
            for result in reply.results:
                if result.error_code:
                    run.errors[_CODE_NAMES.get(result.error_code, str(result.error_code))] += 1
                    continue
                window.record(run, sent, acked)
                if result.duplicate:
                    run.errors["duplicate=true"] += 1

    await run_together([caller(stubs[i % len(stubs)]) for i in range(n)], plan.warmup + plan.seconds + 60)
    return run


async def stream_run(
    target: str, stub: chat_pb2_grpc.ChatServiceStub, traffic: Traffic, n: int, plan: Plan
) -> Run:
    run = Run(target, "stream", n, plan.seconds)
    window = Window(plan.warmup, plan.seconds)
    call = stub.SendMessages()
    slots = asyncio.Semaphore(n)
    sent_at: deque[float] = deque()

    async def writer() -> None:
        while time.perf_counter() < window.end:
            await slots.acquire()
            sent_at.append(time.perf_counter())
            await call.write(traffic.request())
        await call.done_writing()

    async def reader() -> None:
        while (reply := await call.read()) is not grpc.aio.EOF:
            acked = time.perf_counter()
            sent = sent_at.popleft()
            slots.release()
            if reply.error_code:
                run.errors[_CODE_NAMES.get(reply.error_code, str(reply.error_code))] += 1
            else:
                window.record(run, sent, acked)
                if reply.duplicate:
                    run.errors["duplicate=true"] += 1

    try:
        await run_together([writer(), reader()], plan.warmup + plan.seconds + 60)
    except grpc.aio.AioRpcError as exc:
        run.errors[f"stream ended: {exc.code().name}"] += 1
        log(f"{target} SendMessages stream failed: {exc.code().name}: {exc.details()}")
    except Exception as exc:
        run.errors[f"stream ended: {type(exc).__name__}"] += 1
        log(f"{target} SendMessages stream failed: {exc!r}")
    finally:
        call.cancel()
    return run


async def produce_run(producer: AIOKafkaProducer, topic: str, traffic: Traffic, n: int, plan: Plan) -> Run:
    run = Run("kafka", "produce", n, plan.seconds)
    window = Window(plan.warmup, plan.seconds)

    async def sender() -> None:
        while (sent := time.perf_counter()) < window.end:
            try:
                await (await send_event(producer, topic, traffic.event()))
            except Exception as exc:
                run.errors[type(exc).__name__] += 1
                await asyncio.sleep(0.05)
                continue
            window.record(run, sent, time.perf_counter())

    await run_together([sender() for _ in range(n)], plan.warmup + plan.seconds + 60)
    return run


async def wait_for_echo(address: str, within_s: float = 20.0) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), within_s)


async def measure(runs: list[Run], meter: CpuMeter, run: Coroutine[Any, Any, Run]) -> None:
    start = meter.snapshot()
    result = await run
    result.cpu = CpuMeter.cores(start, meter.snapshot())
    runs.append(result)
    log(f"{result.summary()}  cpu {cores_text(result.cpu, CPU_COLUMNS[result.target])}")


# Whose CPU each write-path row shows: the client (this process), the server, Kafka, Redis, and
# processes that are not this run's.
CPU_COLUMNS = {
    "echo": ("bench", "echo", "kafka", "redis", "others"),
    "ingress": ("bench", "ingress", "kafka", "redis", "others"),
    "kafka": ("bench", "-", "kafka", "redis", "others"),
}


async def write_path(system: BenchSystem, meter: CpuMeter, conversations: list[str], plan: Plan) -> list[Run]:
    settings = system.settings
    traffic = Traffic(conversations)
    runs: list[Run] = []
    producer = raw_producer(settings, "bench-raw-producer")
    await producer.start()
    await wait_for_echo(system.echo_listen)
    # Each channel its own connection (no shared subchannel), as separate clients would have.
    own = [("grpc.use_local_subchannel_pool", 1)]
    echo_channels = [grpc.aio.insecure_channel(system.echo_listen, options=own) for _ in range(CONNECTIONS)]
    ingress_channels = [
        grpc.aio.insecure_channel(settings.grpc_listen, options=own) for _ in range(CONNECTIONS)
    ]
    try:
        echoes = [chat_pb2_grpc.ChatServiceStub(c) for c in echo_channels]
        ingresses = [chat_pb2_grpc.ChatServiceStub(c) for c in ingress_channels]
        echo, ingress = echoes[0], ingresses[0]
        # Warm-up, not recorded: every target at 10 in flight for a moment first. The first calls
        # after start-up run cold code (Kafka's JIT compiles its request path then: a raw
        # producer's requests cost Kafka 432 µs of CPU each in a first 4 s run, 88 µs in the
        # next), which made the first row, unary at 1 in flight, a measure of start-up.
        warm = replace(plan, seconds=max(1.0, plan.warmup * 2))
        await unary_run("echo", echoes, traffic, 10, warm)
        await unary_run("ingress", ingresses, traffic, 10, warm)
        await stream_run("ingress", ingress, traffic, 10, warm)
        await produce_run(producer, settings.conversation_topic, traffic, 10, warm)
        # Interleaved per level, so drifting background load hits every target alike.
        for n in plan.levels:
            await measure(runs, meter, unary_run("echo", echoes, traffic, n, plan))
            await measure(runs, meter, unary_run("ingress", ingresses, traffic, n, plan))
            await measure(runs, meter, stream_run("echo", echo, traffic, n, plan))
            await measure(runs, meter, stream_run("ingress", ingress, traffic, n, plan))
            await measure(runs, meter, produce_run(producer, settings.conversation_topic, traffic, n, plan))
        for n in plan.deep_stream:
            await measure(runs, meter, stream_run("echo", echo, traffic, n, plan))
            await measure(runs, meter, stream_run("ingress", ingress, traffic, n, plan))
            await measure(runs, meter, produce_run(producer, settings.conversation_topic, traffic, n, plan))
        # SendMessageBatch: n batches of BATCH_MESSAGES in flight, against the raw producer at
        # the same number of messages in flight.
        for n in plan.batch_levels:
            await measure(runs, meter, batch_run("echo", echoes, traffic, n, plan))
            await measure(runs, meter, batch_run("ingress", ingresses, traffic, n, plan))
            await measure(
                runs,
                meter,
                produce_run(producer, settings.conversation_topic, traffic, n * BATCH_MESSAGES, plan),
            )
    finally:
        await producer.stop()
        for channel in (*echo_channels, *ingress_channels):
            await channel.close()
    return runs


# ------------------------------------------------------------------------------- watching the log


class LogWatch:
    """End offsets of the conversation topic, consumer groups' committed offsets, Redis and ClickHouse."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.conversation_topic
        self.partitions = [TopicPartition(self.topic, p) for p in range(settings.topic_partitions)]
        self.admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="bench-watch")
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False, client_id="bench-watch"
        )
        self.redis = aioredis.Redis.from_url(settings.redis_url)
        self._clickhouse: Any = None

    async def start(self) -> None:
        await self.admin.start()
        await self.consumer.start()
        self.consumer.assign(self.partitions)

    async def stop(self) -> None:
        await self.consumer.stop()
        await self.admin.close()
        await self.redis.aclose()

    async def end_offsets(self) -> dict[int, int]:
        ends = await self.consumer.end_offsets(self.partitions)
        return {tp.partition: int(off) for tp, off in ends.items()}

    async def committed(self, group: str) -> dict[int, int]:
        offsets = await self.admin.list_consumer_group_offsets(group, partitions=self.partitions)
        found = {tp.partition: int(meta.offset) for tp, meta in offsets.items() if meta.offset >= 0}
        return {tp.partition: found.get(tp.partition, 0) for tp in self.partitions}

    async def skip_to_end(self, group: str) -> tuple[int, int]:
        """Move a stopped group's committed offsets to the end of the log; returns how many records
        it skips, and how many it had read before."""
        ends = await self.end_offsets()
        before = await self.committed(group)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap, group_id=group, enable_auto_commit=False
        )
        await consumer.start()
        try:
            consumer.assign(self.partitions)
            await consumer.commit({tp: ends[tp.partition] for tp in self.partitions})
        finally:
            await consumer.stop()
        if await self.committed(group) != ends:
            raise RuntimeError(f"could not move the committed offsets of {group} to the end of the log")
        if group == SESSIONS_GROUP:
            # The sessions worker resumes from its own positions in Redis, not from Kafka's
            # committed offsets: move those too, or it applies what phase 1 wrote first.
            await self.redis.hset(hv.APPLIED_KEY, mapping={str(p): o for p, o in ends.items()})
        return sum(ends[p] - before[p] for p in ends), sum(before.values())

    async def caught_up(self, groups: Sequence[str], ends: dict[int, int]) -> bool:
        for group in groups:
            if await self.committed(group) != ends:
                return False
        return True

    async def groups_on_topic(self) -> list[str]:
        groups = [g[0] for g in await self.admin.list_consumer_groups()]
        on_topic = []
        for group in groups:
            offsets = await self.admin.list_consumer_group_offsets(group, partitions=self.partitions)
            if any(meta.offset >= 0 for meta in offsets.values()):
                on_topic.append(group)
        return sorted(on_topic)

    def _query(self, sql: str) -> list[Any]:
        if self._clickhouse is None:
            host, port = self.settings.analytics_listen.rsplit(":", 1)
            # With a user name clickhouse-connect sends X-ClickHouse-User, which the endpoint
            # requires of a POST (a bare one looks like a web form to it).
            self._clickhouse = clickhouse_connect.get_client(host=host, port=int(port), username="default")
        try:
            return list(self._clickhouse.query(sql).result_rows)
        except Exception:
            self._clickhouse = None
            raise

    async def clickhouse(self, sql: str) -> list[Any] | None:
        """Rows, or None when the analytics endpoint does not answer."""
        try:
            return await asyncio.to_thread(self._query, sql)
        except Exception:
            return None

    async def states(self, conversations: Sequence[str]) -> list[dict[str, Any] | None]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for conversation in conversations:
                pipe.hget(hv.conversation_key(TENANT, conversation), hv.F_STATE)
            raws = await pipe.execute()
        return [json.loads(raw) if raw else None for raw in raws]


async def produce_backlog(
    settings: Settings, conversations: list[str], total: int, traffic: Traffic
) -> tuple[int, float]:
    """Start events for `conversations`, then messages across them, `total` events in all."""
    producer = raw_producer(settings, "bench-backlog")
    await producer.start()
    started = time.perf_counter()
    try:
        pending: list[asyncio.Future[Any]] = []
        for i, conversation in enumerate(conversations):
            pending.append(
                await send_event(producer, settings.conversation_topic, started_event(conversation, i))
            )
        for _ in range(total - len(conversations)):
            pending.append(await send_event(producer, settings.conversation_topic, traffic.event()))
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return total, total / (time.perf_counter() - started)


# ------------------------------------------------------------------------------- pipeline progress


class Applied:
    """How many phase 2/3 events each consumer has applied, read from its own output rather than
    from committed offsets (a consumer can commit past an event it never applied, or fail to commit
    one it did): sessions from the live streams in Redis (one entry per applied event), analytics
    from `count()` in ClickHouse."""

    def __init__(
        self, watch: LogWatch, conversations: Sequence[str], produced_from: int, projected_before: int
    ) -> None:
        self.watch = watch
        self.conversations = list(conversations)
        self.produced_from = produced_from  # topic size (sum of end offsets) when phase 2 began
        self.projected_before = projected_before  # rows analytics had written before phase 1

    async def sessions(self) -> int:
        async with self.watch.redis.pipeline(transaction=False) as pipe:
            for conversation in self.conversations:
                pipe.xlen(hv.live_stream_key(TENANT, conversation))
            return sum(int(n) for n in await pipe.execute())

    async def analytics(self) -> int | None:
        rows = await self.watch.clickhouse("SELECT count() FROM switchboard.events")
        return None if rows is None else int(rows[0][0]) - self.projected_before

    async def of(self, name: str) -> int | None:
        return await self.sessions() if name == "sessions" else await self.analytics()


class Produced:
    """Records written to the topic since phase 2 began (only this run writes to it then)."""

    def __init__(self, watch: LogWatch, before: int) -> None:
        self.watch = watch
        self.before = before

    async def count(self) -> int:
        return sum((await self.watch.end_offsets()).values()) - self.before


# ------------------------------------------------------------------------------- pipeline catch-up

# A consumer that has applied something and then nothing new for this long is done with what it will
# ever apply; whatever is still missing then was skipped.
STALL_S = 10.0


@dataclass
class CatchUp:
    name: str
    group: str
    events: int
    first_progress_s: float | None = None  # from process start to the first applied event
    done_s: float | None = None  # from process start until its output had every event it applied
    steady_rate: float | None = None  # events/s between 10% and 90% of the backlog
    applied: int = 0
    lost: int = 0  # never applied: the consumer stopped progressing without them
    how_done: str = ""
    cpu: dict[str, float] = field(default_factory=dict)  # cores per process until it was done

    @property
    def wall_rate(self) -> float | None:
        return self.applied / self.done_s if self.done_s else None

    @property
    def cpu_us_per_event(self) -> float | None:
        """The consumer's own CPU per event applied, start-up included: what a core buys, whatever
        else ran on the machine (the 1 / this is its rate on a core of its own)."""
        busy = self.cpu.get(self.name, 0.0) * (self.done_s or 0.0)
        return busy / self.applied * 1e6 if self.applied and busy else None


def steady_rate(samples: list[tuple[float, int]], total: int) -> float | None:
    """Events/s between the moments 10% and 90% of `total` were applied (or the last sample, when
    90% was never reached): start-up and the last partial batches left out."""
    lo = next(((t, c) for t, c in samples if c >= 0.1 * total), None)
    hi = next(((t, c) for t, c in samples if c >= 0.9 * total), samples[-1] if samples else None)
    if lo is None or hi is None or hi[0] - lo[0] < 1.5:
        return None
    return (hi[1] - lo[1]) / (hi[0] - lo[0])


async def catch_up(
    system: BenchSystem, meter: CpuMeter, applied: Applied, groups: dict[str, str], total: int, plan: Plan
) -> list[CatchUp]:
    """Start each consumer alone on a backlog of `total` events (one after the other: the next one
    starts once the previous one is done and idle) and time how long it takes to apply it."""
    results = []
    for name, group in groups.items():
        results.append(await catch_up_one(system, meter, applied, name, group, total, plan))
    return results


async def catch_up_one(
    system: BenchSystem, meter: CpuMeter, applied: Applied, name: str, group: str, total: int, plan: Plan
) -> CatchUp:
    r = CatchUp(name, group, total)
    samples: list[tuple[float, int]] = []
    last_change = 0.0
    log(f"catch-up: starting {name} alone on {total:,} events")
    t0 = time.perf_counter()
    system.children[name].start()
    cpu_start = meter.snapshot()
    deadline = t0 + plan.catchup_limit_s
    while time.perf_counter() < deadline and r.done_s is None:
        await asyncio.sleep(0.25)
        now = time.perf_counter() - t0
        count = await applied.of(name)
        if count is None:
            continue  # analytics' endpoint is not up yet
        samples.append((now, count))
        if count != r.applied:
            last_change = now
        r.applied = count
        if r.first_progress_s is None and count > 0:
            r.first_progress_s = now
        if count >= total:
            r.done_s = now
            r.how_done = "all applied"
        elif count > 0 and now - last_change >= STALL_S:
            r.done_s = last_change
            r.lost = total - count
            r.how_done = f"**stopped with {r.lost:,} never applied**"
        if r.done_s is not None:
            r.cpu = CpuMeter.cores(cpu_start, meter.snapshot())
        if not system.children[name].alive and r.done_s is None:
            log(f"{name} exited during the catch-up; last log lines:\n{system.children[name].log_tail()}")
            r.how_done = "**process exited**"
            break
    r.cpu = r.cpu or CpuMeter.cores(cpu_start, meter.snapshot())
    r.steady_rate = steady_rate(samples, total)
    if r.done_s is None and not r.how_done:
        r.how_done = f"**not done within {plan.catchup_limit_s:g} s**"
    done = f"done in {r.done_s:.1f}s" if r.done_s is not None else "not done"
    log(
        f"catch-up {name}: {r.applied:,} of {total:,} applied, {done} ({r.how_done}), "
        f"steady {_fmt(r.steady_rate)}/s, {_fmt(r.cpu_us_per_event, '.0f')} CPU µs/event"
    )
    return r


async def settle(
    applied: Applied, produced: Produced, names: Sequence[str], missing: dict[str, int], within_s: float
) -> bool:
    """Wait until every consumer has applied all it is going to (everything but `missing`)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        total = await produced.count()
        counts = [await applied.of(name) for name in names]
        if all(c is not None and c >= total - missing[n] for n, c in zip(names, counts, strict=True)):
            return True
        await asyncio.sleep(0.5)
    return False


# ------------------------------------------------------------------------------ sustained-rate probe


@dataclass
class ProbeStep:
    offered: int  # target events/s
    achieved: float  # events/s the generator actually produced (acked by Kafka)
    consumed: dict[str, float] = field(default_factory=dict)  # per consumer, events/s applied
    lag_start: dict[str, int] = field(default_factory=dict)
    lag_end: dict[str, int] = field(default_factory=dict)
    lag_peak: dict[str, int] = field(default_factory=dict)
    lag_slope: dict[str, float] = field(default_factory=dict)  # events/s the lag grew by
    trough_slope: dict[str, float | None] = field(default_factory=dict)  # events/s its troughs rose by
    drain_s: dict[str, float | None] = field(default_factory=dict)
    bounded: dict[str, bool] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # cores per process during the load


def trough_slope(points: list[tuple[float, int]]) -> float | None:
    """How fast the lag's lows rose: the lowest lag of the last third of the samples against the
    lowest of the first third, per second between the thirds; None with fewer than 6 samples."""
    if len(points) < 6:
        return None
    k = len(points) // 3
    first, last = points[:k], points[-k:]
    low0, low1 = min(lag for _, lag in first), min(lag for _, lag in last)
    span = (last[0][0] + last[-1][0]) / 2 - (first[0][0] + first[-1][0]) / 2
    return (low1 - low0) / span if span > 0 else None


def slope(points: list[tuple[float, int]]) -> float:
    if len(points) < 3:
        return 0.0
    mean_t = sum(t for t, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (y - mean_y) for t, y in points) / var if var else 0.0


async def offer_load(
    settings: Settings, traffic: Traffic, rate: int, seconds: float
) -> tuple[float, Counter[str]]:
    """Produce `rate` events/s for `seconds`, paced in 10 ms ticks; returns the rate Kafka acked."""
    errors: Counter[str] = Counter()
    producer = raw_producer(settings, "bench-probe")
    await producer.start()
    acked = 0
    try:
        pending: list[asyncio.Future[Any]] = []
        start = time.perf_counter()
        sent = 0
        while (elapsed := time.perf_counter() - start) < seconds:
            due = min(int(rate * elapsed) - sent, rate // 10)
            for _ in range(max(due, 0)):
                pending.append(await send_event(producer, settings.conversation_topic, traffic.event()))
                sent += 1
            await asyncio.sleep(0.01)
        for outcome in await asyncio.gather(*pending, return_exceptions=True):
            if isinstance(outcome, BaseException):
                errors[type(outcome).__name__] += 1
            else:
                acked += 1
        took = time.perf_counter() - start
    finally:
        await producer.stop()
    return acked / took, errors


@dataclass
class Pipeline:
    """What the probe needs: where to read progress, and what each consumer will never apply."""

    applied: Applied
    produced: Produced
    names: list[str]
    missing: dict[str, int]
    traffic: Traffic
    meter: CpuMeter

    async def lags(self) -> dict[str, int]:
        total = await self.produced.count()
        lags = {}
        for name in self.names:
            count = await self.applied.of(name)
            lags[name] = total - self.missing[name] - (count if count is not None else 0)
        return lags


async def probe_step(p: Pipeline, rate: int, plan: Plan) -> ProbeStep:
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in p.names}
    lag_start = await p.lags()
    produced_start = await p.produced.count()
    cpu_start = p.meter.snapshot()
    t0 = time.perf_counter()
    load = asyncio.ensure_future(offer_load(p.applied.watch.settings, p.traffic, rate, plan.probe_seconds))
    while not load.done():
        await asyncio.sleep(0.5)
        now = time.perf_counter() - t0
        for name, lag in (await p.lags()).items():
            samples[name].append((now, lag))
    achieved, errors = await load
    step = ProbeStep(rate, achieved, cpu=CpuMeter.cores(cpu_start, p.meter.snapshot()))
    took = time.perf_counter() - t0
    lag_end = await p.lags()
    produced = await p.produced.count() - produced_start
    for name in p.names:
        # Applied during the step = produced during it, less the growth of the lag.
        step.consumed[name] = (produced - (lag_end[name] - lag_start[name])) / took
        step.lag_start[name] = lag_start[name]
        step.lag_end[name] = lag_end[name]
        step.lag_peak[name] = max((lag for _, lag in samples[name]), default=0)
        tail = [(t, lag) for t, lag in samples[name] if t >= 0.3 * plan.probe_seconds]
        step.lag_slope[name] = slope(tail)
        step.trough_slope[name] = trough_slope(tail)
    # Drain: how long until each consumer has applied everything once the load stops.
    drain_start = time.perf_counter()
    pending = set(p.names)
    while pending and time.perf_counter() - drain_start < plan.drain_limit_s:
        for name, lag in (await p.lags()).items():
            if name in pending and lag <= 0:
                step.drain_s[name] = time.perf_counter() - drain_start
                pending.discard(name)
        await asyncio.sleep(0.25)
    for name in p.names:
        step.drain_s.setdefault(name, None)
        # Bounded: the lag's troughs did not keep rising (under 10% of the offered rate per second;
        # troughs, because a consumer that batches by age, like the projector, makes a saw-tooth
        # whose least-squares slope over a few seconds is noise; with too few samples, the lag
        # ended under one second of load), it never grew by more than ~3 s of load, and the
        # consumer drained afterwards.
        troughs = step.trough_slope[name]
        step.bounded[name] = (
            (
                troughs < 0.1 * rate
                if troughs is not None
                else step.lag_end[name] - max(step.lag_start[name], 0) < rate
            )
            and step.lag_peak[name] <= max(step.lag_start[name], 0) + 3 * rate
            and step.drain_s[name] is not None
        )
    if errors:
        log(f"probe {rate}/s: producer errors {dict(errors)}")
    log(
        f"probe {rate:,}/s offered, {achieved:,.0f}/s produced: "
        + "; ".join(
            f"{n} applied {step.consumed[n]:,.0f}/s lag {step.lag_start[n]:,}→{step.lag_end[n]:,} "
            f"peak {step.lag_peak[n]:,} slope {step.lag_slope[n]:,.0f}/s troughs {_fmt(step.trough_slope[n])}/s "
            f"drain {_fmt(step.drain_s[n], '.1f')} {'bounded' if step.bounded[n] else 'GROWING'}"
            for n in p.names
        )
        + f"; cpu {cores_text(step.cpu, PROBE_CPU)}"
    )
    return step


# Whose CPU the probe table shows.
PROBE_CPU = ("sessions", "analytics", "kafka", "redis", "bench", "others")
PROBE_FLOOR = 250


async def probe(p: Pipeline, plan: Plan) -> list[ProbeStep]:
    """Offer the planned rates upwards while any consumer keeps up; then, for a consumer that kept up
    with none of them, halve the lowest rate (down to PROBE_FLOOR) until it does."""
    steps: list[ProbeStep] = []

    def kept_up(name: str) -> bool:
        return any(s.bounded[name] and s.achieved >= 0.9 * s.offered for s in steps)

    for rate in plan.probe_rates:
        step = await probe_step(p, rate, plan)
        steps.append(step)
        if not any(step.bounded.values()) or step.achieved < 0.9 * rate:
            break  # nobody keeps up (or the generator cannot offer more): higher rates say nothing new
    rate = min(s.offered for s in steps)
    while not all(kept_up(name) for name in p.names) and rate // 2 >= PROBE_FLOOR:
        rate //= 2
        steps.append(await probe_step(p, rate, plan))
    return steps


# --------------------------------------------------------------------------------------- reporting


def _fmt(value: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}×" if b else "–"


def write_path_table(runs: list[Run]) -> str:
    by_key = {(r.target, r.mode, r.inflight): r for r in runs}
    lines = [
        "| target | mode | in flight | acked msg/s | p50 ms | p99 ms | errors | × echo (same mode, n) "
        "| × raw Kafka producer (same n) | CPU cores: client / server / Kafka / Redis / not this run |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in runs:
        echo = by_key.get(("echo", r.mode, r.inflight))
        # A batch row has BATCH_MESSAGES messages in flight per call.
        raw = by_key.get(("kafka", "produce", r.inflight * (BATCH_MESSAGES if r.mode == "batch" else 1)))
        vs_echo = _ratio(r.rate, echo.rate) if r.target == "ingress" and echo else "–"
        vs_raw = _ratio(r.rate, raw.rate) if r.target == "ingress" and raw else "–"
        errors = ", ".join(f"{k} {v}" for k, v in r.errors.items()) or "0"
        target = {"echo": "grpc.aio echo", "ingress": "**ingress**", "kafka": "raw aiokafka"}[r.target]
        lines.append(
            f"| {target} | {r.mode} | {r.inflight} | {r.rate:,.0f} | {r.percentile_ms(0.5):.2f} | "
            f"{r.percentile_ms(0.99):.2f} | {errors} | {vs_echo} | {vs_raw} | "
            f"{cores_text(r.cpu, CPU_COLUMNS[r.target])} |"
        )
    return "\n".join(lines)


def catch_up_table(results: list[CatchUp], backlog_note: str) -> str:
    lines = [
        f"Catch-up ({backlog_note}):",
        "",
        "| consumer (group) | events | applied | never applied | start → first applied s | start → all applied s "
        "| events/s incl. start-up | steady events/s (10%→90%) | its CPU µs/event | how it ended "
        "| CPU cores until done: sessions / analytics / Kafka / Redis / not this run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} ({r.group}) | {r.events:,} | {r.applied:,} | {r.lost:,} | "
            f"{_fmt(r.first_progress_s, '.1f')} | {_fmt(r.done_s, '.1f')} | {_fmt(r.wall_rate)} | "
            f"{_fmt(r.steady_rate)} | {_fmt(r.cpu_us_per_event)} | {r.how_done} | "
            f"{cores_text(r.cpu, ('sessions', 'analytics', 'kafka', 'redis', 'others'))} |"
        )
    return "\n".join(lines)


def probe_table(steps: list[ProbeStep], names: list[str]) -> str:
    head = "| offered ev/s | produced ev/s |" + "".join(
        f" {n} applied ev/s | {n} lag start / peak / end | {n} lag slope / troughs' slope ev/s "
        f"| {n} drain s | {n} bounded |"
        for n in names
    )
    head += (
        " CPU cores: "
        + " / ".join(PROBE_CPU).replace("bench", "generator").replace("others", "not this run")
        + " |"
    )
    lines = [head, "|---:|---:|" + "---:|---|---:|---:|---|" * len(names) + "---|"]
    for s in steps:
        row = f"| {s.offered:,} | {s.achieved:,.0f} |"
        for n in names:
            drain = s.drain_s.get(n)
            row += (
                f" {s.consumed[n]:,.0f} | {s.lag_start[n]:,} / {s.lag_peak[n]:,} / {s.lag_end[n]:,} | "
                f"{s.lag_slope[n]:,.0f} / {_fmt(s.trough_slope.get(n))} | "
                f"{_fmt(drain, '.1f') if drain is not None else 'did not drain'} | "
                f"{'yes' if s.bounded[n] else '**no**'} |"
            )
        lines.append(row + f" {cores_text(s.cpu, PROBE_CPU)} |")
    return "\n".join(lines)


# Issue 7's target table: "today" is the figure the issue was filed with (the 2026-11-23 quiet run).
TODAY = {
    "unary": "0.21× echo",
    "unary p50": "3.4 ms",
    "batch": "2.1–3k msg/s",
    "sessions": "~1.8k ev/s",
    "analytics": "~3k ev/s",
    "pipeline": "0.5–1k ev/s",
    "end to end": "not measured",
}


def verdicts(
    runs: list[Run],
    catchups: list[CatchUp],
    steps: list[ProbeStep],
    names: list[str],
    end_to_end: Any = None,
) -> str:
    """Every row of issue 7's target table: today's figure, this run's, the target, met or not."""
    by_key = {(r.target, r.mode, r.inflight): r for r in runs}
    rows: list[tuple[str, str, str, str, bool | None]] = []

    def verdict(ok: bool | None) -> str:
        return "–" if ok is None else ("met" if ok else "**missed**")

    for n in (10, 100):
        r, echo = by_key.get(("ingress", "unary", n)), by_key.get(("echo", "unary", n))
        if r is not None and echo is not None and echo.rate:
            ratio = r.rate / echo.rate
            rows.append(
                (
                    f"unary SendMessage acked, {n} in flight",
                    TODAY["unary"],
                    f"{ratio:.2f}× echo ({r.rate:,.0f} vs {echo.rate:,.0f} calls/s)",
                    "≥ 0.6× echo",
                    ratio >= 0.6,
                )
            )
    one = by_key.get(("ingress", "unary", 1))
    if one is not None and one.latencies:
        p50 = one.percentile_ms(0.5)
        echo_one = by_key.get(("echo", "unary", 1))
        echo_p50 = f" (echo {echo_one.percentile_ms(0.5):.2f} ms)" if echo_one and echo_one.latencies else ""
        rows.append(
            (
                "unary ack latency at 1 in flight, p50",
                TODAY["unary p50"],
                f"{p50:.2f} ms{echo_p50}",
                "≤ 1.5 ms",
                p50 <= 1.5,
            )
        )
    batched = max(
        (r for r in runs if r.target == "ingress" and r.mode == "batch"), key=lambda r: r.rate, default=None
    )
    if batched is not None:
        rows.append(
            (
                "batched ingest, acked",
                TODAY["batch"],
                f"{batched.rate:,.0f} msg/s (SendMessageBatch of {BATCH_MESSAGES}, {batched.inflight} in flight)",
                "≥ 15,000 msg/s",
                batched.rate >= 15_000,
            )
        )
    targets = {"sessions": 15_000, "analytics": 30_000}
    for c in catchups:
        if c.name not in targets:
            continue
        # The steady rate (10% → 90% of the backlog) when the polling could see one; a backlog
        # applied between two polls has only its rate including start-up.
        rate = c.steady_rate or c.wall_rate
        how = "steady" if c.steady_rate else "incl. start-up"
        rows.append(
            (
                f"{c.name} catch-up, alone",
                TODAY[c.name],
                f"{_fmt(rate)} ev/s {how} ({_fmt(c.cpu_us_per_event)} µs CPU/event)",
                f"≥ {targets[c.name]:,} ev/s",
                None if rate is None else rate >= targets[c.name],
            )
        )
    tops = [max((s.offered for s in steps if s.bounded.get(name)), default=0) for name in names]
    if names:
        top = min(tops)
        rows.append(
            (
                "pipeline sustained, both running, bounded lag",
                TODAY["pipeline"],
                f"{top:,} ev/s (highest step offered with bounded lag for {' and '.join(names)})",
                "≥ 5,000 ev/s",
                top >= 5000,
            )
        )
    if end_to_end is not None:
        line = end_to_end.verdict()
        text, _, ok = line.rpartition(": ")
        rows.append(
            (
                "end to end: API → GetConversation and ClickHouse, sustained",
                TODAY["end to end"],
                text,
                "≥ 3k msg/s, p99 ack ≤ 50 ms, API→CH p99 ≤ 2 s",
                ok == "met",
            )
        )
    out = [
        "Against issue 7's targets:",
        "",
        "| what | today (issue) | this run | target | |",
        "|---|---|---|---|---|",
    ]
    out += [
        f"| {what} | {today} | {now} | {target} | {verdict(ok)} |" for what, today, now, target, ok in rows
    ]
    return "\n".join(out)


def machine() -> str:
    def run(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"nproc {run('nproc')}; load average {load}\n{run('free', '-h')}"


# ------------------------------------------------------------------------------------------- main


async def start_conversations(settings: Settings, count: int) -> list[str]:
    async with grpc.aio.insecure_channel(settings.grpc_listen) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        sem = asyncio.Semaphore(20)

        async def one(i: int) -> str:
            async with sem:
                conv = await stub.StartConversation(
                    chat_pb2.StartConversationRequest(
                        tenant_id=TENANT,
                        channel=(events_pb2.CHANNEL_WEB, events_pb2.CHANNEL_IOS, events_pb2.CHANNEL_ANDROID)[
                            i % 3
                        ],
                        customer_id=f"cust-{i:05d}",
                        locale=("zh-CN", "en-US")[i % 2],
                    ),
                    timeout=30,
                )
                return str(conv.conversation_id)

        return list(await asyncio.gather(*(one(i) for i in range(count))))


async def wait_caught_up(watch: LogWatch, expected: int, within_s: float) -> dict[str, str]:
    """Wait until `expected` consumer groups on the topic have committed everything; name → group."""
    deadline = time.monotonic() + within_s
    groups: list[str] = []
    while time.monotonic() < deadline:
        groups = await watch.groups_on_topic()
        ends = await watch.end_offsets()
        if len(groups) >= expected and await watch.caught_up(groups, ends):
            break
        await asyncio.sleep(0.5)
    return {("sessions" if group == SESSIONS_GROUP else "analytics"): group for group in groups}


async def verify(
    watch: LogWatch, applied: Applied, groups: dict[str, str], phase1: int, skipped: dict[str, int]
) -> list[str]:
    """Cross-check the consumers' output against the log: every phase 2/3 record applied once."""
    ends = await watch.end_offsets()
    in_log = sum(ends.values())
    written = in_log - applied.produced_from
    notes = [
        f"records in the topic: {in_log:,}; phase 1 wrote {phase1:,} of them (skipped by the consumers), "
        f"phase 2/3 {written:,}"
    ]
    states = await watch.states(applied.conversations)
    folded = sum(int(s.get("event_count", 0)) for s in states if s)
    no_state = sum(1 for s in states if s is None)
    no_start = sum(1 for s in states if s and not s.get("created_at_ns"))
    live = await applied.sessions()
    ok = folded == written and live == written and not no_state and not no_start
    notes.append(
        f"sessions (Redis): over the {len(states):,} phase 2/3 conversations, event_count sums to "
        f"{folded:,} and the live streams hold {live:,} entries, for {written:,} records written to them; "
        f"{no_start:,} conversations never got their ConversationStarted applied (created_at_ns = 0)"
        + (f", {no_state:,} have no state" if no_state else "")
        + (" — matches" if ok else " — **does not match: events were skipped**")
    )
    if "analytics" in groups:
        rows = await watch.clickhouse("SELECT count(), uniqExact(event_id) FROM switchboard.events")
        if rows is None:
            notes.append("analytics (ClickHouse): endpoint did not answer")
        else:
            count, distinct = int(rows[0][0]), int(rows[0][1])
            wanted = in_log - skipped.get("analytics", 0)
            notes.append(
                f"analytics (ClickHouse): switchboard.events count() = {count:,}, distinct event ids = "
                f"{distinct:,}, records it read = {wanted:,} — "
                + ("matches" if distinct == wanted else "**does not match**")
            )
    for name, group in groups.items():
        committed = await watch.committed(group)
        behind = {p: (committed[p], ends[p]) for p in ends if committed[p] != ends[p]}
        if behind:
            detail = ", ".join(f"partition {p} at {c:,} of {e:,}" for p, (c, e) in sorted(behind.items()))
            notes.append(f"**{name}: committed offsets short of the log end after it settled: {detail}**")
        else:
            notes.append(f"{name}: committed offsets at the log end")
    return notes


async def start_processes(system: BenchSystem) -> bool:
    """Start analytics, sessions and ingress; False when analytics would not start (then without it)."""
    settings, children = system.settings, system.children
    for name in ("analytics", "sessions", "ingress"):
        children[name].start()
    analytics_ok = True
    try:
        await wait_for_analytics(settings, children["analytics"])
    except (RuntimeError, TimeoutError) as exc:
        log(f"analytics did not start; the pipeline numbers cover sessions only.\n{exc}")
        await system.stop("analytics")
        analytics_ok = False
    await wait_for_ingress(settings, children["ingress"])
    return analytics_ok


async def start_sessions_and_ingress(system: BenchSystem) -> None:
    """The stack, then the sessions worker and the ingress (what a write-path benchmark needs)."""
    await system.up()
    for name in ("sessions", "ingress"):
        system.children[name].start()
    await wait_for_ingress(system.settings, system.children["ingress"])


async def report_after(system: BenchSystem, body: Coroutine[Any, Any, str]) -> int:
    """Run a benchmark's body, tear this run's stack and processes down whatever happens (with
    the warnings of their logs), then print the body's report."""
    text = ""
    try:
        text = await body
    except Exception as exc:
        log(f"benchmark failed: {exc!r}")
        raise
    finally:
        excerpts = system.log_excerpts()
        if excerpts:
            log("warnings and errors in the process logs:\n" + excerpts)
        log("tearing down")
        await system.down()
    print(text, flush=True)
    return 0


async def bench(plan: Plan, system: BenchSystem) -> str:
    settings = system.settings
    machine_before = machine()
    others_before = await asyncio.to_thread(other_processes, {os.getpid()})
    await system.up()
    meter = CpuMeter(system)
    await meter.refresh()
    run_start = meter.snapshot()
    log("starting analytics, sessions and ingress")
    analytics_ok = await start_processes(system)
    conversations = await start_conversations(settings, plan.conversations)
    log(f"{len(conversations)} conversations started through the API")

    watch = LogWatch(settings)
    await watch.start()
    try:
        groups = await wait_caught_up(watch, 2 if analytics_ok else 1, 90)
        log(f"consumer groups on {settings.conversation_topic}: {groups}")
        if "sessions" not in groups:
            raise RuntimeError(
                "the sessions worker never committed offsets; last log lines:\n"
                + system.children["sessions"].log_tail()
            )
        if analytics_ok and "analytics" not in groups:
            log("analytics runs but has no consumer group on the topic: pipeline numbers cover sessions only")
        consumers: dict[str, str] = {n: groups[n] for n in ("sessions", "analytics") if n in groups}
        await system.stop("sessions", "analytics")

        log("phase 1: the write path (sessions and analytics stopped)")
        runs = await write_path(system, meter, conversations, plan)

        log("phase 2: pipeline catch-up")
        # Phase 1 wrote only to measure the write path; its volume depends on how fast that was. The
        # consumers skip it, so the catch-up covers a backlog of the planned size and shape.
        skips = {name: await watch.skip_to_end(group) for name, group in consumers.items()}
        skipped = {name: skip[0] for name, skip in skips.items()}
        phase1 = max(skipped.values())
        log(f"consumers skip the {phase1:,} records phase 1 wrote")
        before = sum((await watch.end_offsets()).values())
        backlog_conversations = [str(uuid.uuid4()) for _ in range(plan.backlog_conversations)]
        traffic = Traffic(backlog_conversations)
        made, rate = await produce_backlog(settings, backlog_conversations, plan.backlog, traffic)
        note = (
            f"{made:,} events produced straight to Kafka at {rate:,.0f}/s: "
            f"{len(backlog_conversations):,} ConversationStarted, then MessageReceived round-robin, "
            f"~{made // len(backlog_conversations)} events per conversation"
        )
        log(f"backlog: {note}")
        applied = Applied(watch, backlog_conversations, before, skips.get("analytics", (0, 0))[1])
        produced = Produced(watch, before)
        catchups = await catch_up(system, meter, applied, consumers, made, plan)
        if "analytics" in consumers:
            await wait_for_analytics(settings, system.children["analytics"])
        lost = {c.name: c.lost for c in catchups}

        log("phase 3: sustained-rate probe")
        if not await settle(applied, produced, list(consumers), lost, plan.catchup_limit_s):
            log("the consumers did not finish the backlog; the probe starts with lag")
        pipeline = Pipeline(applied, produced, list(consumers), lost, traffic, meter)
        steps = await probe(pipeline, plan)
        if not await settle(applied, produced, list(consumers), lost, plan.catchup_limit_s):
            log("the consumers did not finish after the probe; the consistency check shows the gap")
        checks = await verify(watch, applied, consumers, phase1, skipped)
        for line in checks:
            log(line)

        # After the consistency check, which counts the phase 2/3 conversations only.
        e2e = None
        if plan.e2e_rate and "analytics" in consumers:
            import end_to_end  # here: it imports this module

            log(f"phase 4: end to end at {plan.e2e_rate:,} msg/s through SendMessages streams")
            e2e = await end_to_end.run(system, plan.e2e_rate, plan.e2e_seconds, "stream")
            log(e2e.verdict())
        others_after = await asyncio.to_thread(other_processes, my_pids(meter))
        whole_run = CpuMeter.cores(run_start, meter.snapshot())
    finally:
        await watch.stop()

    names: list[str] = list(consumers)
    return "\n\n".join(
        [
            f"## Ingest benchmark — {time.strftime('%Y-%m-%d %H:%M %Z')}",
            f"Plan: {plan.seconds:g} s measured after {plan.warmup:g} s warm-up per run; "
            f"{plan.conversations} conversations; texts {min(len(t.format(n=0).encode()) for t in TEXTS)}-"
            f"{max(len(t.format(n=99999).encode()) for t in TEXTS)} bytes of UTF-8 (zh/en); "
            "sessions and analytics stopped during the write path and skip what it wrote; "
            f"`switchboard ingress` with {process_count(settings)} server processes (SO_REUSEPORT); unary and "
            f"batch clients over {CONNECTIONS} connections (a stream is one), batches of {BATCH_MESSAGES}.",
            "Machine at start, and other processes using CPU then (not part of this run):\n\n```\n"
            + machine_before
            + "\n\n"
            + others_before
            + "\n```",
            "### Write path: acked messages/s and ack latency",
            write_path_table(runs),
            "### Pipeline: sessions worker (Redis) and analytics projector (ClickHouse)",
            catch_up_table(catchups, note)
            + "\n\nApplied = live-stream entries in Redis (sessions) / rows in switchboard.events "
            "(analytics), polled every 0.25 s.",
            "Sustained-rate probe (load offered straight to Kafka, both consumers running; "
            f"{plan.probe_seconds:g} s per step; lag = records produced − events applied, read from "
            "Redis live streams and ClickHouse, not from committed offsets; "
            "bounded = the lag's troughs rose by < 10% of the offered rate per second (lowest lag of "
            "the last third of the samples vs the first third), "
            "lag never grew by more than 3 s of load, drained within "
            f"{plan.drain_limit_s:g} s afterwards; steps in the order run):",
            probe_table(steps, names),
            "Consistency after the run:\n\n" + "\n".join(f"- {line}" for line in checks),
            "End to end (all processes running; open-loop load through the API):\n\n"
            + (e2e.text if e2e is not None else "not run"),
            verdicts(runs, catchups, steps, names, e2e),
            f"Over the whole run, processes that were not this run's used {whole_run.get('others', 0.0):.2f} "
            f"of the {os.cpu_count()} cores on average (per-row figures in the tables).",
            "Machine at end, and other processes using CPU then:\n\n```\n"
            + machine()
            + "\n\n"
            + others_after
            + "\n```",
        ]
    )


async def main_async(plan: Plan, keep_data: bool, port_offset: int) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    system = BenchSystem(keep_data, port_offset)
    return await report_after(system, bench(plan, system))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller and shorter (about 2 minutes)")
    parser.add_argument(
        "--seconds", type=float, help="measured seconds per write-path run (default 5; quick 2)"
    )
    parser.add_argument("--keep-data", action="store_true", help="keep var/bench-* (logs) after the run")
    parser.add_argument(
        "--port-offset", type=int, default=0, help="add this to every port (two runs side by side)"
    )
    args = parser.parse_args(argv)
    plan = make_plan(args.quick, args.seconds)
    try:
        return asyncio.run(main_async(plan, args.keep_data, args.port_offset))
    except KeyboardInterrupt:
        log("interrupted; everything this run started was stopped")
        return 130
    except asyncio.CancelledError:
        log("terminated; everything this run started was stopped")
        return 143


if __name__ == "__main__":
    sys.exit(main())
