"""Settings sections owned by storage/: the database, the object store and the adapter registry."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from protocol.settings import redact_url


class DatabaseSettings(BaseModel):
    """Where Postgres is."""

    model_config = ConfigDict(hide_input_in_errors=True)  # a rejected value may carry a password

    url: str = Field(
        "postgresql+psycopg://lorafn@127.0.0.1:5432/lorafn",
        description="SQLAlchemy URL of the Postgres database (driver psycopg)",
    )
    pool_size: int = Field(5, ge=1, le=100, description="connections kept open per process")
    pool_timeout_s: float = Field(10.0, gt=0, description="seconds a statement waits for a pooled connection "
                                  "when all are busy (the request-path engine never opens more than pool_size)")

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, v: str) -> str:
        if not v.startswith(("postgresql://", "postgresql+psycopg://")):
            raise ValueError(f"database url {redact_url(v)!r} must be a postgresql:// or postgresql+psycopg:// URL")
        if v.startswith("postgresql://"):
            v = "postgresql+psycopg://" + v[len("postgresql://") :]
        return v


class ObjectStoreSettings(BaseModel):
    """Where the S3-compatible object store is (MinIO, SeaweedFS, AWS S3)."""

    model_config = ConfigDict(hide_input_in_errors=True)  # a rejected value may carry a password

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
    """Limits the registry enforces on uploaded adapters.

    Archives are read with every limit checked while reading (storage/archive.py), so memory does not
    depend on what an archive claims or holds. Per concurrent upload, the process's peak RSS grows by at
    most 16 MiB (storage.archive.READ_MEMORY_BYTES) while the upload is read; an upload refused there (a
    decompression bomb, a huge tar long name or pax header, too many members, a safetensors header length
    of gigabytes, a file larger than any adapter of the backbone) never costs more. An upload that passes
    is then validated and re-encoded in memory (its bytes, its tensors, the canonical blob and the
    encoder's copy of it): at most 5 times its weights file more (4.1x measured), and the weights file is
    at most the largest adapter the backbone admits at `max_rank` (every module of every layer in F32:
    165 MiB for SmolLM2-135M at rank 128). The upload itself is on disk (spooled by the multipart
    parser), never in memory as a whole.
    """

    max_rank: int = Field(128, ge=1, le=4096, description="largest LoRA rank accepted per module")
    max_upload_bytes: int = Field(
        1 << 30, ge=1024, description="largest accepted upload (archive or files together), in bytes"
    )
    max_archive_members: int = Field(64, ge=2, description="most entries an uploaded archive may hold")
    max_inflated_bytes: int = Field(
        1 << 30, ge=1024, description="most bytes an archive's members may inflate to, all together (also the "
        "largest weights file kept; the backbone's largest adapter at max_rank usually bounds it lower)")
    max_compression_ratio: float = Field(
        100.0, ge=1.0, description="most a zip member, or a whole archive, may inflate relative to its compressed "
        "bytes (adapter weights compress about 1.1x, zero-initialised ones about 2x; deflate bombs 1000x)")
    compression_ratio_grace_bytes: int = Field(
        4 << 20, ge=0, description="inflated bytes below which the ratio is not enforced (a JSON config "
        "compresses well and is harmless)")
    max_archive_header_bytes: int = Field(
        256 << 10, ge=4096, description="largest tar extended header (pax record, GNU long name) or zip central "
        "directory, in bytes: they are read into memory whole")
    backbone_gguf: Path | None = Field(None, description="GGUF file of the backbone (default: SmolLM2-135M)")
    backbone_hf_dir: Path | None = Field(None, description="Hugging Face checkpoint dir of the backbone")
