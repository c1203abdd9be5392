"""Fixtures of the gateway tests: the gateway served by uvicorn on a free port (the openai client needs a
real port), tenants with API keys, and a TEST worker.

The test worker is the gateway's peer over the real NATS JetStream, not a mock of the gateway: a durable
pull consumer on `lora.invoke.>` that answers every Invocation following the worker contract (started
event, TokenChunks with indices, then one InvocationResult on the reply subject, headers
`Lorafn-Kind: chunk|result`, the result also recorded in the results stream). It echoes the prompt's
words (the last chat message's words for a chat). Prompts steer it: `FAIL <code>` fails with that
ErrorCode, `SLOW <seconds>` waits first, `DUP ...` resends every chunk (as a redelivered generation would).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import nats
import pytest
import pytest_asyncio
import uvicorn
from nats.aio.client import Client

from bench.invocation import EchoPeer
from gateway.app import create_app
from gateway.settings import CallbackSettings, GatewayOptions, GatewaySettings, LimitSettings
from protocol import subjects
from protocol.messages import (
    ErrorCode,
    Invocation,
    InvocationError,
    InvocationResult,
)
from protocol.settings import NatsSettings
from protocol.streams import ensure_streams
from scheduler.metrics import MetricsSettings
from storage import repo
from storage.backbone import default_backbone_spec
from storage.objectstore import ObjectStore
from storage.registry import Registry
from storage.settings import DatabaseSettings, ObjectStoreSettings, RegistrySettings

TEST_WORKER_CONSUMER = "gateway-test-worker"


@dataclass
class Keys:
    """API keys of the test tenants: acme (the caller) and other (a stranger)."""

    acme: str
    other: str

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.acme}"}


@pytest_asyncio.fixture
async def keys(sessions: Any) -> Keys:
    async with sessions() as session, session.begin():
        acme = await repo.create_tenant(session, name="acme")
        other = await repo.create_tenant(session, name="other")
        return Keys(acme=await repo.create_api_key(session, tenant=acme),
                    other=await repo.create_api_key(session, tenant=other))


@pytest.fixture(scope="session")
def backbone_spec() -> Any:
    return default_backbone_spec()


@pytest.fixture
def registry(sessions: Any, store: ObjectStore, backbone_spec: Any) -> Registry:
    return Registry(sessions=sessions, store=store, spec=backbone_spec, settings=RegistrySettings())


@pytest_asyncio.fixture
async def nc(services: Any) -> AsyncIterator[Client]:
    """A NATS connection of the test's own, with the streams in place and the invocations stream empty.

    Consumers left by other test modules (their workers are gone) are deleted too: a work-queue stream
    takes only non-overlapping consumers, and the echo worker consumes every invocation subject.
    """
    conn = await nats.connect(services.nats_url)
    js = conn.jetstream()
    await ensure_streams(js)
    for consumer in await js.consumers_info(subjects.INVOCATIONS_STREAM):
        await js.delete_consumer(subjects.INVOCATIONS_STREAM, consumer.name)
    await js.purge_stream(subjects.INVOCATIONS_STREAM)
    try:
        yield conn
    finally:
        await conn.close()


async def stream_messages(nc: Client, stream: str = subjects.INVOCATIONS_STREAM) -> int:
    """Messages a stream holds now."""
    return int((await nc.jetstream().stream_info(stream)).state.messages)


class EchoWorker(EchoPeer):
    """The echo worker (see the module docstring): the benchmark's echo peer on every invocation subject,
    reporting tier `device` and a 12.5 ms load, and obeying the FAIL / SLOW / DUP prompt conventions."""

    def __init__(self, nc: Client) -> None:
        super().__init__(nc, consumer=TEST_WORKER_CONSUMER, filter_subject=subjects.INVOKE_ALL,
                         worker_id="test-worker", tier="device", load_ms=12.5, batch=8)

    def chunk_rounds(self, inv: Invocation) -> int:
        return 2 if self.words(inv)[:1] == ["DUP"] else 1

    async def respond(self, inv: Invocation, started: float) -> InvocationResult:
        words = self.words(inv)
        if words[:1] == ["SLOW"]:
            await asyncio.sleep(float(words[1]))
        if words[:1] == ["FAIL"]:
            return InvocationResult(
                invocation_id=inv.id, status="failed", worker_id=self.worker_id, adapter_tier="device",
                error=InvocationError(code=ErrorCode(words[1]), message=f"test worker failed it with {words[1]}"),
            )
        return await super().respond(inv, started)


@pytest_asyncio.fixture
async def worker(nc: Client) -> AsyncIterator[EchoWorker]:
    w = EchoWorker(nc)
    await w.start()
    try:
        yield w
    finally:
        await w.stop()


# The callback receivers of the tests listen on http://127.0.0.1, which the gateway refuses by default.
TEST_CALLBACKS = CallbackSettings(allow_http=True, allow_networks=("127.0.0.1/32",))


def make_settings(services: Any, object_store: ObjectStoreSettings, **limits: Any) -> GatewaySettings:
    """Gateway settings for the test services; `limits` override LimitSettings fields."""
    return GatewaySettings(
        nats=NatsSettings(url=services.nats_url, connect_timeout_s=1),
        database=DatabaseSettings(url=services.database_url),
        object_store=object_store,
        gateway=GatewayOptions(limits=LimitSettings(**{"sync_timeout_s": 10.0, **limits}), callbacks=TEST_CALLBACKS),
        metrics=MetricsSettings(enabled=False),  # its listener's shutdown takes up to 0.5 s; test_metrics turns it on
    )


@dataclass
class RunningGateway:
    """A gateway served by uvicorn on 127.0.0.1:<port> in this event loop."""

    url: str
    app: Any
    server: uvicorn.Server
    task: asyncio.Task[None]

    def client(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30, **kw)

    async def stop(self) -> None:
        self.server.should_exit = True
        await self.task


async def start_gateway(settings: GatewaySettings, registry: Registry | None) -> RunningGateway:
    app = create_app(settings, registry=registry)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 30
    while not server.started:
        if task.done():
            task.result()
        if time.monotonic() > deadline:
            raise TimeoutError("the gateway did not start")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return RunningGateway(f"http://127.0.0.1:{port}", app, server, task)


GatewayFactory = Callable[..., Any]


@pytest_asyncio.fixture
async def gateway_factory(services: Any, object_store_settings: ObjectStoreSettings,
                          registry: Registry) -> AsyncIterator[GatewayFactory]:
    """Start gateways with modified settings: `await factory(**limits)` or `await factory(settings=...)`."""
    running: list[RunningGateway] = []

    async def factory(settings: GatewaySettings | None = None, **limits: Any) -> RunningGateway:
        gw = await start_gateway(settings or make_settings(services, object_store_settings, **limits), registry)
        running.append(gw)
        return gw

    try:
        yield factory
    finally:
        for gw in running:
            await gw.stop()


@pytest_asyncio.fixture
async def gateway(gateway_factory: GatewayFactory, keys: Keys) -> RunningGateway:
    """A gateway with the test settings."""
    gw: RunningGateway = await gateway_factory()
    return gw


@pytest_asyncio.fixture
async def client(gateway: RunningGateway, keys: Keys) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the gateway authenticated as acme."""
    async with gateway.client(headers=keys.auth()) as c:
        yield c


def random_name(prefix: str = "a") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class Pushed:
    """Adapters pushed for a test: acme/bot (the caller's) and other/secret (a stranger's)."""

    bot: str
    secret: str


@pytest_asyncio.fixture
async def adapters(registry: Registry, keys: Keys, make_peft_adapter: Callable[..., Any]) -> Pushed:
    path = make_peft_adapter(r=4, seed=3)
    await registry.push(tenant="acme", name="bot", source=path)
    await registry.push(tenant="other", name="secret", source=path)
    return Pushed(bot="acme/bot", secret="other/secret")


async def read_body(receive: Any) -> bytes:
    """The whole body of an ASGI request (for the callback receivers the tests run)."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body
