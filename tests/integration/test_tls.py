"""TLS and mutual TLS on the gRPC ingress, with certificates made here: an ingress process reads
its certificate, key and client CA from settings; clients that do not trust its CA, or (mTLS)
present no certificate or one from another CA, are refused at the handshake."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from switchboard.v1 import chat_pb2, chat_pb2_grpc, events_pb2

from services.processes import Child
from tests.integration.conftest import System

pytestmark = pytest.mark.integration

_OFFSET = int(os.environ.get("SWITCHBOARD_TEST_PORT_OFFSET", "0"))
TLS_PORT = 25084 + _OFFSET
MTLS_PORT = 25085 + _OFFSET


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return _pem(cert, key)


def make_leaf(ca: Pem, common_name: str, *, server: bool) -> Pem:
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return _pem(builder.sign(ca_key, hashes.SHA256()), key)


def _pem(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pem:
    return Pem(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


@dataclass(frozen=True)
class Pki:
    server_ca: Pem
    client_ca: Pem
    client: Pem
    stranger_ca: Pem
    stranger_client: Pem


@dataclass
class TlsIngresses:
    pki: Pki
    tls: str
    mtls: str


@pytest.fixture(scope="module")
async def ingresses(system: System, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TlsIngresses]:
    server_ca, client_ca, stranger_ca = (
        make_ca("sb server CA"),
        make_ca("sb client CA"),
        make_ca("stranger CA"),
    )
    pki = Pki(
        server_ca,
        client_ca,
        make_leaf(client_ca, "backend-1", server=False),
        stranger_ca,
        make_leaf(stranger_ca, "intruder", server=False),
    )
    server = make_leaf(server_ca, "ingress", server=True)
    files: Path = tmp_path_factory.mktemp("tls")
    (files / "server.pem").write_bytes(server.cert)
    (files / "server.key").write_bytes(server.key)
    (files / "client-ca.pem").write_bytes(client_ca.cert)
    base = {**system.env, "SWITCHBOARD_INGRESS_PROCESSES": "1", "SWITCHBOARD_INGRESS_METRICS_LISTEN": ""}
    tls_env = {
        **base,
        "SWITCHBOARD_GRPC_LISTEN": f"127.0.0.1:{TLS_PORT}",
        "SWITCHBOARD_GRPC_TLS_CERT": str(files / "server.pem"),
        "SWITCHBOARD_GRPC_TLS_KEY": str(files / "server.key"),
    }
    mtls_env = {
        **tls_env,
        "SWITCHBOARD_GRPC_LISTEN": f"127.0.0.1:{MTLS_PORT}",
        "SWITCHBOARD_GRPC_TLS_CLIENT_CA": str(files / "client-ca.pem"),
    }
    logs = Path(system.env["SWITCHBOARD_DATA_DIR"]) / "logs"
    children = [
        Child("tls-ingress", ["ingress"], logs / "tls-ingress.log", tls_env),
        Child("mtls-ingress", ["ingress"], logs / "mtls-ingress.log", mtls_env),
    ]
    for child in children:
        child.start()
    result = TlsIngresses(pki, f"127.0.0.1:{TLS_PORT}", f"127.0.0.1:{MTLS_PORT}")
    try:
        await wait_serving(result.tls, credentials(pki.server_ca), children[0])
        await wait_serving(result.mtls, credentials(pki.server_ca, pki.client), children[1])
        yield result
    finally:
        for child in children:
            child.stop()


def credentials(ca: Pem, client: Pem | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.cert,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )


async def wait_serving(target: str, creds: grpc.ChannelCredentials, child: Child) -> None:
    deadline = time.monotonic() + 60
    while True:
        async with grpc.aio.secure_channel(target, creds) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
        assert child.alive, child.log_tail()
        assert time.monotonic() < deadline, child.log_tail()
        await asyncio.sleep(0.3)


async def start(channel: grpc.aio.Channel, tenant: str) -> grpc.StatusCode:
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    try:
        conv = await stub.StartConversation(
            chat_pb2.StartConversationRequest(tenant_id=tenant, channel=events_pb2.CHANNEL_WEB), timeout=5
        )
        assert conv.tenant_id == tenant
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_tls_serves_clients_that_trust_its_ca_only(ingresses: TlsIngresses, tenant: str) -> None:
    async with grpc.aio.secure_channel(ingresses.tls, credentials(ingresses.pki.server_ca)) as channel:
        assert await start(channel, tenant) is grpc.StatusCode.OK
    # A client that trusts another CA refuses the server's certificate: no call goes through.
    async with grpc.aio.secure_channel(ingresses.tls, credentials(ingresses.pki.stranger_ca)) as channel:
        assert await start(channel, tenant) is grpc.StatusCode.UNAVAILABLE
    # Plaintext to a TLS port gets nowhere either.
    async with grpc.aio.insecure_channel(ingresses.tls) as channel:
        assert await start(channel, tenant) is grpc.StatusCode.UNAVAILABLE


async def test_mtls_needs_a_client_certificate_from_the_client_ca(
    ingresses: TlsIngresses, tenant: str
) -> None:
    pki = ingresses.pki
    async with grpc.aio.secure_channel(ingresses.mtls, credentials(pki.server_ca, pki.client)) as channel:
        assert await start(channel, tenant) is grpc.StatusCode.OK
    async with grpc.aio.secure_channel(ingresses.mtls, credentials(pki.server_ca)) as channel:
        assert await start(channel, tenant) is grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.secure_channel(
        ingresses.mtls, credentials(pki.server_ca, pki.stranger_client)
    ) as channel:
        assert await start(channel, tenant) is grpc.StatusCode.UNAVAILABLE
    # The right client certificate but a client that trusts the wrong CA for the server.
    async with grpc.aio.secure_channel(ingresses.mtls, credentials(pki.stranger_ca, pki.client)) as channel:
        assert await start(channel, tenant) is grpc.StatusCode.UNAVAILABLE
