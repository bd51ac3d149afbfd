"""Knowledge fairness benchmark: how long one tenant's single document takes to be indexed while
another tenant has a backlog of hundreds of upserts, against the same document with no backlog.

    .venv/bin/python benchmarks/knowledge_fairness.py                 # about 3 minutes
    .venv/bin/python benchmarks/knowledge_fairness.py --backlog 300 --rounds 2 --port-offset 700

It brings up its own stack, ingress and assistant like benchmarks/assistant.py (BenchSystem, ports
shifted by --port-offset, default 600), torn down at the end. Each round:

1. solo: tenant B upserts one document through the ingress; time from the ack to the document in
   B's documents hash (the assistant writes it once the document is indexed, so it is searchable);
2. under backlog: tenant A upserts --backlog documents (~3.4 KB each, 100 per call), then B one
   document; the same time for B's, how many of A's were indexed at that moment, and how long A's
   whole backlog took.

The report gives the medians over the rounds and B's ratio (under backlog / solo). Before the
per-tenant turns (streams/knowledge/_fair.py) B's document waited for all of A's backlog.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
import redis.asyncio as aioredis
from assistant import ASSISTANT_PORT, MODELS_DIR, _refresh, start_ingress
from ingest import BenchSystem, log, machine, report_after
from switchboard.v1 import knowledge_pb2, knowledge_pb2_grpc

from schemas import hotview as hv

WORDS = "refund order parcel courier invoice warranty account password voucher delivery".split()
PROBE_S = 0.02


@dataclass
class Round:
    solo_s: float
    under_backlog_s: float
    a_indexed_then: int
    backlog_s: float


def article(document_id: str, rng: random.Random, sentences: int = 40) -> knowledge_pb2.Document:
    body = "\n\n".join(
        " ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "." for _ in range(sentences)
    )
    return knowledge_pb2.Document(
        document_id=document_id, title=f"About {document_id}", body=body, language="en"
    )


async def indexed_after(redis: aioredis.Redis, tenant: str, document_id: str, acked: float) -> float:
    """Seconds from `acked` until the document is in the tenant's hash (probed every 20 ms)."""
    while not await redis.hexists(hv.documents_key(tenant), document_id):
        if time.monotonic() - acked > 600:
            raise RuntimeError(f"{tenant}/{document_id} not indexed within 600 s")
        await asyncio.sleep(PROBE_S)
    return time.monotonic() - acked


async def indexed_count(redis: aioredis.Redis, tenant: str, count: int, since: float) -> None:
    """Wait until `count` of the tenant's documents are indexed."""
    while int(await redis.hlen(hv.documents_key(tenant))) < count:
        if time.monotonic() - since > 900:
            raise RuntimeError(f"{tenant}: fewer than {count} documents indexed within 900 s")
        await asyncio.sleep(PROBE_S)


async def one_document(stub: knowledge_pb2_grpc.KnowledgeServiceStub, tenant: str) -> float:
    await stub.UpsertDocuments(
        knowledge_pb2.UpsertDocumentsRequest(
            tenant_id=tenant,
            documents=[
                knowledge_pb2.Document(
                    document_id="cards",
                    title="Payment cards",
                    body="We accept Visa and Alipay.",
                    language="en",
                )
            ],
        )
    )
    return time.monotonic()


async def one_round(
    stub: knowledge_pb2_grpc.KnowledgeServiceStub, redis: aioredis.Redis, backlog: int, seed: int
) -> Round:
    run = uuid.uuid4().hex[:8]
    solo_tenant, a, b = f"solo-{run}", f"a-{run}", f"b-{run}"
    solo_s = await indexed_after(redis, solo_tenant, "cards", await one_document(stub, solo_tenant))
    rng = random.Random(seed)
    started = time.monotonic()
    for first in range(0, backlog, 100):
        docs = [article(f"a-{i}", rng) for i in range(first, min(backlog, first + 100))]
        await stub.UpsertDocuments(knowledge_pb2.UpsertDocumentsRequest(tenant_id=a, documents=docs))
    b_acked = await one_document(stub, b)
    under_s = await indexed_after(redis, b, "cards", b_acked)
    a_then = int(await redis.hlen(hv.documents_key(a)))
    await indexed_count(redis, a, backlog, started)
    backlog_s = time.monotonic() - started
    log(
        f"  solo {solo_s * 1000:.0f} ms; under A's backlog {under_s * 1000:.0f} ms with {a_then}/{backlog} "
        f"of A's indexed; A's backlog indexed in {backlog_s:.1f} s"
    )
    return Round(solo_s, under_s, a_then, backlog_s)


def report(rounds: list[Round], backlog: int, machine_text: str) -> str:
    solo = statistics.median(r.solo_s for r in rounds)
    under = statistics.median(r.under_backlog_s for r in rounds)
    lines = [
        "Knowledge fairness (benchmarks/knowledge_fairness.py)",
        f"machine: {machine_text}",
        f"rounds: {len(rounds)}; tenant A's backlog: {backlog} documents of ~3.4 KB, then tenant B's one",
        f"B's document indexed after its ack, no backlog (baseline): median {solo * 1000:.0f} ms",
        f"B's document indexed after its ack, A's backlog queued:    median {under * 1000:.0f} ms "
        f"({under / solo:.1f}x the baseline)",
        f"A's documents indexed when B's was: {', '.join(str(r.a_indexed_then) for r in rounds)} of {backlog}",
        f"A's whole backlog indexed in: median {statistics.median(r.backlog_s for r in rounds):.1f} s "
        "(what B waited before the per-tenant turns)",
    ]
    return "\n".join(lines)


async def bench(system: BenchSystem, backlog: int, rounds: int) -> str:
    machine_text = machine()
    await system.up()
    system.children["sessions"].start()  # the ingress serves once the hot view is ready
    system.children["assistant"].start()
    await start_ingress(system)
    redis = aioredis.Redis.from_url(system.settings.redis_url)
    try:
        async with grpc.aio.insecure_channel(system.settings.grpc_listen) as channel:
            stub = knowledge_pb2_grpc.KnowledgeServiceStub(channel)
            # Warm-up: the assistant has loaded its models and indexes.
            await indexed_after(redis, "warm-up", "cards", await one_document(stub, "warm-up"))
            log(f"assistant indexing; {rounds} rounds of a {backlog}-document backlog")
            results = [await one_round(stub, redis, backlog, seed) for seed in range(rounds)]
    finally:
        await redis.aclose()
    return report(results, backlog, machine_text)


async def main_async(backlog: int, rounds: int, keep_data: bool, port_offset: int) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    system = BenchSystem(keep_data, port_offset)
    system.env["SWITCHBOARD_ASSISTANT_LISTEN"] = f"127.0.0.1:{ASSISTANT_PORT + port_offset}"
    system.env.setdefault("SWITCHBOARD_MODELS_DIR", str(MODELS_DIR))
    _refresh(system)
    return await report_after(system, bench(system, backlog, rounds))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backlog", type=int, default=500, help="tenant A's documents (default 500)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each with fresh tenants (default 3)")
    parser.add_argument("--keep-data", action="store_true", help="keep var/bench-* (logs) after the run")
    parser.add_argument("--port-offset", type=int, default=600, help="add this to every port (default 600)")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(main_async(args.backlog, args.rounds, args.keep_data, args.port_offset))
    except KeyboardInterrupt:
        log("interrupted; everything this run started was stopped")
        return 130
    except asyncio.CancelledError:
        log("terminated; everything this run started was stopped")
        return 143


if __name__ == "__main__":
    sys.exit(main())
