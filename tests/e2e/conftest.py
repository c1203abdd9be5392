"""The whole invocation path, for real: NATS, Postgres and S3 (the session's servers), the gateway served
by uvicorn on a free port in this event loop, the scheduler in-process, and TWO `python -m workers`
processes.

The backbone is the tiny random Llama of workers/tiny.py (the default SmolLM2 backbone is too slow for a
test budget on a small CPU): every code path is the real one, only the text is gibberish. Expected outputs
come from `workers.engine.Engine` in this process, on the same backbone and the same canonical adapter
blobs the workers download, so a response must equal them token for token.

Each test module gets its own cluster (module scope): it deletes the consumers other modules left on the
shared invocations stream, purges it, and starts its workers on a fresh bucket with a fresh tenant.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import nats
import pytest
import pytest_asyncio
import torch
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from openai import AsyncOpenAI

from gateway.settings import GatewayOptions, GatewaySettings, LimitSettings
from lorafn.services import child_env
from protocol import subjects
from protocol.messages import Heartbeat, InvocationResult, InvocationStarted
from scheduler.service import SchedulerService
from scheduler.settings import PlacementSettings, SchedulerSettings, StagingSettings
from storage.adapter_format import load_canonical, write_peft_adapter
from storage.backbone import BackboneSpec
from storage.objectstore import ObjectStore
from storage.settings import DatabaseSettings, ObjectStoreSettings, RegistrySettings
from tests.stacks import clean_invocations_stream, start_gateway, stop_gateway, tenant_key
from workers.adapters import lora_weights_from_parsed
from workers.batcher import Completion
from workers.engine import Engine, EngineSettings
from workers.sampling import SamplingParams
from workers.tiny import write_tiny_backbone
from workers.tokenizer import Tokenizer
from workers.weights import load_backbone

REPO_ROOT = Path(__file__).parents[2]
WORKERS = ("e2e-w1", "e2e-w2")
KV_CACHE_BYTES = 16 << 20
ADAPTER_POOL_BYTES = 8 << 20
ACK_WAIT_S = 4.0  # a killed worker's invocations are redelivered this long after its last in-progress ack
HEARTBEAT_TIMEOUT_S = 3.0


@dataclass
class Cluster:
    """The processes and clients of one test module."""

    services: Any
    backbone: Path
    spec: BackboneSpec
    store_settings: ObjectStoreSettings
    store: ObjectStore
    database: DatabaseSettings
    gateway_url: str
    gateway_app: Any
    tenant: str
    api_key: str
    nc: NatsClient
    js: JetStreamContext
    logs: Path
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    started: list[InvocationStarted] = field(default_factory=list)
    last_heartbeat: dict[str, float] = field(default_factory=dict)  # worker id -> monotonic time
    worker_env: dict[str, str] = field(default_factory=dict)  # the test module's WORKER_ENV: over the defaults

    # -- clients ---------------------------------------------------------------------------------------

    def openai(self) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=f"{self.gateway_url}/v1", api_key=self.api_key, max_retries=0, timeout=90.0)

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.gateway_url, timeout=90.0,
                                 headers={"Authorization": f"Bearer {self.api_key}"})

    async def push(self, name: str, source: Path) -> dict[str, Any]:
        """Upload a PEFT adapter directory through POST /v1/adapters; the adapter's JSON."""
        files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(source.iterdir())]
        async with self.http() as client:
            r = await client.post("/v1/adapters", data={"name": name}, files=files)
        assert r.status_code == 201, r.text
        body: dict[str, Any] = r.json()
        return body

    def write_adapter(self, tmp: Path, *, rank: int, modules: tuple[str, ...], seed: int,
                      std: float = 0.2) -> Path:
        return write_peft_adapter(tmp / f"r{rank}-{seed}", self.spec, rank=rank, modules=modules, seed=seed, std=std)

    # -- NATS ------------------------------------------------------------------------------------------

    async def results_recorded(self, invocation_id: str) -> int:
        """How many results the results stream holds for an invocation."""
        subject = subjects.result(invocation_id)
        info = await self.js.stream_info(subjects.RESULTS_STREAM, subjects_filter=subject)
        return int((info.state.subjects or {}).get(subject, 0))

    async def recorded_result(self, invocation_id: str) -> InvocationResult:
        raw = await self.js.get_last_msg(subjects.RESULTS_STREAM, subjects.result(invocation_id))
        return InvocationResult.decode(raw.data or b"")

    async def queued(self, subject: str = subjects.INVOKE_ALL) -> int:
        """Messages of the invocations stream under `subject` (not yet acked)."""
        info = await self.js.stream_info(subjects.INVOCATIONS_STREAM, subjects_filter=subject)
        return sum((info.state.subjects or {}).values())

    def started_by(self, invocation_id: str) -> list[str]:
        """Workers that announced InvocationStarted for an invocation, in order."""
        return [s.worker_id for s in self.started if s.invocation_id == invocation_id]

    # -- workers ---------------------------------------------------------------------------------------

    def spawn_worker(self, worker_id: str) -> None:
        env = child_env(nats_url=self.services.nats_url, object_store=self.store_settings, extra={
            **self.services.nats_env_of("worker"),  # the workers' own NATS user
            "LORAFN_BACKBONE__PATH": str(self.backbone),
            "LORAFN_WORKER_ID": worker_id,
            "LORAFN_ENGINE__KV_CACHE_BYTES": str(KV_CACHE_BYTES),
            "LORAFN_ENGINE__ADAPTER_POOL_BYTES": str(ADAPTER_POOL_BYTES),
            "LORAFN_CONSUMER__ACK_WAIT_S": str(ACK_WAIT_S),
            "LORAFN_CONSUMER__IN_PROGRESS_EVERY_S": "1",
            "LORAFN_CONSUMER__RETRY_DELAY_S": "0.5",
            "LORAFN_HEARTBEAT_S": "0.5",
            "LORAFN_DRAIN_TIMEOUT_S": "5",
            "OMP_NUM_THREADS": "1",
            **self.worker_env,
        })
        self.last_heartbeat.pop(worker_id, None)
        with open(self.logs / f"{worker_id}.log", "ab") as log:
            self.workers[worker_id] = subprocess.Popen(
                [sys.executable, "-m", "workers"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
            )

    async def wait_workers(self, worker_ids: Sequence[str] = WORKERS, timeout: float = 90.0) -> None:
        """Until every worker named has heartbeated (it is connected and pulling)."""
        deadline = time.monotonic() + timeout
        while not all(w in self.last_heartbeat for w in worker_ids):
            dead = [w for w in worker_ids if self.workers[w].poll() is not None]
            assert not dead, f"workers {dead} exited\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"workers did not start in {timeout} s\n{self.log_tail()}"
            await asyncio.sleep(0.1)

    def kill_worker(self, worker_id: str) -> None:
        proc = self.workers[worker_id]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def log_tail(self, chars: int = 4000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in sorted(self.logs.glob("*.log")))


class SpawnsWorkers(Protocol):
    workers: dict[str, subprocess.Popen[bytes]]

    def spawn_worker(self, worker_id: str) -> None: ...

    async def wait_workers(self, worker_ids: Sequence[str], timeout: float = ...) -> None: ...


@contextlib.asynccontextmanager
async def running_workers(cluster: SpawnsWorkers, worker_ids: Sequence[str]) -> AsyncIterator[None]:
    """Spawn the workers named and wait for their heartbeats; on exit, kill whichever still runs (one a test
    paused is continued first). The clusters of this folder and of test_dispatch share it."""
    for worker_id in worker_ids:
        cluster.spawn_worker(worker_id)
    try:
        await cluster.wait_workers(worker_ids)
        yield
    finally:
        for proc in cluster.workers.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            proc.wait()


async def wait_for(check: Callable[[], Any], *, timeout: float = 30.0, what: str = "condition",
                   interval: float = 0.1) -> Any:
    """Poll `check` (sync or async) until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = check()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
        except Exception as e:  # a probe may fail until it succeeds
            last_error = e
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s (last error: {last_error!r})"
        await asyncio.sleep(interval)


# -- calls through the OpenAI client ------------------------------------------------------------------------


@dataclass
class OpenAICall:
    """One call of the official client (chat or completion, streamed or not) and what came back."""

    kind: str  # "chat" or "completion"
    model: str
    prompt: str
    max_tokens: int
    temperature: float
    seed: int
    stream: bool
    adapter_sha: str | None = None  # the version behind `model` (None: the base model)
    headers: httpx.Headers | None = None
    deltas: list[str] = field(default_factory=list)  # streamed text pieces, in order
    text: str | None = None
    finish_reason: str | None = None
    opened: asyncio.Event = field(default_factory=asyncio.Event)  # set once the response headers are in

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]

    @property
    def invocation_id(self) -> str:
        assert self.headers is not None
        return str(self.headers["x-lorafn-invocation-id"])

    @property
    def tier(self) -> str | None:
        assert self.headers is not None
        return self.headers.get("x-lorafn-adapter-tier")

    @property
    def load_ms(self) -> float | None:
        assert self.headers is not None
        value = self.headers.get("x-lorafn-load-ms")
        return float(value) if value is not None else None

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, seed=self.seed, max_tokens=self.max_tokens)

    def label(self) -> str:
        return f"{self.kind}{'-stream' if self.stream else ''} {self.model}"


async def run_openai(client: AsyncOpenAI, call: OpenAICall) -> OpenAICall:
    """Make the call; fills headers (as soon as they arrive), deltas, text and finish_reason."""
    common: dict[str, Any] = {"model": call.model, "max_tokens": call.max_tokens, "temperature": call.temperature,
                              "seed": call.seed, "stream": call.stream}
    if call.kind == "chat":
        raw: Any = await client.chat.completions.with_raw_response.create(messages=call.messages,  # type: ignore[arg-type]
                                                                          **common)
    else:
        raw = await client.completions.with_raw_response.create(prompt=call.prompt, **common)
    call.headers = raw.headers
    call.opened.set()
    body = raw.parse()
    if inspect.isawaitable(body):
        body = await body
    if not call.stream:
        choice = body.choices[0]
        call.text = choice.message.content if call.kind == "chat" else choice.text
        call.finish_reason = choice.finish_reason
        return call
    async for chunk in body:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        piece = (choice.delta.content if call.kind == "chat" else choice.text) or ""
        if piece:
            call.deltas.append(piece)
        if choice.finish_reason is not None:
            call.finish_reason = choice.finish_reason
    call.text = "".join(call.deltas)
    return call


# -- the reference engine ----------------------------------------------------------------------------------


class Reference:
    """The engine in this process on the workers' backbone: what every response must equal."""

    def __init__(self, backbone: Path, store: ObjectStore) -> None:
        self.tokenizer = Tokenizer.load(backbone)
        self.engine = Engine(load_backbone(backbone), EngineSettings(kv_cache_bytes=KV_CACHE_BYTES,
                                                                     adapter_pool_bytes=ADAPTER_POOL_BYTES),
                             tokenizer=self.tokenizer)
        self.store = store

    def _add(self, sha: str) -> None:
        if sha not in self.engine.adapters:
            # Exactly what a worker does: the canonical blob from the object store, parsed the same way.
            blob = self.store.get_blob(sha)
            self.engine.add_adapter(sha, lora_weights_from_parsed(load_canonical(blob)))

    def prompt_ids(self, *, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> list[int]:
        if messages is not None:
            return self.tokenizer.encode_chat(messages)
        assert prompt is not None
        return self.tokenizer.encode(prompt)

    def run(self, requests: Sequence[tuple[str | None, list[int], SamplingParams]]) -> list[Completion]:
        """(adapter sha or None, prompt ids, sampling) -> completions, in one batch (outputs are batch
        invariant: the engine's own tests prove it)."""
        torch.set_num_threads(1)  # as the workers (OMP_NUM_THREADS=1)
        for sha, _, _ in requests:
            if sha is not None:
                self._add(sha)
        return self.engine.generate([r[1] for r in requests], [r[2] for r in requests],
                                    adapters=[r[0] for r in requests])

    def expect(self, calls: Sequence[OpenAICall]) -> list[Completion]:
        """The engine's completions of these calls (same chat template, seed and parameters)."""
        return self.run([
            (c.adapter_sha, self.prompt_ids(messages=c.messages) if c.kind == "chat" else self.prompt_ids(prompt=c.prompt),
             c.sampling())
            for c in calls
        ])


def openai_finish_reason(completion: Completion) -> str:
    """The finish_reason the gateway reports for an engine completion."""
    return "length" if completion.finish_reason.value == "length" else "stop"


# -- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def e2e_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random backbone (wider than the default tiny one so that rank 64 is a real rank), long
    context so that a generation can run long enough to be interrupted."""
    return write_tiny_backbone(tmp_path_factory.mktemp("e2e") / "backbone", hidden_size=128, intermediate_size=256,
                               max_position_embeddings=4096)


@contextlib.asynccontextmanager
async def gateway_cluster(services: Any, backbone: Path, root: Path, *, name: str, limits: LimitSettings,
                          worker_env: dict[str, str] | None = None) -> AsyncIterator[Cluster]:
    """A bucket of its own, the test's NATS connection (the invocations stream cleaned), a tenant and its key,
    the gateway in this process, and a `Cluster` that follows heartbeats and started events; the caller adds
    the scheduler(s) and workers. Cleans up the gateway, the stream and the connection."""
    logs = root / "logs"
    logs.mkdir()
    store_settings = ObjectStoreSettings(endpoint=services.s3_endpoint, access_key=services.s3_access_key,
                                         secret_key=services.s3_secret_key, bucket=f"{name}-{secrets.token_hex(6)}")
    store = ObjectStore(store_settings)
    store.ensure_bucket()
    database = DatabaseSettings(url=services.database_url)

    nc = await nats.connect(services.nats_url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    js = nc.jetstream()
    await clean_invocations_stream(js)

    tenant = f"{name}{secrets.token_hex(4)}"
    api_key = await tenant_key(database, tenant)

    # The gateway, the scheduler and the workers each connect as their own NATS user, with its permissions.
    settings = GatewaySettings(
        nats=services.nats_of("gateway"),
        database=database,
        object_store=store_settings,
        registry=RegistrySettings(backbone_hf_dir=backbone),
        gateway=GatewayOptions(limits=limits, nats_reconnect_wait_s=0.2),
    )
    url, app, server, server_task = await start_gateway(settings)
    c = Cluster(services=services, backbone=backbone, spec=BackboneSpec.from_hf_dir(backbone),
                store_settings=store_settings, store=store, database=database, gateway_url=url, gateway_app=app,
                tenant=tenant, api_key=api_key, nc=nc, js=js, logs=logs, worker_env=dict(worker_env or {}))

    async def on_heartbeat(msg: Msg) -> None:
        with contextlib.suppress(Exception):
            c.last_heartbeat[Heartbeat.decode(msg.data).worker_id] = time.monotonic()

    async def on_started(msg: Msg) -> None:
        with contextlib.suppress(Exception):
            c.started.append(InvocationStarted.decode(msg.data))

    await nc.subscribe(subjects.WORKER_EVENTS_ALL, cb=on_heartbeat)
    await nc.subscribe(subjects.invocation_event("started"), cb=on_started)
    try:
        yield c
    finally:
        with contextlib.suppress(Exception):
            await stop_gateway(server, server_task)
        with contextlib.suppress(Exception):
            await clean_invocations_stream(js)
        await nc.close()


@pytest_asyncio.fixture(scope="module")
async def cluster(services: Any, e2e_backbone: Path, tmp_path_factory: pytest.TempPathFactory,
                  request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    async with gateway_cluster(services, e2e_backbone, tmp_path_factory.mktemp("e2e-cluster"), name="e2e",
                               limits=LimitSettings(sync_timeout_s=90.0, unavailable_retry_after_s=3),
                               worker_env=getattr(request.module, "WORKER_ENV", {})) as c:
        scheduler = SchedulerService(SchedulerSettings(
            nats=services.nats_of("scheduler"), nats_callout=services.callout(), database=c.database,
            # No replication of busy adapters here: these tests expect a repeated call to find its adapter where
            # the first one loaded it (replication has its own test in test_dispatch.py).
            scheduler=PlacementSettings(heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S, flush_every_s=0.5, tick_s=0.25,
                                        placement_grace_s=3.0, adapter_cache_s=0.0, replicate_at=10_000),
            # tiers are asserted where calls left them: no predictive keep-alive moving adapters between tiers
            staging=StagingSettings(predictor="none"),
        ))
        stop = asyncio.Event()
        scheduler_task = asyncio.create_task(scheduler.run(stop))
        try:
            async with running_workers(c, WORKERS):
                yield c
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(scheduler_task, 15)


@pytest.fixture(scope="module")
def reference(cluster: Cluster) -> Reference:
    return Reference(cluster.backbone, cluster.store)
