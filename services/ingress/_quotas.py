"""Per-tenant quotas: conversations open at once, documents in the knowledge base.

A quota comes from the tenant's record on the tenants topic (`switchboard tenants update T
--max-open-conversations N --max-knowledge-documents N`), else from the settings' defaults; 0 is
unlimited (the default). Open conversations are counted in a sorted set per tenant
(`schemas.hotview.open_conversations_key`) that the sessions worker keeps from the log (a start
adds the conversation, a close removes it), so it is exact after a replay or a Redis loss. The
ingress reserves a place in it before a start is published (a reservation expires unless the start
is folded, so a crashed ingress leaks nothing) and frees it as soon as a close is durable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import grpc

from services.auth._limits import MAX_KNOWLEDGE_DOCUMENTS, MAX_OPEN_CONVERSATIONS
from services.auth._model import Registry
from services.ingress import _validation as v
from services.settings import Settings


class Quotas:
    """The quotas of each tenant, read from the registry per call (they change live)."""

    def __init__(self, settings: Settings, registry: Callable[[], Registry | None] | None = None) -> None:
        self._settings = settings
        self._registry = registry

    def _own(self, tenant_id: str) -> Mapping[str, Any]:
        registry = self._registry() if self._registry is not None else None
        tenant = registry.tenants.get(tenant_id) if registry is not None else None
        return tenant.settings if tenant is not None else {}

    def open_conversations(self, tenant_id: str) -> int:
        return int(self._own(tenant_id).get(MAX_OPEN_CONVERSATIONS, self._settings.max_open_conversations))

    def knowledge_documents(self, tenant_id: str) -> int:
        return int(self._own(tenant_id).get(MAX_KNOWLEDGE_DOCUMENTS, self._settings.max_knowledge_documents))


def too_many_open(tenant_id: str, open_now: int, quota: int) -> v.RequestRejected:
    return v.RequestRejected(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"tenant {tenant_id!r} has {open_now} conversations open, its quota is {quota}: close some "
        f"(CloseConversation) or raise it (`switchboard tenants update {tenant_id} "
        "--max-open-conversations N`)",
        retryable=False,
    )


def too_many_documents(tenant_id: str, would_have: int, quota: int) -> v.RequestRejected:
    return v.RequestRejected(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"tenant {tenant_id!r} would have {would_have} knowledge documents, its quota is {quota}: "
        f"delete some (DeleteDocument) or raise it (`switchboard tenants update {tenant_id} "
        "--max-knowledge-documents N`)",
        retryable=False,
    )
