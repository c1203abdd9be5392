"""API key authentication and adapter resolution, both cached briefly so the invocation path rarely
touches Postgres. A tenant sees only its own adapters: another tenant's adapter is "not found"."""

from __future__ import annotations

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.cache import TtlCache
from gateway.errors import ModelNotFound, Unauthenticated
from gateway.settings import CacheSettings
from protocol.messages import AdapterEvent
from storage import repo
from storage.errors import NotFound
from storage.models import Adapter, Tenant


class Authenticator:
    """Bearer key -> tenant, cached per key hash for `auth_ttl_s` (unknown keys too, so a flood of bad keys
    does not reach the database more than once per key and interval)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], settings: CacheSettings) -> None:
        self.sessions = sessions
        self.cache: TtlCache[str, Tenant | None] = TtlCache(settings.auth_ttl_s, settings.max_entries)

    async def tenant(self, authorization: str | None) -> Tenant:
        """The tenant of an `Authorization: Bearer <key>` header; Unauthenticated otherwise."""
        if not authorization:
            raise Unauthenticated("no API key: send the header 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthenticated("malformed Authorization header: expected 'Bearer <key>'")
        digest = repo.hash_api_key(key)
        hit, tenant = self.cache.get(digest)
        if not hit:
            async with self.sessions() as session:
                tenant = await repo.authenticate(session, key=key)
            self.cache.put(digest, tenant)
        if tenant is None:
            raise Unauthenticated("invalid API key")
        return tenant


class AdapterResolver:
    """(tenant, adapter name) -> the adapter with its current version, cached for `adapter_ttl_s` and
    invalidated by AdapterEvent (pushed/deleted) from any gateway or the CLI."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], settings: CacheSettings) -> None:
        self.sessions = sessions
        self.cache: TtlCache[tuple[str, str], Adapter | None] = TtlCache(settings.adapter_ttl_s, settings.max_entries)

    async def resolve(self, tenant: Tenant, name: str) -> Adapter:
        """The tenant's adapter `name` with a current version; ModelNotFound otherwise."""
        key = (tenant.name, name)
        hit, adapter = self.cache.get(key)
        if not hit:
            try:
                async with self.sessions() as session:
                    adapter = await repo.get_adapter(session, tenant=tenant, name=name)
            except NotFound:
                adapter = None
            self.cache.put(key, adapter)
        if adapter is None or adapter.current_version is None:
            raise ModelNotFound(f"{tenant.name}/{name}")
        return adapter

    def on_event(self, event: AdapterEvent) -> None:
        """Forget what an adapter event made stale."""
        self.cache.discard((event.tenant, event.adapter))


async def current_tenant(request: Request) -> Tenant:
    """FastAPI dependency: the authenticated tenant of the request."""
    authenticator: Authenticator = request.app.state.gateway.authenticator
    return await authenticator.tenant(request.headers.get("authorization"))
