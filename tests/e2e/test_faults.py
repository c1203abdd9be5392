"""Faults on the invocation path, through the gateway: a corrupted adapter object, a worker killed
mid-generation, NATS restarted with invocations queued, Postgres down.

These tests restart the session's NATS and Postgres servers: they live in their own module, run in order on
this module's cluster, and every one leaves the servers (and both workers) running and healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from protocol import subjects
from storage import repo
from storage.models import InvocationStatus
from storage.objectstore import blob_key
from tests.e2e.conftest import (
    WORKERS,
    Cluster,
    OpenAICall,
    Reference,
    openai_finish_reason,
    run_openai,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def faas_call(model: str, prompt: str, *, max_tokens: int, temperature: float, seed: int,
              adapter_sha: str | None) -> OpenAICall:
    """A FaaS invocation with a raw prompt: the same engine request as an OpenAI completion."""
    return OpenAICall(kind="completion", model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                      seed=seed, stream=False, adapter_sha=adapter_sha)


async def submit_async(client: httpx.AsyncClient, cluster: Cluster, adapter: str, call: OpenAICall) -> str:
    """POST /v1/functions/<tenant>/<adapter>/invocations with Prefer: respond-async; the invocation id."""
    r = await client.post(
        f"/v1/functions/{cluster.tenant}/{adapter}/invocations", headers={"Prefer": "respond-async"},
        json={"prompt": call.prompt, "max_tokens": call.max_tokens, "temperature": call.temperature,
              "seed": call.seed},
    )
    assert r.status_code == 202, r.text
    assert r.headers["x-lorafn-invocation-id"] == r.json()["id"]
    return str(r.json()["id"])


async def finished(client: httpx.AsyncClient, invocation_id: str, timeout: float = 90.0) -> dict[str, Any]:
    """GET /v1/invocations/<id> until it is no longer queued or running."""

    async def done() -> dict[str, Any] | None:
        r = await client.get(f"/v1/invocations/{invocation_id}")
        body: dict[str, Any] = r.json()
        return body if r.status_code == 200 and body["status"] in ("succeeded", "failed") else None

    result: dict[str, Any] = await wait_for(done, timeout=timeout, what=f"invocation {invocation_id} finished",
                                            interval=0.25)
    return result


async def test_a_corrupted_adapter_object_fails_with_502_and_is_not_redelivered(
    cluster: Cluster, tmp_path: Path
) -> None:
    body = await cluster.push("tampered", cluster.write_adapter(tmp_path, rank=8, modules=("q_proj", "v_proj"),
                                                                seed=7))
    sha = body["sha256"]
    # Before any worker has it cached, the object's bytes are replaced.
    bad = b"not the adapter you pushed" * 100
    cluster.store.client.put_object(cluster.store.bucket, blob_key(sha), io.BytesIO(bad), len(bad))
    model = f"{cluster.tenant}/tampered"

    ids: list[str] = []
    async with cluster.openai() as client:
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as raised:
                await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=8, stream=stream)
            err = raised.value
            assert err.status_code == 502, err
            error = err.response.json()["error"]  # OpenAI's error shape
            assert error["code"] == "adapter_corrupted" and error["type"] == "server_error"
            assert sha in error["message"] and "corrupted" in error["message"]
            ids.append(err.response.headers["x-lorafn-invocation-id"])

    # Nothing is redelivered: each invocation has exactly one (failed, first-attempt, first-dispatch) result,
    # the work-queue streams dropped the messages (acked), and each was dispatched and delivered once.
    for invocation_id in ids:
        assert await cluster.results_recorded(invocation_id) == 1
        result = await cluster.recorded_result(invocation_id)
        assert result.status == "failed" and result.attempt == 1 and result.epoch == 1
        assert result.error is not None and result.error.code == "adapter_corrupted"
    await wait_for(lambda: _zero(cluster.queued(subjects.invoke(cluster.tenant, "tampered"))),
                   what="the tampered adapter's invocations acked")
    for worker_id in {s.worker_id for i in ids for s in cluster.started if s.invocation_id == i}:
        info = await cluster.js.consumer_info(subjects.WORK_STREAM, subjects.work_consumer(worker_id))
        assert info.num_ack_pending == 0 and info.num_redelivered == 0
    async with cluster.http() as client:
        view = (await client.get(f"/v1/invocations/{ids[0]}")).json()
    assert view["status"] == "failed" and view["error"]["code"] == "adapter_corrupted"


async def _zero(count: Any) -> bool:
    return bool(await count == 0)


async def _equals(count: Any, n: int) -> bool:
    return bool(await count == n)


async def test_a_worker_killed_mid_generation_loses_and_duplicates_nothing(
    cluster: Cluster, reference: Reference, tmp_path: Path
) -> None:
    body = await cluster.push("long", cluster.write_adapter(tmp_path, rank=8, modules=ALL_MODULES, seed=11))
    sha = body["sha256"]
    model = f"{cluster.tenant}/long"
    n = 600  # long enough to be killed mid-way on a fast CPU
    # Greedy: a clean run is reproducible whatever the batch around it (seeded sampling is not, see
    # test_invocation_path.py::test_a_seeded_sampling_call_gives_the_same_text_alone_or_in_a_batch).
    streams = [
        OpenAICall(kind="chat", model=model, prompt="Tell me a long story.", max_tokens=n, temperature=0.0, seed=0,
                   stream=True, adapter_sha=sha),
        OpenAICall(kind="completion", model=model, prompt="It was a dark night", max_tokens=n, temperature=0.0,
                   seed=0, stream=True, adapter_sha=sha),
        OpenAICall(kind="chat", model="base", prompt="And the base model?", max_tokens=n, temperature=0.0, seed=0,
                   stream=True, adapter_sha=None),
    ]
    plain = OpenAICall(kind="chat", model=model, prompt="No streaming here.", max_tokens=n, temperature=0.0, seed=0,
                       stream=False, adapter_sha=sha)
    queued = [faas_call(model, f"async number {i}", max_tokens=n, temperature=0.0, seed=0, adapter_sha=sha)
              for i in range(2)]
    expected = await asyncio.to_thread(reference.expect, [*streams, plain, *queued])
    victim: str | None = None
    try:
        async with cluster.openai() as client, cluster.http() as http:
            seen = len(cluster.started)
            tasks = [asyncio.create_task(run_openai(client, c)) for c in [*streams, plain]]
            async_ids = [await submit_async(http, cluster, "long", c) for c in queued]
            # Mid-generation: every stream has text, all six invocations have started.
            await wait_for(lambda: all(len(c.deltas) >= 3 for c in streams), what="streams under way")
            await wait_for(lambda: len({s.invocation_id for s in cluster.started[seen:]}) == 6,
                           what="all invocations started")
            known = {*(c.invocation_id for c in streams), *async_ids}
            [plain_id] = {s.invocation_id for s in cluster.started[seen:]} - known  # its headers come at the end
            adapter_ids = [streams[0].invocation_id, streams[1].invocation_id, plain_id, *async_ids]
            [victim] = set(cluster.started_by(streams[0].invocation_id))
            assert {w for i in adapter_ids for w in cluster.started_by(i)} == {victim}  # one worker holds the adapter
            assert not any(t.done() for t in tasks), "the generations ended before the kill: raise max_tokens"
            cluster.kill_worker(victim)

            done = await asyncio.wait_for(asyncio.gather(*tasks), 120)
            views = [await finished(http, i) for i in async_ids]
        assert plain.invocation_id == plain_id
        for call, want in zip(done, expected[:4], strict=True):
            # No duplicated or missing token: the text equals a clean run's with the same seed.
            assert call.text == want.text, call.label()
            assert call.finish_reason == openai_finish_reason(want), call.label()
        for view, want in zip(views, expected[4:], strict=True):
            assert view["status"] == "succeeded" and view["output"]["text"] == want.text, view
        for invocation_id in [*(c.invocation_id for c in done), *async_ids]:
            assert await cluster.results_recorded(invocation_id) == 1
            result = await cluster.recorded_result(invocation_id)
            assert result.status == "succeeded" and result.worker_id != victim
            # Interrupted on the victim, rescued by the dispatcher and completed by the other worker (a second
            # dispatch, its first delivery there); the others ran once.
            assert result.attempt == 1
            assert result.epoch == (2 if victim in cluster.started_by(invocation_id) else 1)
        survivor = next(w for w in WORKERS if w != victim)
        assert all(cluster.started_by(i)[-1] == survivor for i in adapter_ids)
    finally:
        if victim is not None:
            cluster.spawn_worker(victim)
            await cluster.wait_workers([victim])


async def test_a_nats_restart_loses_no_queued_invocation(
    services: Any, cluster: Cluster, reference: Reference, tmp_path: Path
) -> None:
    if services.stack is None:
        pytest.skip("the NATS server is not ours to restart")
    body = await cluster.push("queued", cluster.write_adapter(tmp_path, rank=16, modules=("q_proj", "o_proj"),
                                                              seed=13))
    model = f"{cluster.tenant}/queued"
    calls = [
        *(faas_call(model, f"queued adapter call {i}", max_tokens=16, temperature=0.0, seed=0,
                    adapter_sha=body["sha256"]) for i in range(3)),
        *(faas_call("base", f"queued base call {i}", max_tokens=16, temperature=0.0, seed=0, adapter_sha=None)
          for i in range(3)),
    ]
    sync = OpenAICall(kind="chat", model=model, prompt="waiting through the restart", max_tokens=16,
                      temperature=0.0, seed=0, stream=True, adapter_sha=body["sha256"])
    expected = await asyncio.to_thread(reference.expect, [*calls, sync])
    pids = [p.pid for p in cluster.workers.values()]
    paused = False
    try:
        # The workers are paused: the invocations wait in the stream, and the adapter cannot be placed yet.
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        paused = True
        async with cluster.http() as http, cluster.openai() as client:
            ids = [await submit_async(http, cluster, "queued" if c.adapter_sha else subjects.BASE_ADAPTER, c)
                   for c in calls]
            # A synchronous caller waits across the restart too (its reply subscription must come back).
            waiting = asyncio.create_task(run_openai(client, sync))
            await wait_for(lambda: _equals(cluster.queued(), len(calls) + 1), what="every invocation in the stream")
            await asyncio.to_thread(services.stack.restart, "nats")
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
            paused = False
            views = [await finished(http, i) for i in ids]
            await asyncio.wait_for(waiting, 60)
        for view, want in zip(views, expected[:-1], strict=True):
            assert view["status"] == "succeeded" and view["output"]["text"] == want.text, view
        assert sync.text == expected[-1].text and sync.finish_reason == openai_finish_reason(expected[-1])
        for invocation_id in [*ids, sync.invocation_id]:
            assert await cluster.results_recorded(invocation_id) == 1
        await wait_for(lambda: _zero(cluster.queued()), what="the invocations stream emptied")
        # The gateway serves new calls through its reconnected NATS link.
        async with cluster.openai() as client:
            after = await run_openai(client, OpenAICall(kind="chat", model=model, prompt="after the restart",
                                                        max_tokens=8, temperature=0.0, seed=0, stream=True,
                                                        adapter_sha=body["sha256"]))
        [want] = await asyncio.to_thread(reference.expect, [after])
        assert after.text == want.text and after.tier == "device"
    finally:
        if paused:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        if not services.stack.process("nats").alive():
            await asyncio.to_thread(services.stack.restart, "nats")


async def test_postgres_down_answers_503_and_service_resumes(
    services: Any, cluster: Cluster, reference: Reference
) -> None:
    if services.stack is None:
        pytest.skip("the Postgres server is not ours to stop")
    postgres = services.stack.process("postgres")
    call = faas_call("base", "accepted before the outage", max_tokens=300, temperature=0.0, seed=0, adapter_sha=None)
    [want] = await asyncio.to_thread(reference.expect, [call])
    try:
        async with cluster.http() as http, cluster.openai() as client:
            before = await submit_async(http, cluster, subjects.BASE_ADAPTER, call)
            await asyncio.to_thread(postgres.stop)

            # Postgres is down: the gateway answers 503 with Retry-After, in OpenAI's error shape.
            with pytest.raises(openai.APIStatusError) as raised:
                await client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=4)
            assert raised.value.status_code == 503
            assert int(raised.value.response.headers["retry-after"]) > 0
            assert raised.value.response.json()["error"]["code"] == "unavailable"
            for r in (
                await http.post(f"/v1/functions/{cluster.tenant}/{subjects.BASE_ADAPTER}/invocations",
                                headers={"Prefer": "respond-async"}, json={"prompt": "hi"}),
                await http.get(f"/v1/invocations/{before}"),
            ):
                assert r.status_code == 503 and int(r.headers["retry-after"]) > 0, r.text
                assert r.json()["error"]["code"] == "unavailable"
            ready = await http.get("/readyz")
            assert ready.status_code == 503 and ready.json() == {"ready": False, "nats": True, "postgres": False,
                                                                 "scheduler": True}
            # The invocation accepted before the outage completes without Postgres (NATS holds its result).
            await wait_for(lambda: _equals(cluster.results_recorded(before), 1), what="the result in the stream")

            await asyncio.to_thread(services.stack.restart, "postgres")

            # The same gateway process serves again at once.
            assert (await http.get("/readyz")).status_code == 200
            after = await run_openai(client, OpenAICall(kind="chat", model="base", prompt="back again", max_tokens=8,
                                                        temperature=0.0, seed=0, stream=False))
            [want_after] = await asyncio.to_thread(reference.expect, [after])
            assert after.text == want_after.text
            view = await finished(http, before)
            assert view["status"] == "succeeded" and view["output"]["text"] == want.text
        # The scheduler recorded in Postgres the outcome that it could not write during the outage.
        engine = repo.create_engine(cluster.database)
        try:
            sessions = repo.session_factory(engine)

            async def recorded() -> bool:
                async with sessions() as session:
                    row = await repo.get_invocation(session, invocation_id=before)
                return row.status == InvocationStatus.succeeded

            await wait_for(recorded, what="the invocation row succeeded")
        finally:
            await engine.dispose()
    finally:
        if not services.stack.process("postgres").alive():
            await asyncio.to_thread(services.stack.restart, "postgres")
