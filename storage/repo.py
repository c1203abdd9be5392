"""Every SQL statement of lorafn. Keyword-only async functions over an AsyncSession; callers own the
transaction (`async with session.begin():`). Routes and handlers never build queries."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    cast,
    column,
    delete,
    func,
    literal,
    select,
    table,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import joinedload, selectinload
from sqlalchemy.pool import NullPool

from storage.errors import AlreadyExists, NotFound
from storage.models import (
    QUOTA_FIELDS,
    Adapter,
    AdapterVersion,
    ApiKey,
    Blob,
    DemandBucket,
    Invocation,
    InvocationStatus,
    NatsCredential,
    Residency,
    Tenant,
    Tier,
    VersionStatus,
    Worker,
)
from storage.settings import DatabaseSettings

API_KEY_PREFIX = "lfn_"
NATS_CREDENTIAL_PREFIX = "lfnats_"


def create_engine(settings: DatabaseSettings, *, name: str = "lorafn") -> AsyncEngine:
    """The process's async engine (created in main/lifespan, disposed on exit). Its pool never grows past
    `pool_size` (as `create_fast_write_engine`'s, for the same reason: no overflow connection opened and closed
    again per burst), so that a process holds a known number of Postgres connections however busy it is: what
    its replicas may hold together must fit the server's max_connections (docs/ARCHITECTURE.md, "Postgres
    connections"). A statement that waits longer than `pool_timeout_s` raises sqlalchemy's TimeoutError (the
    gateway answers 503). `name`: the connections' application_name (pg_stat_activity says whose they are)."""
    return create_async_engine(
        settings.url, pool_size=settings.pool_size, max_overflow=0, pool_timeout=settings.pool_timeout_s,
        pool_pre_ping=True, connect_args={"application_name": name},
    )


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


# -- tenants and keys ------------------------------------------------------------------------------


async def create_tenant(session: AsyncSession, *, name: str) -> Tenant:
    """Create a tenant; AlreadyExists if the name is taken."""
    if await get_tenant(session, name=name, missing_ok=True) is not None:
        raise AlreadyExists("tenant", name)
    tenant = Tenant(name=name)
    session.add(tenant)
    await session.flush()
    return tenant


async def get_or_create_tenant(session: AsyncSession, *, name: str) -> Tenant:
    """The tenant called `name`, created if new (race-free)."""
    await session.execute(insert(Tenant).values(id=uuid.uuid4(), name=name).on_conflict_do_nothing())
    tenant = await get_tenant(session, name=name)
    assert tenant is not None
    return tenant


async def get_tenant(session: AsyncSession, *, name: str, missing_ok: bool = False) -> Tenant | None:
    """The tenant called `name`; NotFound unless missing_ok."""
    tenant = await session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None and not missing_ok:
        raise NotFound("tenant", name)
    return tenant


def hash_api_key(key: str) -> str:
    """Keys are 192-bit random tokens, so one round of SHA-256 is enough (no password stretching)."""
    return hashlib.sha256(key.encode()).hexdigest()


async def create_api_key(session: AsyncSession, *, tenant: Tenant, label: str | None = None) -> str:
    """Make a new key for `tenant` and return it in clear; only its hash is stored."""
    return (await new_api_key(session, tenant=tenant, label=label))[1]


async def new_api_key(session: AsyncSession, *, tenant: Tenant, label: str | None = None) -> tuple[ApiKey, str]:
    """Make a new key for `tenant`: its row and the key in clear (shown once; only its hash is stored)."""
    prefix = secrets.token_hex(6)
    key = f"{API_KEY_PREFIX}{prefix}_{secrets.token_urlsafe(24)}"
    row = ApiKey(tenant_id=tenant.id, prefix=prefix, key_hash=hash_api_key(key), label=label)
    session.add(row)
    await session.flush()
    await session.refresh(row, ["created_at"])
    return row, key


async def authenticate(session: AsyncSession, *, key: str) -> Tenant | None:
    """The tenant a key belongs to, or None for an unknown, malformed or revoked key."""
    row = await find_api_key(session, key=key)
    return row.tenant if row is not None else None


async def find_api_key(session: AsyncSession, *, key: str) -> ApiKey | None:
    """The active key row (its tenant loaded) of a key in clear, or None: unknown, malformed or revoked."""
    if not key.startswith(API_KEY_PREFIX):
        return None
    prefix, _, _ = key[len(API_KEY_PREFIX) :].partition("_")
    row = await session.scalar(
        select(ApiKey).options(selectinload(ApiKey.tenant)).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
    )
    if row is None or not hmac.compare_digest(row.key_hash, hash_api_key(key)):
        return None
    return row


async def touch_api_key(session: AsyncSession, *, key_id: uuid.UUID) -> None:
    """Record that a key was used now."""
    await session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=func.now()))


async def list_api_keys(session: AsyncSession, *, tenant: Tenant | None = None) -> Sequence[ApiKey]:
    """Keys (of one tenant, or all), revoked ones included, with their tenant, oldest first."""
    query = select(ApiKey).options(selectinload(ApiKey.tenant)).order_by(ApiKey.created_at, ApiKey.prefix)
    if tenant is not None:
        query = query.where(ApiKey.tenant_id == tenant.id)
    return (await session.scalars(query)).all()


async def get_api_key(session: AsyncSession, *, ref: str, tenant: Tenant | None = None) -> ApiKey:
    """A key by its id or its prefix (of `tenant` only, when given), with its tenant; NotFound otherwise."""
    try:
        condition = ApiKey.id == uuid.UUID(ref)
    except ValueError:
        condition = ApiKey.prefix == ref
    query = select(ApiKey).options(selectinload(ApiKey.tenant)).where(condition)
    if tenant is not None:
        query = query.where(ApiKey.tenant_id == tenant.id)
    row = await session.scalar(query)
    if row is None:
        raise NotFound("api key", ref)
    return row


async def revoke_api_key_row(session: AsyncSession, *, key: ApiKey) -> bool:
    """Revoke a key by its row; True if it was active (revoking twice is harmless)."""
    result = await session.execute(
        update(ApiKey).where(ApiKey.id == key.id, ApiKey.revoked_at.is_(None)).values(revoked_at=func.now())
        .returning(ApiKey.revoked_at)
    )
    revoked_at = result.scalar_one_or_none()
    if revoked_at is not None:
        key.revoked_at = revoked_at
    return revoked_at is not None


async def count_active_api_keys(session: AsyncSession, *, tenant: Tenant) -> int:
    """Keys of `tenant` that are not revoked."""
    n = await session.scalar(
        select(func.count()).select_from(ApiKey).where(ApiKey.tenant_id == tenant.id, ApiKey.revoked_at.is_(None))
    )
    return int(n or 0)


async def set_tenant_quotas(session: AsyncSession, *, tenant: Tenant, values: dict[str, float | int | None]) -> None:
    """Set quota overrides of a tenant (keys from models.QUOTA_FIELDS; None: back to the default)."""
    unknown = set(values) - set(QUOTA_FIELDS)
    if unknown:
        raise ValueError(f"unknown quota fields {sorted(unknown)}; known: {list(QUOTA_FIELDS)}")
    if values:
        await session.execute(update(Tenant).where(Tenant.id == tenant.id).values(**values))
        for name, value in values.items():
            setattr(tenant, name, value)


@dataclass(frozen=True)
class StorageUse:
    """What a tenant stores: adapters, and bytes of its distinct adapter versions (by content hash)."""

    adapters: int
    bytes: int
    has_adapter: bool  # the adapter asked about exists already


async def storage_use(session: AsyncSession, *, tenant: Tenant, adapter: str | None = None) -> StorageUse:
    """A tenant's stored adapters and bytes (counted in SQL), and whether `adapter` is one of them."""
    adapters = await session.scalar(select(func.count()).select_from(Adapter).where(Adapter.tenant_id == tenant.id))
    distinct = (
        select(AdapterVersion.sha256, func.max(AdapterVersion.bytes).label("bytes"))
        .join(Adapter, AdapterVersion.adapter_id == Adapter.id)
        .where(Adapter.tenant_id == tenant.id)
        .group_by(AdapterVersion.sha256)
        .subquery()
    )
    nbytes = await session.scalar(select(func.coalesce(func.sum(distinct.c.bytes), 0)))
    exists = adapter is not None and bool(await session.scalar(
        select(func.count()).select_from(Adapter).where(Adapter.tenant_id == tenant.id, Adapter.name == adapter)
    ))
    return StorageUse(adapters=int(adapters or 0), bytes=int(nbytes or 0), has_adapter=exists)


async def revoke_api_key(session: AsyncSession, *, key: str) -> bool:
    """Revoke a key; True if it existed and was active."""
    prefix = key[len(API_KEY_PREFIX) :].partition("_")[0] if key.startswith(API_KEY_PREFIX) else ""
    result = await session.execute(
        update(ApiKey)
        .where(ApiKey.prefix == prefix, ApiKey.key_hash == hash_api_key(key), ApiKey.revoked_at.is_(None))
        .values(revoked_at=func.now())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


# -- NATS credentials of tenants -----------------------------------------------------------------------


async def new_nats_credential(session: AsyncSession, *, tenant: Tenant,
                              label: str | None = None) -> tuple[NatsCredential, str]:
    """Make a NATS credential for `tenant`: its row and the secret in clear (shown once; only its hash is
    stored). Direct clients connect with the tenant's name as user and the secret as password."""
    prefix = secrets.token_hex(6)
    secret = f"{NATS_CREDENTIAL_PREFIX}{prefix}_{secrets.token_urlsafe(24)}"
    row = NatsCredential(tenant_id=tenant.id, prefix=prefix, secret_hash=hash_api_key(secret), label=label)
    session.add(row)
    await session.flush()
    return row, secret


async def find_nats_credential(session: AsyncSession, *, tenant: str, secret: str) -> NatsCredential | None:
    """The active credential row (its tenant loaded) of `secret` if it belongs to tenant `tenant`, else None:
    unknown, malformed, revoked, or another tenant's."""
    if not secret.startswith(NATS_CREDENTIAL_PREFIX):
        return None
    prefix = secret[len(NATS_CREDENTIAL_PREFIX):].partition("_")[0]
    row = await session.scalar(
        select(NatsCredential).options(selectinload(NatsCredential.tenant))
        .where(NatsCredential.prefix == prefix, NatsCredential.revoked_at.is_(None))
    )
    if row is None or row.tenant.name != tenant or not hmac.compare_digest(row.secret_hash, hash_api_key(secret)):
        return None
    return row


async def touch_nats_credential(session: AsyncSession, *, credential_id: uuid.UUID) -> None:
    """Record that a NATS credential was used (a connection was authorised) now."""
    await session.execute(update(NatsCredential).where(NatsCredential.id == credential_id)
                          .values(last_used_at=func.now()))


async def list_nats_credentials(session: AsyncSession, *, tenant: Tenant | None = None) -> Sequence[NatsCredential]:
    """NATS credentials (of one tenant, or all), revoked ones included, with their tenant, oldest first."""
    query = (select(NatsCredential).options(selectinload(NatsCredential.tenant))
             .order_by(NatsCredential.created_at, NatsCredential.prefix))
    if tenant is not None:
        query = query.where(NatsCredential.tenant_id == tenant.id)
    return (await session.scalars(query)).all()


async def revoke_nats_credential(session: AsyncSession, *, secret_or_prefix: str) -> bool:
    """Revoke a NATS credential given in clear or by its prefix; True if it existed and was active. Open
    connections keep their grant until it expires (`NatsCalloutSettings.grant_ttl_s`)."""
    prefix = secret_or_prefix
    if prefix.startswith(NATS_CREDENTIAL_PREFIX):
        prefix = prefix[len(NATS_CREDENTIAL_PREFIX):].partition("_")[0]
    result = await session.execute(
        update(NatsCredential).where(NatsCredential.prefix == prefix, NatsCredential.revoked_at.is_(None))
        .values(revoked_at=func.now())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


# -- adapters and versions -------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionFacts:
    """What the registry records about a validated adapter version."""

    sha256: str
    max_rank: int
    ranks: dict[str, int]
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str]
    num_layers: int
    base_model: str | None
    dtype: str
    bytes: int
    object_key: str


async def register_version(
    session: AsyncSession, *, tenant: Tenant, name: str, facts: VersionFacts
) -> tuple[Adapter, AdapterVersion, bool]:
    """Create the adapter if new, its version if new, and make the version current.

    Returns (adapter, version, created) where created is False when this exact content was already a
    version of the adapter (re-upload is idempotent). Takes the blob's lock first (`lock_blob`): callers
    that stored the blob check that it is still there after this call, before they commit.
    """
    await lock_blob(session, sha256=facts.sha256)
    await session.execute(
        insert(Adapter).values(id=uuid.uuid4(), tenant_id=tenant.id, name=name).on_conflict_do_nothing()
    )
    adapter = await session.scalar(
        select(Adapter).where(Adapter.tenant_id == tenant.id, Adapter.name == name).with_for_update()
    )
    assert adapter is not None
    version = await session.scalar(
        select(AdapterVersion).where(AdapterVersion.adapter_id == adapter.id, AdapterVersion.sha256 == facts.sha256)
    )
    created = version is None
    if version is None:
        version = AdapterVersion(
            adapter_id=adapter.id,
            sha256=facts.sha256,
            max_rank=facts.max_rank,
            ranks=facts.ranks,
            lora_alpha=facts.lora_alpha,
            use_rslora=facts.use_rslora,
            target_modules=facts.target_modules,
            num_layers=facts.num_layers,
            base_model=facts.base_model,
            dtype=facts.dtype,
            bytes=facts.bytes,
            object_key=facts.object_key,
            status=VersionStatus.ready,
        )
        session.add(version)
        await session.flush()
    adapter.current_version_id = version.id
    await session.flush()
    return adapter, version, created


async def get_adapter(session: AsyncSession, *, tenant: Tenant, name: str) -> Adapter:
    """A tenant's adapter with its current version loaded; NotFound otherwise."""
    adapter = await session.scalar(
        select(Adapter)
        .options(joinedload(Adapter.current_version))  # one round trip (the gateway resolves on every cache miss)
        .where(Adapter.tenant_id == tenant.id, Adapter.name == name)
    )
    if adapter is None:
        raise NotFound("adapter", f"{tenant.name}/{name}")
    return adapter


@dataclass(frozen=True)
class AdapterTarget:
    """What the dispatcher needs to route an invocation of an adapter version."""

    adapter_id: uuid.UUID
    version: str  # sha256
    max_rank: int
    bytes: int


async def find_adapter_targets(
    session: AsyncSession, *, keys: Sequence[tuple[str, str, str | None]]
) -> dict[tuple[str, str, str | None], AdapterTarget]:
    """(tenant, adapter, version or None for the current one) -> its `AdapterTarget`, for many keys in two
    queries at most; keys of adapters that do not exist (or never had that version) are absent."""
    out: dict[tuple[str, str, str | None], AdapterTarget] = {}
    current = {(t, a) for t, a, v in keys if v is None}
    pinned = {(t, a, v) for t, a, v in keys if v is not None}
    base = select(Tenant.name, Adapter.name, Adapter.id, AdapterVersion.sha256, AdapterVersion.max_rank,
                  AdapterVersion.bytes).join(Tenant, Tenant.id == Adapter.tenant_id)
    if current:
        rows = await session.execute(
            base.join(AdapterVersion, AdapterVersion.id == Adapter.current_version_id)
            .where(tuple_(Tenant.name, Adapter.name).in_(list(current))))
        for t, a, adapter_id, sha, rank, nbytes in rows:
            out[(t, a, None)] = AdapterTarget(adapter_id=adapter_id, version=sha, max_rank=rank, bytes=nbytes)
    if pinned:
        rows = await session.execute(
            base.join(AdapterVersion, AdapterVersion.adapter_id == Adapter.id)
            .where(tuple_(Tenant.name, Adapter.name, AdapterVersion.sha256).in_(list(pinned))))
        for t, a, adapter_id, sha, rank, nbytes in rows:
            out[(t, a, sha)] = AdapterTarget(adapter_id=adapter_id, version=sha, max_rank=rank, bytes=nbytes)
    return out


async def list_adapters(session: AsyncSession, *, tenant: Tenant | None = None) -> Sequence[Adapter]:
    """Adapters (of one tenant, or all) with their tenant and current version, by name."""
    query = (
        select(Adapter)
        .options(selectinload(Adapter.current_version), selectinload(Adapter.tenant))
        .join(Tenant, Adapter.tenant_id == Tenant.id)
        .order_by(Tenant.name, Adapter.name)
    )
    if tenant is not None:
        query = query.where(Adapter.tenant_id == tenant.id)
    return (await session.scalars(query)).all()


async def list_versions(session: AsyncSession, *, adapter: Adapter) -> Sequence[AdapterVersion]:
    return (
        await session.scalars(
            select(AdapterVersion).where(AdapterVersion.adapter_id == adapter.id).order_by(AdapterVersion.created_at)
        )
    ).all()


async def delete_adapter(session: AsyncSession, *, tenant: Tenant, name: str) -> list[str]:
    """Delete an adapter and its versions. Returns the sha256 of the blobs they used: whether a blob is still
    used is decided after the commit, under its lock (`lock_blob`); before it, another transaction's delete
    of the blob's last other version would not be seen by either of the two."""
    adapter = await get_adapter(session, tenant=tenant, name=name)
    shas = set(
        (await session.scalars(select(AdapterVersion.sha256).where(AdapterVersion.adapter_id == adapter.id))).all()
    )
    await session.execute(delete(Adapter).where(Adapter.id == adapter.id))
    return sorted(shas)


async def count_rows(session: AsyncSession) -> dict[str, int]:
    """Row counts of the registry tables (for checks that nothing was written)."""
    counts = {}
    for model in (Tenant, ApiKey, Adapter, AdapterVersion, Worker, Residency, Invocation, DemandBucket):
        counts[model.__tablename__] = int(await session.scalar(select(func.count()).select_from(model)) or 0)
    return counts


async def sha_is_referenced(session: AsyncSession, *, sha256: str) -> bool:
    """True if any adapter version refers to this blob."""
    n = await session.scalar(select(func.count()).select_from(AdapterVersion).where(AdapterVersion.sha256 == sha256))
    return bool(n)


async def lock_blob(session: AsyncSession, *, sha256: str) -> int:
    """Lock the blob's row until the transaction ends (making the row if there is none) and return how many
    versions refer to the blob. A push registers a version, and a removal deletes the object, only while
    holding this lock, so one transaction at a time decides about a blob (storage.registry)."""
    # DO UPDATE locks an existing row (DO NOTHING would not); should a removal delete the row while we wait for
    # its lock, the insert goes ahead instead. Either way we hold the lock of a live row.
    await session.execute(
        insert(Blob).values(sha256=sha256)
        .on_conflict_do_update(index_elements=[Blob.sha256], set_={"created_at": Blob.__table__.c.created_at})
    )
    # Read committed: this statement's snapshot is taken after the lock was granted, so it sees every version
    # committed by whoever held the lock before us.
    n = await session.scalar(select(func.count()).select_from(AdapterVersion).where(AdapterVersion.sha256 == sha256))
    return int(n or 0)


async def forget_blob(session: AsyncSession, *, sha256: str) -> None:
    """Delete the blob's row: its object was deleted under the row's lock and no version refers to it."""
    await session.execute(delete(Blob).where(Blob.sha256 == sha256))


# -- workers and residency -------------------------------------------------------------------------


async def upsert_worker(
    session: AsyncSession, *, worker_id: str, host: str, device: str, capacity: dict[str, Any],
    state: dict[str, Any] | None = None,
) -> None:
    """Record a worker's heartbeat (insert on first sight)."""
    now = datetime.now(UTC)
    values = dict(
        id=worker_id, host=host, device=device, capacity=capacity, state=state or {}, status="up",
        last_heartbeat_at=now,
    )
    stmt = insert(Worker).values(**values, started_at=now)
    await session.execute(
        stmt.on_conflict_do_update(
            index_elements=[Worker.id],
            set_={k: stmt.excluded[k] for k in ("host", "device", "capacity", "state", "status", "last_heartbeat_at")},
        )
    )


async def mark_worker_down(session: AsyncSession, *, worker_id: str) -> None:
    """A worker that left or missed its heartbeats: its residency no longer counts."""
    await session.execute(update(Worker).where(Worker.id == worker_id).values(status="down"))
    await session.execute(delete(Residency).where(Residency.worker_id == worker_id))


async def live_workers(session: AsyncSession) -> Sequence[Worker]:
    return (await session.scalars(select(Worker).where(Worker.status == "up").order_by(Worker.id))).all()


async def prune_workers(session: AsyncSession, *, silent_since: datetime) -> list[str]:
    """Delete the rows (and residency) of workers whose last recorded heartbeat is older than `silent_since`;
    their ids. A worker that comes back later gets a new row from its next heartbeat."""
    ids = await session.scalars(delete(Worker).where(Worker.last_heartbeat_at < silent_since).returning(Worker.id))
    return sorted(ids.all())


# -- scheduler leader election ---------------------------------------------------------------------------

_PG_LOCKS = table("pg_locks", column("locktype"), column("pid"), column("granted"), column("classid"),
                  column("objid"), column("objsubid"))


def create_lock_engine(settings: DatabaseSettings, *, keepalive_s: int, name: str = "lorafn") -> AsyncEngine:
    """An engine for ONE long-lived connection that holds a session advisory lock: no pool (the connection is
    the lock), autocommit (never idle in a transaction), and TCP keepalives on both ends every `keepalive_s`
    (3 probes), so that the server ends the session of a holder whose host vanished, and the holder's own
    checks fail, within about 4 x `keepalive_s` (a holder that dies with its host up is seen at once: its
    kernel closes the socket)."""
    idle = max(1, keepalive_s)
    server = (f"-c tcp_keepalives_idle={idle} -c tcp_keepalives_interval={idle} -c tcp_keepalives_count=3 "
              f"-c tcp_user_timeout={4 * idle * 1000}")
    return create_async_engine(
        settings.url, poolclass=NullPool, isolation_level="AUTOCOMMIT",
        connect_args={"keepalives": 1, "keepalives_idle": idle, "keepalives_interval": idle,
                      "keepalives_count": 3, "tcp_user_timeout": 4 * idle * 1000, "options": server,
                      "application_name": name},
    )


async def try_advisory_lock(conn: AsyncConnection, *, key: int) -> bool:
    """Take session advisory lock `key` on this connection if no other session holds it (never waits). Taken,
    it is held until the session ends (the server releases it when the connection closes or dies)."""
    return bool(await conn.scalar(select(func.pg_try_advisory_lock(key))))


async def holds_advisory_lock(conn: AsyncConnection, *, key: int) -> bool:
    """Whether this connection's session holds advisory lock `key` (one round trip: the connection is alive
    too). pg_locks shows a bigint key as classid (its high 32 bits), objid (its low 32 bits), objsubid 1."""
    c = _PG_LOCKS.c
    found = await conn.scalar(select(func.count()).select_from(_PG_LOCKS).where(
        c.locktype == "advisory", c.pid == func.pg_backend_pid(), c.granted.is_(True),
        cast(c.classid, BigInteger) == (key >> 32) & 0xFFFFFFFF, cast(c.objid, BigInteger) == key & 0xFFFFFFFF,
        c.objsubid == 1,
    ))
    return bool(found)


async def set_residency(
    session: AsyncSession, *, version_id: uuid.UUID, worker_id: str, tier: Tier, pages: int = 0,
    nbytes: int = 0, load_ms: float | None = None,
) -> None:
    """Record that a worker holds a version in `tier` (idempotent)."""
    stmt = insert(Residency).values(
        adapter_version_id=version_id, worker_id=worker_id, tier=tier, pages=pages, bytes=nbytes, load_ms=load_ms
    )
    await session.execute(
        stmt.on_conflict_do_update(
            index_elements=[Residency.adapter_version_id, Residency.worker_id, Residency.tier],
            set_={"pages": stmt.excluded.pages, "bytes": stmt.excluded.bytes, "load_ms": stmt.excluded.load_ms},
        )
    )


async def clear_residency(session: AsyncSession, *, version_id: uuid.UUID, worker_id: str, tier: Tier) -> None:
    await session.execute(
        delete(Residency).where(
            Residency.adapter_version_id == version_id, Residency.worker_id == worker_id, Residency.tier == tier
        )
    )


async def touch_residency(session: AsyncSession, *, version_id: uuid.UUID, worker_id: str) -> None:
    """Mark a version used now on a worker (LRU eviction reads last_used_at)."""
    await session.execute(
        update(Residency)
        .where(Residency.adapter_version_id == version_id, Residency.worker_id == worker_id)
        .values(last_used_at=func.now())
    )


async def residency_of(session: AsyncSession, *, version_id: uuid.UUID) -> Sequence[Residency]:
    return (await session.scalars(select(Residency).where(Residency.adapter_version_id == version_id))).all()


async def worker_residency(session: AsyncSession, *, worker_id: str, tier: Tier) -> Sequence[Residency]:
    """A worker's resident versions in a tier, least recently used first."""
    return (
        await session.scalars(
            select(Residency)
            .where(Residency.worker_id == worker_id, Residency.tier == tier)
            .order_by(Residency.last_used_at.asc().nulls_first(), Residency.loaded_at)
        )
    ).all()


# -- invocations ---------------------------------------------------------------------------------------


async def create_invocation(
    session: AsyncSession, *, invocation_id: str, tenant: Tenant, adapter: Adapter | None,
    idempotency_key: str | None = None, request_hash: str | None = None,
) -> Invocation:
    inv = Invocation(
        id=invocation_id,
        tenant_id=tenant.id,
        adapter_id=adapter.id if adapter else None,
        adapter_version_id=adapter.current_version_id if adapter else None,
        status=InvocationStatus.queued,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    session.add(inv)
    await session.flush()
    return inv


async def get_invocation(session: AsyncSession, *, invocation_id: str, tenant: Tenant | None = None) -> Invocation:
    query = select(Invocation).where(Invocation.id == invocation_id)
    if tenant is not None:
        query = query.where(Invocation.tenant_id == tenant.id)
    inv = await session.scalar(query)
    if inv is None:
        raise NotFound("invocation", invocation_id)
    return inv


async def find_idempotent_invocation(session: AsyncSession, *, tenant: Tenant, key: str) -> Invocation | None:
    return await session.scalar(
        select(Invocation).where(Invocation.tenant_id == tenant.id, Invocation.idempotency_key == key)
    )


async def update_invocation(session: AsyncSession, *, invocation_id: str, **fields: Any) -> None:
    """Set status, timestamps, token counts, worker, attempts or error of an invocation."""
    allowed = {"status", "started_at", "first_token_at", "finished_at", "prompt_tokens", "completion_tokens",
               "worker_id", "attempts", "error"}
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"cannot update invocation fields {sorted(unknown)}")
    await session.execute(update(Invocation).where(Invocation.id == invocation_id).values(**fields))


# -- demand history ------------------------------------------------------------------------------------


async def record_demand(
    session: AsyncSession, *, adapter_id: uuid.UUID, at: datetime, bucket_seconds: int = 60, count: int = 1
) -> None:
    """Add `count` invocations of an adapter to the bucket that contains `at`. Nothing happens when the adapter
    was deleted meanwhile (the insert selects it, so a deleted adapter's demand cannot fail the transaction)."""
    epoch = int(at.timestamp())
    start = datetime.fromtimestamp(epoch - epoch % bucket_seconds, UTC)
    source = select(Adapter.id, literal(start), literal(bucket_seconds), literal(count)).where(
        Adapter.id == adapter_id)
    stmt = insert(DemandBucket).from_select(
        [DemandBucket.adapter_id, DemandBucket.bucket_start, DemandBucket.bucket_seconds, DemandBucket.count], source)
    await session.execute(
        stmt.on_conflict_do_update(
            index_elements=[DemandBucket.adapter_id, DemandBucket.bucket_start, DemandBucket.bucket_seconds],
            set_={"count": DemandBucket.count + stmt.excluded.count},
        )
    )


async def _execute_arrays(session: AsyncSession, sql: str, params: dict[str, Any]) -> None:
    """Run one of the fixed driver statements over parallel arrays below in the session's transaction."""
    connection = await session.connection()
    await connection.exec_driver_sql(sql, params)


# Demand counts as driver SQL over parallel arrays (one statement text whatever the number of adapters; see
# _FINISH_INVOCATIONS). FOR KEY SHARE: an adapter whose delete is in flight is waited for and then skipped, not read
# from this statement's snapshot (the foreign key check would then fail the whole write when the delete commits).
_RECORD_DEMAND = (
    "INSERT INTO demand_history (adapter_id, bucket_start, bucket_seconds, count) "
    "SELECT a.id, d.bucket_start, %(bucket_seconds)s, d.count "
    "FROM unnest(%(adapter_id)s::uuid[], %(bucket_start)s::timestamptz[], %(count)s::int[]) "
    "AS d(adapter_id, bucket_start, count) JOIN adapters AS a ON a.id = d.adapter_id FOR KEY SHARE OF a "
    "ON CONFLICT (adapter_id, bucket_start, bucket_seconds) DO UPDATE SET count = demand_history.count + excluded.count"
)


async def record_demand_many(session: AsyncSession, *, counts: Sequence[tuple[uuid.UUID, datetime, int]],
                             bucket_seconds: int = 60) -> None:
    """`record_demand` for many (adapter id, time, count) at once, in one statement (a flush of a thousand
    adapters' demand is one round trip); adapters deleted meanwhile are skipped."""
    if not counts:
        return
    merged: dict[tuple[uuid.UUID, datetime], int] = {}
    for adapter_id, at, count in counts:
        epoch = int(at.timestamp())
        start = datetime.fromtimestamp(epoch - epoch % bucket_seconds, UTC)
        merged[(adapter_id, start)] = merged.get((adapter_id, start), 0) + count
    await _execute_arrays(session, _RECORD_DEMAND, {
        "bucket_seconds": bucket_seconds, "adapter_id": [a for a, _ in merged],
        "bucket_start": [t for _, t in merged], "count": list(merged.values())})


async def demand_series(
    session: AsyncSession, *, adapter_id: uuid.UUID, since: datetime, bucket_seconds: int = 60
) -> list[tuple[datetime, int]]:
    """(bucket start, count) of an adapter since `since`, oldest first; empty buckets are absent."""
    rows = await session.execute(
        select(DemandBucket.bucket_start, DemandBucket.count)
        .where(
            DemandBucket.adapter_id == adapter_id,
            DemandBucket.bucket_seconds == bucket_seconds,
            DemandBucket.bucket_start >= since,
        )
        .order_by(DemandBucket.bucket_start)
    )
    return [(r[0], int(r[1])) for r in rows]


async def demand_totals(session: AsyncSession, *, since: datetime, bucket_seconds: int = 60) -> dict[uuid.UUID, int]:
    """Invocations per adapter since `since`, aggregated in SQL."""
    rows = await session.execute(
        select(DemandBucket.adapter_id, func.sum(DemandBucket.count))
        .where(DemandBucket.bucket_seconds == bucket_seconds, DemandBucket.bucket_start >= since)
        .group_by(DemandBucket.adapter_id)
    )
    return {r[0]: int(r[1]) for r in rows}


# -- health --------------------------------------------------------------------------------------------


async def ping(session: AsyncSession) -> None:
    """A round trip to the database (readiness checks); raises if it does not answer."""
    await session.execute(select(1))


# -- scheduler: warm state and invocation lifecycle ------------------------------------------------------


@dataclass(frozen=True)
class ResidencyRow:
    """One adapter version (by content hash) a worker reports in a tier (from its heartbeat)."""

    sha256: str
    tier: Tier
    pages: int = 0
    nbytes: int = 0
    last_used_at: datetime | None = None


# A worker's reported residency as driver SQL over parallel arrays (see _FINISH_INVOCATIONS); FOR KEY SHARE as in
# _RECORD_DEMAND: a version whose delete is in flight is waited for and skipped.
_WRITE_RESIDENCY = (
    "INSERT INTO residency (adapter_version_id, worker_id, tier, pages, bytes, last_used_at) "
    "SELECT v.id, %(worker_id)s, r.tier::tier, r.pages, r.bytes, r.last_used_at "
    "FROM unnest(%(sha256)s::text[], %(tier)s::text[], %(pages)s::int[], %(bytes)s::bigint[], "
    "%(last_used_at)s::timestamptz[]) AS r(sha256, tier, pages, bytes, last_used_at) "
    "JOIN adapter_versions AS v ON v.sha256 = r.sha256 FOR KEY SHARE OF v "
    "ON CONFLICT (adapter_version_id, worker_id, tier) DO UPDATE SET pages = excluded.pages, "
    "bytes = excluded.bytes, last_used_at = excluded.last_used_at"
)


async def write_worker_residency(session: AsyncSession, *, worker_id: str, rows: Sequence[ResidencyRow],
                                 drop: Sequence[tuple[str, Tier]] = (), replace: bool = False) -> None:
    """Upsert a worker's residency rows and delete `drop` ((sha256, tier) pairs), in three statements at most
    whatever the number of rows. `replace`: the worker holds exactly `rows` (everything else of it is deleted
    first: a scheduler that has no record of what it wrote before). A hash names every adapter version with
    that content (identical bytes pushed under two names are resident for both); a hash no version has any
    more (deleted meanwhile) is skipped, never a foreign-key error."""
    if replace:
        await session.execute(delete(Residency).where(Residency.worker_id == worker_id))
    for tier in {t for _, t in drop}:
        shas = [sha for sha, t in drop if t == tier]
        await session.execute(delete(Residency).where(
            Residency.worker_id == worker_id, Residency.tier == tier,
            Residency.adapter_version_id.in_(select(AdapterVersion.id).where(AdapterVersion.sha256.in_(shas))),
        ))
    if not rows:
        return
    await _execute_arrays(session, _WRITE_RESIDENCY, {
        "worker_id": worker_id, "sha256": [r.sha256 for r in rows], "tier": [r.tier.value for r in rows],
        "pages": [r.pages for r in rows], "bytes": [r.nbytes for r in rows],
        "last_used_at": [r.last_used_at for r in rows]})


async def mark_invocation_running(
    session: AsyncSession, *, invocation_id: str, worker_id: str, attempt: int, started_at: datetime
) -> None:
    """An attempt of an invocation started on a worker (ignored once the invocation has finished, and when a
    later attempt's start is written already)."""
    await session.execute(
        update(Invocation)
        .where(Invocation.id == invocation_id,
               Invocation.status.in_([InvocationStatus.queued, InvocationStatus.running]),
               Invocation.attempts <= attempt)
        .values(status=InvocationStatus.running, worker_id=worker_id, attempts=attempt, started_at=started_at)
    )


_MARK_RUNNING = (
    "UPDATE invocations AS i SET status = 'running', worker_id = s.worker_id, attempts = s.attempt, "
    "started_at = s.started_at FROM unnest(%(id)s::text[], %(worker_id)s::text[], %(attempt)s::int[], "
    "%(started_at)s::timestamptz[]) AS s(id, worker_id, attempt, started_at) "
    "WHERE i.id = s.id AND i.status IN ('queued', 'running') AND i.attempts <= s.attempt"
)


async def mark_invocations_running(session: AsyncSession, *,
                                    started: Sequence[tuple[str, str, int, datetime]]) -> None:
    """`mark_invocation_running` for many (invocation id, worker id, attempt, started at), in one statement of
    fixed text (driver SQL over arrays, as _FINISH_INVOCATIONS: one row per invocation the scheduler saw start).
    A start of an earlier attempt than the row's (written again by a new leader) changes nothing."""
    if not started:
        return
    latest = {inv: (w, a, t) for inv, w, a, t in sorted(started, key=lambda s: s[3])}  # the last start wins
    await _execute_arrays(session, _MARK_RUNNING, {
        "id": list(latest), "worker_id": [w for w, _, _ in latest.values()],
        "attempt": [a for _, a, _ in latest.values()], "started_at": [t for _, _, t in latest.values()]})


async def finish_invocation(
    session: AsyncSession, *, invocation_id: str, status: InvocationStatus, finished_at: datetime,
    started_at: datetime | None = None, first_token_at: datetime | None = None, prompt_tokens: int | None = None,
    completion_tokens: int | None = None, worker_id: str | None = None, attempts: int | None = None,
    error: str | None = None,
) -> None:
    """Record an invocation's outcome; timestamps already set (started_at) are kept."""
    await finish_invocations(session, outcomes=[Outcome(
        invocation_id=invocation_id, status=status, finished_at=finished_at, started_at=started_at,
        first_token_at=first_token_at, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
        worker_id=worker_id, attempts=attempts, error=error)])


@dataclass(frozen=True)
class Outcome:
    """What `finish_invocations` records of one invocation (None leaves worker and attempts as they are)."""

    invocation_id: str
    status: InvocationStatus
    finished_at: datetime
    started_at: datetime | None = None
    first_token_at: datetime | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    worker_id: str | None = None
    attempts: int | None = None
    error: str | None = None


# Outcomes as driver SQL over parallel arrays: one statement text whatever the batch size, so neither SQLAlchemy
# nor the driver compiles anything per batch (the VALUES form compiled every row's parameters on each batch: a tenth
# of the scheduler's CPU under load, in one stretch that held up its dispatch loop).
_FINISH_INVOCATIONS = (
    "UPDATE invocations AS i SET status = o.status::invocation_status, finished_at = o.finished_at, "
    "first_token_at = o.first_token_at, started_at = coalesce(i.started_at, o.started_at), "
    "prompt_tokens = o.prompt_tokens, completion_tokens = o.completion_tokens, error = o.error, "
    "worker_id = coalesce(o.worker_id, i.worker_id), attempts = coalesce(o.attempts, i.attempts) "
    "FROM unnest(%(id)s::text[], %(status)s::text[], %(finished_at)s::timestamptz[], %(started_at)s::timestamptz[], "
    "%(first_token_at)s::timestamptz[], %(prompt_tokens)s::int[], %(completion_tokens)s::int[], "
    "%(worker_id)s::text[], %(attempts)s::int[], %(error)s::text[]) "
    "AS o(id, status, finished_at, started_at, first_token_at, prompt_tokens, completion_tokens, worker_id, "
    "attempts, error) WHERE i.id = o.id"
)


async def finish_invocations(session: AsyncSession, *, outcomes: Sequence[Outcome]) -> None:
    """Record many invocations' outcomes in one statement (the scheduler writes a batch of results at once);
    a start time already set is kept, as are the worker and attempts an outcome does not name."""
    if not outcomes:
        return
    latest = list({o.invocation_id: o for o in outcomes}.values())  # a result recorded twice: either copy says the same
    params = {
        "id": [o.invocation_id for o in latest], "status": [o.status.name for o in latest],
        "finished_at": [o.finished_at for o in latest], "started_at": [o.started_at for o in latest],
        "first_token_at": [o.first_token_at for o in latest], "prompt_tokens": [o.prompt_tokens for o in latest],
        "completion_tokens": [o.completion_tokens for o in latest], "worker_id": [o.worker_id for o in latest],
        "attempts": [o.attempts for o in latest], "error": [o.error for o in latest],
    }
    await _execute_arrays(session, _FINISH_INVOCATIONS, params)


# The row of a new invocation, as driver SQL: this runs once per invocation on the request path, where building
# and compiling an ORM insert cost more CPU than the round trip. tests/gateway and the invocation benchmark
# check it against the model (a column renamed in a migration fails them).
_INSERT_INVOCATION = (
    "INSERT INTO invocations (id, tenant_id, adapter_id, adapter_version_id, status, idempotency_key, "
    "request_hash, attempts) VALUES (%(id)s, %(tenant_id)s, %(adapter_id)s, %(adapter_version_id)s, "
    "%(status)s, %(idempotency_key)s, %(request_hash)s, 0)"
)


def create_fast_write_engine(settings: DatabaseSettings, *, name: str = "lorafn") -> AsyncEngine:
    """An engine for rows written on the request path whose loss in a Postgres crash is tolerable because
    the source of truth is elsewhere (an invocation row: the invocation itself is durable in JetStream).

    Every statement commits on its own (autocommit: no BEGIN and COMMIT round trips) without waiting for
    its WAL flush (synchronous_commit off for the engine's sessions), and pooled connections are not pinged
    before use: a connection that died in the pool is detected by the statement itself, which
    `insert_invocation` then retries once on a fresh one. Never used for the registry.

    The pool never grows past `pool_size`: a statement that finds every connection busy waits for one (an
    insert holds it well under a millisecond) instead of opening an overflow connection, which SQLAlchemy
    closes again as soon as it is returned. With the default overflow, 16 concurrent callers of the gateway
    made Postgres start a backend process for about one call in five (550 sessions per 3,000 calls), a
    fork and an authentication each, on the same CPUs as the calls. A wait longer than `pool_timeout_s`
    raises sqlalchemy's TimeoutError (the gateway answers 503). `name`: the connections' application_name.
    """
    return create_async_engine(
        settings.url, pool_size=settings.pool_size, max_overflow=0, pool_timeout=settings.pool_timeout_s,
        pool_pre_ping=False, isolation_level="AUTOCOMMIT",
        connect_args={"options": "-c synchronous_commit=off", "application_name": name},
    )


async def insert_invocation(
    engine: AsyncEngine, *, invocation_id: str, tenant: Tenant, adapter: Adapter | None,
    idempotency_key: str | None = None, request_hash: str | None = None,
) -> None:
    """Insert a queued invocation row in one statement: one round trip on an engine from
    `create_fast_write_engine`.

    Raises IntegrityError when the id or the tenant's Idempotency-Key is taken, OperationalError when
    Postgres cannot be reached.
    """
    params = {
        "id": invocation_id, "tenant_id": tenant.id, "adapter_id": adapter.id if adapter else None,
        "adapter_version_id": adapter.current_version_id if adapter else None, "status": InvocationStatus.queued.name,
        "idempotency_key": idempotency_key, "request_hash": request_hash,
    }
    for attempt in (1, 2):
        try:
            async with engine.connect() as connection:
                await connection.exec_driver_sql(_INSERT_INVOCATION, params)
            return
        except DBAPIError as e:
            if attempt == 2 or not e.connection_invalidated:
                raise
