"""API keys: list, create, revoke and rotate over the API and the CLI; a revocation reaches every gateway on
the same NATS within a second (an event, not the auth cache's lifetime, which these tests set to 5 minutes)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
from typer.testing import CliRunner, Result

from gateway.settings import CacheSettings, GatewaySettings, QuotaSettings
from lorafn.cli import app as cli_app
from storage import repo
from tests.gateway.conftest import GatewayFactory, Keys, RunningGateway, make_settings

REVOCATION_DEADLINE_S = 1.0


def long_cache_settings(services: Any, object_store: Any, **quotas: Any) -> GatewaySettings:
    """Test settings whose auth cache keeps a key for 5 minutes: only an event can make it forget one."""
    settings = make_settings(services, object_store)
    options = settings.gateway.model_copy(update={"cache": CacheSettings(auth_ttl_s=300.0),
                                                  "quotas": QuotaSettings(**quotas)})
    return settings.model_copy(update={"gateway": options})


async def status(gw: RunningGateway, key: str) -> int:
    async with gw.client() as c:
        return (await c.get("/v1/models", headers={"Authorization": f"Bearer {key}"})).status_code


async def refused_within(gw: RunningGateway, key: str, deadline_s: float = REVOCATION_DEADLINE_S) -> float:
    """Seconds until `gw` answers 401 to `key` (fails past the deadline)."""
    started = time.monotonic()
    while (code := await status(gw, key)) != 401:
        assert code == 200
        assert time.monotonic() - started < deadline_s, f"the key still works after {deadline_s} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_keys_over_the_api(gateway_factory: GatewayFactory, services: Any, object_store_settings: Any,
                                 keys: Keys) -> None:
    gw = await gateway_factory(settings=long_cache_settings(services, object_store_settings, api_keys=2))
    async with gw.client(headers=keys.auth()) as c:
        listed = (await c.get("/v1/keys")).json()["data"]
        assert len(listed) == 1 and keys.acme.startswith(listed[0]["prefix"] + "_")
        assert listed[0]["active"] and listed[0]["last_used"] is not None  # this very request looked it up
        assert keys.acme not in str(listed) and "key" not in listed[0]
        created = await c.post("/v1/keys", json={"name": "ci"})
        assert created.status_code == 201, created.text
        new = created.json()
        assert new["key"].startswith(new["prefix"] + "_") and new["name"] == "ci" and new["tenant"] == "acme"
        assert await status(gw, new["key"]) == 200
        error = (await c.post("/v1/keys")).json()["error"]  # a third active key
        assert (error["code"], error["limit"], error["limit_value"], error["current"]) == ("quota_exceeded",
                                                                                           "api_keys", 2, 2)
        assert (await c.post("/v1/keys", json={"name": "bad\nname"})).status_code == 400

        rotated = await c.post(f"/v1/keys/{new['prefix']}/rotate")  # by prefix
        assert rotated.status_code == 201 and rotated.json()["replaces"] == new["id"]
        assert rotated.json()["name"] == "ci"
        assert await status(gw, new["key"]) == 401 and await status(gw, rotated.json()["key"]) == 200
        again = await c.post(f"/v1/keys/{new['id']}/rotate")
        assert again.status_code == 400 and again.json()["error"]["code"] == "key_revoked"

        revoked = await c.delete(f"/v1/keys/{rotated.json()['id']}")
        assert revoked.status_code == 200 and revoked.json()["active"] is False and revoked.json()["revoked"]
        assert await status(gw, rotated.json()["key"]) == 401
        listed = (await c.get("/v1/keys")).json()["data"]
        assert [k["active"] for k in listed] == [True, False, False]
    async with gw.client(headers=keys.auth(keys.other)) as c:  # another tenant's keys are not found
        assert (await c.delete(f"/v1/keys/{listed[0]['id']}")).status_code == 404
        assert (await c.post(f"/v1/keys/{listed[0]['id']}/rotate")).status_code == 404
        assert [k["tenant"] for k in (await c.get("/v1/keys")).json()["data"]] == ["other"]
    assert await status(gw, keys.acme) == 200


async def test_revocation_reaches_a_second_gateway_within_a_second(
        gateway_factory: GatewayFactory, services: Any, object_store_settings: Any, keys: Keys) -> None:
    first = await gateway_factory(settings=long_cache_settings(services, object_store_settings))
    second = await gateway_factory(settings=long_cache_settings(services, object_store_settings))
    async with first.client(headers=keys.auth()) as c:
        spare = (await c.post("/v1/keys", json={"name": "spare"})).json()
    for gw in (first, second):  # both have the keys in their caches now
        assert await status(gw, keys.acme) == 200 and await status(gw, spare["key"]) == 200

    async with first.client(headers=keys.auth()) as c:
        assert (await c.delete(f"/v1/keys/{spare['id']}")).status_code == 200
    took = await refused_within(second, spare["key"])
    assert took < REVOCATION_DEADLINE_S

    async with second.client(headers=keys.auth()) as c:  # and the other way round, by rotation
        rotated = (await c.post("/v1/keys/" + keys.acme.split("_")[1] + "/rotate")).json()
    await refused_within(first, keys.acme)
    assert await status(first, rotated["key"]) == 200


def cli(services: Any, tmp_path: Path, *args: str) -> Result:
    """Run `lorafn ARGS` against the test services (a state dir without a running stack)."""
    env = {"LORAFN_DATABASE__URL": services.database_url, "LORAFN_NATS__URL": services.nats_url, "COLUMNS": "250"}
    return CliRunner().invoke(cli_app, [*args, "--state-dir", str(tmp_path)], env=env)


async def test_cli_keys_ls_revoke_rotate(gateway_factory: GatewayFactory, services: Any, object_store_settings: Any,
                                         keys: Keys, sessions: Any, tmp_path: Path) -> None:
    gw = await gateway_factory(settings=long_cache_settings(services, object_store_settings))
    assert await status(gw, keys.acme) == 200  # cached
    prefix = keys.acme.split("_")[1]

    listed = await asyncio.to_thread(cli, services, tmp_path, "keys", "ls", "acme")
    assert listed.exit_code == 0, listed.output
    assert f"lfn_{prefix}" in listed.output and keys.acme not in listed.output and "other" not in listed.output

    rotated = await asyncio.to_thread(cli, services, tmp_path, "keys", "rotate", f"lfn_{prefix}")
    assert rotated.exit_code == 0, rotated.output
    new_key = rotated.output.strip()
    assert new_key.startswith("lfn_") and new_key != keys.acme
    took = await refused_within(gw, keys.acme)
    assert await status(gw, new_key) == 200

    async with sessions() as session:
        new_row = await repo.find_api_key(session, key=new_key)
    assert new_row is not None and new_row.last_used_at is not None
    revoked = await asyncio.to_thread(cli, services, tmp_path, "keys", "revoke", str(new_row.id))
    assert revoked.exit_code == 0 and "revoked" in revoked.output, revoked.output
    took = max(took, await refused_within(gw, new_key))
    assert took < REVOCATION_DEADLINE_S
    twice = await asyncio.to_thread(cli, services, tmp_path, "keys", "revoke", str(new_row.id))
    assert twice.exit_code == 0 and "already revoked" in twice.output
    assert (await asyncio.to_thread(cli, services, tmp_path, "keys", "rotate", str(new_row.id))).exit_code == 1
    unknown = await asyncio.to_thread(cli, services, tmp_path, "keys", "revoke", "0123456789ab")
    assert unknown.exit_code == 1
    assert await status(gw, keys.other) == 200


async def test_cli_tenant_quota_applies_at_once(gateway_factory: GatewayFactory, services: Any,
                                                object_store_settings: Any, keys: Keys, tmp_path: Path) -> None:
    gw = await gateway_factory(settings=long_cache_settings(services, object_store_settings, requests_per_s=100.0))
    assert await status(gw, keys.acme) == 200  # the tenant (and its quotas) cached for 5 minutes
    set_ = await asyncio.to_thread(cli, services, tmp_path, "tenants", "quota", "acme", "--requests-per-s", "1",
                                   "--burst", "1")
    assert set_.exit_code == 0 and "requests_per_s" in set_.output, set_.output
    deadline = time.monotonic() + REVOCATION_DEADLINE_S
    while True:  # a burst of 1 at 1/s: two quick requests, the second refused once the change arrived
        codes = [await status(gw, keys.acme), await status(gw, keys.acme)]
        if 429 in codes:
            break
        assert time.monotonic() < deadline, "the new quota was not applied within a second"
    reset = await asyncio.to_thread(cli, services, tmp_path, "tenants", "quota", "acme", "--requests-per-s", "0",
                                    "--burst", "0")
    assert reset.exit_code == 0 and "default" in reset.output
    shown = await asyncio.to_thread(cli, services, tmp_path, "tenants", "quota", "acme")
    assert shown.exit_code == 0 and "1" not in shown.output.split("tenant acme")[1].replace("default", "")
    await asyncio.sleep(1.1)
    assert [await status(gw, keys.acme) for _ in range(5)] == [200] * 5


async def test_an_unknown_key_id_is_404(client: httpx.AsyncClient) -> None:
    assert (await client.delete("/v1/keys/not-a-key")).status_code == 404
    assert (await client.post("/v1/keys/00000000-0000-0000-0000-000000000000/rotate")).status_code == 404
