"""SQLAlchemy 2 models of lorafn's registry and warm state. The schema changes only through migrations/."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from protocol.messages import Tier

# Postgres naming convention: every constraint and index gets a predictable name, so that migrations
# can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSONB, list[Any]: JSONB}  # noqa: RUF012 - SQLAlchemy reads it


def _now() -> Any:
    return func.now()


class VersionStatus(enum.StrEnum):
    """Lifecycle of an adapter version: only `ready` versions are served."""

    ready = "ready"
    disabled = "disabled"


class InvocationStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"  # by the caller (POST /v1/invocations/<id>/cancel, or a client that went away)


# Per-tenant quota overrides: column quota_X of tenants overrides gateway.settings.QuotaSettings.X.
QUOTA_FIELDS = ("quota_requests_per_s", "quota_burst", "quota_tokens_per_min", "quota_concurrent", "quota_adapters",
                "quota_stored_bytes")


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    # Quota overrides of this tenant (NULL: the gateway's default, LORAFN_GATEWAY__QUOTAS__*).
    quota_requests_per_s: Mapped[float | None] = mapped_column(Float)
    quota_burst: Mapped[int | None] = mapped_column(Integer)
    quota_tokens_per_min: Mapped[int | None] = mapped_column(BigInteger)
    quota_concurrent: Mapped[int | None] = mapped_column(Integer)
    quota_adapters: Mapped[int | None] = mapped_column(Integer)
    quota_stored_bytes: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (
        CheckConstraint("name ~ '^[A-Za-z0-9_-]{1,64}$'", name="name_token"),
        CheckConstraint(" AND ".join(f"({c} IS NULL OR {c} > 0)" for c in QUOTA_FIELDS), name="quota_positive"),
    )


class ApiKey(Base):
    """An API key of a tenant. Only a hash is stored; the prefix finds the row without scanning."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    label: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    tenant: Mapped[Tenant] = relationship()


class NatsCredential(Base):
    """A tenant's credential for direct NATS clients (user: the tenant's name, password: the secret), checked
    by the auth callout (scheduler.nats_callout). Apart from API keys: a key for HTTP grants no bus access.
    Only a hash is stored; the prefix finds the row without scanning."""

    __tablename__ = "nats_credentials"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    label: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    tenant: Mapped[Tenant] = relationship()


class Adapter(Base):
    """A named function of a tenant: `tenant/name`, pointing at its current immutable version."""

    __tablename__ = "adapters"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    current_version_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="SET NULL", use_alter=True)
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=_now(), onupdate=_now()
    )

    tenant: Mapped[Tenant] = relationship()
    current_version: Mapped[AdapterVersion | None] = relationship(foreign_keys=[current_version_id])

    __table_args__ = (
        UniqueConstraint("tenant_id", "name"),
        CheckConstraint("name ~ '^[A-Za-z0-9_-]{1,64}$'", name="name_token"),
    )


class Blob(Base):
    """A blob of the object store, by content hash. Its row's lock orders every decision about the blob's life:
    a push registers a version of it, and a removal deletes it, only while holding the lock (storage.registry),
    so a push of bytes another tenant is deleting can never leave a version without its blob."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())

    __table_args__ = (CheckConstraint("sha256 ~ '^[0-9a-f]{64}$'", name="sha256_hex"),)


class AdapterVersion(Base):
    """An immutable, content-addressed version of an adapter (sha256 of its canonical blob)."""

    __tablename__ = "adapter_versions"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    adapter_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), index=True)
    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    max_rank: Mapped[int] = mapped_column(Integer)
    ranks: Mapped[dict[str, Any]] = mapped_column(comment="rank per adapted module: {'layers.3.q_proj': 8}")
    lora_alpha: Mapped[float] = mapped_column(Float)
    use_rslora: Mapped[bool]
    target_modules: Mapped[list[Any]]
    num_layers: Mapped[int] = mapped_column(Integer, comment="number of backbone layers adapted")
    base_model: Mapped[str | None] = mapped_column(String(256))
    dtype: Mapped[str] = mapped_column(String(8))
    bytes: Mapped[int] = mapped_column(BigInteger)
    object_key: Mapped[str] = mapped_column(String(256))
    status: Mapped[VersionStatus] = mapped_column(
        Enum(VersionStatus, name="version_status"), default=VersionStatus.ready
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())

    adapter: Mapped[Adapter] = relationship(foreign_keys=[adapter_id])

    __table_args__ = (
        UniqueConstraint("adapter_id", "sha256"),
        CheckConstraint("max_rank >= 1", name="rank_positive"),
        CheckConstraint("sha256 ~ '^[0-9a-f]{64}$'", name="sha256_hex"),
    )


class Worker(Base):
    """A worker process, its capacity and its last heartbeat."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(256))
    device: Mapped[str] = mapped_column(String(64))
    capacity: Mapped[dict[str, Any]] = mapped_column(comment="pool pages, page bytes, host cache bytes, ...")
    state: Mapped[dict[str, Any]] = mapped_column(default=dict, comment="last heartbeat body")
    status: Mapped[str] = mapped_column(String(16), default="up")
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    last_heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class Residency(Base):
    """A copy of an adapter version on a worker, in one tier."""

    __tablename__ = "residency"

    adapter_version_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="CASCADE"), primary_key=True
    )
    worker_id: Mapped[str] = mapped_column(ForeignKey("workers.id", ondelete="CASCADE"), primary_key=True)
    tier: Mapped[Tier] = mapped_column(Enum(Tier, name="tier"), primary_key=True)
    pages: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    load_ms: Mapped[float | None] = mapped_column(Float)
    loaded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index(None, "worker_id", "tier"),)


class Invocation(Base):
    """One invocation of a function (or of the bare base model when adapter_version_id is null)."""

    __tablename__ = "invocations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    adapter_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("adapters.id", ondelete="SET NULL"))
    adapter_version_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="SET NULL")
    )
    status: Mapped[InvocationStatus] = mapped_column(
        Enum(InvocationStatus, name="invocation_status"), default=InvocationStatus.queued
    )
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    submitted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    first_token_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    worker_id: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        Index(None, "status", "submitted_at"),
    )


class DemandBucket(Base):
    """Invocations of an adapter counted per time bucket: the demand history predictors learn from."""

    __tablename__ = "demand_history"

    adapter_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True)
    bucket_start: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    bucket_seconds: Mapped[int] = mapped_column(Integer, primary_key=True)
    count: Mapped[int] = mapped_column(Integer, default=0)
