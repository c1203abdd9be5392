"""Prometheus metrics of one gateway app, in a registry of its own (no module-level state)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from protocol.messages import InvocationResult

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass
class GatewayMetrics:
    """The gateway's metrics; served on a listener of their own (`scheduler.metrics.serve_metrics`, loopback
    by default), never on the API port: their labels name every tenant's adapters. `render` gives the page."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.invocations = Counter(
            "lorafn_invocations", "invocations by adapter and outcome", ["adapter", "status"], registry=r
        )
        self.rejections = Counter(
            "lorafn_rejections", "requests refused before publishing, by reason", ["reason"], registry=r
        )
        self.ttft = Histogram(
            "lorafn_time_to_first_token_seconds", "submission -> first token seen by the gateway", ["adapter"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.latency = Histogram(
            "lorafn_invocation_latency_seconds", "end-to-end latency of synchronous invocations", ["adapter"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_time = Histogram(
            "lorafn_queue_time_seconds", "submission -> a worker started it (worker's timings)", ["adapter"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.cold_starts = Counter(
            "lorafn_cold_starts", "invocations whose adapter was not on the device on arrival, by tier", ["tier"],
            registry=r,
        )
        self.inflight = Gauge("lorafn_gateway_inflight", "invocations this gateway is handling now", registry=r)
        self.callbacks = Counter("lorafn_callbacks", "callback deliveries by outcome", ["outcome"], registry=r)

    def observe_result(self, adapter: str, result: InvocationResult) -> None:
        """Count a finished invocation, its queue time and where its adapter was."""
        self.invocations.labels(adapter, result.status).inc()
        if result.timings.queued_ms is not None:
            self.queue_time.labels(adapter).observe(result.timings.queued_ms / 1000.0)
        if result.adapter_tier in ("host", "object"):
            self.cold_starts.labels(result.adapter_tier).inc()

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
