"""Repository functions against the real Postgres, and the migrations up and down."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, event, inspect, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from storage import repo
from storage.errors import AlreadyExists, NotFound
from storage.migrate import downgrade, upgrade
from storage.models import AdapterVersion, ApiKey, Base, InvocationStatus, Residency, Tier


def facts(sha: str, rank: int = 8) -> repo.VersionFacts:
    return repo.VersionFacts(
        sha256=sha, max_rank=rank, ranks={"layers.0.q_proj": rank}, lora_alpha=16, use_rslora=False,
        target_modules=["q_proj"], num_layers=1, base_model="base", dtype="F32", bytes=10, object_key=f"blobs/{sha}",
    )


async def test_api_keys_are_hashed_and_authenticate_their_tenant(sessions) -> None:
    async with sessions() as session, session.begin():
        acme = await repo.create_tenant(session, name="acme")
        key = await repo.create_api_key(session, tenant=acme, label="ci")
    async with sessions() as session:
        tenant = await repo.authenticate(session, key=key)
        assert tenant is not None and tenant.name == "acme"
        assert await repo.authenticate(session, key=key + "x") is None
        assert await repo.authenticate(session, key="not-a-key") is None
        rows = await session.execute(select(ApiKey.key_hash))
        stored = [r[0] for r in rows]
    assert key not in stored and repo.hash_api_key(key) in stored
    async with sessions() as session, session.begin():
        assert await repo.revoke_api_key(session, key=key)
    async with sessions() as session:
        assert await repo.authenticate(session, key=key) is None


async def test_tenant_names_are_unique_and_checked(sessions) -> None:
    async with sessions() as session, session.begin():
        await repo.create_tenant(session, name="acme")
    async with sessions() as session, session.begin():
        with pytest.raises(AlreadyExists):
            await repo.create_tenant(session, name="acme")
    with pytest.raises(IntegrityError):
        async with sessions() as session, session.begin():
            await repo.create_tenant(session, name="bad.name")
    async with sessions() as session:
        with pytest.raises(NotFound):
            await repo.get_tenant(session, name="nobody")


async def test_versions_list_and_tenant_isolation(sessions) -> None:
    async with sessions() as session, session.begin():
        acme = await repo.get_or_create_tenant(session, name="acme")
        other = await repo.get_or_create_tenant(session, name="other")
        _, v1, created = await repo.register_version(session, tenant=acme, name="a", facts=facts("1" * 64))
        _, v1_again, created_again = await repo.register_version(session, tenant=acme, name="a", facts=facts("1" * 64))
        await repo.register_version(session, tenant=other, name="b", facts=facts("2" * 64))
    assert created and not created_again and v1.id == v1_again.id
    async with sessions() as session:
        acme = await repo.get_tenant(session, name="acme")
        names = [a.name for a in await repo.list_adapters(session, tenant=acme)]
        assert names == ["a"]
        assert [f"{a.tenant.name}/{a.name}" for a in await repo.list_adapters(session)] == ["acme/a", "other/b"]
        with pytest.raises(NotFound):
            await repo.get_adapter(session, tenant=acme, name="b")


async def test_residency_workers_and_lru_order(sessions) -> None:
    async with sessions() as session, session.begin():
        acme = await repo.get_or_create_tenant(session, name="acme")
        _, v1, _ = await repo.register_version(session, tenant=acme, name="a", facts=facts("1" * 64))
        _, v2, _ = await repo.register_version(session, tenant=acme, name="b", facts=facts("2" * 64))
        await repo.upsert_worker(session, worker_id="w1", host="h", device="cpu", capacity={"pages": 100})
        await repo.set_residency(session, version_id=v1.id, worker_id="w1", tier=Tier.device, pages=10, nbytes=100)
        await repo.set_residency(session, version_id=v2.id, worker_id="w1", tier=Tier.device, pages=20, nbytes=200)
        await repo.set_residency(session, version_id=v2.id, worker_id="w1", tier=Tier.device, pages=30, nbytes=300)
    async with sessions() as session, session.begin():
        await repo.touch_residency(session, version_id=v2.id, worker_id="w1")
    async with sessions() as session:
        lru = await repo.worker_residency(session, worker_id="w1", tier=Tier.device)
        assert [r.adapter_version_id for r in lru] == [v1.id, v2.id]  # v1 never used: evicted first
        assert lru[1].pages == 30  # upsert, not duplicate
        assert [w.id for w in await repo.live_workers(session)] == ["w1"]
    async with sessions() as session, session.begin():
        await repo.upsert_worker(session, worker_id="w1", host="h", device="cpu", capacity={"pages": 100},
                                 state={"queue": 3})
        await repo.mark_worker_down(session, worker_id="w1")
    async with sessions() as session:
        assert await repo.live_workers(session) == []
        assert await repo.residency_of(session, version_id=v1.id) == []


async def test_worker_residency_is_written_by_content_hash_in_a_few_statements(sessions) -> None:
    async with sessions() as session, session.begin():
        acme = await repo.create_tenant(session, name="acme")
        _, v1, _ = await repo.register_version(session, tenant=acme, name="a", facts=facts("1" * 64))
        _, twin, _ = await repo.register_version(session, tenant=acme, name="twin", facts=facts("1" * 64))
        _, v2, _ = await repo.register_version(session, tenant=acme, name="b", facts=facts("2" * 64))
        await repo.upsert_worker(session, worker_id="w1", host="h", device="cpu", capacity={})
        at = datetime(2026, 11, 30, tzinfo=UTC)
        rows = [repo.ResidencyRow("1" * 64, Tier.device, pages=10, nbytes=100, last_used_at=at),
                repo.ResidencyRow("2" * 64, Tier.host, nbytes=200),
                repo.ResidencyRow("9" * 64, Tier.host, nbytes=5)]  # no version has it (deleted): skipped
        await repo.write_worker_residency(session, worker_id="w1", rows=rows, replace=True)
    async with sessions() as session:
        device = await repo.worker_residency(session, worker_id="w1", tier=Tier.device)
        host = await repo.worker_residency(session, worker_id="w1", tier=Tier.host)
    # Identical bytes under two names: both versions are resident.
    assert {r.adapter_version_id for r in device} == {v1.id, twin.id}
    assert {(r.pages, r.bytes, r.last_used_at) for r in device} == {(10, 100, at)}
    assert [(r.adapter_version_id, r.bytes) for r in host] == [(v2.id, 200)]
    async with sessions() as session, session.begin():  # a diff: one row changes, one leaves
        await repo.write_worker_residency(session, worker_id="w1", rows=[repo.ResidencyRow("1" * 64, Tier.device, 12, 100)],
                                          drop=[("2" * 64, Tier.host)])
    async with sessions() as session:
        assert {r.pages for r in await repo.worker_residency(session, worker_id="w1", tier=Tier.device)} == {12}
        assert await repo.worker_residency(session, worker_id="w1", tier=Tier.host) == []
    async with sessions() as session, session.begin():  # replace: what it does not report is gone
        await repo.write_worker_residency(session, worker_id="w1", rows=[repo.ResidencyRow("2" * 64, Tier.device)],
                                          replace=True)
    async with sessions() as session:
        device = await repo.worker_residency(session, worker_id="w1", tier=Tier.device)
    assert [r.adapter_version_id for r in device] == [v2.id]


async def test_invocations_idempotency_key_is_unique_per_tenant(sessions) -> None:
    async with sessions() as session, session.begin():
        acme = await repo.get_or_create_tenant(session, name="acme")
        inv = await repo.create_invocation(session, invocation_id="inv1", tenant=acme, adapter=None,
                                           idempotency_key="k1", request_hash="h")
    assert inv.status == InvocationStatus.queued
    async with sessions() as session, session.begin():
        acme = await repo.get_tenant(session, name="acme")
        found = await repo.find_idempotent_invocation(session, tenant=acme, key="k1")
        assert found is not None and found.id == "inv1"
        now = datetime.now(UTC)
        await repo.update_invocation(session, invocation_id="inv1", status=InvocationStatus.succeeded,
                                     started_at=now, finished_at=now, completion_tokens=5)
    with pytest.raises(IntegrityError):
        async with sessions() as session, session.begin():
            acme = await repo.get_tenant(session, name="acme")
            await repo.create_invocation(session, invocation_id="inv2", tenant=acme, adapter=None, idempotency_key="k1")
    async with sessions() as session:
        inv = await repo.get_invocation(session, invocation_id="inv1")
        assert inv.status == InvocationStatus.succeeded and inv.completion_tokens == 5
        with pytest.raises(ValueError, match="cannot update"):
            await repo.update_invocation(session, invocation_id="inv1", tenant_id=uuid.uuid4())


async def test_the_request_path_engine_never_opens_more_connections_than_its_pool(sessions, database_settings) -> None:
    """48 concurrent inserts through a pool of 3 share those 3 connections (an overflow connection, closed again
    when returned, costs Postgres a new backend per call); with every connection held, an insert waits
    `pool_timeout_s` and then raises the pool's TimeoutError, which the gateway answers with 503."""
    async with sessions() as session, session.begin():
        acme = await repo.get_or_create_tenant(session, name="acme")
    settings = database_settings.model_copy(update={"pool_size": 3, "pool_timeout_s": 0.3})
    engine = repo.create_fast_write_engine(settings)
    opened = []
    event.listen(engine.sync_engine, "connect", lambda *_: opened.append(1))
    try:
        await asyncio.gather(*(repo.insert_invocation(engine, invocation_id=f"pool{i}", tenant=acme, adapter=None)
                               for i in range(48)))
        assert len(opened) == 3
        async with sessions() as session:
            assert (await repo.count_rows(session))["invocations"] == 48
        held = [await engine.connect() for _ in range(3)]
        try:
            with pytest.raises(PoolTimeout):
                await repo.insert_invocation(engine, invocation_id="waits", tenant=acme, adapter=None)
        finally:
            for c in held:
                await c.close()
        await repo.insert_invocation(engine, invocation_id="after", tenant=acme, adapter=None)
        assert len(opened) == 3
    finally:
        await engine.dispose()


async def test_demand_history_buckets_and_totals(sessions) -> None:
    async with sessions() as session, session.begin():
        acme = await repo.get_or_create_tenant(session, name="acme")
        a, _, _ = await repo.register_version(session, tenant=acme, name="a", facts=facts("1" * 64))
        b, _, _ = await repo.register_version(session, tenant=acme, name="b", facts=facts("2" * 64))
        t0 = datetime(2026, 1, 1, 12, 0, 5, tzinfo=UTC)
        for dt, adapter in [(0, a), (10, a), (70, a), (20, b)]:
            await repo.record_demand(session, adapter_id=adapter.id, at=t0 + timedelta(seconds=dt))
        await repo.record_demand(session, adapter_id=b.id, at=t0, count=4)
    async with sessions() as session:
        series = await repo.demand_series(session, adapter_id=a.id, since=t0 - timedelta(hours=1))
        assert series == [(datetime(2026, 1, 1, 12, 0, tzinfo=UTC), 2), (datetime(2026, 1, 1, 12, 1, tzinfo=UTC), 1)]
        totals = await repo.demand_totals(session, since=t0 - timedelta(hours=1))
        assert totals == {a.id: 3, b.id: 5}
    # Many at once, in one statement: added to the same buckets; an adapter that is gone is skipped.
    async with sessions() as session, session.begin():
        await repo.record_demand_many(session, counts=[(a.id, t0, 2), (a.id, t0 + timedelta(seconds=1), 1),
                                                       (b.id, t0 + timedelta(seconds=70), 6), (uuid.uuid4(), t0, 9)])
    async with sessions() as session:
        series = await repo.demand_series(session, adapter_id=a.id, since=t0 - timedelta(hours=1))
        assert series == [(datetime(2026, 1, 1, 12, 0, tzinfo=UTC), 5), (datetime(2026, 1, 1, 12, 1, tzinfo=UTC), 1)]
        assert await repo.demand_totals(session, since=t0 - timedelta(hours=1)) == {a.id: 6, b.id: 11}


async def test_demand_of_an_adapter_deleted_meanwhile_is_skipped(sessions) -> None:
    """A flush's demand write that meets an adapter whose delete is not committed yet waits for it and skips
    the adapter; it used to read the adapter from its snapshot and then fail the foreign key (the whole flush
    with it) when the delete committed."""
    async with sessions() as session, session.begin():
        acme = await repo.get_or_create_tenant(session, name="acme")
        gone, _, _ = await repo.register_version(session, tenant=acme, name="gone", facts=facts("4" * 64))
        kept, _, _ = await repo.register_version(session, tenant=acme, name="kept", facts=facts("5" * 64))
    t0 = datetime(2026, 1, 1, 12, 0, 5, tzinfo=UTC)
    async with sessions() as deleting, deleting.begin():
        await repo.delete_adapter(deleting, tenant=await repo.get_tenant(deleting, name="acme"), name="gone")

        async def flush() -> None:
            async with sessions() as session, session.begin():
                await repo.record_demand_many(session, counts=[(gone.id, t0, 3), (kept.id, t0, 2)])

        writing = asyncio.ensure_future(flush())
        await asyncio.sleep(0.5)  # the write reaches the adapter rows and waits on the uncommitted delete
        assert not writing.done()
    await asyncio.wait_for(writing, 10)  # the delete committed: the write goes on without the deleted adapter
    async with sessions() as session:
        assert await repo.demand_totals(session, since=t0 - timedelta(hours=1)) == {kept.id: 2}

    # The residency a heartbeat reports, the same way.
    async with sessions() as session, session.begin():
        gone, _, _ = await repo.register_version(session, tenant=acme, name="gone", facts=facts("4" * 64))
        await repo.upsert_worker(session, worker_id="w1", host="h", device="cpu", capacity={})
    async with sessions() as deleting, deleting.begin():
        await repo.delete_adapter(deleting, tenant=await repo.get_tenant(deleting, name="acme"), name="gone")

        async def heartbeat() -> None:
            async with sessions() as session, session.begin():
                await repo.write_worker_residency(session, worker_id="w1", rows=[
                    repo.ResidencyRow(sha256=sha, tier=Tier.device, pages=1, nbytes=10, last_used_at=t0)
                    for sha in ("4" * 64, "5" * 64)])

        writing = asyncio.ensure_future(heartbeat())
        await asyncio.sleep(0.5)
        assert not writing.done()
    await asyncio.wait_for(writing, 10)
    async with sessions() as session:
        resident = await session.scalars(select(AdapterVersion.sha256).join(
            Residency, Residency.adapter_version_id == AdapterVersion.id))
        assert list(resident) == ["5" * 64]


async def test_invocations_marked_running_in_one_statement(sessions) -> None:
    async with sessions() as session, session.begin():
        acme = await repo.get_or_create_tenant(session, name="acme")
        for i in range(3):
            await repo.create_invocation(session, invocation_id=f"run{i}", tenant=acme, adapter=None)
        await repo.finish_invocation(session, invocation_id="run2", status=InvocationStatus.succeeded,
                                     finished_at=datetime.now(UTC))
    t = datetime(2026, 11, 30, 10, tzinfo=UTC)
    async with sessions() as session, session.begin():
        await repo.mark_invocations_running(session, started=[
            ("run0", "w1", 1, t), ("run0", "w2", 1, t + timedelta(seconds=1)), ("run1", "w1", 2, t),
            ("run2", "w1", 1, t), ("nobody", "w1", 1, t)])
    async with sessions() as session:
        rows = {i: await repo.get_invocation(session, invocation_id=i) for i in ("run0", "run1", "run2")}
    assert (rows["run0"].status, rows["run0"].worker_id, rows["run0"].started_at) == (
        InvocationStatus.running, "w2", t + timedelta(seconds=1))  # the later start wins
    assert (rows["run1"].status, rows["run1"].attempts) == (InvocationStatus.running, 2)
    assert rows["run2"].status == InvocationStatus.succeeded  # a finished one stays finished
    async with sessions() as session, session.begin():  # an earlier attempt's start, written again later
        await repo.mark_invocations_running(session, started=[("run1", "w0", 1, t + timedelta(seconds=9))])
        await repo.mark_invocation_running(session, invocation_id="run1", worker_id="w0", attempt=1,
                                           started_at=t + timedelta(seconds=9))
    async with sessions() as session:
        again = await repo.get_invocation(session, invocation_id="run1")
    assert (again.worker_id, again.attempts, again.started_at) == ("w1", 2, t)  # the later attempt stays
    # Outcomes of many in one statement: the start time already set is kept; worker and attempts left as they
    # are when an outcome does not name them.
    end = t + timedelta(seconds=5)
    async with sessions() as session, session.begin():
        await repo.finish_invocations(session, outcomes=[
            repo.Outcome("run0", InvocationStatus.succeeded, end, started_at=t - timedelta(seconds=9),
                         first_token_at=t + timedelta(seconds=2), prompt_tokens=3, completion_tokens=4),
            repo.Outcome("run1", InvocationStatus.failed, end, worker_id="w9", attempts=3, error="internal: boom"),
            repo.Outcome("nobody", InvocationStatus.failed, end)])
    async with sessions() as session:
        rows = {i: await repo.get_invocation(session, invocation_id=i) for i in ("run0", "run1")}
    r0, r1 = rows["run0"], rows["run1"]
    assert (r0.status, r0.started_at, r0.first_token_at, r0.finished_at, r0.prompt_tokens, r0.completion_tokens,
            r0.worker_id, r0.attempts) == (InvocationStatus.succeeded, t + timedelta(seconds=1),
                                           t + timedelta(seconds=2), end, 3, 4, "w2", 1)
    assert (r1.status, r1.worker_id, r1.attempts, r1.error) == (InvocationStatus.failed, "w9", 3, "internal: boom")


def test_migrations_upgrade_and_downgrade_cleanly(services) -> None:
    url = services.database_url
    # The session fixture migrated to head; go all the way down and back up on the real server.
    downgrade(url, "base")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
            enums = conn.exec_driver_sql("SELECT typname FROM pg_type WHERE typtype = 'e'").scalars().all()
            assert not {"tier", "invocation_status", "version_status"} & set(enums)
        upgrade(url, "head")
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
        assert {t.name for t in Base.metadata.sorted_tables} <= tables
        upgrade(url, "head")  # idempotent
    finally:
        engine.dispose()


def test_models_and_migrations_agree(services) -> None:
    """The schema the migrations build is exactly what the models declare (no forgotten revision)."""
    engine = create_engine(services.database_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []
