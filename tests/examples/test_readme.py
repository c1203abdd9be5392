"""The README's curl examples, run as written with the curl command against a real stack: the gateway on a
free port, the scheduler and a worker in-process (tiny backbone), NATS, Postgres and S3 from the session's
services, tenant `dev` and its key as `$KEY`.

Only what cannot be the same here is replaced: the gateway's address (http://127.0.0.1:8000), `$KEY`, and
`<id>` (the id the previous example's 202 answered). The upload example runs first, from a directory holding
`adapter_config.json` and `adapter_model.safetensors`, since the others call the adapter it pushes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import shlex
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio
import uvicorn
from nats.js.errors import NotFoundError

from gateway.app import create_app
from gateway.settings import GatewayOptions, GatewaySettings, LimitSettings
from protocol import subjects
from protocol.settings import NatsSettings
from protocol.streams import ensure_streams
from scheduler.service import SchedulerService
from scheduler.settings import SchedulerSettings
from storage import repo
from storage.adapter_format import write_peft_adapter
from storage.backbone import BackboneSpec
from storage.objectstore import ObjectStore
from storage.settings import DatabaseSettings, ObjectStoreSettings, RegistrySettings
from workers.service import open_worker
from workers.settings import WorkerSettings
from workers.tiny import write_tiny_backbone

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(shutil.which("curl") is None, reason="runs the README's examples with curl")]

ROOT = Path(__file__).parents[2]
README_GATEWAY = "http://127.0.0.1:8000"


def readme_curl_commands(text: str) -> list[list[str]]:
    """Every curl command in the README's bash blocks, continuation lines joined, comments dropped, as argv."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.lstrip().startswith("curl "):
                commands.append(shlex.split(line, comments=True))
    return commands


@dataclass
class Stack:
    url: str
    key: str
    adapter_dir: Path


@pytest_asyncio.fixture
async def stack(services: Any, tmp_path: Path) -> AsyncIterator[Stack]:
    backbone = await asyncio.to_thread(write_tiny_backbone, tmp_path / "backbone", max_position_embeddings=512)
    adapter_dir = write_peft_adapter(tmp_path / "adapter", BackboneSpec.from_hf_dir(backbone), rank=4,
                                     modules=("q_proj", "v_proj"), seed=5)
    store_settings = ObjectStoreSettings(endpoint=services.s3_endpoint, access_key=services.s3_access_key,
                                         secret_key=services.s3_secret_key, bucket=f"readme-{secrets.token_hex(6)}")
    await asyncio.to_thread(ObjectStore(store_settings).ensure_bucket)
    database = DatabaseSettings(url=services.database_url)
    engine = repo.create_engine(database)
    try:
        async with repo.session_factory(engine)() as session, session.begin():
            tenant = await repo.get_or_create_tenant(session, name="dev")
            key = await repo.create_api_key(session, tenant=tenant)
    finally:
        await engine.dispose()
    nc = await nats.connect(services.nats_url)
    js = nc.jetstream()
    await ensure_streams(js)
    for consumer in await js.consumers_info(subjects.INVOCATIONS_STREAM):  # left by other modules' workers
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(subjects.INVOCATIONS_STREAM, consumer.name)
    await js.purge_stream(subjects.INVOCATIONS_STREAM)
    await nc.close()

    gateway_settings = GatewaySettings(
        nats=NatsSettings(url=services.nats_url, connect_timeout_s=1), database=database, object_store=store_settings,
        registry=RegistrySettings(backbone_hf_dir=backbone),
        gateway=GatewayOptions(limits=LimitSettings(sync_timeout_s=120.0)),
    )
    server = uvicorn.Server(uvicorn.Config(create_app(gateway_settings), host="127.0.0.1", port=0,
                                           log_level="warning", lifespan="on"))
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]  # keep pytest's Ctrl-C
    serving_http = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 60
    while not server.started:
        if serving_http.done():
            serving_http.result()
        assert time.monotonic() < deadline, "the gateway did not start"
        await asyncio.sleep(0.02)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"

    worker_settings = WorkerSettings(
        worker_id=f"readme-{secrets.token_hex(3)}", nats={"url": services.nats_url}, object_store=store_settings,
        backbone={"path": backbone}, engine={"kv_cache_bytes": 8 << 20, "adapter_pool_bytes": 1 << 20},
        host_cache={"directory": tmp_path / "cache"},
    )
    scheduler = SchedulerService(SchedulerSettings(nats={"url": services.nats_url}, database=database))
    stop = asyncio.Event()
    try:
        async with open_worker(worker_settings) as worker:
            tasks = [asyncio.create_task(worker.run(stop)), asyncio.create_task(scheduler.run(stop))]
            try:
                yield Stack(url=url, key=key, adapter_dir=adapter_dir)
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 30)
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving_http, 15)


async def _curl(argv: list[str], *, cwd: Path) -> tuple[int, Any]:
    """Run one curl command; (HTTP status, JSON body)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, "--max-time", "120", "-S", "-w", "\n%{http_code}", cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"{shlex.join(argv)}: curl exited with {proc.returncode}: {err.decode()}"
    body, _, status = out.decode().rpartition("\n")
    return int(status), json.loads(body) if body else None


async def test_readme_curl_examples_succeed(stack: Stack) -> None:
    commands = readme_curl_commands((ROOT / "README.md").read_text())
    assert len(commands) >= 5, commands
    commands.sort(key=lambda argv: not any(a.endswith("/v1/adapters") for a in argv))  # the upload first
    last_id: str | None = None
    for argv in commands:
        assert argv[0] == "curl" and any(a.startswith(README_GATEWAY) for a in argv), argv
        run = [a.replace(README_GATEWAY, stack.url).replace("$KEY", stack.key) for a in argv]
        if any("<id>" in a for a in run):
            assert last_id is not None, f"{shlex.join(argv)} needs the id of an earlier asynchronous call"
            run = [a.replace("<id>", last_id) for a in run]
        status, body = await _curl(run, cwd=stack.adapter_dir)
        assert 200 <= status < 300, f"{shlex.join(argv)} answered {status}: {body}"
        assert isinstance(body, dict) and body.get("error") is None, (argv, body)
        target = next(a for a in run if a.startswith(stack.url))
        if status == 202:
            last_id = body["id"]
        elif target.endswith("/v1/chat/completions"):
            assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"], body
        elif target.endswith("/invocations"):
            assert body["status"] == "succeeded" and body["output"]["text"], body
        elif "/v1/invocations/" in target:
            assert body["id"] == last_id and body["status"] in ("queued", "running", "succeeded"), body
    assert last_id is not None, "the README shows an asynchronous call"
