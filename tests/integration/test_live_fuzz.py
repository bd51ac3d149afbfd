"""Issue 9 §5, live: ≥ 10,000 hostile gRPC requests against the running ingress and ≥ 1,000
malformed HTTP requests against the analyst endpoint, with good traffic beside them.

The generator is tests/fuzz_wire.py (benchmarks/fuzz.py runs it at a larger scale). Seeded:
SWITCHBOARD_FUZZ_SEED=<n> replays a run; every failure message names the seed.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import random
import zlib

import grpc
import lz4.frame
import pytest
import zstandard
from switchboard.v1 import chat_pb2, chat_pb2_grpc

from tests import fuzz_wire as fw
from tests.conftest import System, eventually

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("SWITCHBOARD_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
WARMUP = 2_000
HOSTILE = 10_000
CONCURRENCY = 50
CHANNELS = 4
GOOD_CONVERSATIONS = 20
GOOD_PER_CONVERSATION = 30
# Growth of the ingress's resident memory (supervisor + its 2 server processes) between the end
# of the 2k warm-up round and the end of the 10k round. Measured: +4 to +10 MiB in four runs
# (allocator arenas, grpc's buffers, the registry of started conversations), so 64 MiB leaves
# room for a loaded machine; a leak of what each hostile call holds (a stream slot, a claim, a
# task, a 5 MiB frame) grows with the 10k calls well past it.
RSS_GROWTH_MIB = 64


async def test_the_ingress_survives_ten_thousand_hostile_requests(system: System, tenant: str) -> None:
    address = system.settings.grpc_listen
    ingress = system.children["ingress"]
    assert ingress.proc is not None
    channels = [grpc.aio.insecure_channel(address) for _ in range(CHANNELS)]
    try:
        stubs = [chat_pb2_grpc.ChatServiceStub(c) for c in channels]
        victims = await fw.start_conversations(stubs[0], tenant, 30)
        good = fw.GoodTraffic(
            tenant, await fw.start_conversations(stubs[1], tenant, GOOD_CONVERSATIONS), GOOD_PER_CONVERSATION
        )
        hostile = fw.HostileRequests(SEED, fw.Targets(tenant, victims))
        run = fw.FuzzRun(channels, CONCURRENCY)
        pids = fw.tree_pids(ingress.proc.pid)
        log_start = fw.log_size(ingress.log_path)

        warmup = await run.run(hostile.cases(WARMUP))
        rss_before = fw.tree_rss(ingress.proc.pid)
        writing = asyncio.ensure_future(good.write(stubs, SEED, pace_s=0.3))
        report = await run.run(hostile.cases(HOSTILE))
        await writing
        rss_after = fw.tree_rss(ingress.proc.pid)

        where = f"(seed {SEED}: SWITCHBOARD_FUZZ_SEED={SEED} replays it)"
        summary = (
            f"{report.sent} hostile calls in {report.elapsed_s:.1f} s, codes {dict(report.codes)}, "
            f"per-message codes {dict(report.item_codes)}; INTERNAL for frames that are not protobuf "
            f"{report.internal_for_not_protobuf}, statuses the client lost {report.client_lost_status}; RSS {rss_before / 2**20:.0f} -> "
            f"{rss_after / 2**20:.0f} MiB {where}"
        )
        print(summary)
        assert not warmup.violations, f"warm-up: {warmup.violations[:10]} {where}"
        assert not report.violations, (
            f"{len(report.violations)} bad replies: {report.violations[:10]} {where}"
        )
        assert report.sent >= HOSTILE, summary
        # No process crashed (the supervisor would have restarted it under a new pid).
        assert ingress.alive and fw.tree_pids(ingress.proc.pid) == pids, f"an ingress process died {where}"
        assert await fw.serving(address) == "SERVING,SERVING"
        # Every INTERNAL the ingress answers is logged with its incident id: none, also where
        # the client could not see the status (report.client_lost_status).
        assert not fw.log_problems(ingress.log_path, log_start), fw.log_problems(ingress.log_path, log_start)[
            :5
        ]
        assert rss_after - rss_before < RSS_GROWTH_MIB * 2**20, summary

        # The floods released their live-stream slots: a new follower still gets its first update.
        assert await fw.stream_still_opens(stubs[2], tenant, good.conversations[0]) == "yes"
        problems = await good.check(stubs[0])
        assert not problems, f"good traffic: {problems[:5]} {where}"
        assert good.total == GOOD_CONVERSATIONS * GOOD_PER_CONVERSATION
    finally:
        for channel in channels:
            await channel.close()


HTTP_CASES = 1_000
# Connections the endpoint may still hold once every client hung up (idle keep-alives being
# reaped); a leak would keep one per slowloris or garbage connection, hundreds.
HTTP_LINGERING = 10


async def test_the_analyst_endpoint_answers_malformed_http_with_4xx(system: System) -> None:
    host, port = system.settings.analytics_listen.rsplit(":", 1)
    analytics = system.children["analytics"]
    assert analytics.proc is not None
    log_start = fw.log_size(analytics.log_path)
    cases = fw.HostileHttp(SEED, f"{host}:{port}").cases(HTTP_CASES)
    report = await fw.http_fuzz(host, int(port), cases, concurrency=25)
    where = f"(seed {SEED})"
    print(
        f"{report.sent} HTTP requests: {dict(report.statuses)}; engine errors as 5xx {dict(report.engine_5xx)}"
    )
    assert report.sent == HTTP_CASES
    assert not report.violations, f"{len(report.violations)}: {report.violations[:8]} {where}"
    assert analytics.alive
    failures = fw.log_problems(analytics.log_path, log_start, fw.ENDPOINT_FAILURES)
    assert not failures, failures[:5]
    await eventually(
        lambda: asyncio.to_thread(fw.established, analytics.proc.pid, int(port)),  # type: ignore[union-attr]
        lambda n: n <= HTTP_LINGERING,
        within_s=30,
        what="the endpoint to let go of the fuzzer's connections",
    )
    rows = await asyncio.to_thread(lambda: system.clickhouse().query("SELECT 1 + 1").result_rows)
    assert rows == [(2,)]


# --- bugs the fuzzer found, each pinned by a focused test ----------------------------------------


async def test_a_cursor_past_the_largest_stream_id_is_invalid_argument(
    stub: chat_pb2_grpc.ChatServiceStub, tenant: str
) -> None:
    # Found by the fuzzer: Redis refuses a stream id past 2^64-1 ("Invalid stream ID"), which
    # the ingress answered as INTERNAL; it is the caller's malformed cursor.
    (conversation,) = await fw.start_conversations(stub, tenant, 1)
    for cursor in ("99999999999999999999-0", "1-99999999999999999999", "18446744073709551616-0"):
        call = stub.StreamConversation(
            chat_pb2.StreamConversationRequest(
                tenant_id=tenant, conversation_id=conversation, after_cursor=cursor
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in call:
                pass
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (cursor, refused.value.details())
        assert "cursor" in (refused.value.details() or "")


def _endpoint(system: System) -> tuple[str, int]:
    host, port = system.settings.analytics_listen.rsplit(":", 1)
    return host, int(port)


async def test_compressed_bodies_are_decoded_once_and_undecodable_ones_are_400(system: System) -> None:
    # Found by the fuzzer: aiohttp decoded gzip, deflate and zstd bodies itself before the
    # endpoint decoded them again (a good gzip or zstd body was refused as "bad gzip body"),
    # and a body it could not decode, or a bad zstd or lz4 one, was a 500 with a traceback.
    host, port = _endpoint(system)
    sql = b"SELECT 40 + 2"
    good = {
        "gzip": gzip.compress(sql),
        "deflate": zlib.compress(sql),
        "zstd": zstandard.compress(sql),
        "lz4": lz4.frame.compress(sql),
    }
    for encoding, body in good.items():
        status, _, answer = await fw.http_exchange(
            host, port, fw.http_post(f"{host}:{port}", body, [("Content-Encoding", encoding.encode())])
        )
        assert (status, answer) == ("200", b"42\n"), (encoding, status, answer)
    bad = {
        "gzip": b"not gzip at all",
        "deflate": sql,
        "zstd": b"\x28\xb5\x2f\xfd" + b"\x00junk" * 8,
        "lz4": b"\x04\x22\x4d\x18" + b"\x00junk" * 8,
    }
    for encoding, body in bad.items():
        status, _, answer = await fw.http_exchange(
            host, port, fw.http_post(f"{host}:{port}", body, [("Content-Encoding", encoding.encode())])
        )
        assert status == "400" and answer.startswith(b"Code: 36."), (encoding, status, answer)


async def test_a_query_that_is_not_utf8_gets_the_engines_own_error(system: System) -> None:
    # Found by the fuzzer: chdb could not decode its own error message (it quotes the query's
    # bytes), and the endpoint answered 500 "'utf-8' codec can't decode byte" instead of
    # ClickHouse's SYNTAX_ERROR.
    host, port = _endpoint(system)
    status, _, answer = await fw.http_exchange(
        host, port, fw.http_post(f"{host}:{port}", b"SELECT \xd6\x14$\xba\x1d\xf3G")
    )
    assert status == "400" and answer.startswith(b"Code: 62."), (status, answer)


async def test_a_query_id_with_a_line_break_is_refused_not_dropped(system: System) -> None:
    # Found by the fuzzer: the query id is echoed in X-ClickHouse-Query-Id, and one with CR LF
    # made aiohttp drop the connection with no answer (header injection refused, traceback logged).
    host, port = _endpoint(system)
    target = b"/?query=SELECT+1&query_id=a%0D%0AX-Injected:%201"
    status, head, answer = await fw.http_exchange(
        host, port, fw.http_post(f"{host}:{port}", b"", target=target)
    )
    assert status == "400" and answer.startswith(b"Code: 36."), (status, head, answer)
    assert b"X-Injected" not in head


async def test_a_client_that_hangs_up_mid_body_is_not_logged_as_an_endpoint_failure(system: System) -> None:
    # Found by the fuzzer: the body read raised ConnectionResetError, which the endpoint logged
    # as its own failure ("query endpoint failed" and a traceback) once per such client.
    host, port = _endpoint(system)
    analytics = system.children["analytics"]
    assert analytics.proc is not None
    log_start = fw.log_size(analytics.log_path)
    partial = fw.http_post(f"{host}:{port}", b"SELECT 1")[:-6]  # headers, and 2 of the 8 body bytes
    for _ in range(5):
        _, writer = await asyncio.open_connection(host, port)
        writer.write(partial)
        await writer.drain()
        writer.close()
    await eventually(
        lambda: asyncio.to_thread(fw.established, analytics.proc.pid, port),  # type: ignore[union-attr]
        lambda n: n <= HTTP_LINGERING,
        what="the endpoint to see the connections closed",
    )
    status, _, answer = await fw.http_exchange(host, port, fw.http_post(f"{host}:{port}", b"SELECT 1"))
    assert (status, answer) == ("200", b"1\n")
    failures = fw.log_problems(analytics.log_path, log_start, fw.ENDPOINT_FAILURES)
    assert not failures, failures


FRAMING_CASES = 600


async def test_broken_grpc_framing_gets_grpc_statuses_and_harms_nothing(system: System, tenant: str) -> None:
    # Below the payload: calls written by hand over HTTP/2 with a compressed flag and no (or a
    # bad) encoding, lengths past the end or of 4 GiB, a cut prefix, two messages to a unary
    # method, none at all, bad grpc-timeout, content-type or :method. gRPC answers these itself
    # (INTERNAL is its convention for a frame it cannot read); none may hang, be UNKNOWN, or
    # reach the ingress's own INTERNAL path, and the ingress goes on serving.
    host, port = system.settings.grpc_listen.rsplit(":", 1)
    ingress = system.children["ingress"]
    assert ingress.proc is not None
    pids = fw.tree_pids(ingress.proc.pid)
    log_start = fw.log_size(ingress.log_path)
    report = await fw.framing_fuzz(host, int(port), fw.MalformedFraming(SEED, tenant).cases(FRAMING_CASES))
    print(f"{report.sent} broken gRPC calls: {sorted(report.outcomes.items())}")
    assert report.sent == FRAMING_CASES
    assert not report.violations, f"{report.violations[:8]} (seed {SEED})"
    assert ingress.alive and fw.tree_pids(ingress.proc.pid) == pids
    assert not fw.log_problems(ingress.log_path, log_start)
    assert await fw.serving(system.settings.grpc_listen) == "SERVING,SERVING"
