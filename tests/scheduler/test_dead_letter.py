"""Max deliveries exhausted -> the scheduler fails the invocation visibly (real NATS and Postgres).

The test plays a worker that dies with every delivery: it pulls the invocation and never acks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from protocol import subjects
from protocol.messages import Invocation, InvocationResult
from protocol.streams import ensure_streams
from scheduler.service import SchedulerService
from scheduler.settings import PlacementSettings, SchedulerSettings
from storage import repo
from storage.models import InvocationStatus
from storage.settings import DatabaseSettings

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def running(services, sessions, tenant: str, invocation_id: str,  # type: ignore[no-untyped-def]
                  placement: PlacementSettings) -> AsyncIterator[Client]:
    """A tenant with one queued invocation row, a scheduler with `placement`, and a NATS client."""
    async with sessions() as session, session.begin():
        tenant_row = await repo.get_or_create_tenant(session, name=tenant)
        await repo.create_invocation(session, invocation_id=invocation_id, tenant=tenant_row, adapter=None)
    scheduler = SchedulerService(SchedulerSettings(
        nats={"url": services.nats_url}, database=DatabaseSettings(url=services.database_url), scheduler=placement,
    ))
    stop = asyncio.Event()
    task = asyncio.create_task(scheduler.run(stop))
    nc = await nats.connect(services.nats_url)
    try:
        await ensure_streams(nc.jetstream())
        yield nc
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await nc.close()  # a pull subscription may hold unanswered pull statuses; nothing to drain


async def test_max_deliveries_become_a_visible_dead_letter(services, sessions) -> None:  # type: ignore[no-untyped-def]
    tenant, adapter, inv_id = f"t{secrets.token_hex(4)}", "flaky", f"inv-{secrets.token_hex(8)}"
    placement = PlacementSettings(heartbeat_timeout_s=3.0, flush_every_s=0.5, reconcile_every_s=1.0)
    async with running(services, sessions, tenant, inv_id, placement) as nc:
        js = nc.jetstream()
        durable = subjects.consumer_name(tenant, adapter)
        sub = await js.pull_subscribe(
            subjects.invoke(tenant, adapter), durable=durable, stream=subjects.INVOCATIONS_STREAM,
            config=ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT, ack_wait=1.0, max_deliver=2),
        )
        replies: list[InvocationResult] = []
        got_reply = asyncio.Event()

        async def on_reply(msg: Msg) -> None:
            if (msg.headers or {}).get("Lorafn-Kind") == "result":
                replies.append(InvocationResult.decode(msg.data))
                got_reply.set()

        await nc.subscribe(subjects.reply(inv_id), cb=on_reply)
        await asyncio.sleep(0.5)  # the scheduler subscribes to the advisories
        inv = Invocation(id=inv_id, tenant=tenant, adapter=adapter, prompt="hi", reply_to=subjects.reply(inv_id))
        await js.publish(subjects.invoke(tenant, adapter), inv.encode(), headers={"Nats-Msg-Id": inv_id})
        deliveries = 0
        while not got_reply.is_set():  # a worker that dies with every delivery: pull, never ack
            with contextlib.suppress(nats.errors.TimeoutError):
                deliveries += len(await sub.fetch(1, timeout=1.0))
            assert deliveries <= 2
        [result] = replies
        assert result.status == "failed" and result.error is not None
        assert result.error.code == "dead_letter" and "delivered 2 times" in result.error.message
        raw = await js.get_last_msg(subjects.RESULTS_STREAM, subjects.result(inv_id))
        assert InvocationResult.decode(raw.data or b"") == result
        for _ in range(50):
            async with sessions() as session:
                row = await repo.get_invocation(session, invocation_id=inv_id)
            if row.status == InvocationStatus.failed:
                break
            await asyncio.sleep(0.1)
        assert row.status == InvocationStatus.failed and row.error and "dead_letter" in row.error
        info = await js.stream_info(subjects.INVOCATIONS_STREAM, subjects_filter=subjects.invoke(tenant, adapter))
        assert info.state.messages == 0  # removed from the work queue, not left to linger


async def test_invocations_of_an_unknown_adapter_fail_with_not_found(services, sessions) -> None:  # type: ignore[no-untyped-def]
    """Invocations queued for an adapter that does not exist (a direct NATS client naming one never pushed, or
    one deleted after a gateway accepted the call) fail visibly after the grace period instead of waiting for
    ever: not_found to the reply subject, the results stream (with the callback copy) and the row."""
    tenant, adapter = f"t{secrets.token_hex(4)}", "ghost"
    ids = [f"inv-{secrets.token_hex(8)}" for _ in range(3)]
    placement = PlacementSettings(flush_every_s=0.5, reconcile_every_s=0.3, unknown_adapter_grace_s=1.0)
    async with running(services, sessions, tenant, ids[0], placement) as nc:
        js = nc.jetstream()
        replies: dict[str, InvocationResult] = {}
        all_replied = asyncio.Event()

        async def on_reply(msg: Msg) -> None:
            result = InvocationResult.decode(msg.data)
            replies[result.invocation_id] = result
            if len(replies) == len(ids):
                all_replied.set()

        for inv_id in ids:
            await nc.subscribe(subjects.reply(inv_id), cb=on_reply)
        published = asyncio.get_running_loop().time()
        for i, inv_id in enumerate(ids):
            inv = Invocation(id=inv_id, tenant=tenant, adapter=adapter, prompt="hi", reply_to=subjects.reply(inv_id),
                             callback_url="http://127.0.0.1:9/hook" if i == 1 else None)
            await js.publish(subjects.invoke(tenant, adapter), inv.encode(), headers={"Nats-Msg-Id": inv_id})
        await asyncio.wait_for(all_replied.wait(), 15)
        assert asyncio.get_running_loop().time() - published >= 1.0  # not before the grace period
        for inv_id in ids:
            result = replies[inv_id]
            assert result.status == "failed" and result.error is not None
            assert result.error.code == "not_found" and f"{tenant}/{adapter}" in result.error.message
            raw = await js.get_last_msg(subjects.RESULTS_STREAM, subjects.result(inv_id))
            assert InvocationResult.decode(raw.data or b"") == result
        copy = await js.get_last_msg(subjects.RESULTS_STREAM, subjects.callback(ids[1]))
        assert InvocationResult.decode(copy.data or b"").invocation_id == ids[1]
        for _ in range(50):
            async with sessions() as session:
                row = await repo.get_invocation(session, invocation_id=ids[0])
            if row.status == InvocationStatus.failed:
                break
            await asyncio.sleep(0.1)
        assert row.status == InvocationStatus.failed and row.error and "not_found" in row.error
        info = await js.stream_info(subjects.INVOCATIONS_STREAM, subjects_filter=subjects.invoke(tenant, adapter))
        assert info.state.messages == 0
        for _ in range(50):  # the scheduler's consumer for the subject is gone too
            if not [c for c in await js.consumers_info(subjects.INVOCATIONS_STREAM)
                    if c.config.filter_subject == subjects.invoke(tenant, adapter)]:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the draining consumer was left behind")
