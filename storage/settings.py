"""Settings sections owned by storage/: the database, the object store and the adapter registry."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, SecretStr, field_validator


class DatabaseSettings(BaseModel):
    """Where Postgres is."""

    url: str = Field(
        "postgresql+psycopg://lorafn@127.0.0.1:5432/lorafn",
        description="SQLAlchemy URL of the Postgres database (driver psycopg)",
    )
    pool_size: int = Field(5, ge=1, le=100, description="connections kept open per process")

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, v: str) -> str:
        if not v.startswith(("postgresql://", "postgresql+psycopg://")):
            raise ValueError(f"database url {v!r} must be a postgresql:// or postgresql+psycopg:// URL")
        if v.startswith("postgresql://"):
            v = "postgresql+psycopg://" + v[len("postgresql://") :]
        return v


class ObjectStoreSettings(BaseModel):
    """Where the S3-compatible object store is (MinIO, SeaweedFS, AWS S3)."""

    endpoint: str = Field("127.0.0.1:9000", description="host:port of the S3 API, no scheme")
    access_key: str = Field("lorafn", description="S3 access key id")
    secret_key: SecretStr = Field(SecretStr("lorafn-secret"), description="S3 secret access key")
    bucket: str = Field("lorafn-adapters", description="bucket that holds adapter blobs")
    secure: bool = Field(False, description="use https to reach the endpoint")
    region: str | None = Field(None, description="S3 region, if the store needs one")

    @field_validator("endpoint")
    @classmethod
    def _no_scheme(cls, v: str) -> str:
        if "://" in v:
            raise ValueError(f"object store endpoint {v!r} must be host:port without a scheme (set secure)")
        return v


class RegistrySettings(BaseModel):
    """Limits the registry enforces on uploaded adapters."""

    max_rank: int = Field(128, ge=1, le=4096, description="largest LoRA rank accepted per module")
    max_upload_bytes: int = Field(
        1 << 30, ge=1024, description="largest accepted upload (archive or files together), in bytes"
    )
    max_archive_members: int = Field(64, ge=2, description="most entries an uploaded archive may hold")
    backbone_gguf: Path | None = Field(None, description="GGUF file of the backbone (default: SmolLM2-135M)")
    backbone_hf_dir: Path | None = Field(None, description="Hugging Face checkpoint dir of the backbone")
