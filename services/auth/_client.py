"""Client side: a channel to the ingress that presents the API key on every call."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.auth._tls import channel_credentials
from services.settings import Settings


def _with_key(details: grpc.aio.ClientCallDetails, header: tuple[str, str]) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(*header)
    return details._replace(metadata=metadata)


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, header: tuple[str, str]) -> None:
        self.header = header

    async def intercept_unary_unary(
        self, continuation: Callable[..., Awaitable[Any]], client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(_with_key(client_call_details, self.header), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, header: tuple[str, str]) -> None:
        self.header = header

    async def intercept_unary_stream(
        self, continuation: Callable[..., Awaitable[Any]], client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(_with_key(client_call_details, self.header), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, header: tuple[str, str]) -> None:
        self.header = header

    async def intercept_stream_unary(
        self,
        continuation: Callable[..., Awaitable[Any]],
        client_call_details: Any,
        request_iterator: AsyncIterator[Any],
    ) -> Any:
        return await continuation(_with_key(client_call_details, self.header), request_iterator)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, header: tuple[str, str]) -> None:
        self.header = header

    async def intercept_stream_stream(
        self,
        continuation: Callable[..., Awaitable[Any]],
        client_call_details: Any,
        request_iterator: AsyncIterator[Any],
    ) -> Any:
        return await continuation(_with_key(client_call_details, self.header), request_iterator)


def bearer_interceptors(api_key: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that add `authorization: Bearer <api_key>` to every call."""
    header = ("authorization", f"Bearer {api_key}")
    return [_UnaryUnary(header), _UnaryStream(header), _StreamUnary(header), _StreamStream(header)]


def ingress_channel(settings: Settings, api_key: str | None = None) -> grpc.aio.Channel:
    """A channel to the ingress with the key (SWITCHBOARD_API_KEY unless given) and TLS if configured."""
    key = settings.api_key if api_key is None else api_key
    interceptors = bearer_interceptors(key) if key else None
    credentials = channel_credentials(settings)
    if credentials is None:
        return grpc.aio.insecure_channel(settings.grpc_listen, interceptors=interceptors)
    return grpc.aio.secure_channel(settings.grpc_listen, credentials, interceptors=interceptors)
