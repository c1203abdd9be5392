"""The adapter registry: push, list and remove adapters across Postgres and the object store.

A push validates everything first (nothing is written for a refused adapter), then stores the canonical
blob in S3 under its sha256, then registers the version in one Postgres transaction. A push that is
interrupted before the transaction commits leaves no registered version; a blob it stored is removed
again unless another version already refers to it.
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
            async with self.sessions() as session:
                referenced = await repo.sha_is_referenced(session, sha256=sha)
            if not referenced:
                await asyncio.to_thread(self.store.delete_blob, sha)
        except Exception:
            log.warning("could not remove unregistered blob %s; it is harmless and can be collected", sha)

    async def list_adapters(self, *, tenant: str | None = None) -> list[Adapter]:
        """Adapters of one tenant (or all) with their current versions."""
        try:
            async with self.sessions() as session:
                tenant_row = await repo.get_tenant(session, name=tenant) if tenant else None
                return list(await repo.list_adapters(session, tenant=tenant_row))
        except OperationalError as e:
            raise _unavailable(e) from e

    async def remove(self, *, tenant: str, name: str) -> list[str]:
        """Delete `tenant/name` and every version of it; remove blobs nothing else refers to."""
        try:
            async with self.sessions() as session, session.begin():
                tenant_row = await repo.get_tenant(session, name=tenant)
                assert tenant_row is not None
                orphans = await repo.delete_adapter(session, tenant=tenant_row, name=name)
        except OperationalError as e:
            raise _unavailable(e) from e
        for sha in orphans:
            await asyncio.to_thread(self.store.delete_blob, sha)
        return orphans

    async def fetch(self, version: AdapterVersion) -> bytes:
        """The verified canonical blob of a version."""
        return await asyncio.to_thread(self.store.get_blob, version.sha256)
