"""Cancellation at the gateway, against the echo worker over the real NATS: a synchronous caller that goes
away (plain or streaming) cancels its invocation, POST /v1/invocations/<id>/cancel (tenant-scoped,
idempotent, 409 once finished, answering a caller that waits), and the cancel verdict's table.

The echo worker answers after `SLOW <s>`; its result comes after the cancel, so it is dropped as a
duplicate: the first result recorded is the outcome. Workers stopping their generation is tested with real
workers in tests/e2e/test_cancel.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from gateway.invoker import cancel_verdict
from protocol import subjects
from protocol.messages import CancelInvocation, ErrorCode, InvocationError, InvocationResult
from storage import repo
from storage.models import InvocationStatus
from tests.gateway.conftest import EchoWorker, Keys, Pushed, RunningGateway

FN = "/v1/functions/acme/bot/invocations"


def _result(status: str) -> InvocationResult:
    error = None if status == "succeeded" else InvocationError(code=ErrorCode.internal, message=status)
    return InvocationResult(invocation_id="inv_x", status=status, error=error)  # type: ignore[arg-type]


S = InvocationStatus


@pytest.mark.parametrize(("row", "recorded", "verdict"), [
    (S.queued, None, "cancel"),  # not picked up yet: it never runs
    (S.running, None, "cancel"),  # its worker stops it
    (S.queued, _result("succeeded"), "finished"),  # finished before the scheduler wrote that it ran
    (S.running, _result("failed"), "finished"),
    (S.running, _result("cancelled"), "cancelled"),  # cancelled already, row not written yet: 200 again
    (S.cancelled, _result("cancelled"), "cancelled"),
    (S.cancelled, None, "cancelled"),  # its result aged out of the results stream
    (S.succeeded, None, "finished"),
    (S.failed, None, "finished"),  # never published (the gateway marked it failed): nothing to stop
])
def test_cancel_verdict(row: InvocationStatus, recorded: InvocationResult | None, verdict: str) -> None:
    assert cancel_verdict(row, recorded) == verdict


class Cancels:
    """The lora.cancel.* messages seen, with when they arrived."""

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}

    async def on_msg(self, msg: Msg) -> None:
        self.seen[CancelInvocation.decode(msg.data).invocation_id] = time.monotonic()

    async def wait(self, invocation_id: str | None = None, timeout: float = 5.0) -> tuple[str, float]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, at in self.seen.items():
                if invocation_id in (None, i):
                    return i, at
            await asyncio.sleep(0.01)
        raise AssertionError(f"no cancel of {invocation_id or 'any invocation'} in {timeout} s")


async def _cancels(nc: Client) -> Cancels:
    cancels = Cancels()
    await nc.subscribe(subjects.CANCEL_ALL, cb=cancels.on_msg)
    await nc.flush()
    return cancels


async def _recorded(nc: Client, invocation_id: str) -> tuple[int, InvocationResult]:
    """How many results the results stream holds for the invocation, and the last one."""
    js = nc.jetstream()
    subject = subjects.result(invocation_id)
    info = await js.stream_info(subjects.RESULTS_STREAM, subjects_filter=subject)
    raw = await js.get_last_msg(subjects.RESULTS_STREAM, subject)
    return int((info.state.subjects or {}).get(subject, 0)), InvocationResult.decode(raw.data or b"")


def _counted(gateway: RunningGateway, status: str) -> float:
    value = gateway.app.state.gateway.metrics.registry.get_sample_value(
        "lorafn_invocations_total", {"adapter": "acme/bot", "status": status})
    return float(value or 0.0)


async def _until_inflight(gateway: RunningGateway, n: int) -> None:
    invoker = gateway.app.state.gateway.invoker
    for _ in range(500):
        if invoker.inflight == n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the gateway has {invoker.inflight} calls in flight, not {n}")


async def test_a_sync_caller_that_goes_away_cancels_its_invocation(
    gateway: RunningGateway, client: httpx.AsyncClient, adapters: Pushed, worker: EchoWorker, nc: Client
) -> None:
    cancels = await _cancels(nc)
    call = asyncio.create_task(client.post(FN, json={"prompt": "SLOW 1.5 nobody waits"}))
    await _until_inflight(gateway, 1)
    call.cancel()  # the client closes its connection
    gone = time.monotonic()
    invocation_id, at = await cancels.wait()
    assert at - gone < 0.5  # measured ~0.01 s
    await _until_inflight(gateway, 0)  # its admission slot is free again
    count, result = await _recorded(nc, invocation_id)
    assert count == 1 and result.status == "cancelled" and result.error is not None
    assert result.error.code == ErrorCode.cancelled
    await asyncio.sleep(1.7)  # the echo worker answers now: its result is a duplicate of the cancel's
    assert await _recorded(nc, invocation_id) == (count, result)
    r = await client.get(f"/v1/invocations/{invocation_id}")
    assert r.json()["status"] == "cancelled" and r.json()["error"]["code"] == "cancelled"
    assert (_counted(gateway, "cancelled"), _counted(gateway, "failed")) == (1.0, 0.0)  # not an error


async def test_a_stream_whose_client_goes_away_is_cancelled(
    gateway: RunningGateway, client: httpx.AsyncClient, adapters: Pushed, worker: EchoWorker, nc: Client
) -> None:
    cancels = await _cancels(nc)
    body = {"model": "acme/bot", "messages": [{"role": "user", "content": "SLOW 1.5 still there?"}], "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        invocation_id = r.headers["x-lorafn-invocation-id"]
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                break  # the role chunk: the stream has begun; then the client goes away
    gone = time.monotonic()
    _, at = await cancels.wait(invocation_id)
    assert at - gone < 0.5
    assert (await _recorded(nc, invocation_id))[1].status == "cancelled"
    await _until_inflight(gateway, 0)


async def test_cancel_endpoint_is_tenant_scoped_idempotent_and_refuses_finished_invocations(
    gateway: RunningGateway, keys: Keys, adapters: Pushed, worker: EchoWorker, nc: Client
) -> None:
    cancels = await _cancels(nc)
    async with gateway.client(headers=keys.auth()) as acme, gateway.client(headers=keys.auth(keys.other)) as other:
        r = await acme.post(FN, json={"prompt": "SLOW 1 cancel me"}, headers={"Prefer": "respond-async"})
        invocation_id = r.json()["id"]
        assert (await other.post(f"/v1/invocations/{invocation_id}/cancel")).status_code == 404
        assert invocation_id not in cancels.seen
        first = await acme.post(f"/v1/invocations/{invocation_id}/cancel")
        assert first.status_code == 200, first.text
        assert first.json()["status"] == "cancelled" and first.json()["error"]["code"] == "cancelled"
        await cancels.wait(invocation_id)
        again = await acme.post(f"/v1/invocations/{invocation_id}/cancel")
        assert again.status_code == 200 and again.json()["status"] == "cancelled"
        assert (await acme.get(f"/v1/invocations/{invocation_id}")).json()["status"] == "cancelled"
        assert (await acme.post("/v1/invocations/inv_doesnotexist/cancel")).status_code == 404

        done = await acme.post(FN, json={"prompt": "quick"})
        assert done.status_code == 200
        finished_id = done.headers["x-lorafn-invocation-id"]
        late = await acme.post(f"/v1/invocations/{finished_id}/cancel")
        assert late.status_code == 409
        assert late.json()["error"]["code"] == "invocation_finished" and late.json()["error"]["status"] == "succeeded"
        assert finished_id not in cancels.seen
        assert (await acme.get(f"/v1/invocations/{finished_id}")).json()["status"] == "succeeded"


async def test_a_waiting_caller_gets_409_when_its_invocation_is_cancelled(
    gateway: RunningGateway, client: httpx.AsyncClient, adapters: Pushed, worker: EchoWorker, sessions: Any,
    keys: Keys,
) -> None:
    waiting = asyncio.create_task(client.post(FN, json={"prompt": "SLOW 3 waiting"},
                                              headers={"Idempotency-Key": "cancel-me"}))
    row = None
    for _ in range(500):
        async with sessions() as session:
            acme = await repo.get_tenant(session, name="acme")
            assert acme is not None
            row = await repo.find_idempotent_invocation(session, tenant=acme, key="cancel-me")
        if row is not None:
            break
        await asyncio.sleep(0.01)
    assert row is not None
    started = time.monotonic()
    assert (await client.post(f"/v1/invocations/{row.id}/cancel")).status_code == 200
    r = await asyncio.wait_for(waiting, 2.0)  # now, not when the echo worker's 3 s are over
    assert time.monotonic() - started < 1.0
    assert r.status_code == 409 and r.json()["error"]["code"] == "cancelled", r.text
    assert r.headers["x-lorafn-invocation-id"] == row.id
