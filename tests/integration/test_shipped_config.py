"""The deployment files in infra/ are secure as shipped, and their settings actually start.

Each shipped environment (the Dockerfile's ENV, docker-compose's Switchboard environment, the
Kubernetes ConfigMap + Secret + ingress env) is parsed, its secrets filled in as a deployer must,
its servers' addresses pointed at the test stack and every listen address moved to 127.0.0.1;
then `switchboard ingress` (and, for the image, `switchboard analytics`) is started with it.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from switchboard.v1 import chat_pb2, chat_pb2_grpc

from services.analytics._process import AnalyticsError, listen_address
from services.auth import ingress_channel, listen_refusal
from services.kafka_topics import ensure_topics
from services.processes import Child, wait_for_analytics, wait_for_ingress
from services.settings import PROJECT_ROOT, Settings
from tests.integration.conftest import TEST_ENV, System
from tests.integration.test_tls import make_ca, make_leaf

pytestmark = pytest.mark.integration

INFRA = PROJECT_ROOT / "infra"
# What a deployer puts in infra/.env or secrets.env: the files themselves carry none of it.
SECRETS = {
    "SWITCHBOARD_S3_ACCESS_KEY": "deployer-access",
    "SWITCHBOARD_S3_SECRET_KEY": "deployer-secret",
    "CLICKHOUSE_PASSWORD": "deployer-clickhouse",
    "GRAFANA_ADMIN_PASSWORD": "deployer-grafana",
    "SWITCHBOARD_AUTH_PEPPER": "deployer-pepper",
}
_SECRET_NAMES = ("KEY", "PASSWORD", "PEPPER", "SECRET", "DSN", "REDIS_URL")
_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}")


def compose_interpolate(text: str, given: dict[str, str]) -> str:
    """Docker compose's ${VAR}, ${VAR:-default} and ${VAR:?error} (an unset required one raises)."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        if given.get(name):
            return given[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == ":-" else ""

    return _VAR.sub(one, text.replace("$$", "\0")).replace("\0", "$")


def dockerfile_env() -> dict[str, str]:
    text = (INFRA / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    return {k: v for k, v in env.items() if k.startswith("SWITCHBOARD_")}


def compose_env(given: dict[str, str]) -> dict[str, str]:
    raw = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    ingress = raw["services"]["ingress"]
    merged = {**raw["x-switchboard"]["environment"], **(ingress.get("environment") or {})}
    return {k: compose_interpolate(str(v), given) for k, v in merged.items()}


def k8s_env(given: dict[str, str]) -> dict[str, str]:
    config = yaml.safe_load((INFRA / "k8s" / "configmap.yaml").read_text())["data"]
    secrets = {}
    for line in (INFRA / "k8s" / "secrets.env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            secrets[name] = given.get(name, value)
    docs = list(yaml.safe_load_all((INFRA / "k8s" / "ingress.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    return {**config, **secrets, **env}


def test_no_secret_has_a_default_in_the_shipped_files() -> None:
    assert not [k for k in dockerfile_env() if any(s in k for s in _SECRET_NAMES)]
    # compose refuses to start while any secret is unset.
    text = (INFRA / "docker-compose.yml").read_text()
    for name in SECRETS:
        with pytest.raises(KeyError, match=name):
            compose_interpolate(text, {k: v for k, v in SECRETS.items() if k != name})
    whole = compose_interpolate(text, SECRETS)
    grafana = yaml.safe_load(whole)["services"]["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == SECRETS["GRAFANA_ADMIN_PASSWORD"]
    assert "CLICKHOUSE_SKIP_USER_SETUP" not in yaml.safe_load(whole)["services"]["clickhouse"]["environment"]
    # Kubernetes: no Secret manifest with placeholders; the example leaves every value empty.
    kustomization = yaml.safe_load((INFRA / "k8s" / "kustomization.yaml").read_text())
    assert not any("secret" in r for r in kustomization["resources"])
    tls_paths = {"SWITCHBOARD_GRPC_TLS_CERT", "SWITCHBOARD_GRPC_TLS_KEY"}
    assert all(
        not v for k, v in k8s_env({}).items() if any(s in k for s in _SECRET_NAMES) and k not in tls_paths
    )


@pytest.mark.parametrize("source", ["dockerfile", "compose", "k8s"])
def test_shipped_listen_addresses_pass_their_own_checks(source: str) -> None:
    env = {
        "dockerfile": dockerfile_env,
        "compose": lambda: compose_env(SECRETS),
        "k8s": lambda: k8s_env(SECRETS),
    }[source]()
    listen = env["SWITCHBOARD_GRPC_LISTEN"]
    # Every shipped ingress listens beyond loopback: open without keys is refused, with keys allowed.
    assert listen_refusal(listen, has_keys=False) is not None
    assert listen_refusal(listen, has_keys=True) is None
    if "SWITCHBOARD_ANALYTICS_LISTEN" in env:
        fields = {"analytics_listen": env["SWITCHBOARD_ANALYTICS_LISTEN"], "analytics_password": ""}
        listen_address(Settings(**fields))  # type: ignore[arg-type]
    with pytest.raises(AnalyticsError):
        listen_address(Settings(analytics_listen="0.0.0.0:8123", analytics_password=""))
    if source != "dockerfile":  # the deployments give the ingress TLS
        assert env["SWITCHBOARD_GRPC_TLS_CERT"] and env["SWITCHBOARD_GRPC_TLS_KEY"]


_OFFSET_PORT = int(TEST_ENV["SWITCHBOARD_GRPC_LISTEN"].rsplit(":", 1)[1]) + 60


def localize(shipped: dict[str, str], tmp: Path, tls: dict[str, Path], port: int) -> dict[str, str]:
    """The shipped settings, with servers at the test stack, listen addresses on 127.0.0.1, files
    under `tmp` (TLS paths mapped by file name) and a tenants topic of its own."""
    env = dict(shipped)
    for key in ("SWITCHBOARD_KAFKA_BOOTSTRAP", "SWITCHBOARD_REDIS_URL", "SWITCHBOARD_S3_ENDPOINT"):
        env[key] = TEST_ENV[key]
    env.pop("SWITCHBOARD_CLICKHOUSE_DSN", None)  # the ingress reads no ClickHouse
    # The shape of the servers (a single broker here, topics made with 4 partitions), not a setting
    # of the deployment's security.
    env["SWITCHBOARD_TOPIC_REPLICATION_FACTOR"] = "1"
    env["SWITCHBOARD_TOPIC_PARTITIONS"] = TEST_ENV["SWITCHBOARD_TOPIC_PARTITIONS"]
    env["SWITCHBOARD_GRPC_LISTEN"] = f"127.0.0.1:{port}"
    env["SWITCHBOARD_ANALYTICS_LISTEN"] = f"127.0.0.1:{port + 1}"
    for key in ("INGRESS", "SESSIONS", "ASSISTANT", "ANALYTICS"):
        env[f"SWITCHBOARD_{key}_METRICS_LISTEN"] = ""
    env["SWITCHBOARD_DATA_DIR"] = str(tmp / "data")
    env["SWITCHBOARD_TENANTS_TOPIC"] = f"tenants-shipped-{uuid.uuid4().hex[:8]}"
    env["SWITCHBOARD_INGRESS_PROCESSES"] = "1"
    for key in ("SWITCHBOARD_GRPC_TLS_CERT", "SWITCHBOARD_GRPC_TLS_KEY", "SWITCHBOARD_GRPC_TLS_CA"):
        if env.get(key):
            env[key] = str(tls[Path(env[key]).name])
    return env


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, Path]:
    ca = make_ca("shipped-test-ca")
    leaf = make_leaf(ca, "localhost", server=True)
    files = {}
    # The chain file doubles as the trust bundle, as compose uses it (it holds the CA).
    for name, data in {"server.crt": leaf.cert + ca.cert, "tls.crt": leaf.cert + ca.cert}.items():
        (tmp_path / name).write_bytes(data)
        files[name] = tmp_path / name
    for name in ("server.key", "tls.key"):
        (tmp_path / name).write_bytes(leaf.key)
        files[name] = tmp_path / name
    files["ca"] = tmp_path / "server.crt"
    return files


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.stop()


def _settings(env: dict[str, str]) -> Settings:
    fields = {
        k.removeprefix("SWITCHBOARD_").lower(): v for k, v in env.items() if k.startswith("SWITCHBOARD_")
    }
    return Settings(**{k: v for k, v in fields.items() if k in Settings.model_fields})  # type: ignore[arg-type]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("source", ["dockerfile", "compose", "k8s"])
async def test_the_ingress_starts_with_each_shipped_environment(
    source: str, system: System, tmp_path: Path, tls_files: dict[str, Path], children: list[Child]
) -> None:
    # `system` for its sessions worker: an ingress serves once the hot view it shares is complete.
    shipped = {
        "dockerfile": dockerfile_env,
        "compose": lambda: compose_env(SECRETS),
        "k8s": lambda: k8s_env(SECRETS),
    }[source]()
    port = _OFFSET_PORT + {"dockerfile": 0, "compose": 2, "k8s": 4}[source]
    env = localize(shipped, tmp_path, tls_files, port)
    settings = _settings(env)
    await ensure_topics(settings)
    # As the deployment does before the ingress starts (compose's first-key service): one key.
    issued = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.cli", "keys", "issue", "--tenant", "shipped"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    child = Child(f"ingress-{source}", ["ingress"], tmp_path / "ingress.log", env)
    children.append(child)
    child.start()
    # A client of this ingress: it trusts the test CA when the shipped settings turn TLS on.
    tls = bool(env.get("SWITCHBOARD_GRPC_TLS_CERT"))
    client = _settings({**env, "SWITCHBOARD_GRPC_TLS_CA": str(tls_files["ca"])} if tls else env)
    await wait_for_ingress(client, child)
    async with ingress_channel(client, api_key="") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        request = chat_pb2.StartConversationRequest(tenant_id="shipped")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.StartConversation(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        conv = await stub.StartConversation(
            request, metadata=[("authorization", f"Bearer {token}")], timeout=10
        )
        assert conv.tenant_id == "shipped"


@pytest.mark.timeout(240)
async def test_the_image_analytics_endpoint_starts_with_the_dockerfile_settings(
    local_stack: Settings, tmp_path: Path, children: list[Child]
) -> None:
    shipped = dockerfile_env()
    host, _ = shipped["SWITCHBOARD_ANALYTICS_LISTEN"].rsplit(":", 1)
    assert host == "127.0.0.1", "inside the container only, unless a password is set"
    env = localize(shipped, tmp_path, {}, _OFFSET_PORT + 6)
    env["SWITCHBOARD_ANALYTICS_LISTEN"] = f"{host}:{_OFFSET_PORT + 7}"
    child = Child("analytics-image", ["analytics"], tmp_path / "analytics.log", env)
    children.append(child)
    child.start()
    await wait_for_analytics(_settings(env), child)
