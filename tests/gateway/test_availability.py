"""Health, readiness, and 503 with Retry-After while Postgres or NATS is unreachable; service resumes when
NATS comes back (the client reconnects by itself)."""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import time
from typing import Any

from sqlalchemy import text

from gateway.bus import NatsLink
from gateway.settings import POSTGRES_NAME
from lorafn.stack import find_binary, free_ports
from protocol import subjects
from protocol.messages import SchedulerHeartbeat
from protocol.settings import NatsSettings
from storage import repo
from storage.settings import DatabaseSettings
from tests.gateway.conftest import GatewayFactory, Keys, Pushed, make_settings

FN = "/v1/functions/acme/bot/invocations"


async def test_health_and_ready(client: Any, nc: Any) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    # No scheduler alive: nothing would dispatch an invocation, so the gateway is not ready.
    ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"ready": False, "nats": True, "postgres": True, "scheduler": False}
    await nc.publish(subjects.scheduler_event("s1"), SchedulerHeartbeat(scheduler_id="s1").encode())
    deadline = time.monotonic() + 5
    while (ready := await client.get("/readyz")).status_code != 200:
        assert time.monotonic() < deadline, ready.json()
        await asyncio.sleep(0.05)
    assert ready.json() == {"ready": True, "nats": True, "postgres": True, "scheduler": True}


async def test_postgres_unreachable_is_503(gateway_factory: GatewayFactory, services: Any,
                                           object_store_settings: Any, keys: Keys) -> None:
    (port,) = free_ports("127.0.0.1", 1)
    settings = make_settings(services, object_store_settings)
    settings = settings.model_copy(update={"database": DatabaseSettings(url=f"postgresql://x@127.0.0.1:{port}/x")})
    gw = await gateway_factory(settings=settings)
    async with gw.client(headers=keys.auth()) as c:
        r = await c.post(FN, json={"prompt": "hi"})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"]["code"] == "unavailable"
        assert (await c.get("/v1/adapters")).status_code == 503
        ready = await c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["postgres"] is False
        assert (await c.get("/healthz")).status_code == 200


async def test_nats_unreachable_is_503_then_service_resumes(
    gateway_factory: GatewayFactory, services: Any, object_store_settings: Any, keys: Keys, adapters: Pushed,
    sessions: Any,
) -> None:
    (port,) = free_ports("127.0.0.1", 1)
    settings = make_settings(services, object_store_settings)
    options = settings.gateway.model_copy(update={"startup_nats_wait_s": 0.0, "nats_reconnect_wait_s": 0.2})
    settings = settings.model_copy(update={"nats": NatsSettings(url=f"nats://127.0.0.1:{port}", connect_timeout_s=1),
                                           "gateway": options})
    gw = await gateway_factory(settings=settings)
    async with gw.client(headers=keys.auth()) as c:
        r = await c.post(FN, json={"prompt": "hi"})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert "nats" in r.json()["error"]["message"]
        ready = await c.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {"ready": False, "nats": False, "postgres": True, "scheduler": False}
        async with sessions() as session:
            assert (await repo.count_rows(session))["invocations"] == 0
        binary = find_binary("nats-server")
        assert binary is not None
        with tempfile.TemporaryDirectory() as store:
            proc = subprocess.Popen([str(binary), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", store],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + 20
                while not (await c.get("/readyz")).json()["nats"]:
                    assert time.monotonic() < deadline, "the gateway did not connect to NATS"
                    await asyncio.sleep(0.1)
                accepted = await c.post(FN, json={"prompt": "hi"}, headers={"Prefer": "respond-async"})
                assert accepted.status_code == 202
            finally:
                await gw.stop()
                proc.terminate()
                proc.wait(10)


async def test_a_nats_reconnection_runs_the_reconnect_hooks() -> None:
    """The gateway drops its adapter cache when NATS reconnects (adapter events sent meanwhile are lost to it):
    NatsLink runs its reconnect hooks after a real server restart on the same port."""
    (port,) = free_ports("127.0.0.1", 1)
    binary = find_binary("nats-server")
    assert binary is not None
    reconnected = asyncio.Event()
    with tempfile.TemporaryDirectory() as store:
        argv = [str(binary), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", store]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        link = NatsLink(NatsSettings(url=f"nats://127.0.0.1:{port}", connect_timeout_s=2), reconnect_wait_s=0.2)
        link.on_reconnect(reconnected.set)
        try:
            link.start()
            assert await link.wait_ready(20)
            proc.terminate()
            proc.wait(10)
            assert not reconnected.is_set()
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await asyncio.wait_for(reconnected.wait(), 20)
        finally:
            await link.close()
            proc.terminate()
            proc.wait(10)


def test_a_postgres_pool_that_stays_busy_is_503_with_retry_after() -> None:
    """The request-path engine never opens more than its pool (repo.create_fast_write_engine): a call that waits
    longer than pool_timeout_s for a connection is told to retry, not answered 500."""
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    from gateway.errors import error_status

    status, body, headers = error_status(PoolTimeout("QueuePool limit of size 5 overflow 0 reached"))
    assert (status, headers) == (503, {"Retry-After": "1"})
    assert body["error"]["code"] == "unavailable" and "busy" in body["error"]["message"]


async def test_a_busy_gateway_holds_no_more_postgres_connections_than_it_declares(
        gateway_factory: GatewayFactory, services: Any, object_store_settings: Any, sessions: Any, keys: Keys,
        adapters: Pushed, worker: Any) -> None:
    """Its pools never grow past pool_size (storage.repo; before, the registry engine opened up to 10 overflow
    connections per burst and closed them again): rounds of 16 asynchronous calls, 16 reads of invocations and
    16 adapter listings at once, on a gateway with pool_size 2, never find more than postgres_connections() (4)
    of its connections open in pg_stat_activity, and every request is answered."""
    base = make_settings(services, object_store_settings)
    settings = base.model_copy(update={"database": base.database.model_copy(update={"pool_size": 2})})
    gw = await gateway_factory(settings=settings)
    peak, stop = 0, asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        query = text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name")
        async with sessions() as session:
            while not stop.is_set():
                peak = max(peak, int((await session.execute(query, {"name": POSTGRES_NAME})).scalar_one()))
                await session.rollback()  # a fresh snapshot of pg_stat_activity each time
                await asyncio.sleep(0.002)

    watching = asyncio.create_task(watch())
    statuses: list[int] = []
    try:
        async with gw.client(headers=keys.auth()) as c:
            first = await c.post("/v1/functions/acme/bot/invocations", json={"prompt": "hi"},
                                 headers={"Prefer": "respond-async"})
            assert first.status_code == 202, first.text
            for _ in range(4):
                answers = await asyncio.gather(
                    *(c.post("/v1/functions/acme/bot/invocations", json={"prompt": "hi"},
                             headers={"Prefer": "respond-async"}) for _ in range(16)),
                    *(c.get(f"/v1/invocations/{first.json()['id']}") for _ in range(16)),
                    *(c.get("/v1/adapters") for _ in range(16)),
                )
                statuses += [r.status_code for r in answers]
    finally:
        stop.set()
        await watching
    assert sorted(set(statuses)) == [200, 202], statuses
    assert 0 < peak <= settings.postgres_connections() == 4, peak
