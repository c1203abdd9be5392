"""In-process lorafn stacks for tests: the gateway (uvicorn on a free port), a scheduler and a worker in the
test's event loop, against the real NATS, Postgres and S3 servers of the session's `services` fixture.

- `tenant_key`: a tenant (made if missing) and a new API key of it;
- `clean_invocations_stream`: delete the invocations stream's consumers (workers of earlier modules) and purge it;
- `start_gateway` / `stop_gateway`: a gateway serving on 127.0.0.1 until told to stop;
- `in_process_stack`: all of it on the tiny random backbone, ready once a call of the bare backbone succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import uvicorn
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from gateway.app import create_app
from gateway.settings import GatewayOptions, GatewaySettings, LimitSettings
from protocol import subjects
from protocol.settings import NatsSettings
from protocol.streams import ensure_streams
from scheduler.service import SchedulerService
from scheduler.settings import SchedulerSettings, StagingSettings
from storage import repo
from storage.objectstore import ObjectStore
from storage.settings import DatabaseSettings, ObjectStoreSettings, RegistrySettings
from workers.service import open_worker
from workers.settings import WorkerSettings
from workers.tiny import write_tiny_backbone


async def tenant_key(database: DatabaseSettings, name: str) -> str:
    """A new API key of tenant `name` (the tenant is made if it does not exist)."""
    engine = repo.create_engine(database)
    try:
        async with repo.session_factory(engine)() as session, session.begin():
            tenant = await repo.get_or_create_tenant(session, name=name)
            return await repo.create_api_key(session, tenant=tenant)
    finally:
        await engine.dispose()


async def clean_invocations_stream(js: JetStreamContext) -> None:
    """Delete every consumer of the invocations stream (their workers are gone) and purge it."""
    await ensure_streams(js)
    for consumer in await js.consumers_info(subjects.INVOCATIONS_STREAM):
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(subjects.INVOCATIONS_STREAM, consumer.name)
    await js.purge_stream(subjects.INVOCATIONS_STREAM)


async def start_gateway(settings: GatewaySettings) -> tuple[str, Any, uvicorn.Server, asyncio.Task[None]]:
    """A gateway serving `settings` on a free port of 127.0.0.1: (its URL, the app, the server, its task)."""
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]  # keep pytest's Ctrl-C
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 60
    while not server.started:
        if task.done():
            task.result()
        assert time.monotonic() < deadline, "the gateway did not start"
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}", app, server, task


async def stop_gateway(server: uvicorn.Server, task: asyncio.Task[None]) -> None:
    server.should_exit = True
    await asyncio.wait_for(task, 15)


@dataclass
class InProcessStack:
    url: str  # the gateway
    key: str  # an API key of `tenant`
    tenant: str
    backbone: Path  # the tiny backbone it serves


@contextlib.asynccontextmanager
async def in_process_stack(services: Any, root: Path, *, tenant: str, adapter_pool_bytes: int = 8 << 20,
                           max_position_embeddings: int | None = None,
                           staging: StagingSettings | None = None) -> AsyncIterator[InProcessStack]:
    """The gateway, a scheduler (`staging`: its pre-staging settings, default the service's) and one worker on
    a tiny backbone written under `root`, with a bucket of its own; yielded once a call of the bare backbone
    has gone through all of them."""
    extra = {} if max_position_embeddings is None else {"max_position_embeddings": max_position_embeddings}
    backbone = await asyncio.to_thread(write_tiny_backbone, root / "backbone", **extra)
    store_settings = ObjectStoreSettings(endpoint=services.s3_endpoint, access_key=services.s3_access_key,
                                         secret_key=services.s3_secret_key, bucket=f"stack-{secrets.token_hex(6)}")
    await asyncio.to_thread(ObjectStore(store_settings).ensure_bucket)
    database = DatabaseSettings(url=services.database_url)
    key = await tenant_key(database, tenant)
    nc = await nats.connect(services.nats_url)
    try:
        await clean_invocations_stream(nc.jetstream())  # consumers left by other modules' workers
    finally:
        await nc.close()

    url, _, server, serving = await start_gateway(GatewaySettings(
        nats=NatsSettings(url=services.nats_url, connect_timeout_s=1), database=database, object_store=store_settings,
        registry=RegistrySettings(backbone_hf_dir=backbone),
        gateway=GatewayOptions(limits=LimitSettings(sync_timeout_s=120.0)),
    ))
    worker_settings = WorkerSettings(
        worker_id=f"stack-{secrets.token_hex(3)}", nats={"url": services.nats_url}, object_store=store_settings,
        backbone={"path": backbone}, engine={"kv_cache_bytes": 8 << 20, "adapter_pool_bytes": adapter_pool_bytes},
        host_cache={"directory": root / "cache"},
    )
    scheduler = SchedulerService(SchedulerSettings(nats={"url": services.nats_url}, database=database,
                                                   staging=staging or StagingSettings()))
    stop = asyncio.Event()
    try:
        async with open_worker(worker_settings) as worker:
            tasks = [asyncio.create_task(worker.run(stop)), asyncio.create_task(scheduler.run(stop))]
            try:
                async with httpx.AsyncClient(base_url=url, timeout=60,
                                             headers={"Authorization": f"Bearer {key}"}) as http:
                    warm = await http.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2})
                    assert warm.status_code == 200, warm.text  # the worker serves: the stack is up end to end
                yield InProcessStack(url=url, key=key, tenant=tenant, backbone=backbone)
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 30)
    finally:
        await stop_gateway(server, serving)
