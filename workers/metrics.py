"""Prometheus metrics of one worker, in a registry of its own (served by `scheduler.metrics.serve_metrics`).

Names follow vLLM's where vLLM has the metric, so that dashboards built for vLLM read a worker as they read a
vLLM server (without vLLM's model_name label: a worker holds one backbone and the scrape target names it):
- `vllm:num_requests_running`, `vllm:num_requests_waiting`: the engine's batch and what waits for it;
- `vllm:time_to_first_token_seconds`, `vllm:e2e_request_latency_seconds`: from the invocation's submission
  (as the caller sees it: the queue and any adapter load included);
- `vllm:prompt_tokens_total`, `vllm:generation_tokens_total`, `vllm:request_success_total{finished_reason}`.
The rest are lorafn's own:
- `lorafn_resident_adapters{tier}`: adapter versions on the device and in the host cache;
- `lorafn_adapter_loads_total{source_tier}` and `lorafn_adapter_load_seconds{source_tier}`: loads onto the
  device by the tier each started from (host or object);
- `lorafn_adapter_evictions_total`: versions that left the device;
- `lorafn_adapter_pool_pages`, `lorafn_adapter_pool_free_pages`: the device pool;
- `lorafn_worker_invocations_total{status}`: invocations that ended here: succeeded, failed, cancelled (a
  result was recorded), rescued (the dispatcher gave it to another worker), handed_back (this worker stopped).
- `lorafn_batch_contention_total{decision}`: the batcher's contention decisions (`workers.batcher.BatcherStats`):
  passed_over (a waiting request passed by one behind it, per step), wall (admission stopped at a request passed
  over too often), adapter_skip (a running request left out of a step for an adapter limit), byte_cap (a step the
  adapter-bytes cap bound).

Gauges come from the heartbeat the worker publishes anyway (`observe_heartbeat`); per-invocation metrics are
a few observations when an invocation ends, none per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from protocol.messages import Heartbeat, InvocationResult, Tier
from workers.batcher import BatcherStats

# vLLM's buckets for both request latencies (seconds).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)
# Adapter loads: a host-cache load of a small adapter takes milliseconds, a cold fetch of a large one seconds.
_LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

Ending = Literal["succeeded", "failed", "cancelled", "rescued", "handed_back"]


@dataclass
class WorkerMetrics:
    """The worker's metrics; `render` is the body of GET /metrics."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.running = Gauge("vllm:num_requests_running", "invocations in the engine's running batch", registry=r)
        self.waiting = Gauge(
            "vllm:num_requests_waiting", "invocations waiting for the engine (its queue and submissions in progress)",
            registry=r,
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "submission -> first generated token", buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "submission -> result, for invocations that generated",
            buckets=_E2E_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter("vllm:prompt_tokens", "prompt tokens of generated invocations", registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "tokens generated", registry=r)
        self.success = Counter(
            "vllm:request_success", "invocations that generated, by finish reason", ["finished_reason"], registry=r,
        )
        self.invocations = Counter(
            "lorafn_worker_invocations", "invocations that ended on this worker, by status", ["status"], registry=r,
        )
        self.resident = Gauge("lorafn_resident_adapters", "adapter versions on this worker by tier", ["tier"],
                              registry=r)
        self.loads = Counter(
            "lorafn_adapter_loads", "adapter loads onto the device by the tier they started from", ["source_tier"],
            registry=r,
        )
        self.load_seconds = Histogram(
            "lorafn_adapter_load_seconds", "duration of adapter loads onto the device by the tier they started from",
            ["source_tier"], buckets=_LOAD_BUCKETS, registry=r,
        )
        self.evictions = Counter("lorafn_adapter_evictions", "adapter versions that left the device", registry=r)
        self.pool_pages = Gauge("lorafn_adapter_pool_pages", "pages of the device adapter pool", registry=r)
        self.free_pages = Gauge("lorafn_adapter_pool_free_pages", "pages of the device adapter pool no adapter holds",
                                registry=r)
        # Children bound once: an invocation's end costs no label lookup.
        self._endings = {s: self.invocations.labels(s) for s in ("succeeded", "failed", "cancelled", "rescued",
                                                                   "handed_back")}
        self._resident = {t: self.resident.labels(t.value) for t in (Tier.device, Tier.host)}
        self._evictions_seen = 0
        self.contention = Counter("lorafn_batch_contention", "the batcher's contention decisions", ["decision"],
                                  registry=r)
        self._contention_seen: dict[str, int] = {}

    def observe_heartbeat(self, hb: Heartbeat) -> None:
        """Refresh the gauges from the heartbeat just published, and count the evictions it reports."""
        self.running.set(hb.running)
        self.waiting.set(hb.queue_depth)
        per_tier = dict.fromkeys(self._resident, 0)
        for r in hb.resident:
            if r.tier in per_tier:
                per_tier[Tier(r.tier)] += 1
        for tier, n in per_tier.items():
            self._resident[tier].set(n)
        self.free_pages.set(hb.free_pages)
        self.pool_pages.set(int(hb.capacity.get("pool_pages", 0)))
        evicted = int(hb.capacity.get("transitions", {}).get("evict", {}).get("count", 0))
        if evicted > self._evictions_seen:
            self.evictions.inc(evicted - self._evictions_seen)
        self._evictions_seen = evicted

    def observe_batcher(self, stats: BatcherStats) -> None:
        """Count the batcher's contention decisions since the last call (its counters only grow)."""
        for decision, total in (("passed_over", stats.passed_over), ("wall", stats.walls),
                                ("adapter_skip", stats.adapter_skips), ("byte_cap", stats.byte_cap_steps)):
            new = total - self._contention_seen.get(decision, 0)
            if new > 0:
                self.contention.labels(decision).inc(new)
            self._contention_seen[decision] = total

    def observe_load(self, source: Tier, ms: float) -> None:
        """One adapter load onto the device, from `source` (host or object), that took `ms`."""
        self.loads.labels(source.value).inc()
        self.load_seconds.labels(source.value).observe(ms / 1000.0)

    def observe_result(self, result: InvocationResult) -> None:
        """An invocation whose result this worker recorded."""
        self._endings[result.status].inc()
        if result.status != "succeeded":
            return
        t = result.timings
        if t.first_token_ms is not None:
            self.ttft.observe(t.first_token_ms / 1000.0)
        if t.total_ms is not None:
            self.e2e.observe(t.total_ms / 1000.0)
        self.prompt_tokens.inc(result.usage.prompt_tokens)
        self.generation_tokens.inc(result.usage.completion_tokens)
        self.success.labels(result.finish_reason or "stop").inc()

    def observe_ending(self, status: Ending) -> None:
        """An invocation that left this worker without a result of its own (rescued, handed back)."""
        self._endings[status].inc()

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
