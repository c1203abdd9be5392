"""Pushes and removals of the same bytes by different tenants never leave a version without its blob.

Blobs are shared by content hash. The race: tenant dev pushes bytes that tenant acme's adapter already
stored, so dev's upload finds the blob present and skips it; acme removes its adapter, and the blob, no
longer referred to, is deleted; dev then registers a version of a blob that is gone. These tests force
each interleaving of the two (holding the real object store's calls at chosen points, with Postgres and S3
real) and check that every registered version's blob is in the object store.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage import repo
from storage.backbone import default_backbone_spec
from storage.models import AdapterVersion, Blob
from storage.objectstore import ObjectStore, ProgressCallback
from storage.registry import Registry
from storage.settings import ObjectStoreSettings, RegistrySettings

SPEC = default_backbone_spec()
WAIT_S = 30.0


@dataclass
class Gate:
    """Holds one call of a store method until released."""

    arrived: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    async def reached(self) -> None:
        assert await asyncio.to_thread(self.arrived.wait, WAIT_S), "the held call never came"

    def release(self) -> None:
        self.released.set()


class GatedStore(ObjectStore):
    """The real object store; a test can hold the n-th next call of put_blob or delete_blob before or after it
    runs (the registry calls the store from worker threads, so holding one blocks neither the event loop nor
    the other registry)."""

    def __init__(self, settings: ObjectStoreSettings) -> None:
        super().__init__(settings)
        self._calls: Counter[str] = Counter()
        self._gates: dict[tuple[str, int, str], Gate] = {}

    def hold(self, method: str, *, call: int = 1, when: str = "after") -> Gate:
        gate = Gate()
        self._gates[(method, self._calls[method] + call, when)] = gate
        return gate

    def _pass(self, method: str, n: int, when: str) -> None:
        gate = self._gates.get((method, n, when))
        if gate is not None:
            gate.arrived.set()
            assert gate.released.wait(WAIT_S), f"{method} call {n} held for more than {WAIT_S} s"

    def _gated(self, method: str, run: Any) -> Any:
        self._calls[method] += 1
        n = self._calls[method]
        self._pass(method, n, "before")
        result = run()
        self._pass(method, n, "after")
        return result

    def put_blob(self, blob: bytes, *, progress: ProgressCallback | None = None) -> tuple[str, bool]:
        return self._gated("put_blob", lambda: super(GatedStore, self).put_blob(blob, progress=progress))  # type: ignore[no-any-return]

    def delete_blob(self, sha256: str) -> None:
        self._gated("delete_blob", lambda: super(GatedStore, self).delete_blob(sha256))


@pytest.fixture
def gated(object_store_settings: ObjectStoreSettings, store: ObjectStore) -> tuple[GatedStore, GatedStore]:
    """Two gated clients of the test's bucket: acme's and dev's."""
    return GatedStore(object_store_settings), GatedStore(object_store_settings)


def _registry(sessions: async_sessionmaker[AsyncSession], store: ObjectStore) -> Registry:
    return Registry(sessions=sessions, store=store, spec=SPEC, settings=RegistrySettings())


async def _someone_waits_for_a_lock(sessions: async_sessionmaker[AsyncSession]) -> None:
    """Return once a backend of this database waits for a row lock (the blob's, in these tests)."""
    query = text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                 "AND wait_event_type = 'Lock'")
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while asyncio.get_running_loop().time() < deadline:
        async with sessions() as session:
            if await session.scalar(query):
                return
        await asyncio.sleep(0.02)
    raise AssertionError("nobody waited for the blob's lock")


async def _assert_every_version_has_its_blob(sessions: async_sessionmaker[AsyncSession], store: ObjectStore) -> None:
    async with sessions() as session:
        shas = set((await session.scalars(select(AdapterVersion.sha256))).all())
    for sha in shas:
        assert store.get_blob(sha)  # present, and hashes to its name


async def test_a_push_that_saw_the_blob_before_a_removal_deleted_it_stores_it_again(
    sessions, store: ObjectStore, gated: tuple[GatedStore, GatedStore], make_peft_adapter
) -> None:
    """The race of the issue: dev's push finds the blob present, then acme's removal deletes it, all of it
    before dev registers. Dev's registration, under the blob's lock, finds the object gone and stores it."""
    _, dev_store = gated
    acme, dev = _registry(sessions, store), _registry(sessions, dev_store)
    adapter = make_peft_adapter(r=4, seed=21)
    first = await acme.push(tenant="acme", name="a", source=adapter)

    seen_present = dev_store.hold("put_blob", call=1, when="after")
    push = asyncio.create_task(dev.push(tenant="dev", name="b", source=adapter))
    await seen_present.reached()
    assert store.has_blob(first.sha256)
    assert await acme.remove(tenant="acme", name="a") == [first.sha256]  # no version refers to it: deleted
    assert not store.has_blob(first.sha256)  # the window: dev is about to register a version of a deleted blob
    seen_present.release()
    result = await push

    assert (result.sha256, result.created) == (first.sha256, True)
    assert store.get_blob(result.sha256)
    await _assert_every_version_has_its_blob(sessions, store)


async def test_a_removal_waits_for_a_push_holding_the_blob_and_keeps_it(
    sessions, store: ObjectStore, gated: tuple[GatedStore, GatedStore], make_peft_adapter
) -> None:
    """Dev's push holds the blob's lock (it is checking the object) when acme's removal comes to decide
    about the blob: the removal waits, then sees dev's version and keeps the blob."""
    _, dev_store = gated
    acme, dev = _registry(sessions, store), _registry(sessions, dev_store)
    adapter = make_peft_adapter(r=4, seed=22)
    first = await acme.push(tenant="acme", name="a", source=adapter)

    checking = dev_store.hold("put_blob", call=2, when="before")  # the check under the lock
    push = asyncio.create_task(dev.push(tenant="dev", name="b", source=adapter))
    await checking.reached()
    remove = asyncio.create_task(acme.remove(tenant="acme", name="a"))
    await _someone_waits_for_a_lock(sessions)
    assert not remove.done()
    checking.release()
    await push

    assert await remove == []  # dev's version refers to the blob
    assert store.get_blob(first.sha256)
    await _assert_every_version_has_its_blob(sessions, store)


async def test_a_push_waits_for_a_removal_deleting_the_blob_then_stores_it_again(
    sessions, gated: tuple[GatedStore, GatedStore], store: ObjectStore, make_peft_adapter
) -> None:
    """Dev's push saw the blob present; acme's removal deleted the object and, holding the blob's lock, has
    not committed yet. Dev's registration waits for the lock, then finds the object gone and stores it."""
    acme_store, dev_store = gated
    acme, dev = _registry(sessions, acme_store), _registry(sessions, dev_store)
    adapter = make_peft_adapter(r=4, seed=23)
    first = await acme.push(tenant="acme", name="a", source=adapter)

    seen_present = dev_store.hold("put_blob", call=1, when="after")
    push = asyncio.create_task(dev.push(tenant="dev", name="b", source=adapter))
    await seen_present.reached()
    deleted = acme_store.hold("delete_blob", call=1, when="after")
    remove = asyncio.create_task(acme.remove(tenant="acme", name="a"))
    await deleted.reached()
    assert not store.has_blob(first.sha256)
    seen_present.release()
    await _someone_waits_for_a_lock(sessions)  # dev's push, for the blob's lock
    assert not push.done()
    deleted.release()

    assert await remove == [first.sha256]
    result = await push
    assert result.sha256 == first.sha256
    assert store.get_blob(first.sha256)
    await _assert_every_version_has_its_blob(sessions, store)
    async with sessions() as session:
        assert (await session.scalars(select(Blob.sha256))).all() == [first.sha256]


async def test_concurrent_pushes_and_removals_never_lose_a_blob_nor_keep_one(
    sessions, store: ObjectStore, make_peft_adapter
) -> None:
    """Three tenants push and remove the same bytes over and over, at once: whenever a push has returned, the
    blob is there (until that tenant removes it); once all have removed it, it is gone."""
    registry = _registry(sessions, store)
    prepared = await asyncio.to_thread(registry.prepare, make_peft_adapter(r=4, seed=24))
    rng = random.Random(24)

    async def churn(tenant: str) -> None:
        for _ in range(8):
            result = await registry.push(tenant=tenant, name="x", source=prepared)
            assert store.has_blob(result.sha256), f"{tenant}'s version has no blob"
            await asyncio.sleep(rng.random() * 0.02)
            await registry.remove(tenant=tenant, name="x")
            await asyncio.sleep(rng.random() * 0.02)

    await asyncio.gather(*(churn(t) for t in ("acme", "dev", "ops")))
    assert store.list_blobs() == []
    async with sessions() as session:
        assert (await repo.count_rows(session))["adapter_versions"] == 0
        assert (await session.scalars(select(Blob.sha256))).all() == []
