"""The registry against real Postgres and S3: push, idempotent re-push, interrupted pushes, remove."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from sqlalchemy import select

from storage import repo
from storage.backbone import default_backbone_spec
from storage.errors import NotFound, ObjectCorrupted, ObjectMissing, StorageUnavailable
from storage.models import AdapterVersion
from storage.objectstore import ObjectStore, blob_key
from storage.registry import Registry
from storage.settings import DatabaseSettings, RegistrySettings

SPEC = default_backbone_spec()


@pytest.fixture
def registry(sessions, store: ObjectStore) -> Registry:
    return Registry(sessions=sessions, store=store, spec=SPEC, settings=RegistrySettings())


async def test_push_real_peft_adapter_stores_bytes_that_hash_to_the_version(
    registry: Registry, store: ObjectStore, sessions, make_peft_adapter
) -> None:
    path = make_peft_adapter(r=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"))
    seen: list[int] = []
    result = await registry.push(tenant="acme", name="support-bot", source=path, progress=seen.append)
    assert result.created
    assert sum(seen) == result.bytes  # the progress callback saw every byte
    stored = store.client.get_object(store.bucket, blob_key(result.sha256)).read()
    assert hashlib.sha256(stored).hexdigest() == result.sha256
    async with sessions() as session:
        tenant = await repo.get_tenant(session, name="acme")
        adapter = await repo.get_adapter(session, tenant=tenant, name="support-bot")
        assert adapter.current_version is not None
        v = adapter.current_version
        assert (v.sha256, v.max_rank, v.bytes) == (result.sha256, 16, len(stored))
        assert v.target_modules == list(SPEC.module_shapes())
        assert v.ranks["layers.1.down_proj"] == 16
        assert v.object_key == blob_key(result.sha256)


async def test_re_push_of_identical_content_is_idempotent(registry: Registry, store: ObjectStore, sessions,
                                                         make_peft_adapter) -> None:
    path = make_peft_adapter(r=4, seed=1)
    first = await registry.push(tenant="acme", name="a", source=path)
    again = await registry.push(tenant="acme", name="a", source=path)
    assert not again.created and again.version_id == first.version_id and again.sha256 == first.sha256
    async with sessions() as session:
        counts = await repo.count_rows(session)
    assert counts["adapter_versions"] == 1 and counts["adapters"] == 1
    assert store.list_blobs() == [first.sha256]


async def test_new_content_becomes_the_current_version(registry: Registry, sessions, make_peft_adapter) -> None:
    v1 = await registry.push(tenant="acme", name="a", source=make_peft_adapter(r=4, seed=1))
    v2 = await registry.push(tenant="acme", name="a", source=make_peft_adapter(r=4, seed=2))
    assert v1.sha256 != v2.sha256
    async with sessions() as session:
        tenant = await repo.get_tenant(session, name="acme")
        adapter = await repo.get_adapter(session, tenant=tenant, name="a")
        assert adapter.current_version_id is not None and str(adapter.current_version_id) == v2.version_id
        assert len(await repo.list_versions(session, adapter=adapter)) == 2


async def test_upload_interrupted_midway_leaves_no_version_and_no_blob(
    registry: Registry, store: ObjectStore, sessions, make_peft_adapter
) -> None:
    path = make_peft_adapter(r=8, seed=3)

    class ClientGone(Exception):
        pass

    def cut(_n: int) -> None:
        raise ClientGone("the client went away mid-upload")

    with pytest.raises(ClientGone):
        await registry.push(tenant="acme", name="a", source=path, progress=cut)
    assert store.list_blobs() == []
    async with sessions() as session:
        assert (await repo.count_rows(session))["adapter_versions"] == 0


async def test_database_failure_after_upload_leaves_no_version(store: ObjectStore, sessions, services,
                                                               make_peft_adapter) -> None:
    # A registry whose database is unreachable: the blob goes to S3, registering it fails.
    dead = DatabaseSettings(url="postgresql+psycopg://nobody:x@127.0.0.1:1/lorafn")
    engine = repo.create_engine(dead)
    broken = Registry(sessions=repo.session_factory(engine), store=store, spec=SPEC, settings=RegistrySettings())
    with pytest.raises(StorageUnavailable, match="postgres is unavailable"):
        await broken.push(tenant="acme", name="a", source=make_peft_adapter(r=8, seed=4))
    await engine.dispose()
    async with sessions() as session:
        assert (await repo.count_rows(session))["adapter_versions"] == 0


async def test_remove_deletes_versions_and_unshared_blobs(registry: Registry, store: ObjectStore, sessions,
                                                          make_peft_adapter) -> None:
    shared = make_peft_adapter(r=4, seed=5)
    a = await registry.push(tenant="acme", name="a", source=shared)
    await registry.push(tenant="other", name="b", source=shared)  # same content, other tenant
    own = await registry.push(tenant="acme", name="c", source=make_peft_adapter(r=4, seed=6))
    assert await registry.remove(tenant="acme", name="a") == []  # still used by other/b
    assert await registry.remove(tenant="acme", name="c") == [own.sha256]
    assert sorted(store.list_blobs()) == [a.sha256]
    with pytest.raises(NotFound):
        await registry.remove(tenant="acme", name="a")
    async with sessions() as session:
        rows = (await session.scalars(select(AdapterVersion.sha256))).all()
    assert rows == [a.sha256]


def test_corrupted_object_is_refused_on_download(store: ObjectStore) -> None:
    sha, created = store.put_blob(b"adapter bytes")
    assert created and store.get_blob(sha) == b"adapter bytes"
    evil = b"tampered bytes"
    store.client.put_object(store.bucket, blob_key(sha), io.BytesIO(evil), len(evil))
    with pytest.raises(ObjectCorrupted) as info:
        store.get_blob(sha)
    assert info.value.expected == sha and info.value.actual == hashlib.sha256(evil).hexdigest()
    with pytest.raises(ObjectMissing):
        store.get_blob("0" * 64)


def test_put_blob_is_idempotent(store: ObjectStore) -> None:
    sha1, created1 = store.put_blob(b"x" * 1000)
    sha2, created2 = store.put_blob(b"x" * 1000)
    assert sha1 == sha2 and created1 and not created2
    assert store.list_blobs() == [sha1]


async def test_pushed_blob_round_trips_to_the_same_adapter(registry: Registry, make_peft_adapter, tmp_path: Path,
                                                           sessions) -> None:
    from storage.adapter_format import load_canonical, read_upload, validate

    path = make_peft_adapter(r=8, use_rslora=True, rank_pattern={"v_proj": 4})
    result = await registry.push(tenant="acme", name="a", source=path)
    async with sessions() as session:
        tenant = await repo.get_tenant(session, name="acme")
        adapter = await repo.get_adapter(session, tenant=tenant, name="a")
    assert adapter.current_version is not None
    blob = await registry.fetch(adapter.current_version)
    back = load_canonical(blob)
    original = validate(read_upload(path), SPEC)
    assert back.modules == original.modules and back.use_rslora
    assert back.modules[(0, "v_proj")].rank == 4
    assert result.max_rank == 8


def test_unreachable_object_store_is_reported_as_unavailable(object_store_settings) -> None:
    dead = ObjectStore(object_store_settings.model_copy(update={"endpoint": "127.0.0.1:1"}))
    with pytest.raises(StorageUnavailable, match="object store is unavailable"):
        dead.put_blob(b"x")


async def test_reserved_and_invalid_names_are_refused_before_anything_is_written(registry: Registry, store: ObjectStore,
                                                                                sessions, make_peft_adapter) -> None:
    from protocol.subjects import InvalidName

    path = make_peft_adapter(r=4, seed=7)
    for tenant, name in [("acme", "_base"), ("acme", "a.b"), ("ac me", "a"), ("acme", "")]:
        with pytest.raises(InvalidName):
            await registry.push(tenant=tenant, name=name, source=path)
    assert store.list_blobs() == []
    async with sessions() as session:
        assert set((await repo.count_rows(session)).values()) == {0}
