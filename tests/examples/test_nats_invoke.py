"""examples/nats_invoke.py, run as a script against a running worker and scheduler (in-process, tiny
backbone): a direct NATS client publishes to lora.invoke.<tenant>.<adapter> and the dispatcher routes it. The
client connects with the tenant's own NATS credential (checked by the scheduler's auth callout), the worker
and the scheduler as their own NATS users."""

from __future__ import annotations

import ast
import asyncio
import secrets
import sys
from pathlib import Path

import pytest

from scheduler.service import SchedulerService
from scheduler.settings import SchedulerSettings
from storage import repo
from storage.settings import DatabaseSettings, ObjectStoreSettings
from workers.service import open_worker
from workers.settings import WorkerSettings
from workers.tiny import write_tiny_backbone

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).parents[2]


async def tenant_url(services, tenant: str) -> str:  # type: ignore[no-untyped-def]
    """A NATS URL with a fresh credential of `tenant` (what `lorafn keys create --nats` prints)."""
    engine = repo.create_engine(DatabaseSettings(url=services.database_url))
    try:
        async with repo.session_factory(engine)() as session, session.begin():
            row = await repo.get_or_create_tenant(session, name=tenant)
            _, secret = await repo.new_nats_credential(session, tenant=row)
    finally:
        await engine.dispose()
    return f"nats://{tenant}:{secret}@{services.nats_url.rpartition('@')[2]}"


async def test_example_invokes_the_base_model(services, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    backbone = await asyncio.to_thread(write_tiny_backbone, tmp_path / "backbone")
    settings = WorkerSettings(
        worker_id=f"ex-{secrets.token_hex(3)}",
        nats=services.nats_of("worker"),
        object_store=ObjectStoreSettings(endpoint=services.s3_endpoint, access_key=services.s3_access_key,
                                         secret_key=services.s3_secret_key),
        backbone={"path": backbone},
        engine={"kv_cache_bytes": 8 << 20, "adapter_pool_bytes": 1 << 20},
        host_cache={"directory": tmp_path / "cache"},
    )
    stop = asyncio.Event()
    scheduler = SchedulerService(SchedulerSettings(nats=services.nats_of("scheduler"), nats_callout=services.callout(),
                                                   database=DatabaseSettings(url=services.database_url)))
    client_url = services.nats_url  # the admin, where the servers are not ours (no callout there)
    if services.callout().enabled:
        client_url = await tenant_url(services, "dev")
    async with open_worker(settings) as worker:
        serving = asyncio.create_task(worker.run(stop))
        dispatching = asyncio.create_task(scheduler.run(stop))
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(ROOT / "examples" / "nats_invoke.py"), "--nats", client_url,
                "--tenant", "dev", "--chat", "--max-tokens", "12", "Hello there",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 90)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(serving, dispatching), 30)
    text = out.decode()
    assert proc.returncode == 0, (text, err.decode())
    assert "queued: stream LORAFN_INVOCATIONS" in err.decode()
    assert f"[succeeded on {settings.worker_id}:" in text and "12 completion tokens" in text
    streamed, result_line = text.split("\n[succeeded")[0], text.strip().splitlines()[-1]
    assert result_line.startswith("result: ") and ast.literal_eval(result_line[len("result: "):]) == streamed
