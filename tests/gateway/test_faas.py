"""The FaaS API: sync and async calls, GET of an invocation, callbacks, Idempotency-Key, timeouts, 429."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import uvicorn
from nats.aio.client import Client

from protocol import subjects
from protocol.messages import InvocationResult
from scheduler.metrics import MetricsSettings
from storage import repo
from tests.gateway.conftest import (
    EchoWorker,
    GatewayFactory,
    Keys,
    Pushed,
    RunningGateway,
    make_settings,
    read_body,
    stream_messages,
)

FN = "/v1/functions/acme/bot/invocations"


class CallbackReceiver:
    """A tiny real HTTP server on localhost that records callbacks; the first `fail_first` answer 500."""

    def __init__(self, fail_first: int = 0) -> None:
        self.received: list[dict[str, Any]] = []
        self.attempts = 0
        self.fail_first = fail_first
        self.got = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        self.attempts += 1
        status = 500 if self.attempts <= self.fail_first else 204
        if status == 204:
            self.received.append(json.loads(body))
            self.got.set()
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def _serve(app: Any) -> tuple[str, uvicorn.Server, asyncio.Task[None]]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    return f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/hook", server, task


async def test_sync_call(client: httpx.AsyncClient, adapters: Pushed, worker: EchoWorker) -> None:
    r = await client.post(FN, json={"prompt": "alpha beta gamma", "max_tokens": 2, "temperature": 0, "seed": 1,
                                    "stop": "x"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "succeeded"
    assert body["output"] == {"text": "alpha beta", "finish_reason": "length"}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert body["timings"]["load_ms"] == 12.5
    assert r.headers["x-lorafn-invocation-id"] == body["id"]
    assert r.headers["x-lorafn-adapter-tier"] == "device" and r.headers["x-lorafn-load-ms"] == "12.5"
    chat = await client.post(FN, json={"messages": [{"role": "user", "content": "hi you"}]})
    assert chat.status_code == 200 and chat.json()["output"]["text"] == "hi you"


async def test_async_call_then_get(client: httpx.AsyncClient, adapters: Pushed, worker: EchoWorker,
                                   sessions: Any) -> None:
    r = await client.post(FN, json={"prompt": "SLOW 0.3 later"}, headers={"Prefer": "respond-async"})
    assert r.status_code == 202, r.text
    inv_id = r.json()["id"]
    assert r.json()["status"] == "queued" and r.headers["x-lorafn-invocation-id"] == inv_id
    first = await client.get(f"/v1/invocations/{inv_id}")
    assert first.status_code == 200 and first.json()["status"] in ("queued", "running")
    assert first.json()["submitted_at"] is not None
    deadline = time.monotonic() + 10
    while True:
        got = await client.get(f"/v1/invocations/{inv_id}")
        if got.json()["status"] == "succeeded" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    body = got.json()
    # The scheduler never ran in this test: the result comes from the results stream alone.
    assert body["status"] == "succeeded" and body["result"]["text"] == "SLOW 0.3 later"
    assert got.headers["x-lorafn-adapter-tier"] == "device"
    async with sessions() as session:
        row = await repo.get_invocation(session, invocation_id=inv_id)
    assert row.status == "queued" and row.request_hash is not None


async def test_get_invocation_of_another_tenant_is_404(gateway: RunningGateway, keys: Keys, adapters: Pushed,
                                                       worker: EchoWorker) -> None:
    async with gateway.client(headers=keys.auth()) as acme, gateway.client(headers=keys.auth(keys.other)) as other:
        r = await acme.post(FN, json={"prompt": "mine"}, headers={"Prefer": "respond-async"})
        assert (await other.get(f"/v1/invocations/{r.json()['id']}")).status_code == 404
        assert (await acme.get("/v1/invocations/inv_doesnotexist")).status_code == 404


async def test_callback_is_delivered_with_retries(client: httpx.AsyncClient, adapters: Pushed,
                                                  worker: EchoWorker) -> None:
    receiver = CallbackReceiver(fail_first=1)
    url, server, task = await _serve(receiver)
    try:
        r = await client.post(FN, json={"prompt": "call me back"},
                              headers={"Prefer": "respond-async", "X-Callback-Url": url})
        assert r.status_code == 202
        await asyncio.wait_for(receiver.got.wait(), 15)
        assert receiver.attempts == 2  # the first delivery failed with 500 and was retried
        assert receiver.received[0]["id"] == r.json()["id"]
        assert receiver.received[0]["output"]["text"] == "call me back"
    finally:
        server.should_exit = True
        await task


async def test_callback_consumer_reads_only_callback_copies(client: httpx.AsyncClient, adapters: Pushed,
                                                            worker: EchoWorker, nc: Client) -> None:
    """Results of invocations without a callback never reach the gateway's callback consumer, and a copy whose
    URL no gateway recorded (a direct NATS client naming a URL) is acked without any HTTP call."""
    js = nc.jetstream()

    async def delivered() -> tuple[int, int]:
        info = await js.consumer_info(subjects.RESULTS_STREAM, subjects.CALLBACKS_CONSUMER)
        return info.delivered.consumer_seq or 0, info.ack_floor.consumer_seq or 0

    receiver = CallbackReceiver()
    url, server, task = await _serve(receiver)
    try:
        before, _ = await delivered()
        for i in range(5):
            assert (await client.post(FN, json={"prompt": f"no callback {i}"})).status_code == 200
        r = await client.post(FN, json={"prompt": "call me back"},
                              headers={"Prefer": "respond-async", "X-Callback-Url": url})
        await asyncio.wait_for(receiver.got.wait(), 15)
        forged = InvocationResult(invocation_id="inv-forged0001", status="succeeded", text="x")
        await js.publish(subjects.callback(forged.invocation_id), forged.encode())
        deadline = time.monotonic() + 10
        while (await delivered())[1] < before + 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await delivered() == (before + 2, before + 2)  # the copy of r, then the forged one; both acked
        assert receiver.attempts == 1 and receiver.received[0]["id"] == r.json()["id"]
    finally:
        server.should_exit = True
        await task


async def test_idempotency_key_replay_and_mismatch(client: httpx.AsyncClient, adapters: Pushed,
                                                   worker: EchoWorker, sessions: Any) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = await client.post(FN, json={"prompt": "only once"}, headers=headers)
    again = await client.post(FN, json={"prompt": "only once"}, headers=headers)
    assert first.status_code == again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    assert again.json()["output"]["text"] == "only once"
    assert again.headers["x-lorafn-invocation-id"] == first.json()["id"]
    assert len([i for i in worker.seen if i.id == first.json()["id"]]) == 1  # generated once
    queued = await client.post(FN, json={"prompt": "only once"}, headers={**headers, "Prefer": "respond-async"})
    assert queued.status_code == 202 and queued.json()["id"] == first.json()["id"]
    assert queued.json()["status"] == "succeeded"
    other = await client.post(FN, json={"prompt": "something else"}, headers=headers)
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    async with sessions() as session:
        assert (await repo.count_rows(session))["invocations"] == 1


async def test_sync_timeout_is_504_and_recorded(gateway_factory: GatewayFactory, keys: Keys, adapters: Pushed,
                                                nc: Client, sessions: Any) -> None:
    gw = await gateway_factory(sync_timeout_s=0.5)
    async with gw.client(headers=keys.auth()) as c:
        r = await c.post(FN, json={"prompt": "nobody answers"})
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "timeout"
    inv_id = r.headers["x-lorafn-invocation-id"]
    async with sessions() as session:
        assert (await repo.get_invocation(session, invocation_id=inv_id)).status == "queued"
    assert await stream_messages(nc) == 1  # still there for a worker to take


async def test_worker_error_codes_map_to_statuses(client: httpx.AsyncClient, adapters: Pushed,
                                                  worker: EchoWorker) -> None:
    expected = {"not_found": 404, "adapter_invalid": 422, "adapter_corrupted": 502, "overloaded": 429,
                "unavailable": 503, "timeout": 504, "dead_letter": 500, "bad_request": 400}
    for code, status in expected.items():
        r = await client.post(FN, json={"prompt": f"FAIL {code}"})
        assert r.status_code == status, (code, r.text)
        assert r.json()["error"]["code"] == code
        assert r.headers["x-lorafn-invocation-id"].startswith("inv_")


async def test_queue_limit_is_429_with_retry_after(gateway_factory: GatewayFactory, keys: Keys, adapters: Pushed,
                                                   nc: Client, sessions: Any) -> None:
    gw = await gateway_factory(max_queue_per_adapter=1, retry_after_s=3)
    async with gw.client(headers=keys.auth()) as c:
        ok = await c.post(FN, json={"prompt": "queued"}, headers={"Prefer": "respond-async"})
        assert ok.status_code == 202
        full = await c.post(FN, json={"prompt": "one too many"}, headers={"Prefer": "respond-async"})
        assert full.status_code == 429 and full.headers["retry-after"] == "3"
        assert full.json()["error"]["type"] == "rate_limit_error"
        await asyncio.sleep(0.3)  # past queue_check_interval_s: the depth is read from the stream again
        again = await c.post(FN, json={"prompt": "still full"}, headers={"Prefer": "respond-async"})
        assert again.status_code == 429
        base = await c.post("/v1/functions/acme/_base/invocations", json={"prompt": "another queue"},
                            headers={"Prefer": "respond-async"})
        assert base.status_code == 202  # the limit is per adapter
    assert await stream_messages(nc) == 2
    async with sessions() as session:
        assert (await repo.count_rows(session))["invocations"] == 2


async def test_gateway_inflight_limit_is_429(gateway_factory: GatewayFactory, keys: Keys, adapters: Pushed,
                                             worker: EchoWorker) -> None:
    gw = await gateway_factory(max_inflight=1)
    async with gw.client(headers=keys.auth()) as c:
        slow = asyncio.create_task(c.post(FN, json={"prompt": "SLOW 1 busy"}))
        invoker = gw.app.state.gateway.invoker
        deadline = time.monotonic() + 10
        while invoker.inflight < 1:  # admitted (a fixed sleep lost the race on a loaded machine)
            assert time.monotonic() < deadline and not slow.done()
            await asyncio.sleep(0.02)
        busy = await c.post(FN, json={"prompt": "me too"})
        assert busy.status_code == 429 and "retry-after" in busy.headers
        assert (await slow).status_code == 200
        assert (await c.post(FN, json={"prompt": "now"})).status_code == 200


async def test_metrics(gateway_factory: GatewayFactory, services: Any, object_store_settings: Any, keys: Keys,
                       adapters: Pushed, worker: EchoWorker) -> None:
    """The metrics (which name every tenant's adapters) are served on a loopback listener of their own, not on
    the API port."""
    settings = make_settings(services, object_store_settings).model_copy(update={"metrics": MetricsSettings()})
    gw = await gateway_factory(settings=settings)
    async with gw.client(headers=keys.auth()) as client:
        assert (await client.post(FN, json={"prompt": "count me"})).status_code == 200
        assert (await client.get("/metrics")).status_code == 404
    endpoint = gw.app.state.gateway.metrics_endpoint
    assert endpoint.host == "127.0.0.1" and endpoint.port != int(gw.url.rsplit(":", 1)[1])
    async with httpx.AsyncClient(trust_env=False) as scraper:
        text = (await scraper.get(endpoint.url)).text
    assert 'lorafn_invocations_total{adapter="acme/bot",status="succeeded"} 1.0' in text
    assert "lorafn_invocation_latency_seconds_bucket" in text
    assert "lorafn_queue_time_seconds_count" in text
    assert "lorafn_time_to_first_token_seconds" in text


async def test_callback_survives_a_gateway_restart(gateway_factory: GatewayFactory, keys: Keys, adapters: Pushed,
                                                   worker: EchoWorker) -> None:
    receiver = CallbackReceiver()
    url, server, task = await _serve(receiver)
    try:
        first = await gateway_factory()
        async with first.client(headers=keys.auth()) as c:
            r = await c.post(FN, json={"prompt": "SLOW 1 after restart"},
                             headers={"Prefer": "respond-async", "X-Callback-Url": url})
        assert r.status_code == 202
        await first.stop()  # gone before the result exists
        await asyncio.sleep(1.5)
        assert not receiver.received
        await gateway_factory()  # a new process resumes the durable consumer
        await asyncio.wait_for(receiver.got.wait(), 15)
        assert receiver.received[0]["id"] == r.json()["id"]
        assert receiver.received[0]["output"]["text"] == "SLOW 1 after restart"
    finally:
        server.should_exit = True
        await task
