"""Adapter registry over HTTP: upload (multipart), list, get, delete. The tenant comes from the API key;
another tenant's adapter is a 404. Every push and delete is announced as an AdapterEvent."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, BinaryIO

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from gateway.auth import current_tenant
from gateway.errors import BadRequest, ModelNotFound
from gateway.quotas import check_storage
from gateway.state import GatewayState, gateway_of
from protocol import subjects
from protocol.messages import AdapterEvent
from protocol.subjects import InvalidName
from storage import repo
from storage.adapter_format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    UploadFiles,
    archive_limits,
    read_files,
    read_upload,
)
from storage.archive import ArchiveLimits
from storage.errors import NotFound
from storage.models import Adapter, Tenant

log = logging.getLogger(__name__)
router = APIRouter()

MAX_FORM_PARTS = 8  # a name and up to a few files; anything more is not an adapter upload
MAX_NAME_FIELD_BYTES = 1024


def adapter_json(tenant: Tenant, adapter: Adapter) -> dict[str, Any]:
    """An adapter and its current version as the API shows it."""
    v = adapter.current_version
    return {
        "id": f"{tenant.name}/{adapter.name}",
        "object": "adapter",
        "tenant": tenant.name,
        "name": adapter.name,
        "version": str(v.id) if v else None,
        "sha256": v.sha256 if v else None,
        "bytes": v.bytes if v else None,
        "max_rank": v.max_rank if v else None,
        "ranks": v.ranks if v else None,
        "lora_alpha": v.lora_alpha if v else None,
        "target_modules": list(v.target_modules) if v else [],
        "dtype": v.dtype if v else None,
        "base_model": v.base_model if v else None,
        "created": int(v.created_at.timestamp()) if v else int(adapter.created_at.timestamp()),
    }


async def _announce(gw: GatewayState, event: AdapterEvent) -> None:
    """Publish an adapter event (advisory: caches also expire); forget the local cache entry."""
    gw.resolver.on_event(event)
    nc = gw.link.nc
    if nc is None or not gw.link.connected:
        log.warning("adapter event %s %s/%s not published: NATS is not connected", event.event, event.tenant,
                    event.adapter)
        return
    try:
        await nc.publish(subjects.adapter_event(event.event), event.encode())
    except Exception:
        log.warning("adapter event %s %s/%s not published", event.event, event.tenant, event.adapter, exc_info=True)


async def _current_sha(gw: GatewayState, tenant: Tenant, name: str) -> str | None:
    try:
        async with gw.sessions() as session:
            adapter = await repo.get_adapter(session, tenant=tenant, name=name)
    except NotFound:
        return None
    return adapter.current_version.sha256 if adapter.current_version else None


def _read_parts(parts: dict[str, BinaryIO], limits: ArchiveLimits) -> UploadFiles:
    """One archive, or the adapter's files as separate parts, read under the registry's limits."""
    if len(parts) == 1:
        ((filename, f),) = parts.items()
        if filename not in (CONFIG_FILE, WEIGHTS_FILE):
            return read_upload(f, limits=limits)
    return read_files(parts, limits=limits)


@router.post("/v1/adapters")
async def push_adapter(
    request: Request, tenant: Tenant = Depends(current_tenant), gw: GatewayState = Depends(gateway_of)
) -> JSONResponse:
    """Upload an adapter: multipart with a `name` field and either the two files (adapter_config.json,
    adapter_model.safetensors) or one .tar.gz/.zip. 201 for a new current version, 200 if unchanged."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise BadRequest("upload an adapter as multipart/form-data with a 'name' field and the adapter files",
                         param="content-type", code="invalid_content_type")
    form = await request.form(max_files=MAX_FORM_PARTS, max_fields=MAX_FORM_PARTS,
                              max_part_size=MAX_NAME_FIELD_BYTES)
    try:
        name = form.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest("the form field 'name' (the adapter's name) is missing", param="name",
                             code="missing_field")
        subjects.check_name("adapter", name)
        if name.startswith("_"):
            raise InvalidName("adapter", name)
        parts: dict[str, BinaryIO] = {}
        incoming_bytes = 0
        for field_name, value in form.multi_items():
            if isinstance(value, UploadFile):
                filename = value.filename or field_name
                if filename in parts:
                    raise BadRequest(f"the file {filename!r} was sent twice", param="files")
                parts[filename] = value.file
                incoming_bytes += value.size or 0
        if not parts:
            raise BadRequest(f"no adapter files: send {CONFIG_FILE} and {WEIGHTS_FILE}, or one .tar.gz/.zip",
                             param="files", code="missing_file")
        # The parts are on disk (the multipart parser spools them); reading them is blocking work in bounded
        # chunks, kept off the event loop.
        source = await asyncio.to_thread(_read_parts, parts, archive_limits(gw.registry.settings, gw.registry.spec))
    finally:
        await form.close()
    async with gw.sessions() as session:  # the tenant's storage quotas (403), before anything is stored
        await check_storage(session, tenant=tenant, quota=gw.limiter.quota(tenant), adapter=name,
                            incoming_bytes=incoming_bytes)
    before = await _current_sha(gw, tenant, name)
    result = await gw.registry.push(tenant=tenant.name, name=name, source=source)
    async with gw.sessions() as session:
        adapter = await repo.get_adapter(session, tenant=tenant, name=name)
    await _announce(gw, AdapterEvent(event="pushed", tenant=tenant.name, adapter=name, version=result.sha256))
    status = 200 if before == result.sha256 else 201
    return JSONResponse(adapter_json(tenant, adapter), status_code=status)


@router.get("/v1/adapters")
async def list_adapters(
    tenant: Tenant = Depends(current_tenant), gw: GatewayState = Depends(gateway_of)
) -> dict[str, Any]:
    """The caller's adapters, by name."""
    async with gw.sessions() as session:
        adapters = await repo.list_adapters(session, tenant=tenant)
    return {"object": "list", "data": [adapter_json(tenant, a) for a in adapters]}


async def _own_adapter(gw: GatewayState, tenant: Tenant, owner: str, name: str) -> Adapter:
    if owner != tenant.name:
        raise ModelNotFound(f"{owner}/{name}")
    try:
        async with gw.sessions() as session:
            return await repo.get_adapter(session, tenant=tenant, name=name)
    except NotFound:
        raise ModelNotFound(f"{owner}/{name}") from None


@router.get("/v1/adapters/{owner}/{name}")
async def get_adapter(
    owner: str, name: str, tenant: Tenant = Depends(current_tenant), gw: GatewayState = Depends(gateway_of)
) -> dict[str, Any]:
    """One of the caller's adapters."""
    return adapter_json(tenant, await _own_adapter(gw, tenant, owner, name))


@router.delete("/v1/adapters/{owner}/{name}")
async def delete_adapter(
    owner: str, name: str, tenant: Tenant = Depends(current_tenant), gw: GatewayState = Depends(gateway_of)
) -> dict[str, Any]:
    """Delete one of the caller's adapters and every version of it."""
    await _own_adapter(gw, tenant, owner, name)
    try:
        await gw.registry.remove(tenant=tenant.name, name=name)
    except NotFound:
        raise ModelNotFound(f"{owner}/{name}") from None
    await _announce(gw, AdapterEvent(event="deleted", tenant=tenant.name, adapter=name))
    return {"id": f"{owner}/{name}", "object": "adapter", "deleted": True}
