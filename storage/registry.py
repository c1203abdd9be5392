"""The adapter registry: push, list and remove adapters across Postgres and the object store.

A push validates everything first (nothing is written for a refused adapter), then stores the canonical
blob in S3 under its sha256, then registers the version in one Postgres transaction. A push that is
interrupted before the transaction commits leaves no registered version; a blob it stored is removed
again unless another version already refers to it.

Blobs are shared by content: two tenants pushing the same bytes share one blob, and removing an adapter
deletes a blob only once no version refers to it. Both decisions are taken under the lock of the blob's
row (`repo.lock_blob`), each in one transaction: a push registers its version only after checking, under
the lock, that the object is there (and storing it again if a removal deleted it since the push's first
store); a removal deletes the object only under the lock, while no version refers to it, and deletes the
row in the same transaction. So a push that saw the blob present while another tenant's removal was
deleting it never leaves a version without its blob.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from protocol.subjects import InvalidName, check_name
from storage import repo
from storage.adapter_format import (
    ParsedAdapter,
    UploadFiles,
    archive_limits,
    blob_sha256,
    canonical_blob,
    read_upload,
    validate,
)
from storage.backbone import BackboneSpec
from storage.errors import StorageUnavailable
from storage.models import Adapter, AdapterVersion
from storage.objectstore import ObjectStore, ProgressCallback, blob_key
from storage.settings import RegistrySettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushResult:
    """Outcome of a push: the version now current, and whether anything new was created."""

    tenant: str
    name: str
    version_id: str
    sha256: str
    created: bool
    bytes: int
    max_rank: int
    target_modules: list[str]


def _unavailable(e: OperationalError) -> StorageUnavailable:
    return StorageUnavailable("postgres", str(e.orig or e))


@dataclass(frozen=True)
class Prepared:
    """A validated adapter and its canonical blob, ready to be stored."""

    adapter: ParsedAdapter
    blob: bytes


class Registry:
    """Adapter registry operations; holds no state beyond its collaborators."""

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        store: ObjectStore,
        spec: BackboneSpec,
        settings: RegistrySettings,
    ) -> None:
        self.sessions = sessions
        self.store = store
        self.spec = spec
        self.settings = settings

    def prepare(self, source: Path | bytes | UploadFiles) -> Prepared:
        """Read and validate an upload and build its canonical blob. Touches no service."""
        files = (
            source
            if isinstance(source, UploadFiles)
            else read_upload(source, limits=archive_limits(self.settings, self.spec))
        )
        adapter = validate(files, self.spec, max_rank=self.settings.max_rank)
        return Prepared(adapter, canonical_blob(adapter))

    async def push(
        self,
        *,
        tenant: str,
        name: str,
        source: Path | bytes | UploadFiles | Prepared,
        progress: ProgressCallback | None = None,
    ) -> PushResult:
        """Validate, store and register an adapter as the current version of `tenant/name`."""
        check_name("tenant", tenant)
        check_name("adapter", name)
        if name.startswith("_"):
            raise InvalidName("adapter", name)  # names starting with "_" are reserved (e.g. the base model)
        prepared = source if isinstance(source, Prepared) else await asyncio.to_thread(self.prepare, source)
        adapter, blob = prepared.adapter, prepared.blob
        sha = blob_sha256(blob)
        # The upload, which may be long, happens outside any transaction; what it stored is checked again below.
        _, created_blob = await asyncio.to_thread(self.store.put_blob, blob, progress=progress)
        facts = repo.VersionFacts(
            sha256=sha,
            max_rank=adapter.max_rank,
            ranks=adapter.ranks,
            lora_alpha=adapter.lora_alpha,
            use_rslora=adapter.use_rslora,
            target_modules=adapter.target_modules,
            num_layers=adapter.num_layers,
            base_model=adapter.base_model,
            dtype=adapter.dtype,
            bytes=len(blob),
            object_key=blob_key(sha),
        )
        try:
            async with self.sessions() as session, session.begin():
                await repo.lock_blob(session, sha256=sha)
                # Under the lock, a removal that deleted the blob since our upload has finished and none can start
                # until we commit: the object we find now stays. Stored again if it is gone (a HEAD otherwise).
                await asyncio.to_thread(self.store.put_blob, blob)
                tenant_row = await repo.get_or_create_tenant(session, name=tenant)
                _, version, created = await repo.register_version(session, tenant=tenant_row, name=name, facts=facts)
        except BaseException as e:
            if created_blob:
                await self._remove_orphan(sha)
            if isinstance(e, OperationalError):
                raise _unavailable(e) from e
            raise
        log.info("pushed %s/%s version %s (sha256 %s, created=%s)", tenant, name, version.id, sha, created)
        return PushResult(
            tenant=tenant,
            name=name,
            version_id=str(version.id),
            sha256=sha,
            created=created,
            bytes=len(blob),
            max_rank=adapter.max_rank,
            target_modules=adapter.target_modules,
        )

    async def _remove_orphan(self, sha: str) -> None:
        """Remove a blob this push stored if no registered version refers to it (best effort)."""
        try:
            await self.collect(sha)
        except Exception:
            log.warning("could not remove unregistered blob %s; it is harmless and can be collected", sha)

    async def collect(self, sha: str) -> bool:
        """Delete the blob `sha` from the object store if no version refers to it; True if it was deleted.

        The object is deleted while the blob's row is locked, and the row in the same transaction: a push of
        the same bytes waits for the lock, then finds the object gone and stores it again. Should the commit
        fail after the object was deleted, the row stays and a later push still checks for the object.
        """
        try:
            async with self.sessions() as session, session.begin():
                if await repo.lock_blob(session, sha256=sha):
                    return False
                await asyncio.to_thread(self.store.delete_blob, sha)
                await repo.forget_blob(session, sha256=sha)
        except OperationalError as e:
            raise _unavailable(e) from e
        return True

    async def list_adapters(self, *, tenant: str | None = None) -> list[Adapter]:
        """Adapters of one tenant (or all) with their current versions."""
        try:
            async with self.sessions() as session:
                tenant_row = await repo.get_tenant(session, name=tenant) if tenant else None
                return list(await repo.list_adapters(session, tenant=tenant_row))
        except OperationalError as e:
            raise _unavailable(e) from e

    async def remove(self, *, tenant: str, name: str) -> list[str]:
        """Delete `tenant/name` and every version of it, then the blobs they used that no version refers to any
        more (each decided under its lock, after the delete committed: see `collect`). Returns the sha256 of
        the blobs deleted. A blob that could not be deleted stays (unused, harmless) and is logged."""
        try:
            async with self.sessions() as session, session.begin():
                tenant_row = await repo.get_tenant(session, name=tenant)
                assert tenant_row is not None
                used = await repo.delete_adapter(session, tenant=tenant_row, name=name)
        except OperationalError as e:
            raise _unavailable(e) from e
        deleted = []
        for sha in used:
            try:
                if await self.collect(sha):
                    deleted.append(sha)
            except StorageUnavailable as e:
                log.warning("%s/%s removed, but its unused blob %s stays: %s", tenant, name, sha, e)
        return deleted

    async def fetch(self, version: AdapterVersion) -> bytes:
        """The verified canonical blob of a version."""
        return await asyncio.to_thread(self.store.get_blob, version.sha256)
