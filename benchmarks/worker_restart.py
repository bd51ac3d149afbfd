"""kill -9 of the sessions worker under `switchboard run`, under load: from the kill until a
message sent right after it is folded (shown by GetConversation) on every partition. "warm": the
runner's warm spare takes over (services/runner.py, Settings.warm_spares); "cold": the spare is
killed first, so the runner starts a new process, as before the spares. Rounds alternate, in the
same run and under the same load.

    .venv/bin/python benchmarks/worker_restart.py [--rounds 8] [--senders 40] [--rate 300]
        [--settle-s 8] [--port-offset 0] [--keep-data]

Brings up `switchboard run --no-demo` of its own (fresh `var/bench-*` data directory, 127.0.0.1,
the ports of benchmarks/ingest.py moved by --port-offset, 4 partitions). The load: --rate
messages/s over --senders conversations, each sending one message at a time on a fixed schedule
(a rate the machine sustains: a closed loop as fast as acks come saturates this 2-core machine,
the fold falls behind, and the probes then time the backlog, not the restart). Each round: a
probe to one conversation on each partition, timed to folded (GetConversation) with no kill (the
baseline); then, once the worker and its spare are both there (the runner starts a spare 5 s after
the last one took over), the spare is killed first for a "cold" round, the worker is kill -9ed, and
the probes are sent again at once; reported: kill -> every probe folded, and the 1-minute load
average at the kill. At the end every conversation's last acknowledged message must be folded
(the correctness check).

Progress goes to stderr, the results (markdown) to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PROJECT / "benchmarks"))

import grpc  # noqa: E402
import psutil  # noqa: E402
from ingest import BenchSystem, log  # noqa: E402
from switchboard.v1 import chat_pb2, chat_pb2_grpc  # noqa: E402

from services import stack  # noqa: E402
from services.auth import ingress_channel  # noqa: E402
from services.processes import wait_for_ingress  # noqa: E402
from tests.integration.test_backbone import conversation_ids_per_partition  # noqa: E402

KEY = re.compile(r"demo API key \(tenant '([^']+)'.*?\): (sbk_\S+)")
SERVING = "== serving; Ctrl-C stops everything"
RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)


@dataclass
class Load:
    stub: chat_pb2_grpc.ChatServiceStub
    acked: dict[str, list[str]] = field(default_factory=dict)
    ack_s: list[float] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    stopping: bool = False

    async def sender(self, cid: str, interval_s: float) -> None:
        """One message every `interval_s` (the next once the last was acked): an offered rate
        the machine sustains, so a fold's delay is the restart's, not a backlog's."""
        sent = self.acked.setdefault(cid, [])
        k = 0
        due = time.monotonic() + random.uniform(0, interval_s)
        while not self.stopping:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            due += interval_s
            request = chat_pb2.SendMessageRequest(
                conversation_id=cid, client_message_id=f"{cid}-{k}", text=f"load {k} 你好"
            )
            while True:
                began = time.monotonic()
                try:
                    await self.stub.SendMessage(request, timeout=10)
                    self.ack_s.append(time.monotonic() - began)
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in RETRYABLE:
                        self.unexpected.append(
                            f"{request.client_message_id}: {exc.code().name} {exc.details()}"
                        )
                    await asyncio.sleep(0.05)
            sent.append(request.client_message_id)
            k += 1


def sessions_processes(runner_pid: int, metrics_port: int) -> tuple[int | None, int | None]:
    """(worker pid, spare pid): the worker is the one serving the sessions metrics port."""
    active = spare = None
    for proc in psutil.Process(runner_pid).children():
        try:
            if proc.cmdline()[-2:] != ["worker", "sessions"]:
                continue
            listening = any(
                c.status == psutil.CONN_LISTEN and c.laddr.port == metrics_port
                for c in proc.net_connections("tcp")
            )
        except psutil.NoSuchProcess:
            continue
        if listening:
            active = proc.pid
        else:
            spare = proc.pid
    return active, spare


async def until(probe, done, within_s: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within_s
    while True:
        value = await probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: last value {value!r}")
        await asyncio.sleep(0.05)


async def last_ids(stub: chat_pb2_grpc.ChatServiceStub, cid: str) -> set[str]:
    try:
        conv = await stub.GetConversation(
            chat_pb2.GetConversationRequest(conversation_id=cid, recent_messages=20), timeout=5
        )
    except grpc.aio.AioRpcError:
        return set()
    return {m.client_message_id for m in conv.messages}


def start_runner(env: dict[str, str], out_path: Path) -> subprocess.Popen[bytes]:
    with out_path.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-u", "-m", "services.cli", "run", "--no-demo"],
            env=env,
            cwd=PROJECT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def probe_fold(stub: chat_pb2_grpc.ChatServiceStub, probes: list[str], tag: str, since: float) -> float:
    """Send `tag` to every probe conversation; seconds from `since` until all are folded."""
    for cid in probes:
        request = chat_pb2.SendMessageRequest(conversation_id=cid, client_message_id=tag, text="probe")
        while True:
            try:
                await stub.SendMessage(request, timeout=10)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise
    for cid in probes:
        await until(lambda c=cid: last_ids(stub, c), lambda ids: tag in ids, 120, f"{tag} folded")
    return time.monotonic() - since


async def main_async(args: argparse.Namespace) -> str:
    bench = BenchSystem(args.keep_data, args.port_offset)
    base = 45060 + args.port_offset
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")},
        **bench.env,
        "SWITCHBOARD_INGRESS_METRICS_LISTEN": f"127.0.0.1:{base}",
        "SWITCHBOARD_SESSIONS_METRICS_LISTEN": f"127.0.0.1:{base + 1}",
        "SWITCHBOARD_ASSISTANT_METRICS_LISTEN": f"127.0.0.1:{base + 2}",
        "SWITCHBOARD_ANALYTICS_METRICS_LISTEN": f"127.0.0.1:{base + 3}",
        "SWITCHBOARD_ASSISTANT_LISTEN": f"127.0.0.1:{base + 4}",
        "SWITCHBOARD_MODELS_DIR": str(PROJECT / "var" / "models"),
    }
    settings = bench.settings
    bench._check_ports_free()
    bench._reuse_kafka_jars()
    out_path = bench.data_dir / "runner.out"
    log(f"starting `switchboard run --no-demo` in {bench.data_dir}")
    runner = start_runner(env, out_path)

    def output() -> str:
        return out_path.read_text(errors="replace")

    try:
        await until(
            lambda: asyncio.to_thread(output),
            lambda t: SERVING in t or runner.poll() is not None,
            300,
            "serving",
        )
        found = KEY.search(output())
        if runner.poll() is not None or not found:
            raise RuntimeError(f"`switchboard run` did not serve:\n{output()[-3000:]}")
        settings = settings.model_copy(update={"api_key": found.group(2)})
        await wait_for_ingress(settings)
        port = int(env["SWITCHBOARD_SESSIONS_METRICS_LISTEN"].rsplit(":", 1)[1])
        rows: list[tuple[str, float, float, float]] = []
        async with ingress_channel(settings) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            probes = conversation_ids_per_partition("probe", settings.topic_partitions)
            for cid in probes:
                await stub.StartConversation(
                    chat_pb2.StartConversationRequest(conversation_id=cid), timeout=10
                )
            conversations = []
            for _ in range(args.senders):
                conv = await stub.StartConversation(chat_pb2.StartConversationRequest(), timeout=10)
                conversations.append(conv.conversation_id)
            load = Load(stub)
            senders = [asyncio.create_task(load.sender(c, args.senders / args.rate)) for c in conversations]
            try:
                await asyncio.sleep(args.settle_s)
                for i in range(args.rounds):
                    mode = "warm" if i % 2 == 0 else "cold"
                    active, spare = await until(
                        lambda: asyncio.to_thread(sessions_processes, runner.pid, port),
                        lambda pids: all(pids),
                        60,
                        "the worker and its spare",
                    )
                    assert active is not None and spare is not None
                    baseline = await probe_fold(stub, probes, f"base-{i}", time.monotonic())
                    if mode == "cold":
                        os.kill(spare, signal.SIGKILL)
                    os.kill(active, signal.SIGKILL)
                    killed = time.monotonic()
                    load_avg = os.getloadavg()[0]
                    took = await probe_fold(stub, probes, f"probe-{i}", killed)
                    rows.append((mode, took, load_avg, baseline))
                    log(
                        f"round {i + 1}/{args.rounds} {mode}: kill -> folded on every partition {took:.2f}s "
                        f"(no kill just before: {baseline:.2f}s; load {load_avg:.1f})"
                    )
                    await asyncio.sleep(args.settle_s)
            finally:
                load.stopping = True
                await asyncio.gather(*senders)
            # Correctness: every conversation's last acknowledged message is folded.
            for cid, sent in load.acked.items():
                if sent:
                    await until(
                        lambda c=cid, m=sent[-1]: last_ids(stub, c),
                        lambda ids, m=sent[-1]: m in ids,
                        120,
                        f"{cid} folded",
                    )
        took_over = len(re.findall(r"sessions: its warm spare \(pid \d+\) took over", output()))
        cold_starts = output().count("sessions exited") - took_over
        acked = sum(len(v) for v in load.acked.values())
        lines = [
            "| round | mode | kill -9 -> probes folded on every partition | the same, no kill (just before) | load average (1 min) at the kill |",
            "|---|---|---|---|---|",
            *(
                f"| {i + 1} | {mode} | {took:.2f} s | {base:.2f} s | {la:.1f} |"
                for i, (mode, took, la, base) in enumerate(rows)
            ),
            "",
        ]
        for mode in ("warm", "cold"):
            times = [t for m, t, _, _ in rows if m == mode]
            if times:
                lines.append(
                    f"- {mode}: median {statistics.median(times):.2f} s, worst {max(times):.2f} s over {len(times)} kills"
                )
        warm = [t for m, t, _, _ in rows if m == "warm"]
        cold = [t for m, t, _, _ in rows if m == "cold"]
        if warm and cold:
            lines.append(f"- cold / warm (medians): {statistics.median(cold) / statistics.median(warm):.1f}×")
        lines.append(
            f"- no kill (baseline, every round): median {statistics.median(r[3] for r in rows):.2f} s"
        )
        lines.append(
            f"- load: {args.rate:.0f} msg/s offered by {args.senders} sequential senders, {acked} messages acked, ack p50 "
            f"{statistics.median(load.ack_s) * 1000:.0f} ms; the runner's output: {took_over} take-overs by the spare, "
            f"{cold_starts} cold starts; unexpected errors: {len(load.unexpected)}"
        )
        lines.append("- correctness: every conversation's last acknowledged message folded: yes")
        return "\n".join(lines)
    finally:
        if runner.poll() is None:
            runner.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(runner.wait, 90)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(runner.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await stack.down(bench.settings)
        if args.keep_data:
            log(f"data kept in {bench.data_dir}")
        else:
            shutil.rmtree(bench.data_dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--senders", type=int, default=40)
    parser.add_argument("--rate", type=float, default=300.0, help="messages per second, over all senders")
    parser.add_argument("--settle-s", type=float, default=8.0)
    parser.add_argument("--port-offset", type=int, default=0)
    parser.add_argument("--keep-data", action="store_true")
    args = parser.parse_args()
    print(asyncio.run(main_async(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
