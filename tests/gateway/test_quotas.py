"""Per-tenant quotas and throttles through a real gateway (NATS, Postgres, the echo worker): each refusal is
a 429 with Retry-After (403 for storage) and a JSON error that names the limit and its numbers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from gateway.settings import GatewaySettings, QuotaSettings
from storage import repo
from storage.objectstore import ObjectStore
from tests.gateway.conftest import EchoWorker, GatewayFactory, Keys, Pushed, make_settings
from tests.prometheus import rendered, value

FN = "/v1/functions/acme/bot/invocations"


def quota_settings(services: Any, object_store: Any, **quotas: Any) -> GatewaySettings:
    """The test gateway's settings with these quota defaults."""
    settings = make_settings(services, object_store)
    options = settings.gateway.model_copy(update={"quotas": QuotaSettings(**quotas)})
    return settings.model_copy(update={"gateway": options})


def assert_refused(r: httpx.Response, limit: str, *, status: int = 429) -> dict[str, Any]:
    """A quota refusal: the status, Retry-After (429 only) and the JSON error naming the limit."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["limit"] == limit and error["limit_value"] is not None and error["current"] is not None
    if status == 429:
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
        assert int(r.headers["retry-after"]) >= 1 and error["retry_after_s"] == int(r.headers["retry-after"])
    else:
        assert error["code"] == "quota_exceeded" and "retry-after" not in r.headers
    return error


async def test_requests_per_second(gateway_factory: GatewayFactory, services: Any, object_store_settings: Any,
                                   keys: Keys) -> None:
    gw = await gateway_factory(settings=quota_settings(services, object_store_settings, requests_per_s=2.0, burst=3))
    async with gw.client() as c:
        codes = [(await c.get("/v1/models", headers=keys.auth())).status_code for _ in range(3)]
        assert codes == [200, 200, 200]  # the burst
        refused = await c.get("/v1/models", headers=keys.auth())
        error = assert_refused(refused, "requests_per_s")
        assert error["limit_value"] == 2.0 and "tenant acme" in error["message"]
        assert (await c.get("/v1/models", headers=keys.auth(keys.other))).status_code == 200  # per tenant
        await asyncio.sleep(0.6)  # one request's worth refilled at 2/s
        assert (await c.get("/v1/models", headers=keys.auth())).status_code == 200
    page = rendered(gw.app.state.gateway.metrics)
    assert value(page, "lorafn_rejections_total", reason="quota_requests_per_s") == 1.0


async def test_a_tenant_override_in_postgres_wins(gateway_factory: GatewayFactory, services: Any,
                                                  object_store_settings: Any, keys: Keys, sessions: Any) -> None:
    async with sessions() as session, session.begin():
        acme = await repo.get_tenant(session, name="acme")
        await repo.set_tenant_quotas(session, tenant=acme, values={"quota_requests_per_s": 1.0})
    gw = await gateway_factory(settings=quota_settings(services, object_store_settings, requests_per_s=100.0))
    async with gw.client() as c:
        assert (await c.get("/v1/models", headers=keys.auth())).status_code == 200
        assert_refused(await c.get("/v1/models", headers=keys.auth()), "requests_per_s")
        for _ in range(5):
            assert (await c.get("/v1/models", headers=keys.auth(keys.other))).status_code == 200


async def test_tokens_per_minute(gateway_factory: GatewayFactory, services: Any, object_store_settings: Any,
                                 keys: Keys, adapters: Pushed, worker: EchoWorker) -> None:
    gw = await gateway_factory(settings=quota_settings(services, object_store_settings, tokens_per_min=8))
    async with gw.client(headers=keys.auth()) as c:
        r = await c.post(FN, json={"prompt": "one two three four five six seven eight nine", "max_tokens": 9})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 9
        deadline = time.monotonic() + 2.0
        while (refused := await c.post(FN, json={"prompt": "more"})).status_code == 200:
            assert time.monotonic() < deadline, "the result's tokens were never counted"
        error = assert_refused(refused, "tokens_per_min")
        assert error["limit_value"] == 8 and error["current"] >= 9
        assert 55 <= int(refused.headers["retry-after"]) <= 61  # a window of 60 one-second slots
        async_refused = await c.post(FN, json={"prompt": "later"}, headers={"Prefer": "respond-async"})
        assert_refused(async_refused, "tokens_per_min")
        assert (await c.get("/v1/models")).status_code == 200  # only invocations are refused
    async with gw.client(headers=keys.auth(keys.other)) as c:
        assert (await c.post("/v1/functions/other/_base/invocations", json={"prompt": "hi"})).status_code == 200


async def test_concurrent_invocations(gateway_factory: GatewayFactory, services: Any, object_store_settings: Any,
                                      keys: Keys, adapters: Pushed, worker: EchoWorker) -> None:
    gw = await gateway_factory(settings=quota_settings(services, object_store_settings, concurrent=1))
    async with gw.client(headers=keys.auth()) as c:
        slow = asyncio.create_task(c.post(FN, json={"prompt": "SLOW 1 first"}))
        await asyncio.sleep(0.3)
        error = assert_refused(await c.post(FN, json={"prompt": "second"}), "concurrent")
        assert (error["limit_value"], error["current"]) == (1, 1)
        assert (await slow).status_code == 200
        # Released when the result arrived; an async invocation holds the slot until its result too.
        accepted = await until_accepted(c, {"prompt": "SLOW 1 async"}, {"Prefer": "respond-async"})
        assert accepted.status_code == 202
        assert_refused(await c.post(FN, json={"prompt": "third"}), "concurrent")
        assert (await until_accepted(c, {"prompt": "after"})).status_code == 200
    async with gw.client(headers=keys.auth(keys.other)) as c:  # another tenant is not affected
        assert (await c.post("/v1/functions/other/_base/invocations", json={"prompt": "hi"})).status_code == 200


async def until_accepted(c: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str] | None = None,
                         timeout_s: float = 5.0) -> httpx.Response:
    """Post to FN until it is not refused for concurrency (the slot frees when the result reaches the gateway)."""
    deadline = time.monotonic() + timeout_s
    while (r := await c.post(FN, json=body, headers=headers or {})).status_code == 429:
        assert r.json()["error"]["limit"] == "concurrent"
        assert time.monotonic() < deadline, "the slot was never released"
        await asyncio.sleep(0.05)
    return r


def _adapter_files(path: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(path.iterdir())
            if p.is_file()]


async def test_stored_adapters_and_bytes(gateway_factory: GatewayFactory, services: Any, object_store_settings: Any,
                                         keys: Keys, adapters: Pushed, make_peft_adapter: Any,
                                         store: ObjectStore) -> None:
    files = _adapter_files(make_peft_adapter(r=4, seed=21))
    gw = await gateway_factory(settings=quota_settings(services, object_store_settings, adapters=1))
    async with gw.client(headers=keys.auth()) as c:
        error = assert_refused(await c.post("/v1/adapters", data={"name": "second"}, files=files), "adapters",
                               status=403)
        assert (error["limit_value"], error["current"]) == (1, 1) and "'second'" in error["message"]
        assert (await c.get("/v1/adapters/acme/second")).status_code == 404
        # A new version of an adapter the tenant has is not a new adapter.
        assert (await c.post("/v1/adapters", data={"name": "bot"}, files=files)).status_code == 201
    async with gw.client(headers=keys.auth()) as c:
        listed = (await c.get("/v1/adapters")).json()["data"]
        stored = sum({a["sha256"]: a["bytes"] for a in listed}.values())
    gw2 = await gateway_factory(settings=quota_settings(services, object_store_settings, stored_bytes=stored * 2))
    async with gw2.client(headers=keys.auth()) as c:
        big = _adapter_files(make_peft_adapter(r=8, seed=22))
        error = assert_refused(await c.post("/v1/adapters", data={"name": "big"}, files=big), "stored_bytes",
                               status=403)
        assert error["limit_value"] == stored * 2 and error["current"] >= stored
        assert (await c.get("/v1/adapters/acme/big")).status_code == 404


async def test_failed_auth_is_throttled_per_address_without_the_database(
        gateway_factory: GatewayFactory, services: Any, object_store_settings: Any, keys: Keys, sessions: Any) -> None:
    gw = await gateway_factory(settings=quota_settings(services, object_store_settings, auth_failures=5,
                                                       auth_failure_window_s=60.0))
    attacker = {"X-Forwarded-For": "203.0.113.7"}  # uvicorn trusts it from 127.0.0.1: the client's address
    async with gw.client() as c:
        assert (await c.get("/v1/models", headers={**keys.auth(), **attacker})).status_code == 200  # cached now
        statuses = [(await c.get("/v1/models", headers={**keys.auth(f"lfn_bad{i}_x"), **attacker})).status_code
                    for i in range(5)]
        assert statuses == [401] * 5
        refused = await c.get("/v1/models", headers={**keys.auth("lfn_bad9_x"), **attacker})
        error = assert_refused(refused, "auth_failures")
        assert (error["limit_value"], error["current"]) == (5, 5) and "203.0.113.7" in error["message"]
        assert 55 <= int(refused.headers["retry-after"]) <= 60
        assert refused.status_code == (await c.get("/v1/models", headers=attacker)).status_code  # no key: same
        # A valid key this gateway never looked up is refused too: the throttled address reaches no database.
        async with sessions() as session, session.begin():
            acme = await repo.get_tenant(session, name="acme")
            fresh = await repo.create_api_key(session, tenant=acme)
        assert_refused(await c.get("/v1/models", headers={**keys.auth(fresh), **attacker}), "auth_failures")
        # A valid key already in the cache still works from there (users behind the same NAT), and other
        # addresses are not affected.
        assert (await c.get("/v1/models", headers={**keys.auth(), **attacker})).status_code == 200
        other = {"X-Forwarded-For": "198.51.100.1"}
        assert (await c.get("/v1/models", headers={**keys.auth("lfn_bad_x"), **other})).status_code == 401
        assert (await c.get("/v1/models", headers={**keys.auth(fresh), **other})).status_code == 200


async def test_openapi_lists_no_tenant_data(client: httpx.AsyncClient, adapters: Pushed) -> None:
    r = await client.get("/openapi.json", headers={"Authorization": ""})
    assert r.status_code == 200
    text = r.text
    for secret in ("acme", "other/secret", "lfn_"):
        assert secret not in text
    assert "/metrics" not in text
