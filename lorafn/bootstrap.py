"""What `lorafn up` does once the servers answer: schema, bucket, streams, and a dev tenant with a key."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import nats

from lorafn.stack import StackEndpoints
from protocol.settings import split_nats_urls
from protocol.streams import ensure_streams
from storage import repo
from storage.migrate import upgrade
from storage.objectstore import ObjectStore
from storage.settings import DatabaseSettings, ObjectStoreSettings

log = logging.getLogger(__name__)

DEV_TENANT = "dev"


@dataclass(frozen=True)
class BootstrapResult:
    streams: list[str]
    dev_tenant: str
    dev_api_key: str


def object_store_settings(endpoints: StackEndpoints) -> ObjectStoreSettings:
    return ObjectStoreSettings(
        endpoint=endpoints.s3_endpoint,
        access_key=endpoints.s3_access_key,
        secret_key=endpoints.s3_secret_key,  # type: ignore[arg-type]
        bucket=endpoints.bucket,
    )


async def prepare_services(*, nats_url: str, database_url: str, object_store: ObjectStoreSettings,
                           stream_replicas: int = 1, stream_storage: str = "file") -> list[str]:
    """Schema at head, the adapter bucket, the JetStream streams (with `stream_replicas` replicas, existing
    ones included, in `stream_storage`). Idempotent. Returns the stream names. `nats_url`: one server's URL
    or several, comma-separated."""
    upgrade(database_url)
    ObjectStore(object_store).ensure_bucket()
    nc = await nats.connect(split_nats_urls(nats_url), connect_timeout=5, max_reconnect_attempts=3)
    try:
        return await ensure_streams(nc.jetstream(), replicas=stream_replicas, storage=stream_storage,
                                    reconfigure=True)
    finally:
        await nc.drain()


async def bootstrap(endpoints: StackEndpoints, *, state_dir: Path) -> BootstrapResult:
    """Idempotently prepare a fresh or existing local stack for use, with a dev tenant and key."""
    streams = await prepare_services(
        nats_url=endpoints.nats_admin, database_url=endpoints.database_url,
        object_store=object_store_settings(endpoints), stream_replicas=endpoints.nats_stream_replicas,
    )
    key = await _dev_key(DatabaseSettings(url=endpoints.database_url), state_dir / "dev-api-key")
    return BootstrapResult(streams=streams, dev_tenant=DEV_TENANT, dev_api_key=key)


async def _dev_key(settings: DatabaseSettings, key_file: Path) -> str:
    """The dev tenant's API key: made once, kept in the state dir (0600) so every `up` can print it."""
    engine = repo.create_engine(settings)
    try:
        sessions = repo.session_factory(engine)
        async with sessions() as session, session.begin():
            tenant = await repo.get_or_create_tenant(session, name=DEV_TENANT)
            if key_file.exists():
                key = key_file.read_text().strip()
                if await repo.authenticate(session, key=key) is not None:
                    return key
            key = await repo.create_api_key(session, tenant=tenant, label="created by lorafn up")
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        return key
    finally:
        await engine.dispose()
