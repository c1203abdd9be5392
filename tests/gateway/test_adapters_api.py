"""Adapter upload (two files, .tar.gz, .zip), list, get, delete over HTTP; tenants see only their own."""

from __future__ import annotations

import asyncio
import io
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import httpx
from nats.aio.client import Client

from protocol import subjects
from protocol.messages import AdapterEvent
from storage import repo
from tests.gateway.conftest import EchoWorker, Keys, Pushed, RunningGateway


def _files(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


def _tar_gz(path: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in _files(path).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(path: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in _files(path).items():
            z.writestr(f"adapter/{name}", data)
    return buf.getvalue()


async def _events(nc: Client) -> tuple[list[AdapterEvent], Any]:
    seen: list[AdapterEvent] = []

    async def on(msg: Any) -> None:
        seen.append(AdapterEvent.decode(msg.data))

    sub = await nc.subscribe(f"{subjects.ADAPTER_EVENT_PREFIX}.*", cb=on)
    await nc.flush()
    return seen, sub


async def test_upload_two_files_then_idempotent_reupload(client: httpx.AsyncClient, make_peft_adapter: Any,
                                                         nc: Client) -> None:
    events, sub = await _events(nc)
    path = make_peft_adapter(r=8, target_modules=("q_proj", "v_proj"), seed=11)
    files = [("files", (name, data, "application/octet-stream")) for name, data in _files(path).items()]
    r = await client.post("/v1/adapters", data={"name": "writer"}, files=files)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"] == "acme/writer" and body["name"] == "writer"
    assert body["max_rank"] == 8 and body["target_modules"] == ["q_proj", "v_proj"]
    assert len(body["sha256"]) == 64 and body["bytes"] > 0 and body["version"] and body["created"] > 0
    again = await client.post("/v1/adapters", data={"name": "writer"}, files=files)
    assert again.status_code == 200 and again.json()["sha256"] == body["sha256"]
    await asyncio.sleep(0.1)
    assert [(e.event, e.tenant, e.adapter) for e in events][:1] == [("pushed", "acme", "writer")]
    assert events[0].version == body["sha256"]
    await sub.unsubscribe()


async def test_upload_archives(client: httpx.AsyncClient, make_peft_adapter: Any) -> None:
    path = make_peft_adapter(r=16, seed=12)
    tgz = await client.post("/v1/adapters", data={"name": "from-tar"},
                            files={"archive": ("adapter.tar.gz", _tar_gz(path), "application/gzip")})
    assert tgz.status_code == 201, tgz.text
    z = await client.post("/v1/adapters", data={"name": "from-zip"},
                          files={"archive": ("adapter.zip", _zip(path), "application/zip")})
    assert z.status_code == 201, z.text
    assert tgz.json()["sha256"] == z.json()["sha256"] and tgz.json()["max_rank"] == 16
    listed = (await client.get("/v1/adapters")).json()["data"]
    assert [a["id"] for a in listed] == ["acme/from-tar", "acme/from-zip"]


async def test_get_list_delete_and_tenant_isolation(gateway: RunningGateway, keys: Keys, adapters: Pushed,
                                                    worker: EchoWorker, sessions: Any, nc: Client) -> None:
    async with gateway.client(headers=keys.auth()) as acme, gateway.client(headers=keys.auth(keys.other)) as other:
        got = await acme.get("/v1/adapters/acme/bot")
        assert got.status_code == 200 and got.json()["id"] == "acme/bot"
        assert [a["id"] for a in (await acme.get("/v1/adapters")).json()["data"]] == ["acme/bot"]
        assert [a["id"] for a in (await other.get("/v1/adapters")).json()["data"]] == ["other/secret"]
        # Another tenant's adapter does not exist for acme: get, invoke, delete are all 404.
        assert (await acme.get("/v1/adapters/other/secret")).status_code == 404
        assert (await acme.delete("/v1/adapters/other/secret")).status_code == 404
        assert (await acme.post("/v1/functions/other/secret/invocations", json={"prompt": "x"})).status_code == 404
        r = await acme.post("/v1/completions", json={"model": "other/secret", "prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        # acme can invoke its adapter (caches it), delete it, and then it is gone everywhere.
        assert (await acme.post("/v1/functions/acme/bot/invocations", json={"prompt": "x"})).status_code == 200
        events, sub = await _events(nc)
        deleted = await acme.delete("/v1/adapters/acme/bot")
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        assert (await acme.get("/v1/adapters/acme/bot")).status_code == 404
        assert (await acme.post("/v1/functions/acme/bot/invocations", json={"prompt": "x"})).status_code == 404
        assert (await acme.delete("/v1/adapters/acme/bot")).status_code == 404
        await asyncio.sleep(0.1)
        assert [(e.event, e.adapter) for e in events] == [("deleted", "bot")]
        await sub.unsubscribe()
    async with sessions() as session:
        tenant = await repo.get_tenant(session, name="other")
        assert tenant is not None
        assert [a.name for a in await repo.list_adapters(session, tenant=tenant)] == ["secret"]
