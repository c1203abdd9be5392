"""Settings of the scheduler service: one typed object, built in `scheduler.__main__` and passed down.

Environment variables use the prefix LORAFN_ and `__` between sections, e.g. LORAFN_NATS__URL,
LORAFN_DATABASE__URL, LORAFN_SCHEDULER__HEARTBEAT_TIMEOUT_S.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocol.settings import NatsSettings
from storage.settings import DatabaseSettings


class PlacementSettings(BaseModel):
    """Timing of the scheduler's decisions."""

    heartbeat_timeout_s: float = Field(5.0, gt=0, description="a worker silent this long is marked down")
    flush_every_s: float = Field(1.0, gt=0, description="seconds between batched writes of warm state and demand")
    reconcile_every_s: float = Field(2.0, gt=0, description="seconds between checks for queued work nobody pulls")
    unknown_adapter_grace_s: float = Field(
        10.0, ge=0, description="seconds invocations of an adapter that does not exist may stay queued before "
        "they fail with not_found (an adapter pushed meanwhile takes them)")
    control_timeout_s: float = Field(60.0, gt=0, description="seconds a worker may take to answer a control verb")
    placement_grace_s: float = Field(5.0, ge=0, description="a fresh placement counts as held until heartbeats show it")
    demand_bucket_s: int = Field(60, ge=1, description="width of a demand-history bucket in seconds")
    adapter_cache_s: float = Field(5.0, ge=0, description="seconds a tenant/adapter -> version lookup is reused")
    results_consumer: str = Field("scheduler-results", description="durable consumer of the results stream")

    @model_validator(mode="after")
    def _timeout_above_flush(self) -> PlacementSettings:
        if self.heartbeat_timeout_s <= self.flush_every_s:
            raise ValueError(
                f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must exceed flush_every_s ({self.flush_every_s})"
            )
        return self


class SchedulerSettings(BaseSettings):
    """Everything the scheduler process needs."""

    model_config = SettingsConfigDict(env_prefix="LORAFN_", env_nested_delimiter="__", extra="ignore")

    nats: NatsSettings = Field(default_factory=NatsSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    scheduler: PlacementSettings = Field(default_factory=PlacementSettings)
