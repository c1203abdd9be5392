"""Several schedulers, and a worker's identity across a restart, for real: two `python -m scheduler` processes
under leader election (scheduler.leader), two `python -m workers` processes and the gateway in this event loop,
on the session's NATS, Postgres and S3.

- The leader is SIGKILLed with 60 asynchronous invocations of three cold adapters in flight (the workers take
  few calls at a time, so most wait in the invocations stream for either dispatcher): every invocation
  succeeds, recorded and started once; the other scheduler becomes leader, and how long that took (the kill
  -> its `lorafn_scheduler_leader` reads 1) is printed. Staging verbs come from one scheduler's connection at a
  time: the leader's.
- A worker named by its host name (no LORAFN_WORKER_ID) is SIGKILLed, declared gone by the leader (its
  consumer deleted by the rescue, its row marked down) and started again: it has the same id, its Postgres row
  is the same row (no new one), its consumer is there again, and it serves calls.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.js.errors
import pytest
import pytest_asyncio
from nats.aio.msg import Msg
from sqlalchemy import select

from gateway.settings import LimitSettings
from lorafn.services import child_env
from lorafn.stack import free_ports
from protocol import subjects
from storage import repo
from storage.models import Worker
from tests.e2e.conftest import (
    ACK_WAIT_S,
    ADAPTER_POOL_BYTES,
    HEARTBEAT_TIMEOUT_S,
    KV_CACHE_BYTES,
    Cluster,
    gateway_cluster,
    wait_for,
)
from tests.prometheus import Samples, samples, value
from workers.service import default_worker_id

pytestmark = pytest.mark.timeout(300)

REPO_ROOT = Path(__file__).parents[2]
HOST_WORKER = default_worker_id()  # the worker started without LORAFN_WORKER_ID: its host name
WORKERS = (HOST_WORKER, "sw-2")
MAX_INFLIGHT = 4  # calls a worker runs at once; with QUEUE_PER_WORKER, what the dispatchers may give it
QUEUE_PER_WORKER = 2
SCHEDULER_ENV = {
    "LORAFN_SCHEDULER__HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S), "LORAFN_SCHEDULER__FLUSH_EVERY_S": "0.5",
    "LORAFN_SCHEDULER__TICK_S": "0.25", "LORAFN_SCHEDULER__PLACEMENT_GRACE_S": "3",
    "LORAFN_SCHEDULER__ADAPTER_CACHE_S": "0", "LORAFN_SCHEDULER__DISPATCH_ACK_WAIT_S": "3",
    "LORAFN_SCHEDULER__QUEUE_PER_WORKER": str(QUEUE_PER_WORKER),
    # Pre-staging every second, an adapter idle for a second released from its device: staging verbs go out
    # during the tests (the leader's alone).
    "LORAFN_STAGING__PREDICTOR": "last_value", "LORAFN_STAGING__INTERVAL_S": "1",
    "LORAFN_STAGING__KEEP_ALIVE_S": "1",
}


@dataclass
class Schedulers:
    """The scheduler processes and their metrics pages."""

    procs: dict[str, subprocess.Popen[bytes]]
    metrics: dict[str, str]  # name -> URL of its /metrics

    async def pages(self, client: httpx.AsyncClient) -> dict[str, Samples | None]:
        """Each live scheduler's metrics (None: its page does not answer)."""
        out: dict[str, Samples | None] = {}
        for name, url in self.metrics.items():
            if self.procs[name].poll() is not None:
                continue
            try:
                out[name] = samples((await client.get(url, timeout=2)).text)
            except httpx.HTTPError:
                out[name] = None
        return out

    async def leaders(self, client: httpx.AsyncClient) -> dict[str, float | None]:
        """Each live scheduler's lorafn_scheduler_leader (None: its page does not answer)."""
        return {name: None if page is None else value(page, "lorafn_scheduler_leader")
                for name, page in (await self.pages(client)).items()}

    async def roles(self, client: httpx.AsyncClient) -> tuple[str, str]:
        """(leader, follower) once exactly one of the two leads."""

        async def one_leader() -> tuple[str, str] | None:
            leaders = await self.leaders(client)
            if len(leaders) != 2 or set(leaders.values()) != {0, 1}:
                return None
            [leader] = [n for n, v in leaders.items() if v == 1]
            [follower] = [n for n, v in leaders.items() if v == 0]
            return leader, follower

        roles: tuple[str, str] = await wait_for(one_leader, what="one leader and one follower", timeout=60)
        return roles


@dataclass
class Stack:
    cluster: Cluster
    schedulers: Schedulers
    control: list[tuple[float, str, str]]  # staging requests seen: (monotonic time, subject, reply subject)

    def spawn_worker(self, worker_id: str) -> None:
        """A worker process; `HOST_WORKER` is started without LORAFN_WORKER_ID (its default id is its host's)."""
        c = self.cluster
        extra = {
            **c.services.nats_env_of("worker"), "LORAFN_BACKBONE__PATH": str(c.backbone),
            "LORAFN_ENGINE__KV_CACHE_BYTES": str(KV_CACHE_BYTES),
            "LORAFN_ENGINE__ADAPTER_POOL_BYTES": str(ADAPTER_POOL_BYTES),
            "LORAFN_CONSUMER__MAX_INFLIGHT": str(MAX_INFLIGHT),
            "LORAFN_CONSUMER__ACK_WAIT_S": str(ACK_WAIT_S), "LORAFN_CONSUMER__IN_PROGRESS_EVERY_S": "1",
            "LORAFN_HEARTBEAT_S": "0.5", "LORAFN_DRAIN_TIMEOUT_S": "5", "OMP_NUM_THREADS": "1",
        }
        if worker_id != HOST_WORKER:
            extra["LORAFN_WORKER_ID"] = worker_id
        env = child_env(nats_url=c.services.nats_url, object_store=c.store_settings, extra=extra)
        c.last_heartbeat.pop(worker_id, None)
        with open(c.logs / f"worker-{worker_id}.log", "ab") as log:
            c.workers[worker_id] = subprocess.Popen([sys.executable, "-m", "workers"], env=env, stdout=log,
                                                    stderr=subprocess.STDOUT, cwd=REPO_ROOT)


@pytest_asyncio.fixture(scope="module")
async def stack(services: Any, e2e_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with (
        gateway_cluster(services, e2e_backbone, tmp_path_factory.mktemp("schedulers"), name="sch",
                        limits=LimitSettings(sync_timeout_s=90.0)) as cluster,
        _schedulers_and_workers(services, cluster) as s,
    ):
        yield s


@contextlib.asynccontextmanager
async def _schedulers_and_workers(services: Any, cluster: Cluster) -> AsyncIterator[Stack]:
    nc, logs = cluster.nc, cluster.logs
    control: list[tuple[float, str, str]] = []

    async def on_control(msg: Msg) -> None:
        control.append((time.monotonic(), msg.subject, msg.reply))

    await nc.subscribe(f"{subjects.CTL_PREFIX}.>", cb=on_control)

    ports = free_ports("127.0.0.1", 2)
    schedulers = Schedulers(procs={}, metrics={})
    for name, port in zip(("sched-a", "sched-b"), ports, strict=True):
        env = child_env(nats_url=services.nats_url, database_url=services.database_url, extra={
            **SCHEDULER_ENV, **services.nats_env_of("scheduler"), "LORAFN_METRICS__PORT": str(port)})
        with open(logs / f"{name}.log", "ab") as log:
            schedulers.procs[name] = subprocess.Popen([sys.executable, "-m", "scheduler"], env=env, stdout=log,
                                                      stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        schedulers.metrics[name] = f"http://127.0.0.1:{port}/metrics"
    s = Stack(cluster, schedulers, control)
    for worker_id in WORKERS:
        s.spawn_worker(worker_id)
    try:
        await cluster.wait_workers(WORKERS)
        yield s
    finally:
        for proc in [*cluster.workers.values(), *schedulers.procs.values()]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*cluster.workers.values(), *schedulers.procs.values()]:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def submit_async(http: httpx.AsyncClient, tenant: str, adapter: str, prompt: str, max_tokens: int) -> str:
    r = await http.post(f"/v1/functions/{tenant}/{adapter}/invocations", headers={"Prefer": "respond-async"},
                        json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def connection_of(reply: str) -> str:
    """The connection a request came from: its reply subject without the last token (nats-py's requests of one
    connection share `<inbox prefix>.<connection nuid>.`)."""
    return reply.rpartition(".")[0]


async def not_(check: Any) -> bool:
    return not await check


async def test_a_restarted_worker_keeps_its_identity_row_and_consumer(stack: Stack, tmp_path: Path) -> None:
    engine = repo.create_engine(stack.cluster.database)
    try:
        await restart_and_serve(stack, repo.session_factory(engine), tmp_path)
    finally:
        await engine.dispose()


async def restart_and_serve(stack: Stack, sessions: Any, tmp_path: Path) -> None:
    c = stack.cluster
    await c.push("warm", c.write_adapter(tmp_path, rank=8, modules=("q_proj", "v_proj"), seed=200))

    async def row() -> tuple[set[str], Worker | None]:
        """Every worker row's id (earlier modules' workers' rows included), and the host worker's row."""
        async with sessions() as session:
            ids = set((await session.scalars(select(Worker.id))).all())
            return ids, await session.get(Worker, HOST_WORKER)

    async def consumer_exists(worker_id: str) -> bool:
        try:
            await c.js.consumer_info(subjects.WORK_STREAM, subjects.work_consumer(worker_id))
        except nats.js.errors.NotFoundError:
            return False
        return True

    async def row_status(status: str) -> bool:
        worker = (await row())[1]
        return worker is not None and worker.status == status

    async with httpx.AsyncClient(trust_env=False) as scrape:
        leader, follower = await stack.schedulers.roles(scrape)
        await wait_for(lambda: row_status("up"), what="the worker's row")

        async def every_row() -> bool:  # the leader writes each worker's row at its flush, not all at once
            return set(WORKERS) <= (await row())[0]

        await wait_for(every_row, what="every worker's row")
        rows_before, worker = await row()
        assert worker is not None
        first_started = worker.started_at

        c.kill_worker(HOST_WORKER)
        # Both cores declare it gone; the leader rescues it (its consumer deleted, its row marked down), the
        # follower leaves the rescue to the leader.
        await wait_for(lambda: row_status("down"), what="the killed worker marked down", timeout=30)
        await wait_for(lambda: not_(consumer_exists(HOST_WORKER)), what="its consumer deleted", timeout=30)

        async def rescue_counts() -> dict[str, tuple[float, float]] | None:
            pages = await stack.schedulers.pages(scrape)
            counts = {n: (value(p, "lorafn_rescues_total") or 0.0,
                          value(p, "lorafn_scheduler_dropped_commands_total", kind="rescue") or 0.0)
                      for n, p in pages.items() if p is not None}
            return counts if counts.get(follower, (0, 0))[1] >= 1 else None

        counts = await wait_for(rescue_counts, what="the follower's core calling for the rescue")
        assert counts[leader][0] >= 1 and counts[leader][1] == 0, counts
        assert counts[follower][0] == 0, counts  # carried out by the leader alone

        stack.spawn_worker(HOST_WORKER)  # no LORAFN_WORKER_ID again: the same host name, the same id
        await c.wait_workers([HOST_WORKER])
        await wait_for(lambda: consumer_exists(HOST_WORKER), what="its consumer made again")
        await wait_for(lambda: row_status("up"), what="its row up again")
        rows_after, worker = await row()
        assert rows_after == rows_before  # no new row (a new id)
        assert worker is not None and worker.started_at == first_started  # the same row, resumed

        # With the other worker gone, calls can only go to the restarted one: it serves them.
        c.kill_worker("sw-2")
        await wait_for(lambda: not_(consumer_exists("sw-2")), what="the other worker rescued", timeout=30)
        async def serve(calls: int) -> None:
            async with c.http() as http:
                for i in range(calls):
                    r = await http.post("/v1/completions", json={"model": f"{c.tenant}/warm", "prompt": f"again {i}",
                                                                 "max_tokens": 4})
                    assert r.status_code == 200, r.text
                    result = await c.recorded_result(r.headers["x-lorafn-invocation-id"])
                    assert result.status == "succeeded" and result.worker_id == HOST_WORKER

        def more_control(sent: int) -> bool:
            return len(stack.control) > sent

        async def follower_dropped_staging() -> bool:
            page = (await stack.schedulers.pages(scrape)).get(follower)
            return page is not None and any(
                (value(page, "lorafn_scheduler_dropped_commands_total", kind=k) or 0) >= 1
                for k in ("fetch", "load", "evict"))

        # Idle for a second, the adapter is released from the device: by the leader alone. Both cores call for the
        # release at the same staging boundary, but the follower's may come after the worker reported the
        # leader's release done (nothing left to release): then the adapter is called again and left idle again.
        for attempt in range(5):
            sent = len(stack.control)
            await serve(4 if attempt == 0 else 1)
            await wait_for(functools.partial(more_control, sent), what="a staging verb", timeout=30)
            try:
                await wait_for(follower_dropped_staging, what="the follower dropping its core's staging verbs",
                               timeout=5)
                break
            except AssertionError:
                continue
        else:
            raise AssertionError("the follower's core called for no staging verb in 5 rounds of release")
        assert len({connection_of(r) for _, _, r in stack.control}) == 1, stack.control
    stack.spawn_worker("sw-2")
    await c.wait_workers(WORKERS)


async def test_the_leader_killed_under_load_loses_nothing_and_the_other_takes_over(
        stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c, schedulers = stack.cluster, stack.schedulers
    adapters = []
    for i in range(3):  # pushed now: no worker holds them yet
        await c.push(f"cold{i}", c.write_adapter(tmp_path, rank=8, modules=("q_proj", "v_proj"), seed=300 + i))
        adapters.append(f"cold{i}")
    async with httpx.AsyncClient(trust_env=False) as scrape:
        leader, survivor = await schedulers.roles(scrape)
        async with c.http() as http:
            ids = [await submit_async(http, c.tenant, adapters[i % 3], f"story {i}", max_tokens=48)
                   for i in range(60)]
        # Under load: some finished, most still waiting or running.
        await wait_for(lambda: len({s.invocation_id for s in c.started if s.invocation_id in set(ids)}) >= 10,
                       what="invocations under way", interval=0.05)
        done_before = sum([await c.results_recorded(i) for i in ids])
        killed_at = time.monotonic()
        schedulers.procs[leader].send_signal(signal.SIGKILL)
        schedulers.procs[leader].wait(10)

        async def survivor_leads() -> bool:
            return (await schedulers.leaders(scrape)).get(survivor) == 1

        await wait_for(survivor_leads, what="the survivor leading", timeout=30, interval=0.02)
        takeover_s = time.monotonic() - killed_at

    async def all_recorded() -> bool:
        return all([await c.results_recorded(i) >= 1 for i in ids])

    await wait_for(all_recorded, what="every invocation's result", timeout=180, interval=0.5)
    for invocation_id in ids:
        assert await c.results_recorded(invocation_id) == 1  # none twice
        result = await c.recorded_result(invocation_id)
        assert result.status == "succeeded", result.error
        assert result.epoch == 1 and result.worker_id in WORKERS  # no worker died: dispatched once
        assert len(c.started_by(invocation_id)) == 1, c.started_by(invocation_id)  # run once
    assert done_before < len(ids), "everything finished before the kill: raise max_tokens"

    # The new leader issues staging verbs (the adapters idle now are released), from a connection of its own.
    await wait_for(lambda: any(t > killed_at + takeover_s for t, _, _ in stack.control),
                   what="a staging verb from the new leader", timeout=30)
    before = {connection_of(r) for t, _, r in stack.control if t < killed_at}
    after = {connection_of(r) for t, _, r in stack.control if t > killed_at + takeover_s}
    assert len(before) <= 1 and len(after) == 1 and not before & after, (before, after)
    with capsys.disabled():
        sys.stdout.write(
            f"\nleader {leader} SIGKILLed with {len(ids) - done_before} of {len(ids)} invocations unfinished: "
            f"{survivor} leads {takeover_s:.2f} s later (leader_ttl_s 5.0: a check each 1.0 s)\n")
