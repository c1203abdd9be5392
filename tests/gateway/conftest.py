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
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import nats
import pytest
import pytest_asyncio
import uvicorn
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError

from gateway.app import create_app
from gateway.settings import GatewayOptions, GatewaySettings, LimitSettings
from protocol import subjects
from protocol.messages import (
    ErrorCode,
    Invocation,
    InvocationError,
    InvocationResult,
    InvocationStarted,
    Timings,
    TokenChunk,
    Usage,
)
from protocol.settings import NatsSettings
from protocol.streams import ensure_streams
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


@dataclass
class EchoWorker:
    """The echo worker (see the module docstring)."""

    nc: Client
    worker_id: str = "test-worker"
    tier: str = "device"
    seen: list[Invocation] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _psub: Any = None
    _answering: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        js = self.nc.jetstream()
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(subjects.INVOCATIONS_STREAM, TEST_WORKER_CONSUMER)
        config = ConsumerConfig(durable_name=TEST_WORKER_CONSUMER, ack_policy=AckPolicy.EXPLICIT, ack_wait=30,
                                max_deliver=3, filter_subject=subjects.INVOKE_ALL)
        psub = await js.pull_subscribe(subjects.INVOKE_ALL, durable=TEST_WORKER_CONSUMER,
                                       stream=subjects.INVOCATIONS_STREAM, config=config)
        self._psub = psub
        self._task = asyncio.create_task(self._run(psub))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self._psub.unsubscribe()
        with contextlib.suppress(Exception):
            # A work-queue stream allows one consumer per subject: leave the subjects free for others.
            await self.nc.jetstream().delete_consumer(subjects.INVOCATIONS_STREAM, TEST_WORKER_CONSUMER)

    async def _run(self, psub: Any) -> None:
        while True:
            try:
                msgs = await psub.fetch(8, timeout=0.5)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            for msg in msgs:
                task = asyncio.create_task(self._answer(msg))
                self._answering.add(task)
                task.add_done_callback(self._answering.discard)

    async def _answer(self, msg: Any) -> None:
        inv = Invocation.decode(msg.data)
        self.seen.append(inv)
        started = time.time()
        await self.nc.publish(
            subjects.invocation_event("started"),
            InvocationStarted(invocation_id=inv.id, worker_id=self.worker_id, adapter_tier=self.tier,  # type: ignore[arg-type]
                              load_ms=12.5).encode(),
        )
        source = inv.prompt if inv.prompt is not None else (inv.messages or [])[-1].content
        words = source.split()
        result: InvocationResult
        if words[:1] == ["SLOW"]:
            await asyncio.sleep(float(words[1]))
        if words[:1] == ["FAIL"]:
            result = InvocationResult(
                invocation_id=inv.id, status="failed", worker_id=self.worker_id, adapter_tier=self.tier,  # type: ignore[arg-type]
                error=InvocationError(code=ErrorCode(words[1]), message=f"test worker failed it with {words[1]}"),
            )
        else:
            out = words[: inv.sampling.max_tokens]
            texts = [w if i == 0 else " " + w for i, w in enumerate(out)]
            if inv.stream and inv.reply_to:
                rounds = 2 if words[:1] == ["DUP"] else 1
                for _ in range(rounds):
                    for i, text in enumerate(texts):
                        chunk = TokenChunk(invocation_id=inv.id, index=i, token_ids=[i], text=text)
                        await self.nc.publish(inv.reply_to, chunk.encode(), headers={"Lorafn-Kind": "chunk"})
            result = InvocationResult(
                invocation_id=inv.id, status="succeeded", text="".join(texts), token_ids=list(range(len(out))),
                finish_reason="length" if len(out) < len(words) else "stop",
                usage=Usage(prompt_tokens=len(words), completion_tokens=len(out)),
                timings=Timings(queued_ms=(started - inv.submitted_at) * 1000, load_ms=12.5, first_token_ms=1.0,
                                total_ms=(time.time() - inv.submitted_at) * 1000),
                worker_id=self.worker_id, adapter_tier=self.tier,  # type: ignore[arg-type]
            )
        js = self.nc.jetstream()
        await js.publish(subjects.result(inv.id), result.encode(),
                         headers={"Nats-Msg-Id": f"result-{inv.id}", "Lorafn-Kind": "result"})
        if inv.reply_to:
            await self.nc.publish(inv.reply_to, result.encode(), headers={"Lorafn-Kind": "result"})
        await msg.ack()


@pytest_asyncio.fixture
async def worker(nc: Client) -> AsyncIterator[EchoWorker]:
    w = EchoWorker(nc)
    await w.start()
    try:
        yield w
    finally:
        await w.stop()


def make_settings(services: Any, object_store: ObjectStoreSettings, **limits: Any) -> GatewaySettings:
    """Gateway settings for the test services; `limits` override LimitSettings fields."""
    return GatewaySettings(
        nats=NatsSettings(url=services.nats_url, connect_timeout_s=1),
        database=DatabaseSettings(url=services.database_url),
        object_store=object_store,
        gateway=GatewayOptions(limits=LimitSettings(**{"sync_timeout_s": 10.0, **limits})),
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
