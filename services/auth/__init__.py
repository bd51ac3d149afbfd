"""API keys, tenants and TLS for the gRPC ingress.

Keys and tenants are records on the compacted tenants topic; every ingress folds it into an
in-process registry and checks each call in a grpc.aio server interceptor.
"""

from services.auth._admin import issue_demo_key
from services.auth._client import bearer_interceptors, ingress_channel
from services.auth._ingress import IngressAuth, is_loopback, listen_refusal, preflight
from services.auth._interceptor import AuthInterceptor
from services.auth._log import (
    RegistryFollower,
    TenantsTopicMissing,
    append_records,
    load_pepper,
    read_registry,
)
from services.auth._model import (
    OPEN,
    ROLES,
    KeyRecord,
    Principal,
    Refusal,
    Registry,
    Status,
    TenantRecord,
    authorize,
    bearer_token,
    decode_record,
    encode_record,
    hash_secret,
    new_key,
    parse_token,
    pepper_id,
    roles_for,
    tenant_mismatch,
)
from services.auth._tls import channel_credentials, server_credentials

__all__ = [
    "OPEN",
    "ROLES",
    "AuthInterceptor",
    "IngressAuth",
    "KeyRecord",
    "Principal",
    "Refusal",
    "Registry",
    "RegistryFollower",
    "Status",
    "TenantRecord",
    "TenantsTopicMissing",
    "append_records",
    "authorize",
    "bearer_interceptors",
    "bearer_token",
    "channel_credentials",
    "decode_record",
    "encode_record",
    "hash_secret",
    "ingress_channel",
    "is_loopback",
    "issue_demo_key",
    "listen_refusal",
    "load_pepper",
    "new_key",
    "parse_token",
    "pepper_id",
    "preflight",
    "read_registry",
    "roles_for",
    "server_credentials",
    "tenant_mismatch",
]
