"""TLS for the gRPC ingress (server side) and for the CLI's own clients."""

from __future__ import annotations

from pathlib import Path

import grpc

from services.settings import Settings


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise RuntimeError(f"cannot read the {what} {path}: {exc.strerror}") from exc


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials when a certificate is configured, else None (plaintext).

    With SWITCHBOARD_GRPC_TLS_CLIENT_CA set, clients must present a certificate that CA signed (mTLS).
    """
    cert, key, client_ca = settings.grpc_tls_cert, settings.grpc_tls_key, settings.grpc_tls_client_ca
    if cert is None and key is None:
        if client_ca is not None:
            raise RuntimeError("SWITCHBOARD_GRPC_TLS_CLIENT_CA needs SWITCHBOARD_GRPC_TLS_CERT and _KEY")
        return None
    if cert is None or key is None:
        raise RuntimeError("TLS needs both SWITCHBOARD_GRPC_TLS_CERT and SWITCHBOARD_GRPC_TLS_KEY")
    return grpc.ssl_server_credentials(
        [(_read(key, "TLS private key"), _read(cert, "TLS certificate"))],
        root_certificates=_read(client_ca, "client CA") if client_ca is not None else None,
        require_client_auth=client_ca is not None,
    )


def add_port(server: grpc.aio.Server, settings: Settings) -> int:
    """Listen on SWITCHBOARD_GRPC_LISTEN, with TLS when configured; returns the port (0: failed)."""
    credentials = server_credentials(settings)
    if credentials is None:
        return server.add_insecure_port(settings.grpc_listen)
    return server.add_secure_port(settings.grpc_listen, credentials)


def channel_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    """What the CLI's own clients use towards the ingress: TLS trusting SWITCHBOARD_GRPC_TLS_CA
    (and presenting the server's own certificate pair never: clients have their own)."""
    if settings.grpc_tls_ca is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=_read(settings.grpc_tls_ca, "CA bundle"))
