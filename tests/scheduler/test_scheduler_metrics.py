"""The scheduler's metrics: `SchedulerMetrics` fed plain values (and a real core), the endpoint that serves a
registry, and a live scheduler scraped over HTTP while it dispatches to a fake worker and rescues its work."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable

import httpx
import nats
import pytest
from prometheus_client import CollectorRegistry

from protocol import subjects
from protocol.messages import BASE_ADAPTER, Heartbeat, Invocation, Sampling
from protocol.streams import ensure_streams
from scheduler.core import InvocationArrived, SchedulerCore, WorkerReport, replay
from scheduler.metrics import (
    OTHER_ADAPTERS,
    MetricsSettings,
    MetricsUnavailable,
    SchedulerMetrics,
    pending_by_adapter,
    scale_signal,
    serve_metrics,
)
from scheduler.policy import AdapterSpec, WorkerView
from scheduler.service import SchedulerService
from scheduler.settings import PlacementSettings, SchedulerSettings
from storage.settings import DatabaseSettings
from tests.prometheus import poll, rendered, samples, value


def view(worker_id: str, outstanding: int) -> WorkerView:
    return WorkerView(worker_id=worker_id, total_pages=100, free_pages=100, max_rank=64, capacity=64,
                      outstanding=outstanding)


def invoke(tenant: str, adapter: str) -> str:
    return subjects.invoke(tenant, adapter)


# -- pending per adapter: top N and "other" -----------------------------------------------------------------


@pytest.mark.parametrize(("counts", "top", "expected", "why"), [
    ({}, 3, {OTHER_ADAPTERS: 0}, "nothing waiting: only the other series, at zero"),
    ({invoke("t", "a"): 2, invoke("t", "b"): 5}, 3, {"t/b": 5, "t/a": 2, OTHER_ADAPTERS: 0}, "all fit"),
    ({invoke("t", "a"): 2, invoke("t", "b"): 5, invoke("u", "c"): 1, invoke("u", "d"): 4}, 2,
     {"t/b": 5, "u/d": 4, OTHER_ADAPTERS: 3}, "the two largest by name, the rest summed"),
    ({invoke("t", "b"): 1, invoke("t", "a"): 1, invoke("t", "c"): 1}, 1, {"t/a": 1, OTHER_ADAPTERS: 2},
     "ties go to the name that sorts first"),
    ({invoke("t", "a"): 0, invoke("t", BASE_ADAPTER): 7}, 5, {f"t/{BASE_ADAPTER}": 7, OTHER_ADAPTERS: 0},
     "empty subjects are not labels; the base model is an adapter like the others"),
    ({invoke("t", "a"): 2, invoke("t", "b"): 5}, 0, {OTHER_ADAPTERS: 7}, "top 0: one series in all"),
])
def test_pending_by_adapter(counts: dict[str, int], top: int, expected: dict[str, int], why: str) -> None:
    assert pending_by_adapter(counts, top) == expected, why


def test_pending_gauge_drops_adapters_that_left_the_top() -> None:
    m = SchedulerMetrics(top_adapters=2)
    m.observe_pending({invoke("t", "a"): 3, invoke("t", "b"): 2, invoke("t", "c"): 1})
    page = rendered(m)
    assert value(page, "lorafn_pending_invocations", adapter="t/a") == 3
    assert value(page, "lorafn_pending_invocations", adapter="t/b") == 2
    assert value(page, "lorafn_pending_invocations", adapter=OTHER_ADAPTERS) == 1
    m.observe_pending({invoke("t", "c"): 4})
    page = rendered(m)
    assert value(page, "lorafn_pending_invocations", adapter="t/c") == 4
    assert value(page, "lorafn_pending_invocations", adapter="t/a") is None
    assert value(page, "lorafn_pending_invocations", adapter="t/b") is None
    assert value(page, "lorafn_pending_invocations", adapter=OTHER_ADAPTERS) == 0


def test_top_adapters_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match=r"top_adapters \(-1\)"):
        SchedulerMetrics(top_adapters=-1)


# -- decisions, workers, rescues ------------------------------------------------------------------------------


def test_decisions_add_what_the_core_counted_since_the_last_tick() -> None:
    m = SchedulerMetrics()
    decisions: Counter[str] = Counter({"device": 3, "cold": 1, "defer": 2, "worker_up": 2})
    m.observe_decisions(decisions)
    decisions.update({"device": 2, "fail_not_found": 1, "worker_gone": 1})
    m.observe_decisions(decisions)
    m.observe_decisions(decisions)  # nothing new: nothing added
    page = rendered(m)
    assert value(page, "lorafn_dispatch_decisions_total", reason="device") == 5
    assert value(page, "lorafn_dispatch_decisions_total", reason="cold") == 1
    assert value(page, "lorafn_dispatch_decisions_total", reason="defer") == 2
    assert value(page, "lorafn_dispatch_decisions_total", reason="fail_not_found") == 1
    # Worker events are not dispatch decisions.
    assert value(page, "lorafn_dispatch_decisions_total", reason="worker_up") is None
    assert value(page, "lorafn_scheduler_worker_events_total", event="up") == 2
    assert value(page, "lorafn_scheduler_worker_events_total", event="gone") == 1


def test_decisions_of_a_new_core_count_from_zero() -> None:
    m = SchedulerMetrics()
    m.observe_decisions({"host": 10})
    m.observe_decisions({"host": 4})  # a new core: its 4 are new
    m.observe_decisions({"host": 6})
    assert value(rendered(m), "lorafn_dispatch_decisions_total", reason="host") == 16


def test_decisions_of_a_real_core() -> None:
    core = SchedulerCore()
    spec = AdapterSpec("t", "a", "sha-a", rank=8, bytes=1000)
    replay(core, [
        WorkerReport(at=0.0, worker_id="w1", total_pages=100, free_pages=100, max_rank=64),
        InvocationArrived(at=1.0, invocation_id="i1", adapter=spec),
        InvocationArrived(at=1.1, invocation_id="i2", adapter=None),
        InvocationArrived(at=1.2, invocation_id="i3", adapter=AdapterSpec("t", "big", "sha-b", rank=128)),
    ])
    m = SchedulerMetrics()
    m.observe_decisions(core.decisions)
    m.observe_workers(core.views())
    page = rendered(m)
    assert value(page, "lorafn_dispatch_decisions_total", reason="cold") == 1
    assert value(page, "lorafn_dispatch_decisions_total", reason="base") == 1
    assert value(page, "lorafn_dispatch_decisions_total", reason="fail_rank") == 1
    assert value(page, "lorafn_worker_queue", worker="w1") == 2
    assert value(page, "lorafn_live_workers") == 1


def test_queue_series_of_gone_workers_are_removed() -> None:
    m = SchedulerMetrics()
    m.observe_workers([view("w1", 3), view("w2", 0)])
    page = rendered(m)
    assert value(page, "lorafn_worker_queue", worker="w1") == 3
    assert value(page, "lorafn_worker_queue", worker="w2") == 0
    assert value(page, "lorafn_live_workers") == 2
    m.observe_workers([view("w2", 5)])
    page = rendered(m)
    assert value(page, "lorafn_worker_queue", worker="w1") is None
    assert value(page, "lorafn_worker_queue", worker="w2") == 5
    assert value(page, "lorafn_live_workers") == 1


def test_rescues() -> None:
    m = SchedulerMetrics()
    m.observe_rescue(3)
    m.observe_rescue(0)
    page = rendered(m)
    assert value(page, "lorafn_rescues_total") == 2
    assert value(page, "lorafn_rescued_invocations_total") == 3


def test_each_instance_has_its_own_registry() -> None:
    a, b = SchedulerMetrics(), SchedulerMetrics()
    a.observe_rescue(1)
    assert value(rendered(a), "lorafn_rescues_total") == 1
    assert value(rendered(b), "lorafn_rescues_total") == 0


# -- the endpoint -----------------------------------------------------------------------------------------------


async def test_endpoint_serves_the_registry_on_a_free_port_and_closes() -> None:
    m = SchedulerMetrics()
    m.observe_rescue(2)
    async with serve_metrics(m.registry, MetricsSettings(port=0), what="test") as endpoint:
        assert endpoint is not None and endpoint.port > 0 and endpoint.host == "127.0.0.1"
        assert endpoint.url == f"http://127.0.0.1:{endpoint.port}/metrics"
        async with httpx.AsyncClient(trust_env=False) as client:
            response = await client.get(endpoint.url)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        assert value(samples(response.text), "lorafn_rescued_invocations_total") == 2
    with socket.socket() as s:  # nothing listens there any more (REUSEADDR: closed connections do not count)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", endpoint.port))
        s.listen()


async def test_endpoint_disabled_opens_no_port() -> None:
    async with serve_metrics(CollectorRegistry(), MetricsSettings(enabled=False, port=1), what="test") as endpoint:
        assert endpoint is None


async def test_endpoint_on_a_taken_port_says_which() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsUnavailable, match=rf"127\.0\.0\.1:{port} .*LORAFN_METRICS__PORT"):
            async with serve_metrics(CollectorRegistry(), MetricsSettings(port=port), what="test"):
                pass


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFN_METRICS__PORT", "9464")
    monkeypatch.setenv("LORAFN_METRICS__HOST", "0.0.0.0")
    settings = SchedulerSettings()
    assert settings.metrics == MetricsSettings(enabled=True, host="0.0.0.0", port=9464)
    monkeypatch.setenv("LORAFN_METRICS__ENABLED", "false")
    assert not SchedulerSettings().metrics.enabled
    monkeypatch.setenv("LORAFN_METRICS__PORT", "70000")
    with pytest.raises(ValueError, match="less than or equal to 65535"):
        SchedulerSettings()


# -- a live scheduler -------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(service: SchedulerService) -> AsyncIterator[str]:
    """Run `service`; yield its metrics URL once it serves."""
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        deadline = time.monotonic() + 15
        while service.metrics_endpoint is None:
            assert not task.done(), task
            assert time.monotonic() < deadline, "the scheduler's metrics endpoint did not open"
            await asyncio.sleep(0.05)
        yield service.metrics_endpoint.url
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def scale_when(metrics_url: str, check: Callable[[dict[str, int]], bool], what: str) -> dict[str, int]:
    """GET /scale beside a scheduler's /metrics until `check` holds (it is measured at the scheduler's ticks)."""
    deadline, got = time.monotonic() + 10, None
    async with httpx.AsyncClient(trust_env=False) as client:
        while time.monotonic() < deadline:
            response = await client.get(metrics_url.removesuffix("/metrics") + "/scale")
            if response.status_code == 200 and check(got := response.json()):
                return dict(got)
            await asyncio.sleep(0.05)
    raise AssertionError(f"GET /scale never showed {what}: last {got}")


@pytest.mark.timeout(60)
async def test_live_scheduler_metrics(services, database_settings: DatabaseSettings) -> None:  # type: ignore[no-untyped-def]
    """Pending calls of an adapter no worker serves, a base call dispatched to a (fake) worker, and the rescue of
    that call when the worker falls silent, each seen by scraping the scheduler's endpoint."""
    tenant, worker_id = f"m{secrets.token_hex(4)}", f"fake-{secrets.token_hex(4)}"
    nc = await nats.connect(services.nats_url)
    js = nc.jetstream()
    await ensure_streams(js)
    service = SchedulerService(SchedulerSettings(
        nats={"url": services.nats_url}, database=database_settings, metrics=MetricsSettings(port=0),
        scheduler=PlacementSettings(heartbeat_timeout_s=1.5, flush_every_s=0.5, tick_s=0.1,
                                    unknown_adapter_grace_s=60.0),
    ))

    async def publish(adapter: str) -> None:
        inv = Invocation(id=f"inv-{secrets.token_hex(6)}", tenant=tenant, adapter=adapter, prompt="hi",
                         sampling=Sampling(max_tokens=1))
        await js.publish(invoke(tenant, adapter), inv.encode(), headers={subjects.MSG_ID_HEADER: inv.id})

    beating = True

    async def heartbeats() -> None:
        while beating:
            hb = Heartbeat(worker_id=worker_id, host="test", device="cpu", started_at=time.time(),
                           capacity={"pool_pages": 100, "max_rank": 64, "max_inflight": 4}, free_pages=100)
            await nc.publish(subjects.worker_event(worker_id), hb.encode())
            await asyncio.sleep(0.2)

    beats: asyncio.Task[None] | None = None
    try:
        async with running(service) as url:
            # No worker: nothing is fetched, the calls wait in the invocations stream.
            for _ in range(3):
                await publish("ghost")
            await poll(url, lambda p: value(p, "lorafn_pending_invocations", adapter=f"{tenant}/ghost") == 3,
                       what="3 pending calls of the ghost adapter")
            # The autoscaler's signal counts them (>=: the shared streams may hold other tests' calls).
            await scale_when(url, lambda s: s["waiting"] >= 3 and s["calls"] >= 3 and s["workers"] == 0,
                             what="the 3 waiting calls")

            beats = asyncio.create_task(heartbeats())
            await publish(BASE_ADAPTER)
            page = await poll(
                url, lambda p: (value(p, "lorafn_worker_queue", worker=worker_id) or 0) >= 1
                and (value(p, "lorafn_dispatch_decisions_total", reason="base") or 0) >= 1,
                what="the base call dispatched to the fake worker")
            assert value(page, "lorafn_live_workers") == 1
            assert value(page, "lorafn_scheduler_worker_events_total", event="up") == 1
            # The call the worker holds counts too: a busy worker is not scaled away.
            signal = await scale_when(url, lambda s: s["held"] >= 1 and s["workers"] == 1, what="the held call")
            assert signal["calls"] == signal["held"] + signal["waiting"]
            # The ghost calls stay pending (deferred: the adapter does not exist yet).
            assert value(page, "lorafn_pending_invocations", adapter=f"{tenant}/ghost") == 3

            beating = False
            await beats
            # (the live-worker count too: a rescue of work another test left on a dead worker's subject may
            # come first)
            page = await poll(url, lambda p: (value(p, "lorafn_rescues_total") or 0) >= 1
                              and value(p, "lorafn_live_workers") == 0, what="the silent worker's work rescued")
            assert (value(page, "lorafn_rescued_invocations_total") or 0) >= 1
            # (>= 1: work another test left on a dead worker's subject is rescued too)
            assert (value(page, "lorafn_scheduler_worker_events_total", event="gone") or 0) >= 1
            assert value(page, "lorafn_live_workers") == 0
            assert value(page, "lorafn_worker_queue", worker=worker_id) is None
            # The rescued base call waits in the invocations stream again.
            await poll(url, lambda p: value(p, "lorafn_pending_invocations", adapter=f"{tenant}/{BASE_ADAPTER}") == 1,
                       what="the rescued base call pending")
    finally:
        beating = False
        if beats is not None:
            await asyncio.gather(beats, return_exceptions=True)
        # Leave nothing of this test in the shared streams.
        await js.purge_stream(subjects.INVOCATIONS_STREAM, subject=f"{subjects.INVOKE_PREFIX}.{tenant}.>")
        await js.purge_stream(subjects.WORK_STREAM, subject=subjects.work(worker_id))
        await nc.drain()


# -- the autoscaler's signal ------------------------------------------------------------------------------------


def test_the_scale_signal_counts_calls_held_by_workers_and_waiting_for_one() -> None:
    views = [WorkerView("w1", outstanding=5), WorkerView("w2", outstanding=0),
             WorkerView("w3", outstanding=2, draining=True)]
    assert scale_signal(views, waiting=4, workers_needed=3) == {
        "calls": 11, "held": 7, "waiting": 4, "workers": 2, "workers_needed": 3}
    assert scale_signal([], waiting=0, workers_needed=0)["calls"] == 0  # idle: scale to zero


async def test_the_endpoint_serves_json_routes_beside_the_metrics() -> None:
    m = SchedulerMetrics()
    async with serve_metrics(m.registry, MetricsSettings(port=0), what="test",
                             json_routes={"/scale": m.scale_body}) as endpoint:
        assert endpoint is not None
        base = f"http://127.0.0.1:{endpoint.port}"
        async with httpx.AsyncClient(trust_env=False) as client:
            before = await client.get(f"{base}/scale")
            assert before.status_code == 503 and before.headers["content-type"] == "application/json"
            m.observe_scale([WorkerView("w1", outstanding=3)], waiting=1, workers_needed=2)
            after = await client.get(f"{base}/scale")
            assert after.status_code == 200 and after.json() == {
                "calls": 4, "held": 3, "waiting": 1, "workers": 1, "workers_needed": 2}
            metrics = await client.get(endpoint.url)
            assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
