"""Fairness under a flood: does one tenant over its rate limit slow another tenant down?

    .venv/bin/python benchmarks/fairness.py                      # ~2 minutes
    .venv/bin/python benchmarks/fairness.py --seconds 20 --limit 50 --b-rate 50 --port-offset 700

Brings up its own stack (benchmarks/ingest.py's BenchSystem: Kafka, Redis, SeaweedFS on 4xxxx ports
shifted by --port-offset, a fresh var/bench-* directory removed at the end) and the ingress (2
processes on one port, SO_REUSEPORT, so the limit is shared through Redis as across hosts) plus the
sessions worker. Tenant A has a limit of --limit messages/s (burst as much); tenant B has none. Each
tenant sends unary SendMessage open-loop (a call every 1/rate s whatever the answers, as independent
clients would), with its own API key. Phases, in one run:

1. solo      — B alone at --b-rate: its p50/p99 ack latency is the baseline.
2. flood     — B again, while A floods at --flood× its limit: B's p99 / solo p99 is the figure
               (target ≤ 2×); A's accepted rate should sit near its limit.
3. unlimited — the same flood with A's limit lifted (`tenants update --rate default`): what the
               limit protects B from, on this machine.


A's flood runs in a process of its own (it starts ~1 s into B's phase), so B's timings never wait
on A's client. Prints a markdown table (stdout); progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import BenchSystem, CpuMeter, log  # type: ignore[import-not-found]
from switchboard.v1 import chat_pb2, chat_pb2_grpc, events_pb2

from services.auth import bearer_interceptors
from services.auth._admin import create_tenant, issue_key, update_tenant_limits
from services.processes import wait_for_ingress
from services.settings import Settings

MAX_OUTSTANDING = 4000  # open-loop calls awaiting an answer, per sender (a bound, not a target)


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)  # accepted calls, seconds
    refused: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def p(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def open_loop(
    stub: chat_pb2_grpc.ChatServiceStub, conversations: list[str], rate: float, seconds: float
) -> Tally:
    """`rate` SendMessage calls a second for `seconds`, each timed from its scheduled send."""
    tally = Tally()
    pending: set[asyncio.Task[None]] = set()

    async def one(i: int) -> None:
        start = time.perf_counter()
        request = chat_pb2.SendMessageRequest(
            conversation_id=conversations[i % len(conversations)],
            client_message_id=uuid.uuid4().hex,
            text="Hi, where is my order? 我的订单到哪里了？",
        )
        try:
            await stub.SendMessage(request, timeout=30)
            tally.latencies.append(time.perf_counter() - start)
        except grpc.aio.AioRpcError as err:
            if err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                tally.refused += 1
            else:
                tally.errors[err.code().name] = tally.errors.get(err.code().name, 0) + 1

    began = time.perf_counter()
    total = int(rate * seconds)
    for i in range(total):
        delay = began + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(pending) < MAX_OUTSTANDING:
            task = asyncio.ensure_future(one(i))
            pending.add(task)
            task.add_done_callback(pending.discard)
    if pending:
        await asyncio.gather(*pending)
    return tally


async def flood_child(listen: str, key: str, rate: float, seconds: float, conversations: str) -> None:
    """A's flood, in a process of its own: B's timings then never wait on A's client."""
    async with grpc.aio.insecure_channel(listen, interceptors=bearer_interceptors(key)) as channel:
        await channel.channel_ready()
        # Started (imports, connection) before B's phase; the flood begins on the parent's word.
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        tally = await open_loop(
            chat_pb2_grpc.ChatServiceStub(channel), conversations.split(","), rate, seconds
        )
    print(json.dumps({"accepted": len(tally.latencies), "refused": tally.refused, "errors": tally.errors}))


class Flood:
    """A's flooding client process: started ahead, flooding on `go()`."""

    def __init__(self, child: asyncio.subprocess.Process) -> None:
        self.child = child

    @classmethod
    async def ready(
        cls, listen: str, key: str, rate: float, seconds: float, conversations: list[str]
    ) -> Flood:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--flood-child",
            listen,
            key,
            str(rate),
            str(seconds),
            ",".join(conversations),
            stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.PIPE,
        )
        assert child.stdout is not None
        line = await child.stdout.readline()
        assert line.strip() == b"ready", line
        return cls(child)

    async def go(self) -> Tally:
        out, _ = await self.child.communicate(b"go\n")
        result = json.loads(out.decode().strip().splitlines()[-1])
        return Tally(latencies=[0.0] * result["accepted"], refused=result["refused"], errors=result["errors"])


async def conversations_of(stub: chat_pb2_grpc.ChatServiceStub, n: int) -> list[str]:
    out = []
    for _ in range(n):
        conv = await stub.StartConversation(
            chat_pb2.StartConversationRequest(channel=events_pb2.CHANNEL_WEB, customer_id="bench")
        )
        out.append(conv.conversation_id)
    return out


async def run(args: argparse.Namespace) -> None:
    system = BenchSystem(args.keep_data, args.port_offset)
    system.env["SWITCHBOARD_INGRESS_PROCESSES"] = "2"
    system.env["SWITCHBOARD_INGRESS_METRICS_LISTEN"] = ""
    settings: Settings = system.settings
    try:
        await system.up()
        a_tenant, b_tenant = "tenant-a", "tenant-b"
        await create_tenant(settings, a_tenant, {"rate_per_s": args.limit, "burst": args.limit})
        await create_tenant(settings, b_tenant)
        _, a_key, _ = await issue_key(settings, a_tenant, ["customer-app"])
        _, b_key, _ = await issue_key(settings, b_tenant, ["customer-app"])
        for name in ("sessions", "ingress"):
            system.children[name].start()
        await wait_for_ingress(settings, system.children["ingress"])
        listen = settings.grpc_listen
        async with (
            grpc.aio.insecure_channel(listen, interceptors=bearer_interceptors(a_key)) as a_channel,
            grpc.aio.insecure_channel(listen, interceptors=bearer_interceptors(b_key)) as b_channel,
        ):
            a, b = chat_pb2_grpc.ChatServiceStub(a_channel), chat_pb2_grpc.ChatServiceStub(b_channel)
            b_convs = await conversations_of(b, 50)
            a_convs = await conversations_of(a, 20)
            log("warm-up")
            await open_loop(b, b_convs, args.b_rate, 3)
            await asyncio.sleep(1.5)  # A's bucket full again after its StartConversations

            meter = CpuMeter(system)
            await meter.refresh()
            rows: list[tuple[str, Tally, Tally | None]] = []
            cpu: list[dict[str, float]] = []

            async def phase(name: str, flooder: Flood | None = None) -> None:
                start = meter.snapshot()
                if flooder is not None:
                    b_t, a_t = await asyncio.gather(
                        open_loop(b, b_convs, args.b_rate, args.seconds), flooder.go()
                    )
                else:
                    b_t, a_t = await open_loop(b, b_convs, args.b_rate, args.seconds), None
                cpu.append(CpuMeter.cores(start, meter.snapshot()))
                rows.append((name, b_t, a_t))

            flood_rate = args.limit * args.flood
            limited = {"rate_per_s": args.limit, "burst": args.limit}
            unlimited: dict[str, float | None] = {"rate_per_s": None, "burst": None}
            # Alternated, so a phase is not favoured by when it ran on a noisy machine.
            # Alternated, each round with its own solo: on a shared machine the others' load moves
            # between phases (see "others' cores"), so each flood is compared with its round's solo.
            kinds = (
                ["solo", "limited"] if args.skip_unlimited else ["solo", "limited", "unlimited"]
            ) * args.rounds
            current = "limited"
            for kind in kinds:
                if kind == "solo":
                    log(f"solo: B at {args.b_rate}/s for {args.seconds} s")
                    await phase("solo")
                    continue
                if kind != current:
                    await update_tenant_limits(
                        settings, a_tenant, limited if kind == "limited" else unlimited
                    )
                    current = kind
                    await asyncio.sleep(3)  # every ingress process follows the tenants topic
                await asyncio.sleep(args.limit and 1.5)  # A's bucket refills between phases
                log(f"flood, A {kind}: B at {args.b_rate}/s, A at {flood_rate}/s (limit {args.limit}/s)")
                flooder = await Flood.ready(listen, a_key, flood_rate, args.seconds, a_convs)
                await phase(f"flood, A {kind}", flooder)

        solos = [bt.p(0.99) for name, bt, _ in rows if name == "solo"]
        median_solo = statistics.median(solos)
        print(
            f"\nB at {args.b_rate:g} msg/s; A limited to {args.limit:g} msg/s (burst {args.limit:g}), "
            f"flooding at {flood_rate:g} msg/s; {args.seconds:g} s per phase; ingress: 2 processes\n"
        )
        print(
            "| phase | B p50 ms | B p99 ms | B p99 / round's solo | B p99 / median solo | B errors | A accepted/s | A refused "
            "| ingress cores | others' cores |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        solo_p99 = solos[0]
        for (name, bt, at), cores in zip(rows, cpu, strict=True):
            if name == "solo":
                solo_p99 = bt.p(0.99)
            accepted = f"{len(at.latencies) / args.seconds:.0f}" if at else "-"
            refused = f"{at.refused}" if at else "-"
            errors = sum(bt.errors.values()) + bt.refused
            print(
                f"| {name} | {bt.p(0.5):.1f} | {bt.p(0.99):.1f} | {bt.p(0.99) / solo_p99:.2f}× | {bt.p(0.99) / median_solo:.2f}× | "
                f"{errors} | {accepted} | {refused} | {cores.get('ingress', 0):.2f} | "
                f"{cores.get('others', 0):.2f} |"
            )
        for name, bt, at in rows:
            if bt.errors or (at and at.errors):
                print(f"\n{name}: B errors {bt.errors}, A errors {at.errors if at else {}}")
        fail_open = sum(
            path.read_text(errors="replace").count("rate limiter: Redis failed")
            for path in (system.data_dir / "logs").glob("ingress*.log")
        )
        print(
            f"\nlimiter fail-open warnings in the ingress logs (at most one per 10 s per process): {fail_open}"
        )
        if args.keep_data:
            print(system.log_excerpts(), file=sys.stderr)
    finally:
        await system.down()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--flood-child":
        listen, key, rate, seconds, conversations = sys.argv[2:7]
        asyncio.run(flood_child(listen, key, float(rate), float(seconds), conversations))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    parser.add_argument("--limit", type=float, default=50.0, help="tenant A's limit, messages/s")
    parser.add_argument("--flood", type=float, default=10.0, help="A sends this many times its limit")
    parser.add_argument("--b-rate", type=float, default=50.0, help="tenant B's steady messages/s")
    parser.add_argument("--skip-unlimited", action="store_true", help="no phase with A unlimited")
    parser.add_argument("--rounds", type=int, default=2, help="flood phases of each kind, alternated")
    parser.add_argument("--keep-data", action="store_true")
    parser.add_argument("--port-offset", type=int, default=700)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
