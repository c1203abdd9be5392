"""The gateway's settings: one typed object, built in main (`python -m gateway`) and passed down.

Environment variables use the prefix LORAFN_ and `__` between sections, e.g. LORAFN_GATEWAY__PORT,
LORAFN_GATEWAY__MAX_QUEUE_PER_ADAPTER, LORAFN_NATS__URL, LORAFN_DATABASE__URL. Nothing below main reads
the environment: tests build a GatewaySettings directly.
"""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings

from protocol import subjects
from protocol.settings import NatsSettings, service_settings_config
from scheduler.metrics import MetricsSettings
from storage.settings import DatabaseSettings, ObjectStoreSettings, RegistrySettings


class HttpSettings(BaseModel):
    """Where the gateway listens and what it accepts."""

    host: str = Field("127.0.0.1", description="address uvicorn binds to")
    port: int = Field(8000, ge=0, le=65535, description="port uvicorn binds to (0: any free port)")
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="largest request body of an invocation or any JSON call, in bytes"
    )
    max_prompt_chars: int = Field(
        262_144,
        ge=1,
        description="prompts (all chat contents together) longer than this are refused with 400 before any "
        "publish; shorter ones that still exceed the context window fail on the worker (prompt_too_long -> 400)",
    )


class LimitSettings(BaseModel):
    """Admission control: when to answer 429 and how long callers should wait."""

    max_queue_per_adapter: int = Field(
        1000, ge=0, description="pending invocations of one adapter in the invocations stream before 429"
    )
    max_inflight: int = Field(1000, ge=0, description="invocations this gateway process handles at once before 429")
    queue_check_interval_s: float = Field(
        0.25, ge=0.0, description="how often the per-adapter queue depths are read from the stream (one read for "
        "all adapters; calls meanwhile use the last read plus this gateway's publishes)"
    )
    queue_depth_max_age_s: float = Field(
        5.0, gt=0.0, description="queue depths older than this are not used: a call waits for a fresh read, 503 "
        "if NATS cannot answer"
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After of a 429")
    unavailable_retry_after_s: int = Field(5, ge=1, description="Retry-After of a 503")
    sync_timeout_s: float = Field(300.0, gt=0.0, description="a synchronous call waits this long for its result (504)")
    publish_timeout_s: float = Field(5.0, gt=0.0, description="wait for the JetStream ack of a publish this long")
    max_tokens: int = Field(
        4096, ge=1, description="largest max_tokens (max_completion_tokens) a call may ask for, refused with 400 "
        "above it; the model's context window bounds it too")

    @model_validator(mode="after")
    def _depth_age(self) -> LimitSettings:
        if self.queue_depth_max_age_s < self.queue_check_interval_s:
            raise ValueError(f"queue_depth_max_age_s ({self.queue_depth_max_age_s}) must be at least "
                             f"queue_check_interval_s ({self.queue_check_interval_s})")
        return self


class QuotaSettings(BaseModel):
    """Per-tenant quotas and throttles (LORAFN_GATEWAY__QUOTAS__...): every tenant's defaults; a tenant's
    `quota_*` columns in Postgres (`lorafn tenants quota`) override them. Requests, tokens and concurrency are
    counted by each gateway process on its own; stored adapters and bytes in Postgres (docs/ARCHITECTURE.md,
    "Quotas and keys"). None: no limit."""

    requests_per_s: float | None = Field(1000.0, gt=0.0, description="authenticated API requests per second per "
                                         "tenant (a token bucket), 429 above it")
    burst: int | None = Field(None, ge=1, description="requests a tenant may make at once on top of the rate "
                              "(the bucket's size; None: one second's worth, at least 1)")
    tokens_per_min: int | None = Field(1_000_000, ge=1, description="generated tokens per tenant in any 60 s "
                                       "(counted from results); new invocations get 429 while at or above it")
    concurrent: int | None = Field(500, ge=1, description="invocations of one tenant queued or running at once")
    adapters: int | None = Field(1000, ge=1, description="adapters one tenant may store (403 at push above it)")
    stored_bytes: int | None = Field(50 << 30, ge=1, description="bytes of adapter versions one tenant may store "
                                     "(403 at push above it)")
    api_keys: int = Field(100, ge=1, description="active API keys per tenant (403 on creating one more)")
    pending_ttl_s: float = Field(900.0, gt=0.0, description="an invocation whose result this gateway never saw "
                                 "stops counting as in flight (and for tokens) this long after it was accepted")
    auth_failures: int = Field(20, ge=1, description="failed authentications one client address may make per "
                               "window; further attempts get 429 without a database lookup")
    auth_failure_window_s: float = Field(60.0, gt=0.0, description="the failed-authentication window, seconds")
    max_tracked: int = Field(100_000, ge=1, description="tenants, client addresses and pending invocations each "
                             "tracked at once (bounded memory: the oldest are dropped beyond it)")


class CacheSettings(BaseModel):
    """Short-lived caches that keep the database off the invocation hot path."""

    auth_ttl_s: float = Field(5.0, ge=0.0, description="seconds an API key lookup is reused (per key hash)")
    adapter_ttl_s: float = Field(
        300.0, ge=0.0, description="seconds an adapter lookup is reused (an AdapterEvent, from the API or the CLI, "
        "clears it at once, and a NATS reconnection clears them all)")
    max_entries: int = Field(100_000, ge=1, description="entries per cache before it is cleared")


class CallbackSettings(BaseModel):
    """Delivery of results to X-Callback-Url."""

    max_url_length: int = Field(2048, ge=16, description="longest accepted callback URL")
    max_attempts: int = Field(5, ge=1, le=100, description="deliveries of one callback before it is given up")
    backoff_initial_s: float = Field(0.5, gt=0.0, description="delay before the first retry")
    backoff_max_s: float = Field(60.0, gt=0.0, description="longest delay between retries")
    timeout_s: float = Field(10.0, gt=0.0, description="HTTP timeout of one delivery")
    consumer: str = Field(subjects.CALLBACKS_CONSUMER, description="durable consumer of the callback copies of results (lora.callback.>)")
    bucket: str = Field(
        subjects.CALLBACKS_BUCKET, description="JetStream key-value bucket mapping invocation id -> callback URL"
    )
    bucket_ttl_s: float = Field(24 * 3600.0, gt=0.0, description="how long a callback URL is kept (as the results)")
    allow_http: bool = Field(False, description="accept http:// callback URLs too (https only by default)")
    allow_networks: tuple[str, ...] = Field(
        (), description="addresses or CIDRs callbacks may reach although they are loopback, private, link-local "
        "etc. (refused by default: gateway/callbacks.py); in the environment a JSON list: '[\"10.20.0.0/16\"]'")
    allow_hosts: tuple[str, ...] = Field(
        (), description="host names (exact, or *.suffix) whose addresses callbacks may reach whatever they are")
    resolve_timeout_s: float = Field(2.0, gt=0.0, description="longest wait for the DNS answer of a callback host")

    @field_validator("allow_networks")
    @classmethod
    def _networks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as e:
                raise ValueError(f"allow_networks entry {net!r} is not an address or CIDR: {e}") from e
        return v

    @model_validator(mode="after")
    def _backoff_order(self) -> CallbackSettings:
        if self.backoff_initial_s > self.backoff_max_s:
            raise ValueError(
                f"backoff_initial_s ({self.backoff_initial_s}) exceeds backoff_max_s ({self.backoff_max_s})"
            )
        return self


class GatewayOptions(BaseModel):
    """The gateway's own section (LORAFN_GATEWAY__...)."""

    http: HttpSettings = Field(default_factory=HttpSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    quotas: QuotaSettings = Field(default_factory=QuotaSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    callbacks: CallbackSettings = Field(default_factory=CallbackSettings)
    base_model_aliases: tuple[str, ...] = Field(
        ("base",), description="model names besides the backbone's own that mean 'no adapter'"
    )
    nats_reconnect_wait_s: float = Field(1.0, gt=0.0, description="seconds between NATS (re)connection attempts")
    scheduler_timeout_s: float = Field(
        5.0, gt=0.0, description="/readyz is not ready when no scheduler heartbeat arrived for this long "
        "(without a scheduler nothing is dispatched)")
    startup_nats_wait_s: float = Field(
        5.0, ge=0.0, description="how long startup waits for NATS before serving anyway (503 until connected)"
    )


POSTGRES_NAME = "lorafn-gateway"  # the application_name of a gateway's Postgres connections


class GatewaySettings(BaseSettings):
    """Everything `python -m gateway` needs."""

    model_config = service_settings_config()

    gateway: GatewayOptions = Field(default_factory=GatewayOptions)
    # GET /metrics on a listener of its own (loopback by default): the metrics name every tenant's adapters.
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    nats: NatsSettings = Field(default_factory=NatsSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    object_store: ObjectStoreSettings = Field(default_factory=ObjectStoreSettings)
    # Adapter uploads are read under these limits: per concurrent upload the gateway's peak RSS grows by at most
    # 16 MiB while it is read (a refused bomb never costs more), then at most 5x the weights of a valid one.
    registry: RegistrySettings = Field(default_factory=RegistrySettings)

    def postgres_connections(self) -> int:
        """The most Postgres connections one gateway process holds: the pools of its registry engine and of its
        invocation rows' engine (gateway.app), `pool_size` each."""
        return 2 * self.database.pool_size
