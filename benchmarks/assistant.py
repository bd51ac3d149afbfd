"""Assistant benchmark: customer messages/s through the assistant path (intent cascade, retrieval,
grounded template answer, decisions to Kafka, reply deltas to Redis), time to first token at half
that load, each cascade stage's throughput, and the assistant's memory.

    .venv/bin/python benchmarks/assistant.py            # about 3 minutes
    .venv/bin/python benchmarks/assistant.py --quick    # about 1.5 minutes
    .venv/bin/python benchmarks/assistant.py --port-offset 500 --keep-data

It brings up its own stack and processes like benchmarks/ingest.py (its BenchSystem, on 4xxxx ports
shifted by --port-offset, default 300 so it can run beside an ingest benchmark), in a fresh
var/bench-* directory torn down at the end. Analytics is not started: the path measured ends at
Kafka (decisions) and Redis (reply deltas).

1. Stages, in this process, on the knowledge set's held-out questions, in batches of the
   assistant's batch size: the char n-gram stage, the sentence encoder, the intent head, the whole
   cascade, retrieval (hybrid search over the demo FAQ), the template answerer (gateway stream).
2. Throughput: a backlog of customer messages (FAQ questions in zh and en, each in its own turn of
   many conversations) is produced straight to Kafka while the assistant is stopped; the assistant
   is started on it and messages/s = decisions (IntentClassified) appended per second, from the
   first to the last, read back from the log.
3. First token: messages sent through the ingress (`SendMessage`) at half the measured rate over
   many conversations; a sample of conversations is watched with `StreamConversation`, and first
   token = from just before `SendMessage` is called to the first `reply_delta` of that message's
   reply seen on the stream (client side, end to end: ingress, Kafka, assistant, Redis, ingress).
   The assistant's own first-token figure (gateway call to first delta, on ReplyGenerated) is
   shown beside it.
4. Memory: the assistant's RSS after start-up and its peak during the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
import psutil
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from ingest import BenchSystem, log, machine, raw_producer, report_after, send_event
from switchboard.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    events_pb2,
    knowledge_pb2,
    knowledge_pb2_grpc,
)

from schemas.events import decode_event, new_event
from services.processes import switchboard_children, wait_for_ingress
from services.settings import Settings
from streams.knowledge import load_demo_documents
from streams.knowledge._data import load_questions

TENANT = "bench"
ASSISTANT_GROUP = "switchboard-assistant"
PY_SPY = str(Path(sys.executable).parent / "py-spy")
# The models every run shares (built once by `make install`/`switchboard models build`).
MODELS_DIR = Path(__file__).resolve().parents[1] / "var" / "models"
ASSISTANT_PORT = 45071
# Questions a customer asks that the FAQ answers and that do not ask for a person: the bot answers
# every one of them (an out-of-scope question or a complaint would hand the conversation off, and
# the bot stops answering it).
_HANDOFF_INTENTS = {"talk_to_human", "complaint"}


def questions() -> list[str]:
    return [
        q.text
        for q in load_questions("heldout_questions.jsonl")
        if q.document_id is not None and q.intent not in _HANDOFF_INTENTS
    ]


@dataclass(frozen=True)
class Plan:
    backlog: int
    backlog_conversations: int
    ttft_seconds: float
    ttft_conversations: int
    watched: int
    stage_rounds: int


def make_plan(quick: bool) -> Plan:
    if quick:
        return Plan(
            backlog=3_000,
            backlog_conversations=1_000,
            ttft_seconds=15,
            ttft_conversations=300,
            watched=60,
            stage_rounds=3,
        )
    return Plan(
        backlog=10_000,
        backlog_conversations=2_500,
        ttft_seconds=30,
        ttft_conversations=600,
        watched=100,
        stage_rounds=5,
    )


# ------------------------------------------------------------------------------------------ stages


@dataclass
class Stage:
    name: str
    items: int
    seconds: float
    note: str = ""

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds else 0.0


def timed(name: str, items: int, rounds: int, run: Callable[[], object], note: str = "") -> Stage:
    run()  # warm-up (lazy initialisation, caches)
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return Stage(name, items, best, note)


def stage_throughput(settings: Settings, batch: int, rounds: int) -> list[Stage]:
    from streams.assistant._worker import SEARCH_LIMIT, grounding, load_models
    from streams.assistant.gateway import AnswerRequest, GatewayConfig, GroundingPassage, ModelGateway

    knowledge, classifier = load_models(settings)
    knowledge.upsert(TENANT, load_demo_documents())
    texts = questions()
    batches = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    n = len(texts)
    stages = [
        timed("char n-gram stage", n, rounds, lambda: [classifier.ngram_proba(b) for b in batches]),
        timed("sentence encoder", n, rounds, lambda: [classifier._encoder.encode(b) for b in batches]),
    ]
    embeddings = [classifier._encoder.encode(b) for b in batches]
    stages.append(
        timed(
            "intent head (on embeddings)",
            n,
            rounds,
            lambda: [classifier._head.run(["probabilities"], {"embedding": e}) for e in embeddings],
        )
    )
    decisions = classifier.classify(texts)
    by_encoder = sum(1 for d in decisions if d.stage == "encoder")
    stages.append(
        timed(
            "intent cascade (n-gram, encoder for the unsure)",
            n,
            rounds,
            lambda: [classifier.classify(b) for b in batches],
            f"{by_encoder / n:.0%} of messages go on to the encoder",
        )
    )
    labels = [d.label for d in decisions]
    stages.append(
        timed(
            "retrieval (hybrid search + rerank, top 3)",
            n,
            rounds,
            lambda: [
                knowledge.search(TENANT, t, SEARCH_LIMIT, label)
                for t, label in zip(texts, labels, strict=True)
            ],
            f"{len(load_demo_documents())} documents",
        )
    )
    requests = []
    for text, decision in zip(texts, decisions, strict=True):
        # The passages the assistant answers from (its grounding rule), so the gateway stage times
        # the answers it gives.
        hits = grounding(knowledge.search(TENANT, text, SEARCH_LIMIT, decision.label), decision)
        requests.append(
            AnswerRequest(
                question=text,
                language=decision.language,
                passages=[
                    GroundingPassage(
                        h.document_id, h.chunk_id, h.title, h.snippet, h.scores.rerank, h.language
                    )
                    for h in hits
                ],
                intent=decision.label,
                tenant_id=TENANT,
                conversation_id="c",
            )
        )
    gateway = ModelGateway(GatewayConfig())

    async def answer_all() -> int:
        deltas = 0
        for request in requests:
            reply = gateway.stream(request)
            async for _ in reply:
                deltas += 1
            _ = reply.answer
        return deltas

    loop = asyncio.new_event_loop()
    try:
        stages.append(
            timed(
                "template answerer (gateway stream)",
                n,
                rounds,
                lambda: loop.run_until_complete(answer_all()),
                f"{loop.run_until_complete(answer_all()) / n:.1f} deltas per reply",
            )
        )
        loop.run_until_complete(gateway.aclose())
    finally:
        loop.close()
    return stages


# ------------------------------------------------------------------------------------- the system


def _refresh(system: BenchSystem) -> None:
    fields = {k.removeprefix("SWITCHBOARD_").lower(): v for k, v in system.env.items()}
    known = {k: v for k, v in fields.items() if k in Settings.model_fields}
    system.settings = Settings(**known)  # type: ignore[arg-type]
    system.children = switchboard_children(system.settings, system.env)


async def start_ingress(system: BenchSystem, attempts: int = 3) -> None:
    """Start the ingress; on a fresh stack its start-up can lose a race with topic metadata, so
    it is started again (up to `attempts` times) when it exits during start-up."""
    for attempt in range(1, attempts + 1):
        system.children["ingress"].start()
        try:
            await wait_for_ingress(system.settings, system.children["ingress"])
            return
        except RuntimeError:
            if attempt == attempts:
                raise
            log(f"the ingress exited during start-up (attempt {attempt}); starting it again")
            await asyncio.sleep(1.0)


async def upload_faq(settings: Settings) -> None:
    async with grpc.aio.insecure_channel(settings.grpc_listen) as channel:
        stub = knowledge_pb2_grpc.KnowledgeServiceStub(channel)
        documents = [
            knowledge_pb2.Document(
                document_id=d.document_id,
                title=d.title,
                body=d.body,
                language=d.language,
                tags=list(d.tags),
                url=d.url,
            )
            for d in load_demo_documents()
        ]
        await stub.UpsertDocuments(
            knowledge_pb2.UpsertDocumentsRequest(tenant_id=TENANT, documents=documents)
        )


async def wait_for_search(settings: Settings, within_s: float = 240) -> None:
    """Until SearchKnowledge (forwarded to the assistant) finds the FAQ: models and index loaded."""
    deadline = time.monotonic() + within_s
    async with grpc.aio.insecure_channel(settings.grpc_listen) as channel:
        stub = knowledge_pb2_grpc.KnowledgeServiceStub(channel)
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.SearchKnowledge(
                    knowledge_pb2.SearchKnowledgeRequest(tenant_id=TENANT, query="refund", limit=1), timeout=5
                )
                if reply.hits:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError("the assistant never served SearchKnowledge for the FAQ")
            await asyncio.sleep(0.5)


class Memory:
    """The assistant's RSS, sampled."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self.first = 0

    def cpu_seconds(self) -> float:
        try:
            times = self.process.cpu_times()
        except psutil.Error:
            return 0.0
        return float(times.user + times.system)

    def sample(self) -> int:
        try:
            rss = int(self.process.memory_info().rss)
        except psutil.Error:
            return 0
        self.first = self.first or rss
        self.peak = max(self.peak, rss)
        return rss

    async def follow(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)


class Decisions:
    """Reads the conversation topic from a start position and notes when each decision appears."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.intents: list[float] = []
        self.replies = 0
        self.handoffs = 0
        self.first_token_ms: list[float] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        topic = self.settings.conversation_topic
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap, enable_auto_commit=False, fetch_max_wait_ms=50
        )
        await self._consumer.start()
        tps = [TopicPartition(topic, p) for p in range(self.settings.topic_partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # pin the position now: later records are the ones counted
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            fetched = await self._consumer.getmany(timeout_ms=100, max_records=5000)
            now = time.monotonic()
            for records in fetched.values():
                for record in records:
                    event = decode_event(record.value)
                    kind = event.WhichOneof("payload")
                    if kind == "intent_classified":
                        self.intents.append(now)
                    elif kind == "reply_generated":
                        self.replies += 1
                        self.first_token_ms.append(event.reply_generated.first_token_ms)
                    elif kind == "handoff_requested":
                        self.handoffs += 1

    async def end_offsets(self) -> dict[TopicPartition, int]:
        assert self._consumer is not None
        topic = self.settings.conversation_topic
        tps = [TopicPartition(topic, p) for p in range(self.settings.topic_partitions)]
        return {tp: int(o) for tp, o in (await self._consumer.end_offsets(tps)).items()}

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


@dataclass
class Throughput:
    messages: int
    decided: int
    replies: int
    handoffs: int
    seconds: float
    steady: float
    # CPU time the assistant process used per decided message (all its threads).
    cpu_ms: float

    @property
    def rate(self) -> float:
        return self.decided / self.seconds if self.seconds else 0.0


def start_profiler(system: BenchSystem, path: Path) -> subprocess.Popen[bytes]:
    """py-spy on the assistant while it works through the backlog (collapsed stacks in `path`)."""
    assert system.children["assistant"].proc is not None
    pid = system.children["assistant"].proc.pid
    log(f"profiling the assistant (pid {pid}) with py-spy into {path}")
    return subprocess.Popen(
        [
            PY_SPY,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "100",
            "--output",
            str(path),
            "--format",
            "speedscope",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_profiler(profiler: subprocess.Popen[bytes]) -> None:
    profiler.send_signal(signal.SIGINT)
    try:
        profiler.wait(30)
    except subprocess.TimeoutExpired:
        profiler.kill()


async def throughput(
    system: BenchSystem, plan: Plan, memory_box: list[Memory], profile: Path | None = None
) -> Throughput:
    settings = system.settings
    texts = questions()
    conversations = [str(uuid.uuid4()) for _ in range(plan.backlog_conversations)]
    producer = raw_producer(settings, "assistant-bench-backlog")
    await producer.start()
    try:
        futures = [
            await send_event(
                producer,
                settings.conversation_topic,
                new_event(
                    TENANT,
                    cid,
                    conversation_started=events_pb2.ConversationStarted(
                        channel=events_pb2.CHANNEL_WEB, customer_id=f"c{i}", locale=("zh-CN", "en-US")[i % 2]
                    ),
                ),
            )
            for i, cid in enumerate(conversations)
        ]
        for n in range(plan.backlog):
            event = new_event(
                TENANT,
                conversations[n % len(conversations)],
                message_received=events_pb2.MessageReceived(
                    client_message_id=f"b{n}", text=texts[n % len(texts)], sender=events_pb2.SENDER_CUSTOMER
                ),
            )
            futures.append(await send_event(producer, settings.conversation_topic, event))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    log(
        f"backlog: {plan.backlog:,} messages over {len(conversations):,} conversations; starting the assistant"
    )
    decisions = Decisions(settings)
    await decisions.start()
    system.children["assistant"].start()
    assert system.children["assistant"].proc is not None
    memory = Memory(system.children["assistant"].proc.pid)
    memory_box.append(memory)
    stop = asyncio.Event()
    following = asyncio.create_task(memory.follow(stop))
    profiler = start_profiler(system, profile) if profile else None
    deadline = time.monotonic() + 600
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    cpu_start: tuple[float, int] | None = None
    try:
        # Done when the assistant has committed everything in the topic (its own decisions
        # included): messages of conversations handed off earlier get no decision at all.
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            if not system.children["assistant"].alive:
                raise RuntimeError("the assistant exited:\n" + system.children["assistant"].log_tail())
            if cpu_start is None and decisions.intents:
                cpu_start = (memory.cpu_seconds(), len(decisions.intents))
            if len(decisions.intents) < plan.backlog // 2:
                continue
            committed = await admin.list_consumer_group_offsets(ASSISTANT_GROUP)
            ends = await decisions.end_offsets()
            if ends and all(
                committed.get(tp) is not None and committed[tp].offset >= end for tp, end in ends.items()
            ):
                break
        else:
            log("the assistant did not finish the backlog in 600 s")
    finally:
        await admin.close()
    cpu_ms = 0.0
    if cpu_start is not None and len(decisions.intents) > cpu_start[1]:
        cpu_ms = (memory.cpu_seconds() - cpu_start[0]) * 1000 / (len(decisions.intents) - cpu_start[1])
    if profiler is not None:
        stop_profiler(profiler)
    stop.set()
    await following
    await decisions.stop()
    times = decisions.intents
    seconds = times[-1] - times[0] if len(times) > 1 else 0.0
    # Steady state: the middle 80 % of the decisions (start-up and the tail left out).
    lo, hi = int(len(times) * 0.1), int(len(times) * 0.9)
    steady = (hi - lo) / (times[hi] - times[lo]) if hi > lo and times[hi] > times[lo] else 0.0
    return Throughput(
        plan.backlog, len(times), decisions.replies, decisions.handoffs, seconds, steady, cpu_ms
    )


# ---------------------------------------------------------------------------------- first token


@dataclass
class FirstTokens:
    rate: float
    sent: int = 0
    failed: int = 0
    seconds: float = 0.0
    observed_ms: list[float] = field(default_factory=list)
    unanswered: int = 0
    inside_ms: list[float] = field(default_factory=list)


async def first_tokens(system: BenchSystem, plan: Plan, rate: float) -> FirstTokens:
    settings = system.settings
    texts = questions()
    result = FirstTokens(rate=rate)
    decisions = Decisions(settings)
    await decisions.start()
    async with grpc.aio.insecure_channel(settings.grpc_listen) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        sem = asyncio.Semaphore(20)

        async def start(i: int) -> str:
            async with sem:
                conv = await stub.StartConversation(
                    chat_pb2.StartConversationRequest(
                        tenant_id=TENANT, customer_id=f"t{i}", locale=("zh-CN", "en-US")[i % 2]
                    ),
                    timeout=30,
                )
                return str(conv.conversation_id)

        conversations = list(await asyncio.gather(*(start(i) for i in range(plan.ttft_conversations))))
        watched = set(conversations[: plan.watched])
        # message event id → send time; filled before the stream can show its reply's deltas.
        sent_at: dict[str, float] = {}
        pending: dict[str, float] = {}
        seen: dict[str, float] = {}
        changed = asyncio.Event()

        async def watch(cid: str) -> None:
            call = stub.StreamConversation(
                chat_pb2.StreamConversationRequest(tenant_id=TENANT, conversation_id=cid)
            )
            async for update in call:
                if update.HasField("reply_delta"):
                    message = update.reply_delta.message_event_id
                    seen.setdefault(message, time.monotonic())
                    changed.set()

        watchers = [asyncio.create_task(watch(cid)) for cid in watched]
        await asyncio.sleep(1.0)  # streams open
        interval = 1.0 / rate
        began = time.monotonic()
        tasks: list[asyncio.Task[None]] = []
        order = itertools.count()

        async def send_one(n: int) -> None:
            cid = conversations[n % len(conversations)]
            before = time.monotonic()
            try:
                ack = await stub.SendMessage(
                    chat_pb2.SendMessageRequest(
                        tenant_id=TENANT,
                        conversation_id=cid,
                        client_message_id=f"f{n}",
                        text=texts[(n * 7) % len(texts)],
                    ),
                    timeout=10,
                )
            except grpc.aio.AioRpcError:
                result.failed += 1
                return
            if cid in watched:
                sent_at[ack.event_id] = before

        while time.monotonic() - began < plan.ttft_seconds:
            n = next(order)
            tasks.append(asyncio.create_task(send_one(n)))
            # Open loop: the next send is due at a fixed time whatever the last one took.
            delay = began + (n + 1) * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await asyncio.gather(*tasks)
        result.sent = len(tasks)
        result.seconds = time.monotonic() - began
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(m not in seen for m in sent_at):
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), max(0.0, deadline - time.monotonic()))
        for message, at in sent_at.items():
            if message in seen:
                result.observed_ms.append((seen[message] - at) * 1000)
            else:
                pending[message] = at
        result.unanswered = len(pending)
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
    await decisions.stop()
    result.inside_ms = decisions.first_token_ms
    return result


# --------------------------------------------------------------------------------------- report


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(
    plan: Plan,
    batch: int,
    stages: list[Stage],
    tp: Throughput,
    ft: FirstTokens,
    memory: Memory,
    machine_before: str,
    started_rss: int,
) -> str:
    mib = 1024 * 1024
    rows = "\n".join(
        f"| {s.name} | {s.rate:,.0f} | {s.seconds / s.items * 1000:.3f} | {s.note} |" for s in stages
    )
    verdict_rate = "meets" if tp.rate >= 500 else "**misses**"
    p50, p99 = percentile(ft.observed_ms, 0.5), percentile(ft.observed_ms, 0.99)
    verdict_ttft = "meets" if p99 <= 200 else "**misses**"
    return "\n\n".join(
        [
            f"### Assistant benchmark — {time.strftime('%Y-%m-%d %H:%M %Z')}",
            "Machine at start:\n\n```\n" + machine_before + "\n```",
            f"**Stages** (this process, one thread; {len(questions())} held-out FAQ questions in batches of "
            f"{batch}; best of {plan.stage_rounds} rounds):\n\n"
            "| stage | messages/s | ms per message | note |\n|---|---:|---:|---|\n" + rows,
            f"**Throughput through the assistant** (backlog of {tp.messages:,} customer messages over "
            f"{plan.backlog_conversations:,} conversations, grounded template answerer, decisions read back "
            f"from Kafka): {tp.decided:,} intents in {tp.seconds:.1f} s = **{tp.rate:,.0f} messages/s** "
            f"(middle 80 %: {tp.steady:,.0f}/s); {tp.replies:,} replies, {tp.handoffs:,} handoffs. "
            f"Aim ≥ 500/s: {verdict_rate}. The assistant process used {tp.cpu_ms:.2f} ms of CPU per "
            f"message (all threads): {1000 / tp.cpu_ms if tp.cpu_ms else float('nan'):,.0f} messages/s "
            "per core it gets, on this machine's load.",
            f"**First token at half load** ({ft.rate:,.0f} messages/s offered through SendMessage for "
            f"{ft.seconds:.0f} s over {plan.ttft_conversations} conversations, {ft.sent:,} sent, {ft.failed} "
            f"refused; {len(ft.observed_ms):,} replies timed on {plan.watched} StreamConversation watchers, "
            f"{ft.unanswered} without a delta in time): send → first reply_delta on the stream "
            f"p50 **{p50:.0f} ms**, p90 {percentile(ft.observed_ms, 0.9):.0f} ms, p99 **{p99:.0f} ms**, "
            f"max {max(ft.observed_ms, default=float('nan')):.0f} ms. Aim p99 ≤ 200 ms: {verdict_ttft}. "
            f"Inside the assistant (gateway call → first delta, ReplyGenerated.first_token_ms): "
            f"p50 {percentile(ft.inside_ms, 0.5):.2f} ms, p99 {percentile(ft.inside_ms, 0.99):.2f} ms.",
            f"**Memory** (assistant RSS): {started_rss / mib:,.0f} MiB after start-up, peak "
            f"{memory.peak / mib:,.0f} MiB during the run.",
        ]
    )


async def bench(plan: Plan, system: BenchSystem, profile: Path | None = None) -> str:
    machine_before = machine()
    batch = system.settings.assistant_batch_size
    log("stages: loading models in this process")
    stages = await asyncio.to_thread(stage_throughput, system.settings, batch, plan.stage_rounds)
    for s in stages:
        log(f"  {s.name}: {s.rate:,.0f}/s")
    await system.up()
    system.children["sessions"].start()
    await start_ingress(system)
    await upload_faq(system.settings)
    log("FAQ uploaded through KnowledgeService")
    memory_box: list[Memory] = []
    tp = await throughput(system, plan, memory_box, profile)
    memory = memory_box[0]
    log(f"throughput: {tp.rate:,.0f} messages/s ({tp.decided:,} of {tp.messages:,} decided)")
    await wait_for_search(system.settings)
    started_rss = memory.sample()
    rate = max(1.0, tp.rate / 2)
    log(f"first token at {rate:,.0f} messages/s")
    stop = asyncio.Event()
    following = asyncio.create_task(memory.follow(stop))
    ft = await first_tokens(system, plan, rate)
    stop.set()
    await following
    log(
        f"first token p50 {percentile(ft.observed_ms, 0.5):.0f} ms p99 {percentile(ft.observed_ms, 0.99):.0f} ms"
    )
    return report(plan, batch, stages, tp, ft, memory, machine_before, started_rss)


async def main_async(plan: Plan, keep_data: bool, port_offset: int, profile: Path | None = None) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    system = BenchSystem(keep_data, port_offset)
    system.env["SWITCHBOARD_ASSISTANT_LISTEN"] = f"127.0.0.1:{ASSISTANT_PORT + port_offset}"
    system.env.setdefault("SWITCHBOARD_MODELS_DIR", str(MODELS_DIR))
    _refresh(system)
    return await report_after(system, bench(plan, system, profile))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller and shorter")
    parser.add_argument("--keep-data", action="store_true", help="keep var/bench-* (logs) after the run")
    parser.add_argument("--port-offset", type=int, default=300, help="add this to every port (default 300)")
    parser.add_argument(
        "--profile",
        type=Path,
        help="record the assistant with py-spy during the throughput phase (collapsed stacks)",
    )
    args = parser.parse_args(argv)
    try:
        return asyncio.run(main_async(make_plan(args.quick), args.keep_data, args.port_offset, args.profile))
    except KeyboardInterrupt:
        log("interrupted; everything this run started was stopped")
        return 130
    except asyncio.CancelledError:
        log("terminated; everything this run started was stopped")
        return 143


if __name__ == "__main__":
    sys.exit(main())
