"""Settings of the scheduler service: one typed object, built in `scheduler.__main__` and passed down.

Environment variables use the prefix LORAFN_ and `__` between sections, e.g. LORAFN_NATS__URL,
LORAFN_DATABASE__URL, LORAFN_SCHEDULER__HEARTBEAT_TIMEOUT_S, LORAFN_SCHEDULER__LEADER_TTL_S,
LORAFN_STAGING__PREDICTOR, LORAFN_METRICS__PORT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings

from protocol.settings import NatsCalloutSettings, NatsSettings, service_settings_config
from scheduler.metrics import MetricsSettings
from storage.settings import DatabaseSettings


class PlacementSettings(BaseModel):
    """Timing and limits of the scheduler's decisions (the core's `CoreConfig` and the dispatcher's loop)."""

    heartbeat_timeout_s: float = Field(5.0, gt=0, description="a worker silent this long is gone: its work is rescued")
    flush_every_s: float = Field(1.0, gt=0, description="seconds between batched writes of warm state")
    demand_flush_every_s: float = Field(10.0, ge=0, description="seconds between writes of the demand history")
    tick_s: float = Field(0.5, gt=0, description="seconds between the dispatcher's ticks (timeouts, work counts)")
    unknown_adapter_grace_s: float = Field(
        10.0, ge=0, description="seconds an invocation of an adapter that does not exist waits before it fails "
        "with not_found (an adapter pushed meanwhile takes it)")
    placement_grace_s: float = Field(
        5.0, ge=0, description="a version dispatched to a worker that did not hold it counts as held there until "
        "its heartbeats show it, or for this long after its last call there ended")
    queue_per_worker: int = Field(
        32, ge=0, description="calls dispatched to a worker beyond its max_inflight before the dispatcher holds "
        "further calls in the invocations stream")
    max_epochs: int = Field(5, ge=1, description="dispatches of one invocation (rescues from dead workers "
                                                 "included) before it fails as a dead letter")
    replicate_at: int = Field(8, ge=1, description="a holder with this many calls outstanding is busy: a call may "
                                                   "go to another worker that is replicate_margin calls lighter")
    replicate_margin: int = Field(4, ge=1, description="see replicate_at")
    host_margin: int = Field(8, ge=0, description="a worker with the adapter in its host cache takes a call unless "
                             "it has this many calls more than the least loaded worker (a cold start there)")
    dispatch_ack_wait_s: float = Field(
        10.0, gt=0, description="seconds before an invocation a dispatcher took and never acked (it died) goes "
        "to another dispatcher")
    dispatch_fetch_timeout_s: float = Field(1.0, gt=0, description="seconds one dispatcher pull request waits")
    control_timeout_s: float = Field(60.0, gt=0, description="seconds a worker may take to answer a staging verb")
    demand_bucket_s: int = Field(60, ge=1, description="width of a demand-history bucket in seconds")
    adapter_cache_s: float = Field(
        300.0, ge=0, description="seconds a tenant/adapter -> version lookup is reused (an AdapterEvent clears it at "
        "once, and a NATS reconnection clears them all)")
    results_consumer: str = Field("scheduler-results", description="durable consumer of the results stream")
    router: Literal["affinity", "rank_aware"] = Field(
        "affinity", description="affinity (device holders, a replica when busy, host holders, else the least loaded) "
        "or rank_aware (rank classes on their own workers, sized by operating points: scheduler.placement)")
    operating_points: Path | None = Field(
        None, description="operating points file of the rank_aware router (None: scheduler/operating_points.json, "
        "measured by python -m bench operating-points)")
    placement_interval_s: float = Field(30.0, gt=0, description="seconds between rank-aware placement plans (and "
                                                                "sooner when demand drifts by a quarter)")
    leader_ttl_s: float = Field(
        5.0, ge=0.5, description="leader election (scheduler.leader): a leader steps down when its lock was not "
        "confirmed for this long; the lock is checked every fifth of it, and the lock's connection is given up "
        "by both ends within about this long after the holder's host vanished")
    worker_prune_after_s: float = Field(86_400.0, gt=0, description="the leader deletes the Postgres rows of "
                                                                   "workers silent for this long")

    @model_validator(mode="after")
    def _timeout_above_flush(self) -> PlacementSettings:
        if self.heartbeat_timeout_s <= self.flush_every_s:
            raise ValueError(
                f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must exceed flush_every_s ({self.flush_every_s})"
            )
        return self


class StagingSettings(BaseModel):
    """Predictive pre-staging (`scheduler.core`, `scheduler.predict`, `scheduler.staging`): every `interval_s`
    the predictor scores each adapter version's chance of a call in the next interval and the stager fetches
    the likely ones to workers' host caches, loads the very likely ones to their devices and releases what
    fell out of use. `predictor: none` turns it off (purely reactive placement, LRU keep-alive)."""

    predictor: str = Field(
        "fallback", description="none, last_value, ewma, histogram, lstm, or fallback (lstm, then histogram, then "
        "ewma, by each one's precision)")
    interval_s: float = Field(60.0, gt=0, description="the prediction interval in seconds (the histogram's bin width; "
                                                      "a time-compressed replay shortens it)")
    device_at: float = Field(0.5, ge=0, le=1, description="load to a device at this probability of a call")
    host_at: float = Field(0.1, ge=0, le=1, description="fetch to a host cache at this probability of a call")
    keep_alive_s: float = Field(1800.0, ge=0, description="an adapter unused this long and unlikely to be called "
                                                         "is released from a device to its host cache")
    service_s: float = Field(2.0, gt=0, description="expected seconds of one call (the workers-needed signal)")


POSTGRES_NAME = "lorafn-scheduler"  # the application_name of a scheduler's Postgres connections


class SchedulerSettings(BaseSettings):
    """Everything the scheduler process needs."""

    model_config = service_settings_config()

    nats: NatsSettings = Field(default_factory=NatsSettings)
    nats_callout: NatsCalloutSettings = Field(default_factory=NatsCalloutSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    scheduler: PlacementSettings = Field(default_factory=PlacementSettings)
    staging: StagingSettings = Field(default_factory=StagingSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)

    def postgres_connections(self) -> int:
        """The most Postgres connections one scheduler process holds: its engine's pool (scheduler.service)
        and the leader lock's own connection (scheduler.leader)."""
        return self.database.pool_size + 1
