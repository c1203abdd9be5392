"""The worker service end to end: real NATS, Postgres and S3, real `python -m workers` processes, the
scheduler in-process, and a tiny random Llama backbone (so that generation takes milliseconds per token).

The cluster (scheduler + two workers) is shared by the tests of this module, in order; the last two
tests kill one worker (SIGKILL) and drain the other (SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from lorafn.services import child_env
from protocol import subjects
from protocol.messages import (
    BASE_ADAPTER,
    ChatMessage,
    ControlReply,
    ControlRequest,
    ControlVerb,
    Heartbeat,
    Invocation,
    InvocationResult,
    InvocationStarted,
    ResidentAdapter,
    Sampling,
    TokenChunk,
)
from protocol.residency import ResidencyTracker
from protocol.streams import ensure_streams
from scheduler.service import SchedulerService
from scheduler.settings import PlacementSettings, SchedulerSettings, StagingSettings
from storage import repo
from storage.adapter_format import write_peft_adapter
from storage.backbone import BackboneSpec
from storage.models import InvocationStatus, Tier
from storage.objectstore import ObjectStore, blob_key
from storage.registry import PushResult, Registry
from storage.settings import DatabaseSettings, ObjectStoreSettings, RegistrySettings
from workers.tiny import write_tiny_backbone

pytestmark = pytest.mark.timeout(120)

WORKERS = ("tw-1", "tw-2")
PAGE_BYTES = 128  # the tiny backbone's widths have gcd 32 -> 32 float32 per page (the pool is pinned to float32)
ADAPTER_PAGES = 512  # a rank-8 adapter of all seven modules of the tiny backbone
POOL_BYTES = PAGE_BYTES * ADAPTER_PAGES * 2 + PAGE_BYTES * 50  # two such adapters fit, three do not


@dataclass
class Reply:
    """What a caller saw on its reply subject."""

    chunks: list[TokenChunk] = field(default_factory=list)
    results: list[InvocationResult] = field(default_factory=list)
    started: list[InvocationStarted] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # Lorafn-Kind of every message, in arrival order
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def text(self) -> str:
        """The streamed text, chunks deduplicated by index (a redelivered invocation repeats them)."""
        seen: dict[int, TokenChunk] = {}
        for c in self.chunks:
            seen.setdefault(c.index, c)
        return "".join(c.text for _, c in sorted(seen.items()))

    def token_ids(self) -> list[int]:
        seen: dict[int, TokenChunk] = {}
        for c in self.chunks:
            seen.setdefault(c.index, c)
        return [t for _, c in sorted(seen.items()) for t in c.token_ids]


@dataclass
class Cluster:
    """The shared processes and clients of this module."""

    nc: NatsClient
    js: JetStreamContext
    backbone: Path
    spec: BackboneSpec
    object_store: ObjectStoreSettings
    workers: dict[str, subprocess.Popen[bytes]]
    logs: Path
    heartbeats: dict[str, list[Heartbeat]]
    started: list[InvocationStarted]
    scheduler: SchedulerService
    residency: ResidencyTracker[ResidentAdapter]  # what the heartbeats say each worker holds

    async def invoke(self, inv: Invocation, *, timeout: float = 60.0, wait: bool = True,
                     msg_id: str | None = None) -> Reply:
        reply = Reply()
        sub = await self.nc.subscribe(inv.reply_to or subjects.tenant_reply(inv.tenant, inv.id), cb=_collector(reply))
        await self.js.publish(subjects.invoke(inv.tenant, inv.adapter or BASE_ADAPTER), inv.encode(),
                              headers={"Nats-Msg-Id": msg_id or inv.id})
        if wait:
            try:
                await asyncio.wait_for(reply.done.wait(), timeout)
            finally:
                await sub.unsubscribe()
        return reply

    def log_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.logs.glob("*.log")))


def _collector(reply: Reply) -> Callable[[Msg], Awaitable[None]]:
    async def on_msg(msg: Msg) -> None:
        kind = (msg.headers or {}).get("Lorafn-Kind")
        reply.kinds.append(str(kind))
        if kind == "started":
            reply.started.append(InvocationStarted.decode(msg.data))
        elif kind == "chunk":
            reply.chunks.append(TokenChunk.decode(msg.data))
        elif kind == "result":
            reply.results.append(InvocationResult.decode(msg.data))
            reply.done.set()

    return on_msg


def new_id() -> str:
    return f"inv-{secrets.token_hex(8)}"


def worker_env(services: object, backbone: Path, store: ObjectStoreSettings, worker_id: str) -> dict[str, str]:
    return child_env(nats_url=services.nats_url, object_store=store, extra={  # type: ignore[attr-defined]
        "LORAFN_BACKBONE__PATH": str(backbone),
        "LORAFN_WORKER_ID": worker_id,
        "LORAFN_ENGINE__KV_CACHE_BYTES": str(8 << 20),
        "LORAFN_ENGINE__ADAPTER_POOL_BYTES": str(POOL_BYTES),
        "LORAFN_ENGINE__ADAPTER_DTYPE": "float32",
        "LORAFN_CONSUMER__ACK_WAIT_S": "4",
        "LORAFN_CONSUMER__IN_PROGRESS_EVERY_S": "1",
        "LORAFN_HEARTBEAT_S": "0.5",
        "LORAFN_DRAIN_TIMEOUT_S": "30",
        "OMP_NUM_THREADS": "1",
    })


@pytest_asyncio.fixture(scope="module")
async def cluster(services, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("cluster")
    backbone = await asyncio.to_thread(write_tiny_backbone, root / "backbone")
    store_settings = ObjectStoreSettings(endpoint=services.s3_endpoint, access_key=services.s3_access_key,
                                         secret_key=services.s3_secret_key, bucket=f"svc-{secrets.token_hex(6)}")
    ObjectStore(store_settings).ensure_bucket()
    logs = root / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for worker_id in WORKERS:
        with open(logs / f"{worker_id}.log", "wb") as log:
            procs[worker_id] = subprocess.Popen(
                [sys.executable, "-m", "workers"], env=worker_env(services, backbone, store_settings, worker_id),
                stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2],
            )
    nc = await nats.connect(services.nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.3)
    js = nc.jetstream()
    await ensure_streams(js)
    heartbeats: dict[str, list[Heartbeat]] = {w: [] for w in WORKERS}
    residency = ResidencyTracker.of_adapters()
    started: list[InvocationStarted] = []

    async def on_heartbeat(msg: Msg) -> None:
        hb = Heartbeat.decode(msg.data)
        heartbeats.setdefault(hb.worker_id, []).append(hb)
        residency.apply(hb)

    async def on_started(msg: Msg) -> None:
        started.append(InvocationStarted.decode(msg.data))

    await nc.subscribe(subjects.WORKER_EVENTS_ALL, cb=on_heartbeat)
    await nc.subscribe(subjects.invocation_event("started"), cb=on_started)
    scheduler = SchedulerService(SchedulerSettings(
        nats={"url": services.nats_url}, database=DatabaseSettings(url=services.database_url),
        scheduler=PlacementSettings(heartbeat_timeout_s=3.0, flush_every_s=0.5, tick_s=0.25,
                                    placement_grace_s=3.0, adapter_cache_s=0.0, unknown_adapter_grace_s=30.0),
        # tiers are asserted where calls left them: no predictive keep-alive moving adapters between tiers
        staging=StagingSettings(predictor="none"),
    ))
    stop = asyncio.Event()
    scheduler_task = asyncio.create_task(scheduler.run(stop))
    c = Cluster(nc, js, backbone, BackboneSpec.from_hf_dir(backbone), store_settings, procs, logs, heartbeats,
                started, scheduler, residency)
    try:
        deadline = time.monotonic() + 60
        while not all(residency.resident(w) is not None for w in WORKERS):  # a full heartbeat of each
            dead = [w for w, p in procs.items() if p.poll() is not None]
            assert not dead and time.monotonic() < deadline, f"workers {dead} did not start\n{c.log_tail()}"
            await asyncio.sleep(0.2)
        yield c
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(scheduler_task, 15)
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        await nc.drain()


@pytest.fixture
def registry(cluster: Cluster, sessions) -> Registry:  # type: ignore[no-untyped-def]
    return Registry(sessions=sessions, store=ObjectStore(cluster.object_store), spec=cluster.spec,
                    settings=RegistrySettings())


async def push_adapter(registry: Registry, cluster: Cluster, tmp_path: Path, tenant: str, name: str,
                       seed: int = 0) -> PushResult:
    source = write_peft_adapter(tmp_path / f"{name}-{seed}", cluster.spec, rank=8, seed=seed)
    return await registry.push(tenant=tenant, name=name, source=source)


async def wait_for(check: Callable[[], object], *, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        await asyncio.sleep(0.2)


async def results_in_stream(js: JetStreamContext, invocation_id: str) -> int:
    info = await js.stream_info(subjects.RESULTS_STREAM, subjects_filter=subjects.result(invocation_id))
    return int((info.state.subjects or {}).get(subjects.result(invocation_id), 0))


async def control(cluster: Cluster, worker_id: str, request: ControlRequest) -> ControlReply:
    msg = await cluster.nc.request(subjects.control(worker_id, request.verb.value), request.encode(), timeout=30)
    return ControlReply.decode(msg.data)


# ---------------------------------------------------------------------------------------------------------


async def test_heartbeats_recorded_in_postgres(cluster: Cluster, sessions) -> None:  # type: ignore[no-untyped-def]
    async def recorded() -> bool:
        async with sessions() as session:
            workers = {w.id: w for w in await repo.live_workers(session)}
        return all(w in workers and workers[w].capacity.get("pool_pages") for w in WORKERS)

    await wait_for(recorded, what="both workers in Postgres")
    hb = cluster.heartbeats["tw-1"][-1]
    assert hb.capacity["pool_pages"] == POOL_BYTES // PAGE_BYTES
    assert hb.free_pages == hb.capacity["pool_pages"] and not hb.draining


async def test_adapter_invocation_end_to_end(cluster: Cluster, registry: Registry, sessions, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tenant = f"t{secrets.token_hex(4)}"
    pushed = await push_adapter(registry, cluster, tmp_path, tenant, "bot")
    inv_id = new_id()
    async with sessions() as session, session.begin():
        tenant_row = await repo.get_tenant(session, name=tenant)
        assert tenant_row is not None
        adapter_row = await repo.get_adapter(session, tenant=tenant_row, name="bot")
        await repo.create_invocation(session, invocation_id=inv_id, tenant=tenant_row, adapter=adapter_row)
    inv = Invocation(id=inv_id, tenant=tenant, adapter="bot", version=pushed.sha256, prompt="Hello there",
                     sampling=Sampling(temperature=0.0, max_tokens=12), reply_to=subjects.tenant_reply(tenant, inv_id))
    reply = await cluster.invoke(inv)
    [result] = reply.results
    assert result.status == "succeeded", result.error
    assert result.adapter_tier in ("device", "host", "object")
    assert result.usage.completion_tokens == len(result.token_ids) > 0
    assert reply.token_ids() == result.token_ids and reply.text() == result.text
    assert result.timings.total_ms is not None and result.timings.first_token_ms is not None
    assert await results_in_stream(cluster.js, inv_id) == 1
    # The reply subject carries the start first (with the tier the gateway puts in its headers), then chunks,
    # then the result: one subject, so nothing can overtake the start.
    assert reply.kinds[0] == "started" and reply.kinds[-1] == "result" and set(reply.kinds[1:-1]) == {"chunk"}
    [start] = reply.started
    assert start.invocation_id == inv_id and start.adapter_tier == result.adapter_tier

    async def finished() -> bool:
        async with sessions() as session:
            row = await repo.get_invocation(session, invocation_id=inv_id)
        return row.status == InvocationStatus.succeeded

    await wait_for(finished, what="invocation row succeeded")
    async with sessions() as session:
        row = await repo.get_invocation(session, invocation_id=inv_id)
        assert row.started_at and row.first_token_at and row.finished_at
        assert row.started_at <= row.first_token_at <= row.finished_at
        assert row.completion_tokens == len(result.token_ids) and row.prompt_tokens == result.usage.prompt_tokens
        assert row.worker_id == result.worker_id and row.attempts == 1

    async def resident() -> bool:
        async with sessions() as session:
            rows = await repo.worker_residency(session, worker_id=result.worker_id or "", tier=Tier.device)
        return any(str(r.adapter_version_id) == pushed.version_id for r in rows)

    await wait_for(resident, what="residency row of the placed adapter")

    # Delivered again (here: published under another Nats-Msg-Id, so the stream does not deduplicate it),
    # the recorded result is sent again and nothing is generated twice.
    again = await cluster.invoke(inv, msg_id=f"{inv_id}-again")
    assert not again.chunks and again.results == [result]
    assert await results_in_stream(cluster.js, inv_id) == 1

    # A second call of the same adapter finds it on the device.
    second = await cluster.invoke(inv.model_copy(update={"id": (i := new_id()), "reply_to": subjects.tenant_reply(tenant, i)}))
    assert second.results[0].adapter_tier == "device" and second.results[0].token_ids == result.token_ids


async def test_base_model_chat_invocation(cluster: Cluster) -> None:
    inv_id = new_id()
    inv = Invocation(id=inv_id, tenant="dev", messages=[ChatMessage(role="user", content="Say hi")],
                     sampling=Sampling(temperature=0.7, seed=7, max_tokens=8, stop=["zzz"]),
                     reply_to=subjects.tenant_reply("dev", inv_id))
    reply = await cluster.invoke(inv)
    [result] = reply.results
    assert result.status == "succeeded", result.error
    assert result.adapter_tier is None and result.usage.prompt_tokens > 5  # the chat template's tokens
    assert result.finish_reason in ("length", "stop")
    assert reply.text() == result.text


async def messages_on(js: JetStreamContext, subject: str) -> int:
    info = await js.stream_info(subjects.RESULTS_STREAM, subjects_filter=subject)
    return int((info.state.subjects or {}).get(subject, 0))


async def test_callback_copy_of_the_result(cluster: Cluster) -> None:
    """A result whose invocation has a callback URL is copied to lora.callback.<id> (what the gateway's
    callback consumer reads); one without is not; and a redelivered invocation whose result was recorded
    without its copy (a crash between the two publishes) gets the copy, not a second generation."""
    plain_id, cb_id, crashed_id = new_id(), new_id(), new_id()
    sampling = Sampling(temperature=0.0, max_tokens=4)
    plain = await cluster.invoke(Invocation(id=plain_id, tenant="dev", prompt="hi", sampling=sampling,
                                            reply_to=subjects.tenant_reply("dev", plain_id)))
    with_cb = await cluster.invoke(Invocation(id=cb_id, tenant="dev", prompt="hi", sampling=sampling,
                                              reply_to=subjects.tenant_reply("dev", cb_id), callback_url="http://127.0.0.1:9/cb"))
    assert plain.results[0].status == with_cb.results[0].status == "succeeded"
    assert await messages_on(cluster.js, subjects.callback(plain_id)) == 0
    assert await messages_on(cluster.js, subjects.callback(cb_id)) == 1
    copy = await cluster.js.get_last_msg(subjects.RESULTS_STREAM, subjects.callback(cb_id))
    assert InvocationResult.decode(copy.data) == with_cb.results[0]

    recorded = InvocationResult(invocation_id=crashed_id, status="succeeded", text="recorded before the crash",
                                worker_id="w-gone", attempt=1)
    await cluster.js.publish(subjects.result(crashed_id), recorded.encode(),
                             headers={subjects.MSG_ID_HEADER: subjects.result_msg_id(crashed_id)})
    again = await cluster.invoke(Invocation(id=crashed_id, tenant="dev", prompt="hi", sampling=sampling,
                                            reply_to=subjects.tenant_reply("dev", crashed_id),
                                            callback_url="http://127.0.0.1:9/cb"))
    assert again.results == [recorded] and not again.chunks
    assert await messages_on(cluster.js, subjects.callback(crashed_id)) == 1
    assert await results_in_stream(cluster.js, crashed_id) == 1


async def test_prompt_too_long_is_a_terminal_failure(cluster: Cluster) -> None:
    inv_id = new_id()
    reply = await cluster.invoke(Invocation(id=inv_id, tenant="dev", prompt="word " * 3000,
                                            reply_to=subjects.tenant_reply("dev", inv_id)))
    [result] = reply.results
    assert result.status == "failed" and result.error is not None
    assert result.error.code == "prompt_too_long" and "tokens" in result.error.message
    assert result.attempt == 1 and not reply.chunks
    # refused before the caller is told it started (a streaming caller gets the error as its HTTP status)
    assert not reply.started


async def test_corrupted_adapter_fails_and_is_not_redelivered(
    cluster: Cluster, registry: Registry, tmp_path: Path
) -> None:
    tenant = f"t{secrets.token_hex(4)}"
    pushed = await push_adapter(registry, cluster, tmp_path, tenant, "tampered", seed=3)
    store = ObjectStore(cluster.object_store)
    bad = b"not the adapter you pushed" * 100
    store.client.put_object(store.bucket, blob_key(pushed.sha256), io.BytesIO(bad), len(bad))
    inv_id = new_id()
    reply = await cluster.invoke(Invocation(id=inv_id, tenant=tenant, adapter="tampered", version=pushed.sha256,
                                            prompt="hi", reply_to=subjects.tenant_reply(tenant, inv_id)))
    [result] = reply.results
    assert result.status == "failed" and result.error is not None
    assert result.error.code == "adapter_corrupted"
    assert pushed.sha256 in result.error.message and "corrupted" in result.error.message
    assert result.attempt == 1
    await asyncio.sleep(5.0)  # past ack_wait: a message that was not acked would be delivered again
    assert await results_in_stream(cluster.js, inv_id) == 1
    info = await cluster.js.stream_info(subjects.INVOCATIONS_STREAM,
                                        subjects_filter=subjects.invoke(tenant, "tampered"))
    assert info.state.messages == 0


async def test_control_verbs_and_lru_eviction(cluster: Cluster, registry: Registry, tmp_path: Path) -> None:
    tenant = f"t{secrets.token_hex(4)}"
    pushed = [await push_adapter(registry, cluster, tmp_path, tenant, f"a{i}", seed=10 + i) for i in range(3)]

    def req(verb: ControlVerb, p: PushResult, **kw: object) -> ControlRequest:
        return ControlRequest(verb=verb, tenant=tenant, adapter=p.name, version=p.sha256, **kw)  # type: ignore[arg-type]

    reply = await control(cluster, "tw-1", req(ControlVerb.fetch, pushed[0]))
    assert reply.ok and reply.tier == "host"
    assert (await control(cluster, "tw-1", req(ControlVerb.fetch, pushed[0]))).load_ms == 0.0  # idempotent
    for p in pushed[:2]:
        reply = await control(cluster, "tw-1", req(ControlVerb.load, p))
        assert reply.ok and reply.tier == "device", reply.error
    again = await control(cluster, "tw-1", req(ControlVerb.load, pushed[1]))
    assert again.ok and again.load_ms == 0.0
    # The pool holds two of these adapters: loading a third evicts the least recently used (the first).
    reply = await control(cluster, "tw-1", req(ControlVerb.load, pushed[2]))
    assert reply.ok and reply.tier == "device"
    n = len(cluster.heartbeats["tw-1"])
    await wait_for(lambda: len(cluster.heartbeats["tw-1"]) > n + 1, what="a fresh heartbeat")
    tiers = {v: r.tier for v, r in cluster.residency.entries("tw-1").items()}
    assert tiers[pushed[0].sha256] == "host"
    assert tiers[pushed[1].sha256] == tiers[pushed[2].sha256] == "device"
    assert cluster.heartbeats["tw-1"][-1].capacity["transitions"]["load"]["count"] >= 3
    reply = await control(cluster, "tw-1", req(ControlVerb.evict, pushed[2]))
    assert reply.ok and reply.tier == "host"
    reply = await control(cluster, "tw-1", req(ControlVerb.evict, pushed[2], tier="host"))
    assert reply.ok and reply.tier == "object"
    for p in pushed[:2]:
        await control(cluster, "tw-1", req(ControlVerb.evict, p))


async def test_nats_restart_loses_no_queued_invocation(  # type: ignore[no-untyped-def]
    services, cluster: Cluster, registry: Registry, tmp_path: Path
) -> None:
    if services.stack is None:
        pytest.skip("the NATS server is not ours to restart")
    tenant = f"t{secrets.token_hex(4)}"
    # Published before the adapter exists, these wait in the stream: nobody can place them yet. A few
    # base-model invocations are in flight on the workers when NATS goes down.
    queued = [Invocation(id=new_id(), tenant=tenant, adapter="late", prompt=f"queued {i}",
                         sampling=Sampling(temperature=0.0, max_tokens=10)) for i in range(3)]
    running = [Invocation(id=new_id(), tenant="dev", prompt=f"running {i}",
                          sampling=Sampling(temperature=0.0, max_tokens=60)) for i in range(2)]
    for inv in queued + running:
        await cluster.js.publish(subjects.invoke(inv.tenant, inv.adapter or BASE_ADAPTER), inv.encode(),
                                 headers={"Nats-Msg-Id": inv.id})
    await asyncio.sleep(0.5)
    await asyncio.to_thread(services.stack.restart, "nats")
    await push_adapter(registry, cluster, tmp_path, tenant, "late", seed=21)

    async def all_recorded() -> bool:
        try:
            return all([await results_in_stream(cluster.js, inv.id) == 1 for inv in queued + running])
        except Exception:
            return False

    await wait_for(all_recorded, timeout=60, what="every queued invocation's result after a NATS restart")
    for inv in queued + running:
        raw = await cluster.js.get_last_msg(subjects.RESULTS_STREAM, subjects.result(inv.id))
        result = InvocationResult.decode(raw.data or b"")
        assert result.status == "succeeded", result.error


async def test_worker_killed_mid_generation_is_redelivered(
    cluster: Cluster, registry: Registry, tmp_path: Path
) -> None:
    tenant = f"t{secrets.token_hex(4)}"
    pushed = await push_adapter(registry, cluster, tmp_path, tenant, "long", seed=5)
    inv_id = new_id()
    inv = Invocation(id=inv_id, tenant=tenant, adapter="long", version=pushed.sha256, prompt="Tell me a story",
                     sampling=Sampling(temperature=0.8, max_tokens=120),
                     reply_to=subjects.tenant_reply(tenant, inv_id))
    reply = await cluster.invoke(inv, wait=False)
    await wait_for(lambda: len(reply.chunks) >= 3, what="first chunks")
    [victim] = {s.worker_id for s in cluster.started if s.invocation_id == inv_id}
    cluster.workers[victim].send_signal(signal.SIGKILL)
    cluster.workers[victim].wait()
    await asyncio.wait_for(reply.done.wait(), 60)
    [result] = reply.results
    assert result.status == "succeeded", result.error
    # The dispatcher rescued it from the silent worker: a second dispatch (epoch 2), first delivery there.
    assert result.worker_id != victim and result.epoch == 2 and result.attempt == 1
    # The retry generated again with the same seed: the chunks it repeated carry the same tokens, so
    # deduplicating by index gives exactly the result.
    assert reply.token_ids() == result.token_ids and reply.text() == result.text
    assert await results_in_stream(cluster.js, inv_id) == 1


async def test_sigterm_drains_running_invocation(cluster: Cluster) -> None:
    [survivor] = [w for w, p in cluster.workers.items() if p.poll() is None]
    inv_id = new_id()
    inv = Invocation(id=inv_id, tenant="dev", prompt="a long answer please",
                     sampling=Sampling(temperature=0.0, max_tokens=60),
                     reply_to=subjects.tenant_reply("dev", inv_id))
    reply = await cluster.invoke(inv, wait=False)
    await wait_for(lambda: len(reply.chunks) >= 2, what="first chunks")
    cluster.workers[survivor].send_signal(signal.SIGTERM)
    await asyncio.wait_for(reply.done.wait(), 60)
    assert reply.results[0].status == "succeeded" and reply.results[0].usage.completion_tokens == 60
    code = await asyncio.to_thread(cluster.workers[survivor].wait, 30)
    assert code == 0, cluster.log_tail()
    assert cluster.heartbeats[survivor][-1].draining
