"""API keys over HTTP, authorized by one of the tenant's own keys: list, create, revoke, rotate.

A key is shown in clear once, when it is created (or rotated); afterwards only its id, prefix and name.
Revoking (and rotating, which revokes the old key) publishes a KeyEvent: every gateway drops the key from
its auth cache at once, so it stops working everywhere within a second, not after the cache's lifetime.
Another tenant's key is not found (404), like another tenant's adapter.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.auth import current_tenant
from gateway.errors import BadRequest
from gateway.quotas import check_api_keys
from gateway.state import GatewayState, gateway_of
from protocol import subjects
from protocol.messages import KeyEvent
from storage import repo
from storage.errors import NotFound
from storage.models import ApiKey, Tenant

log = logging.getLogger(__name__)
router = APIRouter()

MAX_KEY_NAME = 128  # the api_keys.label column


class KeyCreate(BaseModel):
    """Body of POST /v1/keys (optional)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=MAX_KEY_NAME, description="a note to tell keys apart")

    @field_validator("name")
    @classmethod
    def _printable(cls, name: str | None) -> str | None:
        if name is not None and not name.isprintable():
            raise ValueError("a key's name must not contain control characters")
        return name


def _ts(t: datetime | None) -> int | None:
    return int(t.timestamp()) if t is not None else None


def key_json(key: ApiKey, tenant: Tenant, *, secret: str | None = None) -> dict[str, Any]:
    """A key as the API shows it; `secret` (the key in clear) only in the answer that created it."""
    body: dict[str, Any] = {
        "id": str(key.id),
        "object": "api_key",
        "prefix": f"{repo.API_KEY_PREFIX}{key.prefix}",
        "name": key.label,
        "tenant": tenant.name,
        "created": _ts(key.created_at),
        "last_used": _ts(key.last_used_at),
        "revoked": _ts(key.revoked_at),
        "active": key.revoked_at is None,
    }
    if secret is not None:
        body["key"] = secret
    return body


async def announce_key_event(gw: GatewayState, event: KeyEvent) -> None:
    """Drop the key from this gateway's cache and tell every other gateway (if NATS cannot be reached, theirs
    expire within `auth_ttl_s`)."""
    gw.authenticator.on_event(event)
    nc = gw.link.nc
    if nc is None or not gw.link.connected:
        log.warning("key event %s of %s not published: NATS is not connected", event.event, event.tenant)
        return
    try:
        await nc.publish(subjects.key_event(event.event), event.encode())
        await nc.flush(timeout=2)
    except Exception:
        log.warning("key event %s of %s not published", event.event, event.tenant, exc_info=True)


async def _own_key(session: Any, tenant: Tenant, key_id: str) -> ApiKey:
    try:
        return await repo.get_api_key(session, ref=key_id.removeprefix(repo.API_KEY_PREFIX), tenant=tenant)
    except NotFound:
        raise NotFound("api key", key_id) from None


@router.get("/v1/keys")
async def list_keys(tenant: Tenant = Depends(current_tenant), gw: GatewayState = Depends(gateway_of)) -> dict[str, Any]:
    """The caller's keys, revoked ones included (never the keys themselves)."""
    async with gw.sessions() as session:
        keys = await repo.list_api_keys(session, tenant=tenant)
    return {"object": "list", "data": [key_json(k, tenant) for k in keys]}


@router.post("/v1/keys")
async def create_key(body: KeyCreate | None = None, tenant: Tenant = Depends(current_tenant),
                     gw: GatewayState = Depends(gateway_of)) -> JSONResponse:
    """A new key of the caller's tenant, shown in clear in this answer only (201)."""
    name = body.name if body is not None else None
    async with gw.sessions() as session, session.begin():
        await check_api_keys(session, tenant=tenant, limit=gw.settings.gateway.quotas.api_keys)
        row, secret = await repo.new_api_key(session, tenant=tenant, label=name)
    return JSONResponse(key_json(row, tenant, secret=secret), status_code=201)


@router.delete("/v1/keys/{key_id}")
async def revoke_key(key_id: str, tenant: Tenant = Depends(current_tenant),
                     gw: GatewayState = Depends(gateway_of)) -> dict[str, Any]:
    """Revoke one of the caller's keys (by id or prefix); it stops working on every gateway at once."""
    async with gw.sessions() as session, session.begin():
        row = await _own_key(session, tenant, key_id)
        await repo.revoke_api_key_row(session, key=row)
    await announce_key_event(gw, KeyEvent(event="revoked", tenant=tenant.name, key_id=str(row.id)))
    return key_json(row, tenant)


@router.post("/v1/keys/{key_id}/rotate")
async def rotate_key(key_id: str, tenant: Tenant = Depends(current_tenant),
                     gw: GatewayState = Depends(gateway_of)) -> JSONResponse:
    """Replace one of the caller's active keys: a new key with the same name, shown in clear in this answer
    only (201), and the old one revoked in the same transaction."""
    async with gw.sessions() as session, session.begin():
        old = await _own_key(session, tenant, key_id)
        if not await repo.revoke_api_key_row(session, key=old):
            raise BadRequest(f"API key {key_id} is revoked already: create a new one instead", param="key_id",
                             code="key_revoked")
        row, secret = await repo.new_api_key(session, tenant=tenant, label=old.label)
    await announce_key_event(gw, KeyEvent(event="revoked", tenant=tenant.name, key_id=str(old.id)))
    return JSONResponse({**key_json(row, tenant, secret=secret), "replaces": str(old.id)}, status_code=201)
