"""What the gateway's routes share: built in the app's lifespan and kept on `app.state.gateway`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from gateway.auth import AdapterResolver, Authenticator
from gateway.bus import NatsLink
from gateway.errors import HEADERS_STATE, BadRequest, ModelNotFound
from gateway.invoker import Invoker, Target
from gateway.metrics import GatewayMetrics
from gateway.quotas import Limiter
from gateway.settings import GatewaySettings
from protocol import subjects
from scheduler.metrics import MetricsEndpoint
from storage.models import Tenant


@dataclass
class GatewayState:
    """The process's resources (one NATS connection, one engine, the caches, the registry)."""

    settings: GatewaySettings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    link: NatsLink
    metrics: GatewayMetrics
    authenticator: Authenticator
    limiter: Limiter  # per-tenant quotas and throttles of this process
    resolver: AdapterResolver
    invoker: Invoker
    http: httpx.AsyncClient
    registry: Any  # storage.registry.Registry (imported in the lifespan: it pulls in torch)
    base_model: str
    scheduler_seen_at: float | None = None  # time.monotonic() of the last scheduler heartbeat
    metrics_endpoint: MetricsEndpoint | None = None  # the metrics listener (None: disabled)

    def scheduler_alive(self) -> bool:
        """A scheduler (dispatcher) sent a heartbeat within `scheduler_timeout_s`."""
        seen = self.scheduler_seen_at
        return seen is not None and time.monotonic() - seen <= self.settings.gateway.scheduler_timeout_s

    @property
    def base_names(self) -> frozenset[str]:
        return frozenset({self.base_model, *self.settings.gateway.base_model_aliases})

    async def target_of_model(self, model: str, tenant: Tenant) -> Target:
        """`<tenant>/<adapter>`, or the base model's name (or an alias such as "base") for no adapter."""
        if model in self.base_names:
            return Target(tenant, None)
        owner, sep, name = model.partition("/")
        if not sep or not subjects.NAME_PATTERN.match(owner) or not subjects.NAME_PATTERN.match(name):
            raise BadRequest(
                f"model {model!r} is neither '<tenant>/<adapter>' nor the base model {self.base_model!r}",
                param="model", code="invalid_model",
            )
        return await self.target_of(owner, name, tenant)

    async def target_of(self, owner: str, name: str, tenant: Tenant) -> Target:
        """The adapter `owner/name` as seen by `tenant`: another tenant's adapter is not found."""
        if name == subjects.BASE_ADAPTER and owner == tenant.name:
            return Target(tenant, None)
        if name.startswith("_"):
            raise BadRequest(f"adapter names starting with '_' are reserved: {name!r}", param="model",
                             code="invalid_model")
        if owner != tenant.name:
            raise ModelNotFound(f"{owner}/{name}")
        return Target(tenant, await self.resolver.resolve(tenant, name))


async def gateway_of(request: Request) -> GatewayState:
    """FastAPI dependency: the app's GatewayState (async: FastAPI runs a plain `def` dependency in a thread
    pool, a thread hop on every request)."""
    state: GatewayState = request.app.state.gateway
    return state


def remember_headers(request: Request, headers: dict[str, str]) -> None:
    """Keep the call's x-lorafn-* headers so that an error answer carries them too."""
    setattr(request.state, HEADERS_STATE, headers)
