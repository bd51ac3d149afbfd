"""The ingress through grpcurl, the tool an operator reaches for first: reflection (list,
describe), JSON calls with an API key in `-H authorization: Bearer …`, and grpcurl's own rendering
(proto field names, as grpcurl prints them) of our refusals (code and message) for garbage and hostile input.

grpcurl (github.com/fullstorydev/grpcurl, pinned below) is built once with `go install` from the
Go module proxy and cached under var/tools/; the test needs `go` on PATH, as test_go_driver does.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.settings import PROJECT_ROOT
from tests.integration.conftest import System, eventually
from tests.integration.test_auth import Replicas, issue, keyed_replicas

pytestmark = pytest.mark.integration

GRPCURL = "github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.4"
PORT = 25086 + int(os.environ.get("SWITCHBOARD_TEST_PORT_OFFSET", "0"))


@pytest.fixture(scope="module")
def grpcurl() -> Path:
    go = shutil.which("go")
    assert go, "Go is needed to build grpcurl (as for test_go_driver): install Go 1.22+"
    gobin = PROJECT_ROOT / "var" / "tools" / GRPCURL.rsplit("@", 1)[1]
    binary = gobin / "grpcurl"
    if not binary.exists():
        gobin.mkdir(parents=True, exist_ok=True)
        built = subprocess.run(
            [go, "install", GRPCURL],
            env={**os.environ, "GOBIN": str(gobin), "GOFLAGS": "-mod=mod"},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert built.returncode == 0, f"go install {GRPCURL} failed:\n{built.stderr[-3000:]}"
    return binary


@pytest.fixture(scope="module")
async def keyed(system: System) -> AsyncIterator[Replicas]:
    async with keyed_replicas(system, "grpcurl", (PORT,)) as started:
        yield started


@pytest.fixture(scope="module")
async def tenant_key(keyed: Replicas) -> tuple[str, str]:
    """A tenant and a key with every role its backends use (as `make run`'s demo key has)."""
    tenant = f"gc{uuid.uuid4().hex[:8]}"
    return tenant, await issue(keyed, tenant, "customer-app", "agent", "knowledge-admin")


def run(
    binary: Path,
    target: str,
    *args: str,
    key: str = "",
    data: object = None,
    stdin: str | None = None,
    max_time: float = 30,
) -> subprocess.CompletedProcess[str]:
    """grpcurl with `data` as its -d JSON, or `stdin` read as a stream of JSON requests (-d @)."""
    argv = [str(binary), "-plaintext", "-max-time", str(max_time)]
    if key:
        argv += ["-H", f"authorization: Bearer {key}"]
    if data is not None:
        argv += ["-d", json.dumps(data)]
    elif stdin is not None:
        argv += ["-d", "@"]
    return subprocess.run([*argv, target, *args], input=stdin, capture_output=True, text=True, timeout=60)


async def test_grpcurl_lists_describes_and_calls_with_a_key(
    grpcurl: Path, keyed: Replicas, tenant_key: tuple[str, str]
) -> None:
    target = keyed.listens[0]
    tenant, key = tenant_key

    listed = run(grpcurl, target, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"switchboard.v1.ChatService", "grpc.health.v1.Health"} <= set(listed.stdout.split()), (
        listed.stdout
    )
    methods = run(grpcurl, target, "list", "switchboard.v1.ChatService")
    assert methods.returncode == 0, methods.stderr
    assert "switchboard.v1.ChatService.SendMessageBatch" in methods.stdout.split(), methods.stdout
    described = run(grpcurl, target, "describe", "switchboard.v1.ChatService.SendMessage")
    assert described.returncode == 0, described.stderr
    assert "SendMessageRequest" in described.stdout and "SendMessageResponse" in described.stdout
    health = run(grpcurl, target, "grpc.health.v1.Health/Check")
    assert health.returncode == 0 and '"SERVING"' in health.stdout, health.stdout + health.stderr

    # No key: refused, and grpcurl shows why.
    refused = run(
        grpcurl, target, "switchboard.v1.ChatService/StartConversation", data={"channel": "CHANNEL_WEB"}
    )
    assert refused.returncode != 0
    assert "Code: Unauthenticated" in refused.stderr, refused.stderr

    started = run(
        grpcurl,
        target,
        "switchboard.v1.ChatService/StartConversation",
        key=key,
        data={"channel": "CHANNEL_WEB", "customer_id": "c-grpcurl", "locale": "zh-CN"},
    )
    assert started.returncode == 0, started.stderr
    conversation = json.loads(started.stdout)
    assert conversation["tenant_id"] == tenant and conversation["status"] == "CONVERSATION_STATUS_OPEN"
    cid = conversation["conversation_id"]

    message = {"conversation_id": cid, "client_message_id": "m-1", "text": "我的包裹到哪里了？"}
    sent = run(grpcurl, target, "switchboard.v1.ChatService/SendMessage", key=key, data=message)
    assert sent.returncode == 0, sent.stderr
    ack = json.loads(sent.stdout)
    assert ack["event_id"] and not ack.get("duplicate", False)
    # The same call again (a retry): the same ack, marked a duplicate.
    again = run(grpcurl, target, "switchboard.v1.ChatService/SendMessage", key=key, data=message)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["event_id"] == ack["event_id"]
    assert json.loads(again.stdout)["duplicate"] is True

    # Several messages on one SendMessages stream, as grpcurl sends JSON objects from stdin: one
    # ack each, in order.
    stream = run(
        grpcurl,
        target,
        "switchboard.v1.ChatService/SendMessages",
        key=key,
        stdin="\n".join(
            json.dumps({"conversation_id": cid, "client_message_id": f"s-{n}", "text": f"stream {n}"})
            for n in range(3)
        ),
    )
    assert stream.returncode == 0, stream.stderr
    acks = [json.loads(chunk) for chunk in stream.stdout.replace("}\n{", "}\0{").split("\0")]
    assert len(acks) == 3 and all(a["event_id"] and not a.get("duplicate") for a in acks), stream.stdout

    # The conversation's updates as a server stream, until grpcurl's own deadline ends it.
    followed = run(
        grpcurl,
        target,
        "switchboard.v1.ChatService/StreamConversation",
        key=key,
        data={"conversation_id": cid},
        max_time=3,
    )
    assert "Code: DeadlineExceeded" in followed.stderr or followed.returncode == 0, followed.stderr
    for text in ("我的包裹到哪里了？", "stream 0", "stream 2"):
        assert text in followed.stdout, followed.stdout

    got = run(
        grpcurl, target, "switchboard.v1.ChatService/GetConversation", key=key, data={"conversation_id": cid}
    )
    assert got.returncode == 0, got.stderr
    texts = [
        m["text"] for m in json.loads(got.stdout).get("messages", []) if m["sender"] == "SENDER_CUSTOMER"
    ]
    assert texts == ["我的包裹到哪里了？", "stream 0", "stream 1", "stream 2"]


@pytest.mark.parametrize(
    ("method", "data", "code", "says"),
    [
        # Hostile ids: a path, a huge id, control characters.
        (
            "SendMessage",
            {"conversation_id": "../../etc/passwd", "client_message_id": "m", "text": "x"},
            "InvalidArgument",
            "conversation_id",
        ),
        ("GetConversation", {"conversation_id": "c" * 5000}, "InvalidArgument", "conversation_id"),
        (
            "StartConversation",
            {"channel": "CHANNEL_WEB", "customer_id": "a\u0000b"},
            "InvalidArgument",
            "customer_id",
        ),
        # Another tenant's data through this tenant's key.
        (
            "StartConversation",
            {"tenant_id": "someone-else", "channel": "CHANNEL_WEB"},
            "PermissionDenied",
            "tenant",
        ),
        # A conversation that does not exist.
        (
            "SendMessage",
            {
                "conversation_id": "01930000-0000-7000-8000-000000000000",
                "client_message_id": "m",
                "text": "x",
            },
            "NotFound",
            "01930000",
        ),
        # No text.
        (
            "SendMessage",
            {"conversation_id": "01930000-0000-7000-8000-000000000000", "client_message_id": "m"},
            "InvalidArgument",
            "text",
        ),
    ],
)
async def test_grpcurl_shows_a_clear_refusal_for_bad_input(
    grpcurl: Path,
    keyed: Replicas,
    tenant_key: tuple[str, str],
    method: str,
    data: dict[str, str],
    code: str,
    says: str,
) -> None:
    _, key = tenant_key
    done = run(grpcurl, keyed.listens[0], f"switchboard.v1.ChatService/{method}", key=key, data=data)
    assert done.returncode != 0, done.stdout
    assert f"Code: {code}" in done.stderr, done.stderr
    message = done.stderr.split("Message:", 1)[1]
    assert says in message, done.stderr


async def test_the_readmes_assistant_calls_work_with_the_key_alone(
    grpcurl: Path, keyed: Replicas, tenant_key: tuple[str, str]
) -> None:
    """The README's grpcurl lines for the assistant's APIs, with `-H authorization` and no
    tenant_id (the key's tenant), as a user of `make run` pastes them."""
    target = keyed.listens[0]
    _, key = tenant_key
    upserted = run(
        grpcurl,
        target,
        "switchboard.v1.KnowledgeService/UpsertDocuments",
        key=key,
        data={
            "documents": [
                {
                    "document_id": "refund-time",
                    "title": "Refund timeline",
                    "body": "Refunds reach your card within 3-5 business days after we receive the return.",
                    "tags": ["refund"],
                }
            ]
        },
    )
    assert upserted.returncode == 0, upserted.stderr

    async def search() -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            run,
            grpcurl,
            target,
            "switchboard.v1.KnowledgeService/SearchKnowledge",
            key=key,
            data={"query": "how long does a refund take", "limit": 3},
        )

    found = await eventually(
        search,
        lambda r: r.returncode == 0 and "refund-time" in r.stdout,
        within_s=60,
        what="the document found",
    )
    assert "refund-time" in found.stdout
    queue = run(grpcurl, target, "switchboard.v1.AgentService/ListQueue", key=key, data={})
    assert queue.returncode == 0, queue.stderr
