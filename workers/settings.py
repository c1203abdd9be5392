"""Settings of the worker service: one typed object, built in `workers.__main__` and passed down.

Environment variables use the prefix LORAFN_ and `__` between sections, e.g. LORAFN_NATS__URL,
LORAFN_OBJECT_STORE__ENDPOINT, LORAFN_ENGINE__ADAPTER_POOL_BYTES, LORAFN_BACKBONE__PATH,
LORAFN_HOST_CACHE__RAM_BYTES, LORAFN_CONSUMER__ACK_WAIT_S, LORAFN_WORKER_ID, LORAFN_METRICS__PORT.

The adapter pool's page dtype is LORAFN_ENGINE__ADAPTER_DTYPE (auto, float32, bfloat16, float16; see
`workers.adapter_pool.adapter_pool_dtype`); LORAFN_NATIVE=0 turns the native CPU LoRA kernel off
(`kernels.native`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings

from protocol.settings import NatsSettings, service_settings_config
from protocol.subjects import NAME_PATTERN
from scheduler.metrics import MetricsSettings
from storage.settings import ObjectStoreSettings
from workers.engine import EngineSettings


class BackboneSettings(BaseModel):
    """Which backbone the worker loads (once per process)."""

    path: Path | None = Field(None, description=".gguf file or HF checkpoint dir (None: SmolLM2-135M GGUF)")
    device: str = Field("cpu", description="torch device of the backbone, the KV cache and the adapter pool")
    dtype: str = Field("float32", description="torch dtype of the backbone weights: float32, float16, bfloat16")

    @model_validator(mode="after")
    def _dtype_known(self) -> BackboneSettings:
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"backbone dtype {self.dtype!r} is not one of float32, float16, bfloat16")
        return self


class HostCacheSettings(BaseModel):
    """The host tier: adapter blobs on local disk and in RAM, each bounded in bytes."""

    directory: Path | None = Field(None, description="disk cache directory (None: a temporary one per process)")
    disk_bytes: int = Field(8 << 30, ge=0, description="bytes of blobs kept on disk")
    ram_bytes: int = Field(1 << 30, ge=0, description="bytes of blobs kept in RAM (least recently used leave)")
    eviction: Literal["lru", "greedy_dual"] = Field(
        "greedy_dual", description="which blobs leave the disk when it is full: greedy_dual (GreedyDual-Size-"
        "Frequency: use count x object-store fetch cost / size, aged; fewer cold starts than lru in the "
        "scheduling bench, README 'Pre-staging') or lru (least recently used)",
    )


class ConsumerSettings(BaseModel):
    """How the worker consumes its work subject (`lora.work.<worker id>`, one durable consumer)."""

    ack_wait_s: float = Field(30.0, gt=0, description="seconds before an unacknowledged invocation is redelivered")
    max_retry_s: float = Field(
        120.0, gt=0, description="seconds after its arrival an invocation that keeps hitting transient errors "
        "(object store down, device pool full of adapters in use) is retried before it fails with that error")
    in_progress_every_s: float = Field(5.0, gt=0, description="seconds between in-progress acks of a running call")
    fetch_timeout_s: float = Field(1.0, gt=0, description="seconds one pull request waits for a message")
    max_inflight: int = Field(32, ge=1, description="invocations pulled and not yet finished, per worker")
    retry_delay_s: float = Field(1.0, ge=0, description="NAK delay of an invocation that hit a transient error")

    @model_validator(mode="after")
    def _in_progress_before_ack_wait(self) -> ConsumerSettings:
        if self.in_progress_every_s >= self.ack_wait_s:
            raise ValueError(
                f"in_progress_every_s ({self.in_progress_every_s}) must be below ack_wait_s ({self.ack_wait_s})"
            )
        return self


class WorkerSettings(BaseSettings):
    """Everything one worker process needs."""

    model_config = service_settings_config()

    worker_id: str | None = Field(None, description="worker name, a subject token, kept across restarts (None: the "
                                  "host name as a subject token; set it when several workers share a host)")
    nats: NatsSettings = Field(default_factory=NatsSettings)
    object_store: ObjectStoreSettings = Field(default_factory=ObjectStoreSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    backbone: BackboneSettings = Field(default_factory=BackboneSettings)
    host_cache: HostCacheSettings = Field(default_factory=HostCacheSettings)
    consumer: ConsumerSettings = Field(default_factory=ConsumerSettings)
    heartbeat_s: float = Field(1.0, gt=0, description="seconds between heartbeats")
    drain_timeout_s: float = Field(20.0, ge=0, description="seconds running invocations get to finish on SIGTERM")
    control_timeout_s: float = Field(60.0, gt=0, description="seconds a control verb may take")
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)

    @model_validator(mode="after")
    def _worker_id_token(self) -> WorkerSettings:
        if self.worker_id is not None and not NAME_PATTERN.match(self.worker_id):
            raise ValueError(f"worker_id {self.worker_id!r} must be 1 to 64 characters from [A-Za-z0-9_-]")
        return self
