"""API key authentication and adapter resolution, both cached briefly so the invocation path rarely
touches Postgres. A tenant sees only its own adapters: another tenant's adapter is "not found". Revoked keys
leave every gateway's cache at once (KeyEvent); failed authentications are throttled per client address."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.cache import LoadingCache
from gateway.errors import ModelNotFound, Unauthenticated
from gateway.quotas import Limiter
from gateway.settings import CacheSettings
from protocol.messages import AdapterEvent, KeyEvent
from storage import repo
from storage.errors import NotFound
from storage.models import Adapter, Tenant


@dataclass(frozen=True)
class KeyOwner:
    """What the auth cache holds for a valid key: its tenant and the key's id (revocation events name it)."""

    tenant: Tenant
    key_id: uuid.UUID


class Authenticator:
    """Bearer key -> tenant, cached per key hash for `auth_ttl_s` (unknown keys too, so a flood of bad keys
    does not reach the database more than once per key and interval); a key in use is looked up again in the
    background before its entry expires, once per gateway however many calls use it. A KeyEvent drops a revoked
    key at once.

    Failed authentications are throttled per client address (`Limiter.check_auth`): past the limit, any
    attempt whose key is not a valid one in the cache is answered 429 without a database lookup.
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession], settings: CacheSettings, limiter: Limiter,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sessions = sessions
        self.limiter = limiter
        self.clock = clock
        self.max_entries = settings.max_entries
        self.cache: LoadingCache[str, KeyOwner | None] = LoadingCache(settings.auth_ttl_s, settings.max_entries,
                                                                       clock)
        self._digests: dict[uuid.UUID, str] = {}  # key id -> its cache key, for revocations

    async def tenant(self, authorization: str | None, *, address: str | None = None) -> Tenant:
        """The tenant of an `Authorization: Bearer <key>` header; Unauthenticated otherwise, QuotaExceeded
        (429) while `address` is throttled."""
        now = self.clock()
        if not authorization:
            self._refuse(address, now, "no API key: send the header 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            self._refuse(address, now, "malformed Authorization header: expected 'Bearer <key>'")
        digest = repo.hash_api_key(key)
        hit, owner = self.cache.cached(digest)
        if not (hit and owner is not None):
            self.limiter.check_auth(address, now)  # a throttled address reaches no database
        owner = await self.cache.get(digest, lambda: self._lookup(key, digest))
        if owner is None:
            self._refuse(address, now, "invalid API key")
        return owner.tenant

    def _refuse(self, address: str | None, now: float, message: str) -> NoReturn:
        self.limiter.check_auth(address, now)
        self.limiter.auth_failed(address, now)
        raise Unauthenticated(message)

    async def _lookup(self, key: str, digest: str) -> KeyOwner | None:
        """The key's owner from Postgres; a valid key's `last_used_at` is set (once per lookup, and a key in
        use is looked up once per half `auth_ttl_s`)."""
        async with self.sessions() as session:
            row = await repo.find_api_key(session, key=key)
            if row is None:
                return None
            await repo.touch_api_key(session, key_id=row.id)
            await session.commit()
        if row.id not in self._digests and len(self._digests) >= self.max_entries:
            self.clear()  # an entry the index lost could not be revoked by an event
        self._digests[row.id] = digest
        return KeyOwner(row.tenant, row.id)

    def on_event(self, event: KeyEvent) -> None:
        """Forget a revoked key (or, when a tenant changed, every cached key: rare, and the cache refills)."""
        if event.event == "revoked" and event.key_id is not None:
            try:
                digest = self._digests.pop(uuid.UUID(event.key_id), None)
            except ValueError:
                return
            if digest is not None:
                self.cache.discard(digest)
            else:  # not cached; a lookup of it may be running: it must not store the key as valid
                self.cache.abandon_loads()
            return
        self.clear()

    def clear(self) -> None:
        """Drop every cached lookup (after a NATS reconnection: events sent meanwhile were missed)."""
        self.cache.clear()
        self._digests.clear()


class AdapterResolver:
    """(tenant, adapter name) -> the adapter with its current version, cached for `adapter_ttl_s` and
    invalidated by AdapterEvent (pushed/deleted) from any gateway or the CLI."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], settings: CacheSettings) -> None:
        self.sessions = sessions
        self.cache: LoadingCache[tuple[str, str], Adapter | None] = LoadingCache(settings.adapter_ttl_s,
                                                                                  settings.max_entries)

    async def resolve(self, tenant: Tenant, name: str) -> Adapter:
        """The tenant's adapter `name` with a current version; ModelNotFound otherwise."""
        adapter = await self.cache.get((tenant.name, name), lambda: self._lookup(tenant, name))
        if adapter is None or adapter.current_version is None:
            raise ModelNotFound(f"{tenant.name}/{name}")
        return adapter

    async def _lookup(self, tenant: Tenant, name: str) -> Adapter | None:
        try:
            async with self.sessions() as session:
                return await repo.get_adapter(session, tenant=tenant, name=name)
        except NotFound:
            return None

    def on_event(self, event: AdapterEvent) -> None:
        """Forget what an adapter event made stale."""
        self.cache.discard((event.tenant, event.adapter))

    def clear(self) -> None:
        """Drop every cached lookup (after a NATS reconnection: events sent meanwhile were missed)."""
        self.cache.clear()


async def current_tenant(request: Request) -> Tenant:
    """FastAPI dependency: the authenticated tenant of the request, counted against its request rate."""
    authenticator: Authenticator = request.app.state.gateway.authenticator
    client = request.client
    tenant = await authenticator.tenant(request.headers.get("authorization"), address=client.host if client else None)
    authenticator.limiter.check_request(tenant, authenticator.clock())
    return tenant
