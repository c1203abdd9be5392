"""Scheduler-directed dispatch with real processes: three `python -m workers` on the tiny backbone, the
session's NATS, Postgres and S3, and the scheduler in-process (with the routing policy a test gives it) or as
`python -m scheduler` processes (for the tests that kill it).

Invocations are published the way any NATS client publishes them (`lora.invoke.<tenant>.<adapter>`), and
every reply is read from its reply subject; the gateway's own `Call` follows one of them where a test is about
what a caller sees.

Module scope: the cluster is shared by the tests, in order. Each test starts the scheduler it needs and stops
it at the end; a test that kills a worker starts it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from bench.simulate import simulate
from bench.traces import TraceRequest
from gateway.invoker import Call
from lorafn.services import child_env
from protocol import subjects
from protocol.messages import (
    ControlReply,
    ControlRequest,
    ControlVerb,
    Heartbeat,
    Invocation,
    InvocationResult,
    InvocationStarted,
    ResidentAdapter,
    Sampling,
    Tier,
    TokenChunk,
)
from protocol.residency import ResidencyTracker
from protocol.streams import ensure_streams
from scheduler.core import Evict, Fetch, Load
from scheduler.policy import AffinityRouter, PinnedRouter, Router
from scheduler.predict import Oracle, Predictor
from scheduler.service import SchedulerService
from scheduler.settings import PlacementSettings, SchedulerSettings, StagingSettings
from scheduler.staging import PredictiveStager
from storage import repo
from storage.adapter_format import write_peft_adapter
from storage.backbone import BackboneSpec
from storage.objectstore import ObjectStore
from storage.registry import PushResult, Registry
from storage.settings import DatabaseSettings, ObjectStoreSettings, RegistrySettings
from tests.e2e.conftest import running_workers, wait_for
from workers.tiny import write_tiny_backbone

pytestmark = pytest.mark.timeout(300)

REPO_ROOT = Path(__file__).parents[2]
WORKERS = ("dw-1", "dw-2", "dw-3")
HEARTBEAT_TIMEOUT_S = 2.0
UNKNOWN_GRACE_S = 3.0
# 64 rank-8 adapters of the tiny backbone per worker (512 pages of 128 bytes each): 300 adapters over three
# workers must be evicted and loaded again.
ADAPTER_POOL_BYTES = 64 * 512 * 128
# Replies come back as to a gateway of this name: lora.reply.<tenant>.dispatch-test.<invocation id>, inside the
# tenant's reply namespace (the dispatcher refuses a reply subject outside it).
REPLIES_AS = "dispatch-test"


# These tests drive placement and staging by hand (pins, staging verbs, tiers expected where a call left them);
# the predictive stager's keep-alive releases at interval boundaries would move adapters under them.
# Pre-staging has its own live test (tests/e2e/test_prestaging.py).
NO_STAGING = StagingSettings(predictor="none")


def scheduler_settings(services: Any) -> dict[str, str]:
    """The scheduler's timing in these tests, as LORAFN_SCHEDULER__* values."""
    return {"HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S), "FLUSH_EVERY_S": "0.5", "TICK_S": "0.2",
            "UNKNOWN_ADAPTER_GRACE_S": str(UNKNOWN_GRACE_S), "PLACEMENT_GRACE_S": "3", "ADAPTER_CACHE_S": "0",
            "DISPATCH_ACK_WAIT_S": "2"}


@dataclass
class Reply:
    """What a caller saw on its reply subject."""

    started: list[InvocationStarted] = field(default_factory=list)
    chunks: list[TokenChunk] = field(default_factory=list)
    results: list[InvocationResult] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Cluster:
    services: Any
    backbone: Path
    spec: BackboneSpec
    store_settings: ObjectStoreSettings
    registry: Registry
    sessions: Any
    nc: NatsClient
    js: JetStreamContext
    logs: Path
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    schedulers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    heartbeats: dict[str, Heartbeat] = field(default_factory=dict)
    residency: ResidencyTracker[ResidentAdapter] = field(default_factory=ResidencyTracker.of_adapters)
    replies: dict[str, Reply] = field(default_factory=dict)
    calls: dict[str, Call] = field(default_factory=dict)  # invocations followed by the gateway's Call

    # -- processes ---------------------------------------------------------------------------------------------

    def spawn_worker(self, worker_id: str, **settings: str) -> None:
        """Start `python -m workers` as `worker_id`; `settings`: LORAFN_* variables over the module's own."""
        env = child_env(nats_url=self.services.nats_url, object_store=self.store_settings, extra={
            **self.services.nats_env_of("worker"),  # the workers' own NATS user
            "LORAFN_BACKBONE__PATH": str(self.backbone), "LORAFN_WORKER_ID": worker_id,
            "LORAFN_ENGINE__KV_CACHE_BYTES": str(16 << 20),
            "LORAFN_ENGINE__ADAPTER_POOL_BYTES": str(ADAPTER_POOL_BYTES),
            "LORAFN_ENGINE__ADAPTER_DTYPE": "float32",
            "LORAFN_CONSUMER__ACK_WAIT_S": "4", "LORAFN_CONSUMER__IN_PROGRESS_EVERY_S": "0.5",
            "LORAFN_HEARTBEAT_S": "0.25", "LORAFN_DRAIN_TIMEOUT_S": "5", "OMP_NUM_THREADS": "1",
            **settings,
        })
        self.heartbeats.pop(worker_id, None)
        self.residency.forget(worker_id)
        with open(self.logs / f"{worker_id}.log", "ab") as log:
            self.workers[worker_id] = subprocess.Popen([sys.executable, "-m", "workers"], env=env, stdout=log,
                                                       stderr=subprocess.STDOUT, cwd=REPO_ROOT)

    def spawn_scheduler(self, name: str) -> None:
        extra = {f"LORAFN_SCHEDULER__{k}": v for k, v in scheduler_settings(self.services).items()}
        extra["LORAFN_STAGING__PREDICTOR"] = "none"  # see NO_STAGING
        extra |= self.services.nats_env_of("scheduler")  # the scheduler's own NATS user
        env = child_env(nats_url=self.services.nats_url, database_url=self.services.database_url, extra=extra)
        with open(self.logs / f"{name}.log", "ab") as log:
            self.schedulers[name] = subprocess.Popen([sys.executable, "-m", "scheduler"], env=env, stdout=log,
                                                     stderr=subprocess.STDOUT, cwd=REPO_ROOT)

    def stop_schedulers(self) -> None:
        for proc in self.schedulers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.schedulers.values():
            proc.wait(20)
        self.schedulers.clear()

    async def wait_workers(self, worker_ids: Sequence[str] = WORKERS, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(w in self.heartbeats for w in worker_ids):
            dead = [w for w in worker_ids if self.workers[w].poll() is not None]
            assert not dead, f"workers {dead} exited\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"workers did not start in {timeout} s\n{self.log_tail()}"
            await asyncio.sleep(0.1)

    def log_tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in sorted(self.logs.glob("*.log")))

    @contextlib.asynccontextmanager
    async def scheduler(self, router: Router | None = None, expect: Sequence[str] = WORKERS, *,
                        predictor: Predictor | None = None, stager: PredictiveStager | None = None,
                        staging: StagingSettings = NO_STAGING, **placement: str,
                        ) -> AsyncIterator[SchedulerService]:
        """An in-process scheduler with `router` (and `predictor`, with the staging settings' interval) for the
        duration of the block (once it has heard from the workers in `expect`); `placement`: settings over
        `scheduler_settings` (HEARTBEAT_TIMEOUT_S="60", ...)."""
        settings = SchedulerSettings(
            nats=self.services.nats_of("scheduler"), database=DatabaseSettings(url=self.services.database_url),
            scheduler=PlacementSettings.model_validate(
                {k.lower(): v for k, v in (scheduler_settings(self.services) | placement).items()}),
            staging=staging,
        )
        service = SchedulerService(settings, router=router, scheduler_id=f"test-{secrets.token_hex(3)}",
                                   predictor=predictor, stager=stager)
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        try:
            await wait_for(lambda: set(expect) <= set(service.core.workers()) or task.done(),
                           what="the scheduler seeing every worker")
            assert not task.done(), task.exception()
            yield service
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    # -- adapters and calls --------------------------------------------------------------------------------------

    async def push(self, tenant: str, name: str, seed: int) -> PushResult:
        source = self.logs.parent / "adapters" / f"{seed}"
        if not source.exists():
            await asyncio.to_thread(write_peft_adapter, source, self.spec, rank=8, seed=seed)
        return await self.registry.push(tenant=tenant, name=name, source=source)

    def invocation(self, tenant: str, adapter: str | None, *, max_tokens: int = 4, prompt: str = "hello",
                   version: str | None = None) -> Invocation:
        inv_id = f"inv-{secrets.token_hex(8)}"
        return Invocation(id=inv_id, tenant=tenant, adapter=adapter, version=version, prompt=prompt,
                          sampling=Sampling(temperature=0.0, max_tokens=max_tokens),
                          reply_to=subjects.gateway_reply(REPLIES_AS, inv_id, tenant=tenant))

    def follow(self, invocations: Sequence[Invocation]) -> None:
        """Follow each invocation with the gateway's own `Call` too, as a caller would (see `one_stream`)."""
        for inv in invocations:
            self.calls[inv.id] = Call(inv.id, inv.id, deadline=time.monotonic() + 180, timeout_s=180)

    async def publish(self, inv: Invocation) -> Reply:
        reply = self.replies[inv.id] = Reply()
        await self.js.publish(subjects.invoke(inv.tenant, inv.adapter or subjects.BASE_ADAPTER), inv.encode(),
                              headers={subjects.MSG_ID_HEADER: inv.id})
        return reply

    async def call(self, inv: Invocation, timeout: float = 120.0) -> InvocationResult:
        reply = await self.publish(inv)
        try:
            await asyncio.wait_for(reply.done.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"no result for {inv.id} in {timeout} s\n{self.log_tail()}") from None
        return reply.results[0]

    async def call_all(self, invocations: Sequence[Invocation], *, concurrency: int) -> list[InvocationResult]:
        """Every invocation, at most `concurrency` waiting at a time (callers that wait for their answer)."""
        gate = asyncio.Semaphore(concurrency)

        async def one(inv: Invocation) -> InvocationResult:
            async with gate:
                return await self.call(inv)

        return await asyncio.gather(*(one(i) for i in invocations))

    async def results_recorded(self, invocation_id: str) -> int:
        subject = subjects.result(invocation_id)
        info = await self.js.stream_info(subjects.RESULTS_STREAM, subjects_filter=subject)
        return int((info.state.subjects or {}).get(subject, 0))

    async def consumer_counts(self) -> dict[str, int]:
        return {stream: (await self.js.stream_info(stream)).state.consumer_count
                for stream in (subjects.INVOCATIONS_STREAM, subjects.WORK_STREAM)}

    async def worker_subscriptions(self) -> dict[str, int]:
        """Subscriptions of each worker's NATS connection, from the server's monitoring endpoint."""
        stack = self.services.stack
        assert stack is not None, "the monitoring port of the session's NATS server is needed"
        url = f"http://127.0.0.1:{stack.config.ports.nats_monitor}/connz?subs=1&limit=1024"
        async with httpx.AsyncClient() as http:
            conns = (await http.get(url)).json()["connections"]
        return {c["name"].removeprefix("lorafn-worker-"): int(c.get("subscriptions", 0))
                for c in conns if c.get("name", "").removeprefix("lorafn-worker-") in WORKERS}


@pytest_asyncio.fixture(scope="module")
async def cluster(services: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    root = tmp_path_factory.mktemp("dispatch")
    backbone = await asyncio.to_thread(write_tiny_backbone, root / "backbone")
    spec = BackboneSpec.from_hf_dir(backbone)
    store_settings = ObjectStoreSettings(endpoint=services.s3_endpoint, access_key=services.s3_access_key,
                                         secret_key=services.s3_secret_key, bucket=f"dispatch-{secrets.token_hex(5)}")
    ObjectStore(store_settings).ensure_bucket()
    engine = repo.create_engine(DatabaseSettings(url=services.database_url))
    sessions = repo.session_factory(engine)
    registry = Registry(sessions=sessions, store=ObjectStore(store_settings), spec=spec, settings=RegistrySettings())
    nc = await nats.connect(services.nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    js = nc.jetstream()
    await ensure_streams(js)
    for stream in (subjects.INVOCATIONS_STREAM, subjects.WORK_STREAM):  # what other modules left behind
        for consumer in await js.consumers_info(stream):
            await js.delete_consumer(stream, consumer.name)
        await js.purge_stream(stream)
    logs = root / "logs"
    logs.mkdir()
    c = Cluster(services, backbone, spec, store_settings, registry, sessions, nc, js, logs)

    async def on_heartbeat(msg: Msg) -> None:
        hb = Heartbeat.decode(msg.data)
        c.heartbeats[hb.worker_id] = hb
        c.residency.apply(hb)

    async def on_reply(msg: Msg) -> None:
        inv_id = msg.subject.rpartition(".")[2]
        call = c.calls.get(inv_id)
        if call is not None:
            await call.on_reply(msg)
        reply = c.replies.get(inv_id)
        if reply is None:
            return
        kind = (msg.headers or {}).get(subjects.KIND_HEADER)
        if kind == subjects.KIND_STARTED:
            reply.started.append(InvocationStarted.decode(msg.data))
        elif kind == subjects.KIND_CHUNK:
            reply.chunks.append(TokenChunk.decode(msg.data))
        elif kind == subjects.KIND_RESULT:
            reply.results.append(InvocationResult.decode(msg.data))
            reply.done.set()

    await nc.subscribe(subjects.WORKER_EVENTS_ALL, cb=on_heartbeat)
    await nc.subscribe(subjects.gateway_replies(REPLIES_AS), cb=on_reply)
    try:
        async with running_workers(c, WORKERS):
            yield c
    finally:
        c.stop_schedulers()
        await nc.drain()
        await engine.dispose()


def zipf_order(n: int, calls: int, *, s: float = 1.0, seed: int = 0) -> list[int]:
    """`calls` indexes of n items drawn by Zipf popularity (rank r has weight 1/r^s), every item at least once."""
    rng = random.Random(seed)
    weights = [1.0 / (r + 1) ** s for r in range(n)]
    order = list(range(n)) + rng.choices(range(n), weights=weights, k=calls - n)
    rng.shuffle(order)
    return order


# ---------------------------------------------------------------------------------------------------------------


async def test_scale_1000_adapters_300_invoked_in_zipf_order(cluster: Cluster) -> None:
    """1,000 adapters registered, 300 of them invoked over three workers in Zipf order by 32 concurrent callers:
    every call succeeds, and neither the workers' subscriptions nor the JetStream consumers grow with the
    number of adapters (measured with 10 adapters, then with 1,000)."""
    tenant = f"scale{secrets.token_hex(3)}"
    async with cluster.scheduler():
        pushed = [await cluster.push(tenant, f"a{i}", seed=i) for i in range(10)]
        few = await cluster.call_all([cluster.invocation(tenant, p.name) for p in pushed for _ in range(3)],
                                     concurrency=32)
        assert all(r.status == "succeeded" for r in few), [r.error for r in few if r.error]
        consumers_10, subs_10 = await cluster.consumer_counts(), await cluster.worker_subscriptions()

        for start in range(10, 1000, 100):  # 990 more, pushed 100 at a time
            pushed += await asyncio.gather(*(cluster.push(tenant, f"a{i}", seed=i)
                                             for i in range(start, min(start + 100, 1000))))
        async with cluster.sessions() as session:
            assert len(await repo.list_adapters(session)) >= 1000
        invoked = [pushed[i] for i in random.Random(1).sample(range(1000), 300)]
        order = zipf_order(300, 600, seed=2)
        calls = [cluster.invocation(tenant, invoked[i].name) for i in order]
        started = time.monotonic()
        results = await cluster.call_all(calls, concurrency=32)
        elapsed = time.monotonic() - started
        failed = [(r.invocation_id, r.error) for r in results if r.status != "succeeded"]
        assert not failed, failed
        consumers_1000, subs_1000 = await cluster.consumer_counts(), await cluster.worker_subscriptions()

    assert consumers_1000 == consumers_10 == {subjects.INVOCATIONS_STREAM: 1, subjects.WORK_STREAM: len(WORKERS)}
    assert subs_1000 == subs_10 and set(subs_10) == set(WORKERS), (subs_10, subs_1000)
    by_worker: dict[str, int] = {}
    for r in results:
        by_worker[r.worker_id or "?"] = by_worker.get(r.worker_id or "?", 0) + 1
    assert set(by_worker) == set(WORKERS), by_worker  # the load was spread over all three
    logging.getLogger(__name__).info("600 calls over 300 adapters in %.1f s (%.1f calls/s); per worker %s",
                                     elapsed, 600 / elapsed, by_worker)


async def test_a_routing_policy_is_obeyed_live_and_in_the_simulator(cluster: Cluster) -> None:
    """One policy object, a PinnedRouter that sends adapter X to worker 2, drives the live dispatcher and the
    simulator: every call of X runs on worker 2 in both, and the other adapters are spread as usual."""
    tenant = f"pin{secrets.token_hex(3)}"
    x, y = await cluster.push(tenant, "x", seed=5000), await cluster.push(tenant, "y", seed=5001)
    policy = PinnedRouter(pins={f"{tenant}/x": "dw-2", f"{tenant}/sim-x": "w1"}, fallback=AffinityRouter())

    async with cluster.scheduler(router=policy) as service:
        results = await cluster.call_all(
            [cluster.invocation(tenant, name) for name in ["x", "y"] * 20], concurrency=16)
        assert all(r.status == "succeeded" for r in results)
        assert {r.worker_id for r, name in zip(results, ["x", "y"] * 20, strict=True) if name == "x"} == {"dw-2"}
        assert service.core.decisions["pinned"] == 20

    trace = [TraceRequest(at_s=i * 0.05, tenant=tenant, adapter=("sim-x" if i % 2 else "sim-y"), prompt_tokens=32,
                          output_tokens=8) for i in range(200)]
    report = simulate(trace, workers=3, router=policy, seed=3)
    assert report.completed == 200
    sim_x = {w: rec.adapters.get(f"{tenant}/sim-x", 0) for w, rec in report.per_worker.items()}
    assert sim_x["w1"] == 100 and sum(sim_x.values()) == 100, sim_x
    assert report.decisions["pinned"] == 100
    assert x.sha256 != y.sha256


async def test_the_schedulers_staging_commands_move_an_adapter_between_tiers(cluster: Cluster) -> None:
    """Fetch, Load and Evict from the core are carried out on the worker they name (the stager emits them;
    here they are sent by hand); the worker's heartbeats, and so the core's residency, follow."""
    tenant = f"stage{secrets.token_hex(3)}"
    pushed = await cluster.push(tenant, "staged", seed=6000)
    sha, worker = pushed.sha256, "dw-2"

    def tier_in_heartbeat() -> str | None:
        held = cluster.residency.entries(worker).get(sha)
        return held.tier.value if held else None

    async with cluster.scheduler() as service:
        assert service.dispatcher is not None
        await service.dispatcher.stage(Fetch(sha, worker))
        await wait_for(lambda: tier_in_heartbeat() == "host", what="the blob in the host cache")
        await service.dispatcher.stage(Load(sha, worker))
        await wait_for(lambda: tier_in_heartbeat() == "device", what="the adapter on the device")
        await wait_for(lambda: service.core.residency().get(sha, {}).get(worker) == Tier.device,
                       what="the core seeing it on the device")
        # Routed to where it now is, without a load.
        result = await cluster.call(cluster.invocation(tenant, "staged"))
        assert result.worker_id == worker and result.adapter_tier == "device"
        await service.dispatcher.stage(Evict(sha, worker, Tier.host))
        await wait_for(lambda: tier_in_heartbeat() == "host", what="the adapter back in the host cache")


async def test_a_predicted_call_finds_its_adapter_staged_and_an_idle_one_is_released(cluster: Cluster) -> None:
    """Pre-staging live, with the oracle (it knows when the calls come) at 1-second intervals and a stager
    whose keep-alive is short and drops host blobs too: after its first call the adapter is idle, so it is
    released from every tier; before its next call the scheduler loads it again, and that call finds it on
    the device."""
    tenant = f"pre{secrets.token_hex(3)}"
    sha = (await cluster.push(tenant, "ahead", seed=6100)).sha256
    t0 = math.ceil(time.time()) + 2.0
    first, second = t0 + 0.3, t0 + 6.6  # the second's interval (t0 + 6, t0 + 7] is staged at t0 + 6
    oracle = Oracle([(first, sha), (second, sha)], 1.0)

    def holders() -> dict[str, str]:
        return {w: held[sha].tier.value for w in cluster.heartbeats
                for held in (cluster.residency.entries(w),) if sha in held}

    stager = PredictiveStager(keep_alive_s=0.5, host_release_at=0.02)
    async with cluster.scheduler(predictor=oracle, stager=stager, staging=StagingSettings(interval_s=1.0)) as service:
        await asyncio.sleep(max(0.0, first - time.time()))
        assert (await cluster.call(cluster.invocation(tenant, "ahead"))).adapter_tier != "device"  # never called
        await wait_for(lambda: not holders(), timeout=15, what="the idle adapter released from every tier")
        assert time.time() < second - 0.5, "the release came too late for this test's timeline"
        await asyncio.sleep(max(0.0, second - time.time()))
        result = await cluster.call(cluster.invocation(tenant, "ahead"))
        assert result.adapter_tier == "device", holders()
        await wait_for(lambda: service.core.intervals[-1].end >= t0 + 7.0, what="the interval closed")
        rec = next(r for r in service.core.intervals if r.end == t0 + 7.0)
        assert (rec.loads, rec.calls, rec.device_hits, rec.hits, rec.precision) == (1, 1, 1, 1, 1.0)
        assert [r.end for r in service.core.intervals if r.loads] == [t0 + 7.0]  # loaded once, for its call


class HeldForecast:
    """A predictor whose forecasts wait until the test lets them go (as a forecast over many adapters takes
    its time: an LSTM's over 10,000 takes about half a second)."""

    name = "held"

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.asked, self.go = threading.Event(), threading.Event()
        self.answered = 0

    def observe(self, end: float, counts: Mapping[str, int]) -> None:
        pass

    def predict(self, now: float, keys: Collection[str]) -> dict[str, float]:
        self.asked.set()
        self.go.wait(timeout=120)
        self.answered += 1
        return dict.fromkeys(keys, 0.0)


async def test_a_forecast_under_way_does_not_hold_up_dispatch(cluster: Cluster) -> None:
    """The scheduler's demand predictor runs beside its event loop: while a forecast is stuck, calls are
    dispatched and served; once it answers, its interval is staged and recorded with it."""
    tenant = f"held{secrets.token_hex(3)}"
    await cluster.push(tenant, "busy", seed=6300)
    held = HeldForecast(1.0)
    try:
        async with cluster.scheduler(predictor=held, stager=PredictiveStager(),
                                     staging=StagingSettings(interval_s=1.0)) as service:
            assert (await cluster.call(cluster.invocation(tenant, "busy"))).status == "succeeded"
            await wait_for(held.asked.is_set, what="a forecast under way")  # (the adapter is a key to score now)
            results = await cluster.call_all([cluster.invocation(tenant, "busy", prompt=f"p {i}") for i in range(8)],
                                             concurrency=4)
            assert [r.status for r in results] == ["succeeded"] * 8
            assert held.answered == 0  # all of them served while the forecast waited
            held.go.set()
            await wait_for(lambda: any(r.predictor == "held" for r in service.core.intervals),
                           what="an interval staged with the forecast")
    finally:
        held.go.set()


async def test_a_busy_adapter_is_replicated_to_another_worker(cluster: Cluster) -> None:
    """48 concurrent calls of one adapter do not all queue on the worker that loaded it: once it has
    `replicate_at` (8) calls outstanding and another worker is 4 lighter, calls go there (a second copy)."""
    tenant = f"hot{secrets.token_hex(3)}"
    await cluster.push(tenant, "hot", seed=6500)
    async with cluster.scheduler() as service:
        results = await cluster.call_all(
            [cluster.invocation(tenant, "hot", max_tokens=64, prompt=f"hot {i}") for i in range(48)], concurrency=48)
        assert service.core.decisions["replicate"] > 0
    assert all(r.status == "succeeded" for r in results)
    by_worker: dict[str, int] = {}
    for r in results:
        by_worker[r.worker_id or "?"] = by_worker.get(r.worker_id or "?", 0) + 1
    assert len(by_worker) >= 2, by_worker  # served by more than one worker
    assert max(by_worker.values()) < 48 * 3 // 4, by_worker


async def test_two_tenants_pushing_identical_bytes_are_both_served(cluster: Cluster) -> None:
    """Two names whose adapters have the same bytes are one version (one blob, one residency); calls of both
    are served, concurrently and by name."""
    t1, t2 = f"same{secrets.token_hex(3)}", f"same{secrets.token_hex(3)}"
    a = await cluster.push(t1, "bot", seed=7000)
    b = await cluster.push(t2, "helper", seed=7000)
    c = await cluster.push(t1, "twin", seed=7000)
    assert a.sha256 == b.sha256 == c.sha256
    async with cluster.scheduler():
        calls = [cluster.invocation(t, n) for t, n in [(t1, "bot"), (t2, "helper"), (t1, "twin")] * 4]
        # One of each names no version (a direct NATS client): the dispatcher resolves the current one.
        calls.append(cluster.invocation(t2, "helper"))
        results = await cluster.call_all(calls, concurrency=13)
    assert all(r.status == "succeeded" for r in results), [r.error for r in results]
    assert len({tuple(r.token_ids) for r in results}) == 1  # same weights, same greedy tokens


async def test_a_killed_worker_loses_none_of_50_invocations(cluster: Cluster) -> None:
    """SIGKILL a worker with 50 invocations queued or running on it: all 50 succeed (its work is rescued when
    its heartbeats stop), each recorded once."""
    tenant = f"kill{secrets.token_hex(3)}"
    await cluster.push(tenant, "busy", seed=8000)
    victim = "dw-1"
    try:
        async with cluster.scheduler(router=PinnedRouter(pins={f"{tenant}/busy": victim})):
            calls = [cluster.invocation(tenant, "busy", max_tokens=400, prompt=f"story {i}") for i in range(50)]
            replies = [await cluster.publish(inv) for inv in calls]
            await wait_for(lambda: sum(bool(r.chunks) for r in replies) >= 5, what="calls running on the victim")

            async def all_on_the_victim() -> bool:  # every call dispatched: finished, or waiting in its queue
                subject = subjects.work(victim)
                info = await cluster.js.stream_info(subjects.WORK_STREAM, subjects_filter=subject)
                return (info.state.subjects or {}).get(subject, 0) + sum(r.done.is_set() for r in replies) == 50

            await wait_for(all_on_the_victim, what="all 50 calls dispatched to the victim")
            done_before_kill = sum(r.done.is_set() for r in replies)
            cluster.workers[victim].send_signal(signal.SIGKILL)
            cluster.workers[victim].wait(10)
        assert done_before_kill <= 5, done_before_kill  # at least 45 were queued or running on the victim
        # The pin would wait for the dead worker: an operator replaces the scheduler with the default policy.
        async with cluster.scheduler(router=AffinityRouter(), expect=("dw-2", "dw-3")):
            await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in replies)), 180)
        for inv, reply in zip(calls, replies, strict=True):
            [result] = reply.results
            assert result.status == "succeeded", result.error
            assert await cluster.results_recorded(inv.id) == 1
        results = [r.results[0] for r in replies]
        rescued = [r for r in results if r.epoch == 2]
        assert rescued and {r.worker_id for r in rescued} <= {"dw-2", "dw-3"}
        assert all(r.worker_id == victim for r in results if r.epoch == 1)  # finished before the kill
    finally:
        if cluster.workers[victim].poll() is not None:
            cluster.spawn_worker(victim)
        await cluster.wait_workers()


async def test_a_killed_dispatcher_loses_nothing(cluster: Cluster) -> None:
    """Two `python -m scheduler` processes share the dispatch; SIGKILL one while invocations are queued: every
    call succeeds (the other takes its unacknowledged messages). Then with none left, calls wait in the
    stream and all succeed once a scheduler is back."""
    tenant = f"disp{secrets.token_hex(3)}"
    await cluster.push(tenant, "d", seed=9000)
    cluster.spawn_scheduler("sched-a")
    cluster.spawn_scheduler("sched-b")
    try:
        await asyncio.sleep(2.0)
        first = [cluster.invocation(tenant, "d", max_tokens=16, prompt=f"q{i}") for i in range(40)]
        replies = [await cluster.publish(inv) for inv in first]
        cluster.schedulers["sched-a"].send_signal(signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in replies)), 120)
        assert all(r.results[0].status == "succeeded" for r in replies)

        cluster.schedulers["sched-b"].send_signal(signal.SIGKILL)
        queued = [cluster.invocation(tenant, "d", prompt=f"late {i}") for i in range(20)]
        late = [await cluster.publish(inv) for inv in queued]
        await asyncio.sleep(1.0)
        assert not any(r.done.is_set() for r in late)  # nobody dispatches them: they wait in the stream
        cluster.spawn_scheduler("sched-c")
        await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in late)), 120)
        assert all(r.results[0].status == "succeeded" for r in late)
        for inv in first + queued:
            assert await cluster.results_recorded(inv.id) == 1
    finally:
        cluster.stop_schedulers()


async def one_stream(cluster: Cluster, inv: Invocation) -> InvocationResult:
    """What the caller of `inv` saw through the gateway's Call (followed since it was published): one
    contiguous stream of tokens, none twice, ending in a succeeded result with exactly those tokens, the only
    result recorded."""
    assert await cluster.results_recorded(inv.id) == 1
    call = cluster.calls.pop(inv.id)
    tokens: list[int] = []
    result: InvocationResult | None = None
    async for event in call.events():
        if isinstance(event, TokenChunk):
            assert event.index == len(tokens)  # contiguous, nothing twice
            tokens += event.token_ids
        elif isinstance(event, InvocationResult):
            result = event
    assert result is not None and result.status == "succeeded", result
    assert tokens == result.token_ids
    return result


async def test_a_paused_worker_is_rescued_and_the_caller_sees_one_stream(cluster: Cluster) -> None:
    """SIGSTOP a worker mid-generation for longer than its heartbeat timeout, then SIGCONT: every call succeeds
    once (one recorded result), and the caller, through the gateway's Call, sees one stream whose tokens are
    the result's, none twice."""
    tenant = f"stop{secrets.token_hex(3)}"
    await cluster.push(tenant, "s", seed=9500)
    victim = "dw-3"
    calls = [cluster.invocation(tenant, "s", max_tokens=200, prompt=f"long {i}") for i in range(6)]
    cluster.follow(calls)
    async with cluster.scheduler(router=PinnedRouter(pins={f"{tenant}/s": victim}, fallback=AffinityRouter())):
        replies = [await cluster.publish(inv) for inv in calls]
        await wait_for(lambda: all(r.chunks for r in replies), what="every call streaming on the victim")
        cluster.workers[victim].send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(HEARTBEAT_TIMEOUT_S + 1.5)
        # A new scheduler, with the default policy (the pin would wait for the paused worker), has never heard
        # from the paused worker: the work queued on its subject is rescued all the same.
        async with cluster.scheduler(router=AffinityRouter(), expect=("dw-1", "dw-2")):
            await wait_for(lambda: all(len({s.epoch for s in r.started}) == 2 for r in replies), timeout=60,
                           what="every call started again elsewhere")
            cluster.workers[victim].send_signal(signal.SIGCONT)
            await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in replies)), 120)
            await asyncio.sleep(2.0)  # what the woken worker might still send arrives now
    finally:
        cluster.workers[victim].send_signal(signal.SIGCONT)
    for inv in calls:
        result = await one_stream(cluster, inv)
        assert result.epoch == 2 and result.worker_id != victim
    # The woken worker abandoned its copies: it recorded nothing and is serving again.
    await wait_for(lambda: victim in cluster.heartbeats and not cluster.heartbeats[victim].running,
                   what="the woken worker idle")


async def test_a_worker_restarted_before_it_was_missed_hands_back_what_it_was_running(cluster: Cluster) -> None:
    """SIGKILL a worker mid-generation and start it again with its id while no scheduler could notice (a crashed
    container restarted in place): its new process hands the calls the old one was running back for a new
    dispatch at once (epoch 2), instead of running them again after the ack wait, and its consumer takes the
    new process's settings. Every call succeeds once, and the caller sees one stream."""
    tenant = f"crash{secrets.token_hex(3)}"
    await cluster.push(tenant, "c", seed=9600)
    victim = "dw-2"
    calls = [cluster.invocation(tenant, "c", max_tokens=1000, prompt=f"crash {i}") for i in range(6)]
    cluster.follow(calls)
    durable = subjects.work_consumer(victim)
    try:
        # This scheduler would not miss the victim for a minute; the next one starts after it is back.
        async with cluster.scheduler(router=PinnedRouter(pins={f"{tenant}/c": victim}), HEARTBEAT_TIMEOUT_S="60"):
            replies = [await cluster.publish(inv) for inv in calls]
            await wait_for(lambda: all(r.chunks for r in replies), what="every call streaming on the victim")
            cluster.workers[victim].send_signal(signal.SIGKILL)
            cluster.workers[victim].wait(10)
        assert not any(r.done.is_set() for r in replies)
        assert (await cluster.js.consumer_info(subjects.WORK_STREAM, durable)).num_ack_pending == len(calls)
        cluster.spawn_worker(victim, LORAFN_CONSUMER__ACK_WAIT_S="7")
        await cluster.wait_workers([victim])

        async def handed_back() -> bool:  # to the invocations stream, for the next scheduler to dispatch
            subject = subjects.invoke(tenant, "c")
            info = await cluster.js.stream_info(subjects.INVOCATIONS_STREAM, subjects_filter=subject)
            return (info.state.subjects or {}).get(subject, 0) == len(calls)

        await wait_for(handed_back, what="the calls handed back")
        assert (await cluster.js.consumer_info(subjects.WORK_STREAM, durable)).config.ack_wait == 7.0
        async with cluster.scheduler(router=AffinityRouter()):
            await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in replies)), 120)
            await asyncio.sleep(1.0)  # anything sent twice would arrive now
    finally:
        cluster.workers[victim].kill()
        cluster.workers[victim].wait()
        cluster.spawn_worker(victim)  # the module's settings again (the consumer's too)
        await cluster.wait_workers()
    for inv in calls:
        assert (await one_stream(cluster, inv)).epoch == 2  # a new dispatch, not a redelivery after the ack wait


async def test_a_drained_worker_hands_back_its_queue(cluster: Cluster) -> None:
    """The `drain` control verb: the worker finishes what it runs, hands back what is queued on its subject
    (it still heartbeats, so nothing else would move it), and is sent nothing more; every call succeeds."""
    tenant = f"drain{secrets.token_hex(3)}"
    await cluster.push(tenant, "q", seed=9700)
    victim = "dw-1"
    calls = [cluster.invocation(tenant, "q", max_tokens=300, prompt=f"drain {i}") for i in range(60)]
    try:
        async with cluster.scheduler(router=PinnedRouter(pins={f"{tenant}/q": victim})) as pinned:
            replies = [await cluster.publish(inv) for inv in calls]
            # every call handed to the victim before this scheduler goes (one left in the stream would be
            # dispatched first elsewhere once the victim drains), and some of them running
            await wait_for(lambda: pinned.core.decisions["pinned"] >= len(calls)
                           and sum(bool(r.chunks) for r in replies) >= 5, what="calls dispatched and running")
        async with cluster.scheduler(router=AffinityRouter()):
            request = ControlRequest(verb=ControlVerb.drain)
            reply = ControlReply.decode((await cluster.nc.request(subjects.control(victim, "drain"),
                                                                  request.encode(), timeout=30)).data)
            assert reply.ok
            await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in replies)), 180)
            assert cluster.heartbeats[victim].draining
        results = [r.results[0] for r in replies]
        assert all(r.status == "succeeded" for r in results), [r.error for r in results]
        handed_back = [r for r in results if r.epoch == 2]
        assert handed_back and {r.worker_id for r in handed_back} <= {"dw-2", "dw-3"}
        assert all(r.worker_id == victim for r in results if r.epoch == 1)  # what ran there finished there
    finally:  # a drained worker takes nothing more until it restarts
        cluster.workers[victim].kill()
        cluster.workers[victim].wait()
        cluster.spawn_worker(victim)
        await cluster.wait_workers()


async def test_a_deleted_adapters_queued_calls_fail_with_not_found(cluster: Cluster) -> None:
    """Calls queued for an adapter that is deleted before they are dispatched fail with not_found within the
    grace period (and calls naming an adapter that never existed, likewise)."""
    tenant = f"del{secrets.token_hex(3)}"
    await cluster.push(tenant, "gone", seed=9900)
    queued = [cluster.invocation(tenant, "gone") for _ in range(5)]
    queued += [cluster.invocation(tenant, "never-pushed") for _ in range(2)]
    replies = [await cluster.publish(inv) for inv in queued]
    async with cluster.sessions() as session, session.begin():
        tenant_row = await repo.get_tenant(session, name=tenant)
        assert tenant_row is not None
        await repo.delete_adapter(session, tenant=tenant_row, name="gone")
    started = time.monotonic()
    async with cluster.scheduler():
        await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in replies)), UNKNOWN_GRACE_S + 10)
        waited = time.monotonic() - started
    assert waited <= UNKNOWN_GRACE_S + 3, waited
    for reply in replies:
        [result] = reply.results
        assert result.status == "failed" and result.error is not None and result.error.code == "not_found"
