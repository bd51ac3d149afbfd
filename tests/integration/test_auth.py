"""API keys and tenancy on real servers: two ingress replicas of their own, beside the test system,
following a tenants topic of their own (the system's ingress stays keyless for the other tests);
keys are made with the `switchboard keys` CLI, as an operator would."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from switchboard.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    chat_pb2,
    chat_pb2_grpc,
    events_pb2,
    knowledge_pb2,
    knowledge_pb2_grpc,
)

from services.auth import bearer_interceptors
from services.processes import Child, wait_for_ingress
from services.settings import PROJECT_ROOT, Settings
from tests.integration.conftest import System, eventually

pytestmark = pytest.mark.integration

_OFFSET = int(os.environ.get("SWITCHBOARD_TEST_PORT_OFFSET", "0"))
# Ports of this module's own ingress replicas (beside the system's 25051 and the other tests').
REPLICA_PORTS = (25081 + _OFFSET, 25082 + _OFFSET)
REFUSED_PORT = 25083 + _OFFSET
TOKEN = re.compile(r"sbk_[0-9a-f]{12}_[A-Za-z0-9_\-]{43}")


async def create_topic(settings: Settings, name: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 1, 1, topic_configs={"cleanup.policy": "compact"})])
    finally:
        await admin.close()


def auth_env(system: System, topic: str) -> dict[str, str]:
    return {
        **system.env,
        "SWITCHBOARD_TENANTS_TOPIC": topic,
        # One process per replica, no metrics port of its own (the system's ingress has it).
        "SWITCHBOARD_INGRESS_PROCESSES": "1",
        "SWITCHBOARD_INGRESS_METRICS_LISTEN": "",
    }


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        env={**os.environ, **env},
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@dataclass
class Replicas:
    env: dict[str, str]
    listens: list[str]
    children: list[Child]

    def channel(self, i: int = 0, key: str | None = None) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(
            self.listens[i], interceptors=bearer_interceptors(key) if key else None
        )


@contextlib.asynccontextmanager
async def keyed_replicas(system: System, name: str, ports: tuple[int, ...]) -> AsyncIterator[Replicas]:
    """Ingress replicas of their own on `ports`, following a tenants topic of their own."""
    topic = f"tenants-{name}-{uuid.uuid4().hex[:8]}"
    await create_topic(system.settings, topic)
    env = auth_env(system, topic)
    listens = [f"127.0.0.1:{port}" for port in ports]
    logs = Path(system.env["SWITCHBOARD_DATA_DIR"]) / "logs"
    children = [
        Child(
            f"{name}-ingress-{i}",
            ["ingress"],
            logs / f"{name}-ingress-{i}.log",
            {**env, "SWITCHBOARD_GRPC_LISTEN": ln},
        )
        for i, ln in enumerate(listens)
    ]
    for child in children:
        child.start()
    try:
        for child, listen in zip(children, listens, strict=True):
            await wait_for_ingress(Settings(**{**system.settings.model_dump(), "grpc_listen": listen}), child)
        yield Replicas(env, listens, children)
    finally:
        for child in children:
            child.stop()


@pytest.fixture(scope="module")
async def replicas(system: System) -> AsyncIterator[Replicas]:
    async with keyed_replicas(system, "auth", REPLICA_PORTS) as started:
        yield started


def start_request(tenant: str = "") -> chat_pb2.StartConversationRequest:
    return chat_pb2.StartConversationRequest(
        tenant_id=tenant, channel=events_pb2.CHANNEL_WEB, customer_id="c1"
    )


async def code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def start_code(replicas: Replicas, i: int, key: str | None, tenant: str = "") -> grpc.StatusCode:
    async with replicas.channel(i, key) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        return await code_of(stub.StartConversation(start_request(tenant), timeout=10))


async def start_status(replicas: Replicas, i: int, key: str) -> tuple[grpc.StatusCode, str]:
    """Code and details, so a failure says which refusal it was (CI once saw PERMISSION_DENIED
    for a key just issued, in a full run only)."""
    async with replicas.channel(i, key) as channel:
        try:
            await chat_pb2_grpc.ChatServiceStub(channel).StartConversation(start_request(), timeout=10)
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


async def issue(replicas: Replicas, tenant: str, *roles: str) -> str:
    """A key made with the CLI, once every replica knows it (within 2 s, as revocations)."""
    role_args = [a for r in roles for a in ("--role", r)]
    done = await asyncio.to_thread(cli, replicas.env, "keys", "issue", "--tenant", tenant, *role_args)
    assert done.returncode == 0, done.stderr
    # Scripts capture the secret: it is alone on stdout.
    key = done.stdout.strip()
    assert TOKEN.fullmatch(key), done.stdout
    for i in range(len(replicas.listens)):
        await eventually(
            lambda i=i: start_code(replicas, i, key),  # type: ignore[misc]
            lambda c: c is not grpc.StatusCode.UNAUTHENTICATED,
            # Not the measured bound (see the revocation test): a helper, on a loaded machine.
            within_s=10,
            what=f"replica {i} to know the new key",
        )
    return key


async def test_open_on_loopback_until_the_first_key_then_keys_are_required(
    replicas: Replicas, tenant: str
) -> None:
    # Module order: this runs first, on a tenants topic with no key yet.
    for i in range(2):
        assert await start_code(replicas, i, None, tenant) is grpc.StatusCode.OK
    assert "NO API KEYS EXIST" in replicas.children[0].log_tail(400)

    key = await issue(replicas, tenant)
    for i in range(2):
        await eventually(
            lambda i=i: start_code(replicas, i, None, tenant),  # type: ignore[misc]
            lambda c: c is grpc.StatusCode.UNAUTHENTICATED,
            within_s=5,
            what=f"replica {i} to require keys",
        )
        assert await start_code(replicas, i, key) is grpc.StatusCode.OK
    # The pepper the CLI made is the operator's only: mode 0600.
    pepper = Path(replicas.env["SWITCHBOARD_DATA_DIR"]) / "secrets" / "auth-pepper"
    assert stat.S_IMODE(pepper.stat().st_mode) == 0o600


async def test_the_key_is_the_tenant(replicas: Replicas, tenant: str) -> None:
    key = await issue(replicas, tenant)
    other = f"{tenant}x"
    async with replicas.channel(0, key) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        # An empty tenant_id is the key's tenant.
        conv = await stub.StartConversation(start_request(""))
        assert conv.tenant_id == tenant
        ack = await stub.SendMessage(
            chat_pb2.SendMessageRequest(
                conversation_id=conv.conversation_id, client_message_id="m1", text="hi"
            )
        )
        assert ack.offset >= 0
        same = chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=conv.conversation_id)
        assert (await stub.GetConversation(same)).conversation_id == conv.conversation_id

        # Naming another tenant is PERMISSION_DENIED, on every kind of call.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.StartConversation(start_request(other))
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert tenant in (refused.value.details() or "")
        foreign = chat_pb2.GetConversationRequest(tenant_id=other, conversation_id=conv.conversation_id)
        assert await code_of(stub.GetConversation(foreign)) is grpc.StatusCode.PERMISSION_DENIED
        follow = stub.StreamConversation(
            chat_pb2.StreamConversationRequest(tenant_id=other, conversation_id=conv.conversation_id)
        )
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            async for _ in follow:
                pass
        assert streamed.value.code() is grpc.StatusCode.PERMISSION_DENIED

        # A stream answers what came before a foreign tenant, then ends with PERMISSION_DENIED.
        def msg(t: str, cmid: str) -> chat_pb2.SendMessageRequest:
            return chat_pb2.SendMessageRequest(
                tenant_id=t, conversation_id=conv.conversation_id, client_message_id=cmid, text="hey"
            )

        call = stub.SendMessages(iter([msg("", "s1"), msg(tenant, "s2"), msg(other, "s3")]))
        answers = []
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for answer in call:
                answers.append(answer)
        assert ended.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert [a.client_message_id for a in answers] == ["s1", "s2"]
        assert all(not a.error_code for a in answers)

        # A batch names a tenant per message: each must be the key's (or empty).
        batch = chat_pb2.SendMessageBatchRequest(messages=[msg("", "b1"), msg(other, "b2")])
        assert await code_of(stub.SendMessageBatch(batch)) is grpc.StatusCode.PERMISSION_DENIED
        batch = chat_pb2.SendMessageBatchRequest(messages=[msg("", "b1"), msg(tenant, "b2")])
        results = (await stub.SendMessageBatch(batch)).results
        assert [(r.client_message_id, r.error_code) for r in results] == [("b1", 0), ("b2", 0)]

    # The key's tenant sees its own conversation; the other tenant (keyed too) does not.
    other_key = await issue(replicas, other)
    async with replicas.channel(1, other_key) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        theirs = chat_pb2.GetConversationRequest(conversation_id=conv.conversation_id)
        assert await code_of(stub.GetConversation(theirs)) is grpc.StatusCode.NOT_FOUND


async def test_unknown_keys_are_unauthenticated_and_health_and_reflection_stay_open(
    replicas: Replicas, tenant: str
) -> None:
    key = await issue(replicas, tenant)
    key_id = key.split("_")[1]
    for bad in ("nonsense", f"sbk_{key_id}_{'A' * 43}", f"sbk_{'0' * 12}_{'A' * 43}"):
        assert await start_code(replicas, 0, bad) is grpc.StatusCode.UNAUTHENTICATED
    async with replicas.channel(0) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        async for reply in reflect:
            names = {s.name for s in reply.list_services_response.service}
            assert "switchboard.v1.ChatService" in names
            break


async def test_roles_decide_the_services(replicas: Replicas, tenant: str) -> None:
    app = await issue(replicas, tenant)
    admin = await issue(replicas, tenant, "knowledge-admin")
    agent = await issue(replicas, tenant, "agent")

    async def list_documents(key: str) -> grpc.StatusCode:
        async with replicas.channel(0, key) as channel:
            stub = knowledge_pb2_grpc.KnowledgeServiceStub(channel)
            return await code_of(stub.ListDocuments(knowledge_pb2.ListDocumentsRequest(), timeout=10))

    async def list_queue(key: str) -> grpc.StatusCode:
        async with replicas.channel(0, key) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            return await code_of(stub.ListQueue(agent_pb2.ListQueueRequest(), timeout=10))

    assert await list_documents(app) is grpc.StatusCode.PERMISSION_DENIED
    assert await list_documents(admin) is grpc.StatusCode.OK
    assert await list_queue(app) is grpc.StatusCode.PERMISSION_DENIED
    assert await list_queue(agent) is grpc.StatusCode.OK
    assert await start_code(replicas, 0, admin) is grpc.StatusCode.PERMISSION_DENIED
    assert await start_code(replicas, 0, app) is grpc.StatusCode.OK


async def test_a_revocation_reaches_every_replica_within_two_seconds(replicas: Replicas, tenant: str) -> None:
    key = await issue(replicas, tenant)
    for i in range(2):
        # Issued keys arrive as fast as revocations do.
        await eventually(
            lambda i=i: start_status(replicas, i, key),  # type: ignore[misc]
            lambda status: status[0] is grpc.StatusCode.OK,
            within_s=2,
            what="the new key",
        )
    done = await asyncio.to_thread(cli, replicas.env, "keys", "revoke", key.split("_")[1])
    assert done.returncode == 0, done.stderr
    revoked_at = time.monotonic()
    for i in range(2):
        await eventually(
            lambda i=i: start_code(replicas, i, key),  # type: ignore[misc]
            lambda c: c is grpc.StatusCode.UNAUTHENTICATED,
            within_s=2 - (time.monotonic() - revoked_at),
            what=f"replica {i} to refuse the revoked key",
        )
    assert time.monotonic() - revoked_at < 2.0


async def test_rotation_keeps_the_old_key_for_the_overlap(replicas: Replicas, tenant: str) -> None:
    old = await issue(replicas, tenant)
    done = await asyncio.to_thread(
        cli, replicas.env, "keys", "rotate", f"sbk_{old.split('_')[1]}", "--overlap", "4"
    )
    assert done.returncode == 0, done.stderr
    new = done.stdout.strip()
    assert TOKEN.fullmatch(new) and new != old
    rotated_at = time.monotonic()
    await eventually(
        lambda: start_code(replicas, 1, new),
        lambda c: c is grpc.StatusCode.OK,
        within_s=2,
        what="the successor",
    )
    assert await start_code(replicas, 1, old) is grpc.StatusCode.OK
    assert time.monotonic() - rotated_at < 4  # still in the overlap window when checked
    await eventually(
        lambda: start_code(replicas, 1, old),
        lambda c: c is grpc.StatusCode.UNAUTHENTICATED,
        within_s=10,
        what="the old key to expire",
    )
    assert await start_code(replicas, 1, new) is grpc.StatusCode.OK


async def test_a_disabled_tenant_is_refused_until_enabled(replicas: Replicas, tenant: str) -> None:
    key = await issue(replicas, tenant)
    assert (await asyncio.to_thread(cli, replicas.env, "tenants", "disable", tenant)).returncode == 0
    await eventually(
        lambda: start_code(replicas, 0, key),
        lambda c: c is grpc.StatusCode.PERMISSION_DENIED,
        within_s=2,
        what="the disabled tenant refused",
    )
    refused = await asyncio.to_thread(cli, replicas.env, "keys", "issue", "--tenant", tenant)
    assert refused.returncode == 1 and "disabled" in refused.stderr and not refused.stdout
    assert (await asyncio.to_thread(cli, replicas.env, "tenants", "enable", tenant)).returncode == 0
    await eventually(
        lambda: start_code(replicas, 0, key), lambda c: c is grpc.StatusCode.OK, within_s=2, what="enabled"
    )


async def test_lists_show_keys_and_tenants_never_secrets(replicas: Replicas, tenant: str) -> None:
    key = await issue(replicas, tenant, "agent", "customer-app")
    listed = await asyncio.to_thread(cli, replicas.env, "keys", "list", "--tenant", tenant, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["key_id"], r["roles"], r["status"]) for r in rows] == [
        (key.split("_")[1], ["agent", "customer-app"], "active")
    ]
    assert key.split("_", 2)[2] not in listed.stdout and "secret_hash" not in listed.stdout
    table = await asyncio.to_thread(cli, replicas.env, "tenants", "list")
    assert re.search(rf"^{tenant}\s+active\s+1\s", table.stdout, re.M), table.stdout


def test_a_public_address_without_keys_refuses_to_start(system: System) -> None:
    topic = f"tenants-{uuid.uuid4().hex[:8]}"
    asyncio.run(create_topic(system.settings, topic))
    env = {**auth_env(system, topic), "SWITCHBOARD_GRPC_LISTEN": f"0.0.0.0:{REFUSED_PORT}"}
    started = time.monotonic()
    done = cli(env, "ingress")
    assert done.returncode != 0
    assert "refusing to listen on 0.0.0.0" in done.stderr + done.stdout
    assert time.monotonic() - started < 60


async def test_make_runs_demo_key_drives_the_demo_and_stays_the_same_across_runs(
    system: System, replicas: Replicas, tenant: str
) -> None:
    """A client that copied the demo key from one `make run` keeps working after `make run`
    again over the same data (seen in a rehearsal of a kill -9 of `switchboard run`: every call
    of the load client was refused "API key … is revoked" after the restart, because each run
    replaced the key). Revoked, it is replaced by a new one on the next run."""
    from services.auth import issue_demo_key
    from services.auth._admin import revoke_key
    from services.demo import play_demo

    settings = system.settings.model_copy(
        update={
            "tenants_topic": replicas.env["SWITCHBOARD_TENANTS_TOPIC"],
            "grpc_listen": replicas.listens[0],
            "demo_tenant": tenant,
        }
    )
    first = await asyncio.to_thread(issue_demo_key, settings)
    again = await asyncio.to_thread(issue_demo_key, settings)  # the next run
    assert again == first
    keyed = settings.model_copy(update={"api_key": first})
    # (`make run` issues the key before it starts the ingress, which reads the topic whole first.)
    await eventually(
        lambda: start_code(replicas, 0, first),
        lambda c: c is not grpc.StatusCode.UNAUTHENTICATED,
        within_s=2,
        what="the replica to know the demo key",
    )
    result = await play_demo(keyed, tenant)
    assert result.tenant_id == tenant and len(result.conversation_ids) == 4
    # Revoked (by an operator), the next run issues a new one, and the old one stays refused.
    await revoke_key(settings, first)
    second = await asyncio.to_thread(issue_demo_key, settings)
    assert second != first
    await eventually(
        lambda: start_code(replicas, 0, second),
        lambda c: c is not grpc.StatusCode.UNAUTHENTICATED,
        within_s=2,
        what="the replica to know the new demo key",
    )
    await eventually(
        lambda: start_code(replicas, 0, first),
        lambda c: c is grpc.StatusCode.UNAUTHENTICATED,
        within_s=2,
        what="the revoked demo key refused",
    )
    # A key given in the environment is used as it is.
    assert issue_demo_key(keyed) == first
