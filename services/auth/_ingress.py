"""What the ingress process runs for authentication: the follower, the interceptor, the listen rule."""

from __future__ import annotations

import ipaddress
import logging

import grpc

from services.auth._interceptor import AuthInterceptor
from services.auth._limits import RateLimiter
from services.auth._log import RegistryFollower, load_pepper, read_registry
from services.auth._model import Registry
from services.auth._tls import add_port
from services.settings import Settings

log = logging.getLogger(__name__)

_OPEN_WARNING = (
    "\n" + "!" * 78 + "\n"
    "!! NO API KEYS EXIST: the ingress on %s accepts calls WITHOUT a key, for any tenant.\n"
    "!! This is allowed on a loopback address only. Issue one to close it:\n"
    "!!     switchboard keys issue --tenant <tenant>\n" + "!" * 78
)


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def listen_refusal(listen: str, has_keys: bool) -> str | None:
    """Why the ingress must not start on `listen`, or None."""
    if has_keys or is_loopback(listen):
        return None
    return (
        f"refusing to listen on {listen} with no API keys: anyone who reaches it could write into "
        "any tenant. Issue a key first (`switchboard keys issue --tenant <tenant>`), or listen on "
        "127.0.0.1."
    )


async def preflight(settings: Settings) -> None:
    """Refuse to start (before binding anything) when the listen rule says so."""
    registry = await read_registry(settings)
    refusal = listen_refusal(settings.grpc_listen, registry.has_keys)
    if refusal is not None:
        raise SystemExit(f"switchboard ingress: {refusal}")


class IngressAuth:
    """API keys for one ingress: the interceptor to install and the registry follower behind it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.follower = RegistryFollower(settings, self._changed)
        # Rate limits (services/auth/_limits.py): its own Redis pool, so a slow limiter never
        # holds the write path's connections.
        self.limiter = RateLimiter(settings)
        self.interceptor = AuthInterceptor(
            lambda: self.follower.registry, load_pepper(settings), self.limiter
        )
        self._enforcing = False

    def add_port(self, server: grpc.aio.Server) -> int:
        return add_port(server, self.settings)

    async def start(self) -> None:
        registry = await self.follower.start()
        refusal = listen_refusal(self.settings.grpc_listen, registry.has_keys)
        if refusal is not None:
            await self.follower.stop()
            raise RuntimeError(refusal)
        self._changed(registry)
        if not registry.has_keys:
            log.warning(_OPEN_WARNING, self.settings.grpc_listen)

    def _changed(self, registry: Registry) -> None:
        if registry.has_keys and not self._enforcing:
            self._enforcing = True
            log.info(
                "API keys required (%d keys of %d tenants on topic %s)",
                len(registry.keys),
                len({k.tenant_id for k in registry.keys.values()}),
                self.settings.tenants_topic,
            )

    async def stop(self) -> None:
        await self.follower.stop()
        await self.limiter.close()
