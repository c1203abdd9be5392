"""The gateway's FastAPI app: `create_app(settings)` builds it; its lifespan owns every resource (one NATS
connection, the database engine, the caches, the callback consumer) and keeps them on app.state.gateway."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import adapters_api, errors, faas, keys_api, openai_api
from gateway.auth import AdapterResolver, Authenticator
from gateway.bus import NatsLink
from gateway.callbacks import CallbackDispatcher
from gateway.invoker import Invoker
from gateway.metrics import GatewayMetrics
from gateway.quotas import Limiter
from gateway.settings import POSTGRES_NAME, GatewaySettings
from gateway.state import GatewayState
from protocol import subjects
from protocol.messages import AdapterEvent, InvocationResult, KeyEvent, MessageInvalid
from scheduler.metrics import serve_metrics
from storage import repo

log = logging.getLogger(__name__)

UPLOAD_PATH = "/v1/adapters"
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the adapter bytes of an upload


class BodyLimit:
    """Refuse bodies over the limit before reading them: by Content-Length at once, else by counting the
    bytes as they stream in (chunked uploads). Uploads of adapters get the registry's larger limit."""

    def __init__(self, app: ASGIApp, *, limit: int, upload_limit: int) -> None:
        self.app, self.limit, self.upload_limit = app, limit, upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_limit if scope["path"] == UPLOAD_PATH and scope["method"] == "POST" else self.limit
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                size = -1
            if size < 0:
                await errors.error_response(None, errors.BadRequest("invalid Content-Length"))(scope, receive, send)
                return
            if size > limit:
                await errors.error_response(None, errors.BodyTooLarge(limit, size))(scope, receive, send)
                return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise errors.BodyTooLarge(limit)
            return message

        await self.app(scope, counting_receive, send)


def create_app(settings: GatewaySettings, *, registry: Any | None = None) -> FastAPI:
    """The gateway app. `registry` replaces the one built from settings (tests pass their own)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        options = settings.gateway
        engine = repo.create_engine(settings.database, name=POSTGRES_NAME)
        sessions = repo.session_factory(engine)
        rows = repo.create_fast_write_engine(settings.database, name=POSTGRES_NAME)  # invocation rows, one statement each
        metrics = GatewayMetrics()
        link = NatsLink(settings.nats, reconnect_wait_s=options.nats_reconnect_wait_s)
        resolver = AdapterResolver(sessions, options.cache)
        limiter = Limiter(options.quotas, on_refusal=lambda limit: metrics.rejections.labels(f"quota_{limit}").inc())
        authenticator = Authenticator(sessions, options.cache, limiter)
        invoker = Invoker(link=link, sessions=sessions, rows=rows, limits=options.limits, callbacks=options.callbacks,
                          metrics=metrics, quotas=limiter)

        async def on_adapter_event(msg: Msg) -> None:
            try:
                resolver.on_event(AdapterEvent.decode(msg.data))
            except MessageInvalid:
                return

        async def on_scheduler_heartbeat(msg: Msg) -> None:
            state.scheduler_seen_at = time.monotonic()

        async def on_key_event(msg: Msg) -> None:
            try:
                authenticator.on_event(KeyEvent.decode(msg.data))
            except MessageInvalid:
                return

        async def on_result(msg: Msg) -> None:
            """Results of the invocations this gateway accepted: their tokens count for their tenant's
            tokens/min and they leave its concurrency count (any other result is skipped undecoded)."""
            invocation_id = msg.subject.rpartition(".")[2]
            if not limiter.tracks(invocation_id):
                return
            try:
                result = InvocationResult.decode(msg.data)
            except MessageInvalid:
                return
            limiter.on_result(invocation_id, result.usage.completion_tokens, time.monotonic(),
                              cancel_record=result.status == "cancelled" and result.worker_id is None)

        async def subscribe_adapter_events(nc: Client, js: JetStreamContext) -> None:
            await nc.subscribe(subjects.ADAPTER_EVENTS_ALL, cb=on_adapter_event)
            await nc.subscribe(subjects.SCHEDULER_EVENTS_ALL, cb=on_scheduler_heartbeat)
            await nc.subscribe(subjects.KEY_EVENTS_ALL, cb=on_key_event)
            await nc.subscribe(subjects.RESULT_ALL, cb=on_result)

        link.on_connect(subscribe_adapter_events)
        # Adapter events are what keeps the long-lived lookup cache right; any sent while this process was
        # disconnected are lost to it, so a reconnection drops the whole cache.
        link.on_reconnect(resolver.clear)
        link.on_reconnect(authenticator.clear)  # a key revoked while away must not stay cached
        http = httpx.AsyncClient(follow_redirects=False)
        dispatcher = CallbackDispatcher(link=link, http=http, settings=options.callbacks, metrics=metrics)
        adapter_registry = registry if registry is not None else _registry(settings, sessions)
        state = GatewayState(
            settings=settings, engine=engine, sessions=sessions, link=link, metrics=metrics,
            authenticator=authenticator, limiter=limiter, resolver=resolver, invoker=invoker, http=http,
            registry=adapter_registry, base_model=str(adapter_registry.spec.name),
        )
        app.state.gateway = state
        link.start()
        if not await link.wait_ready(options.startup_nats_wait_s):
            log.warning("NATS at %s is not reachable yet; invocations answer 503 until it is", settings.nats.url)
        try:
            # The metrics name every tenant's adapters: they are served on a listener of their own (loopback
            # by default, LORAFN_METRICS__*), never on the API port.
            async with serve_metrics(metrics.registry, settings.metrics, what="gateway") as endpoint:
                state.metrics_endpoint = endpoint
                yield
        finally:
            await dispatcher.close()
            await link.close()
            await http.aclose()
            await rows.dispose()
            await engine.dispose()

    app = FastAPI(title="lorafn gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    errors.install(app)
    app.include_router(openai_api.router)
    app.include_router(faas.router)
    app.include_router(adapters_api.router)
    app.include_router(keys_api.router)
    _health_routes(app)
    upload_limit = settings.registry.max_upload_bytes + MULTIPART_OVERHEAD
    app.add_middleware(BodyLimit, limit=settings.gateway.http.max_body_bytes, upload_limit=upload_limit)
    return app


def _registry(settings: GatewaySettings, sessions: Any) -> Any:
    """The adapter registry (imported here: adapter validation pulls in torch, so only at startup)."""
    from storage.backbone import resolve_backbone_spec
    from storage.objectstore import ObjectStore
    from storage.registry import Registry

    spec = resolve_backbone_spec(gguf=settings.registry.backbone_gguf, hf_dir=settings.registry.backbone_hf_dir)
    return Registry(sessions=sessions, store=ObjectStore(settings.object_store), spec=spec,
                    settings=settings.registry)


def _health_routes(app: FastAPI) -> None:
    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        """NATS is connected, Postgres answers, and a scheduler is alive (it dispatches every invocation)."""
        gw: GatewayState = request.app.state.gateway
        postgres = True
        try:
            async with gw.sessions() as session:
                await repo.ping(session)
        except Exception:
            postgres = False
        nats_ok = gw.link.connected
        scheduler = nats_ok and gw.scheduler_alive()
        ready = postgres and nats_ok and scheduler
        return JSONResponse({"ready": ready, "nats": nats_ok, "postgres": postgres, "scheduler": scheduler},
                            status_code=200 if ready else 503)
