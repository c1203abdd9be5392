"""Cancellation with real workers: a client that goes away (a stream, a plain synchronous call) and
POST /v1/invocations/<id>/cancel stop the generation within a second. "Stopped" is measured where it matters:
the worker acked the invocation (its handler ended: the batch slot is free), and its next heartbeat shows no
request running and every KV block free. The result and the invocation's row both say `cancelled`.

The generations are long (LONG tokens of the bare backbone: seconds on the tiny one), so each call is mid-way
when it is cancelled; the tests check it was (the cancel, not the end of the generation, is the outcome).
The last test pauses both workers; it stays last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
import pytest_asyncio
from nats.aio.msg import Msg

from protocol import subjects
from protocol.messages import Heartbeat
from storage import repo
from tests.e2e.conftest import WORKERS, Cluster, wait_for
from tests.stacks import tenant_key

pytestmark = pytest.mark.timeout(180)

log = logging.getLogger(__name__)

LONG = 3000  # max_tokens of the calls that are cancelled mid-way
FREED_WITHIN_S = 1.0


@dataclass
class Beats:
    """Every worker's heartbeats since the fixture began, with the monotonic time each arrived."""

    seen: dict[str, list[tuple[float, Heartbeat]]] = field(default_factory=dict)

    async def on_msg(self, msg: Msg) -> None:
        with contextlib.suppress(Exception):
            hb = Heartbeat.decode(msg.data)
            self.seen.setdefault(hb.worker_id, []).append((time.monotonic(), hb))

    def busy(self, worker_id: str) -> bool:
        """The worker's latest heartbeat shows a request running and KV blocks held."""
        beats = self.seen.get(worker_id) or []
        return bool(beats) and not idle(beats[-1][1])

    def idle_since(self, worker_id: str, after: float) -> float | None:
        """Arrival (monotonic) of the worker's first heartbeat after `after` showing it idle."""
        return next((at for at, hb in self.seen.get(worker_id, []) if at > after and idle(hb)), None)


def idle(hb: Heartbeat) -> bool:
    """Nothing running or waiting in the engine, every KV block free."""
    return hb.running == 0 and hb.queue_depth == 0 and hb.capacity["kv_free_blocks"] == hb.capacity["kv_blocks"]


@pytest_asyncio.fixture(scope="module")
async def beats(cluster: Cluster) -> AsyncIterator[Beats]:
    b = Beats()
    sub = await cluster.nc.subscribe(subjects.WORKER_EVENTS_ALL, cb=b.on_msg)
    try:
        yield b
    finally:
        await sub.unsubscribe()


async def on_work_subject(cluster: Cluster, worker_id: str) -> int:
    """Invocations on a worker's work subject (dispatched and not acked)."""
    subject = subjects.work(worker_id)
    info = await cluster.js.stream_info(subjects.WORK_STREAM, subjects_filter=subject)
    return int((info.state.subjects or {}).get(subject, 0))


async def row_status(cluster: Cluster, invocation_id: str) -> str:
    engine = repo.create_engine(cluster.database)
    try:
        async with repo.session_factory(engine)() as session:
            row = await repo.get_invocation(session, invocation_id=invocation_id)
            return str(row.status.value)
    finally:
        await engine.dispose()


async def check_freed(cluster: Cluster, beats: Beats, invocation_id: str, worker_id: str, since: float,
                      what: str) -> None:
    """The worker let go of the invocation within FREED_WITHIN_S of `since` (monotonic): acked (slot free) and a
    heartbeat showing it idle; its result and its row say cancelled."""

    async def acked() -> float | None:
        return time.monotonic() if await on_work_subject(cluster, worker_id) == 0 else None

    acked_at = await wait_for(acked, timeout=10, interval=0.01, what=f"{what}: acked")
    idle_at = await wait_for(lambda: beats.idle_since(worker_id, since), timeout=10, interval=0.01,
                             what=f"{what}: an idle heartbeat")
    log.info("%s: acked %.3f s and idle in a heartbeat %.3f s after it was cancelled", what, acked_at - since,
             idle_at - since)
    assert acked_at - since < FREED_WITHIN_S, what
    assert idle_at - since < FREED_WITHIN_S, what  # heartbeats every 0.5 s: an upper bound
    assert await cluster.results_recorded(invocation_id) == 1, what
    result = await cluster.recorded_result(invocation_id)
    assert result.status == "cancelled" and result.error is not None and result.error.code == "cancelled", what
    await wait_for(lambda: _is_cancelled(cluster, invocation_id), timeout=10, what=f"{what}: row cancelled")


async def _is_cancelled(cluster: Cluster, invocation_id: str) -> bool:
    return await row_status(cluster, invocation_id) == "cancelled"


def chat(stream: bool) -> dict[str, object]:
    return {"model": "base", "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": LONG, "temperature": 0.0, "stream": stream}


async def started(cluster: Cluster, seen: int) -> str:
    """The id of the first invocation a worker started since `cluster.started` had `seen` entries."""
    await wait_for(lambda: len(cluster.started) > seen, timeout=30, what="an invocation started")
    return cluster.started[seen].invocation_id


async def test_a_disconnected_stream_frees_its_slot_within_a_second(cluster: Cluster, beats: Beats) -> None:
    async with cluster.http() as http:
        async with http.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
            assert r.status_code == 200
            invocation_id = r.headers["x-lorafn-invocation-id"]
            deltas = 0
            async for line in r.aiter_lines():
                deltas += '"content":"' in line and '"content":""' not in line
                if deltas >= 5:
                    break
        gone = time.monotonic()  # the connection is closed: the body was not read to its end
    [worker] = cluster.started_by(invocation_id)
    assert beats.busy(worker) or await on_work_subject(cluster, worker) == 1  # it was running
    await check_freed(cluster, beats, invocation_id, worker, gone, "stream")


async def test_a_disconnected_sync_call_frees_its_slot_within_a_second(cluster: Cluster, beats: Beats) -> None:
    seen = len(cluster.started)
    async with cluster.http() as http:
        call = asyncio.create_task(http.post(f"/v1/functions/{cluster.tenant}/_base/invocations",
                                             json={"prompt": "Once upon a time", "max_tokens": LONG,
                                                   "temperature": 0.0}))
        invocation_id = await started(cluster, seen)
        [worker] = cluster.started_by(invocation_id)
        await wait_for(lambda: beats.busy(worker), timeout=10, what="the call generating")
        call.cancel()  # the client goes away
        gone = time.monotonic()
        with contextlib.suppress(asyncio.CancelledError):
            await call
    await check_freed(cluster, beats, invocation_id, worker, gone, "sync call")


async def test_the_cancel_endpoint_stops_a_running_invocation(cluster: Cluster, beats: Beats) -> None:
    stranger_key = await tenant_key(cluster.database, f"{cluster.tenant}x")
    seen = len(cluster.started)
    async with cluster.http() as http, httpx.AsyncClient(
        base_url=cluster.gateway_url, headers={"Authorization": f"Bearer {stranger_key}"}) as other:
        r = await http.post(f"/v1/functions/{cluster.tenant}/_base/invocations", headers={"Prefer": "respond-async"},
                            json={"prompt": "A long async story", "max_tokens": LONG, "temperature": 0.0})
        assert r.status_code == 202
        invocation_id = r.json()["id"]
        assert await started(cluster, seen) == invocation_id
        [worker] = cluster.started_by(invocation_id)
        await wait_for(lambda: beats.busy(worker), timeout=10, what="the invocation generating")
        assert (await other.post(f"/v1/invocations/{invocation_id}/cancel")).status_code == 404
        asked = time.monotonic()
        r = await http.post(f"/v1/invocations/{invocation_id}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        await check_freed(cluster, beats, invocation_id, worker, asked, "cancel endpoint")
        again = await http.post(f"/v1/invocations/{invocation_id}/cancel")
        assert again.status_code == 200 and again.json()["status"] == "cancelled"
        got = (await http.get(f"/v1/invocations/{invocation_id}")).json()
        assert got["status"] == "cancelled" and got["error"]["code"] == "cancelled"

        short = await http.post(f"/v1/functions/{cluster.tenant}/_base/invocations",
                                json={"prompt": "Short", "max_tokens": 4, "temperature": 0.0})
        assert short.status_code == 200
        late = await http.post(f"/v1/invocations/{short.json()['id']}/cancel")
        assert late.status_code == 409 and late.json()["error"]["status"] == "succeeded", late.text


async def test_a_queued_invocation_that_is_cancelled_never_runs(cluster: Cluster, beats: Beats) -> None:
    """Both workers paused (shorter than the heartbeat timeout, or the dispatcher rescues their work: the
    cancelled invocation is then dropped by the dispatcher instead, and never runs either)."""
    await wait_for(lambda: not any(beats.busy(w) for w in WORKERS), timeout=10, what="both workers idle")
    seen = len(cluster.started)
    for w in WORKERS:
        os.kill(cluster.workers[w].pid, signal.SIGSTOP)
    try:
        async with cluster.http() as http:
            r = await http.post(f"/v1/functions/{cluster.tenant}/_base/invocations",
                                headers={"Prefer": "respond-async"},
                                json={"prompt": "Queued", "max_tokens": LONG, "temperature": 0.0})
            invocation_id = r.json()["id"]

            async def dispatched() -> str | None:
                for w in WORKERS:
                    if await on_work_subject(cluster, w):
                        return w
                return None

            worker = await wait_for(dispatched, timeout=2, interval=0.01, what="dispatched to a paused worker")
            r = await http.post(f"/v1/invocations/{invocation_id}/cancel")
            assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    finally:
        for w in WORKERS:
            os.kill(cluster.workers[w].pid, signal.SIGCONT)

    async def gone_from_the_streams() -> bool:
        return await on_work_subject(cluster, worker) == 0 and await cluster.queued() == 0

    await wait_for(gone_from_the_streams, timeout=15, what="the cancelled invocation refused")
    await wait_for(lambda: _is_cancelled(cluster, invocation_id), timeout=10, what="row cancelled")
    await asyncio.sleep(1.0)  # a started event would have come by now
    assert invocation_id not in {s.invocation_id for s in cluster.started[seen:]}
    assert (await cluster.recorded_result(invocation_id)).status == "cancelled"
