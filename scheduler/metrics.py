"""Prometheus metrics of one scheduler, in a registry of its own, and the endpoint that serves a registry.

The endpoint (`serve_metrics`) is shared with the workers: each process serves its own registry on its own
port (`MetricsSettings`, LORAFN_METRICS__*), in prometheus_client's HTTP server thread. That thread only reads
metric values (prometheus_client guards them with locks); the service's own state is read on its event loop,
when the dispatcher ticks, and copied into gauges. So a scrape never touches the scheduler core, and the
dispatcher's per-invocation path does nothing for metrics beyond the core's own `decisions[reason] += 1`.

Metrics (see docs/ARCHITECTURE.md, "Metrics"):
- `lorafn_dispatch_decisions_total{reason}`: the core's decisions: route reasons (device, replicate, host,
  cold, base, pinned, or a policy's own word), defer, fail_*, outstanding_forgotten (calls the work stream
  showed finished whose result never reached this scheduler) (copied from `SchedulerCore.decisions` each tick);
- `lorafn_scheduler_worker_events_total{event}`: workers that came up / were declared gone;
- `lorafn_worker_queue{worker}`: calls dispatched to each live worker and not finished (the core's count);
- `lorafn_live_workers`: workers the core counts as alive;
- `lorafn_pending_invocations{adapter}`: invocations waiting in the invocations stream, per "tenant/adapter",
  for the `top_adapters` adapters with the most; the rest are summed under adapter="other";
- `lorafn_rescues_total`, `lorafn_rescued_invocations_total`: gone workers whose work was dispatched again, and
  how many invocations that moved;
- pre-staging (from the core's `IntervalRecord`s, each closed interval counted once):
  `lorafn_workers_needed` (the scale-to-zero signal: workers the predicted load needs, for an autoscaler),
  `lorafn_staging_predictor{predictor}` (1 for the predictor answering now, 0 for the others seen),
  `lorafn_staging_predictor_switches_total{from,to}` (health fallbacks and returns),
  `lorafn_staging_precision` / `lorafn_staging_recall` / `lorafn_staging_device_hit_ratio` (the last interval
  that had predictions / calls), `lorafn_staging_commands_total{kind}` (fetch, load, evict),
  `lorafn_staging_loaded_bytes_total` and `lorafn_staging_unused_loaded_bytes_total` (loaded for an interval in
  which the version was not called); these count what this replica's core called for, issued only by the leader;
- leadership (`scheduler.leader`): `lorafn_scheduler_leader` (1 on the leader, 0 on the others) and
  `lorafn_scheduler_dropped_commands_total{kind}` (commands a follower's core called for and left to the leader).

Beside /metrics a process may serve JSON routes (`serve_metrics(json_routes=...)`): the scheduler's `GET /scale`
is what an autoscaler reads (`scale_signal`; KEDA's metrics-api scaler, docs/kubernetes.md): `calls`, the calls
the workers hold (queued or running, as the work stream counts them) plus the invocations waiting for a worker,
and `workers_needed`, the forecast's figure. 503 until the first tick has measured them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, make_wsgi_app
from prometheus_client.exposition import CONTENT_TYPE_LATEST, ThreadingWSGIServer
from pydantic import BaseModel, Field

from protocol import subjects
from scheduler.core import IntervalRecord
from scheduler.policy import WorkerView

logger = logging.getLogger(__name__)

# Label of the pending-invocations series that sums every adapter outside the top N. No adapter can take
# it: adapter labels are "tenant/adapter".
OTHER_ADAPTERS = "other"
# Decisions of the core that are about workers, not about a call: counted apart from dispatch decisions.
_WORKER_EVENTS = {"worker_up": "up", "worker_gone": "gone"}


class MetricsSettings(BaseModel):
    """The Prometheus endpoint of a scheduler or worker process (GET /metrics, text format)."""

    enabled: bool = Field(True, description="serve the metrics endpoint (false: no port is opened)")
    host: str = Field("127.0.0.1", description="address the endpoint binds (0.0.0.0 to be scraped from elsewhere)")
    port: int = Field(0, ge=0, le=65535, description="TCP port of the endpoint (0: a free port, logged at start)")


class MetricsUnavailable(Exception):
    """The metrics endpoint cannot listen where its settings say."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(f"cannot serve metrics on {host}:{port} ({reason}); set LORAFN_METRICS__PORT to a free "
                         f"port, 0 for any free one, or LORAFN_METRICS__ENABLED=false")
        self.host = host
        self.port = port


@dataclass(frozen=True)
class MetricsEndpoint:
    """Where a process serves its metrics (the port actually bound, also when the settings said 0)."""

    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"


JsonRoute = Callable[[], Mapping[str, Any] | None]  # a JSON body, or None: not measured yet (503)
SCALE_PATH = "/scale"  # the scheduler's autoscaling signal (`scale_signal`)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not worth a log line


def endpoint_app(registry: CollectorRegistry, json_routes: Mapping[str, JsonRoute]) -> Callable[..., Any]:
    """The WSGI app of a metrics endpoint: `json_routes` by path, the registry's text format on every other."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        route = json_routes.get(environ.get("PATH_INFO", ""))
        if route is None:
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        body = route()
        status = "200 OK" if body is not None else "503 Service Unavailable"
        data = json.dumps(body if body is not None else {"error": "not measured yet"}).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                                ("Cache-Control", "no-store")])
        return [data]

    return app


def _start_server(host: str, port: int, app: Callable[..., Any]) -> tuple[ThreadingWSGIServer, threading.Thread]:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

    class Server(ThreadingWSGIServer):
        address_family = family

    server = make_server(host, port, app, Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-endpoint", daemon=True)
    thread.start()
    return server, thread


@contextlib.asynccontextmanager
async def serve_metrics(registry: CollectorRegistry, settings: MetricsSettings, *, what: str,
                        json_routes: Mapping[str, JsonRoute] | None = None) -> AsyncIterator[MetricsEndpoint | None]:
    """Serve `registry` over HTTP (and `json_routes`, path -> the body's source, called on the server's
    threads: it must only read a value the service replaces whole) while the context is open (None: disabled).
    `what` names the process in the log line that gives the URL, which is the only way to learn a port picked
    by port=0."""
    if not settings.enabled:
        yield None
        return
    try:
        server, thread = _start_server(settings.host, settings.port, endpoint_app(registry, json_routes or {}))
    except OSError as e:
        raise MetricsUnavailable(settings.host, settings.port, e.strerror or str(e)) from e
    endpoint = MetricsEndpoint(settings.host, int(server.server_port))
    logger.info("%s metrics on %s", what, endpoint.url)
    try:
        yield endpoint
    finally:
        # shutdown() waits for the server's poll loop (up to half a second): not on the event loop.
        await asyncio.to_thread(server.shutdown)
        server.server_close()
        await asyncio.to_thread(thread.join, 5.0)


def scale_signal(workers: Iterable[WorkerView], waiting: int, workers_needed: int) -> dict[str, int]:
    """GET /scale's body: `calls` = `held` (calls the live workers hold, queued or running) + `waiting`
    (invocations in the invocations stream, not yet handed to a worker); `workers` live and not draining;
    `workers_needed` (the forecast's). Every scheduler replica reads the same streams, so any answers alike."""
    views = list(workers)
    held = sum(v.outstanding for v in views)
    return {"calls": held + waiting, "held": held, "waiting": waiting,
            "workers": sum(1 for v in views if not v.draining), "workers_needed": workers_needed}


def pending_by_adapter(counts: Mapping[str, int], top: int) -> dict[str, int]:
    """Invocations waiting per adapter label from the invocations stream's per-subject counts
    (`lora.invoke.<tenant>.<adapter>` -> n): the `top` adapters with the most as "tenant/adapter", the others
    summed under `OTHER_ADAPTERS` (always present, so the series sum to the stream's total). Ties go to the
    name that sorts first, so the label set does not flicker between equal adapters."""
    prefix = len(subjects.INVOKE_PREFIX) + 1
    ranked = sorted(((n, s) for s, n in counts.items() if n > 0), key=lambda x: (-x[0], x[1]))
    out = {s[prefix:].replace(".", "/", 1): n for n, s in ranked[:top]}
    out[OTHER_ADAPTERS] = sum(n for n, _ in ranked[top:])
    return out


@dataclass
class SchedulerMetrics:
    """The scheduler's metrics. Gauges and the decision counter are refreshed by the dispatcher's tick from
    plain values (`observe_*`); `render` is the body of GET /metrics. `top_adapters` bounds the adapter
    labels of the pending-invocations gauge (the rest go to "other")."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    top_adapters: int = 20

    def __post_init__(self) -> None:
        if self.top_adapters < 0:
            raise ValueError(f"top_adapters ({self.top_adapters}) must be at least 0")
        r = self.registry
        self.decisions = Counter(
            "lorafn_dispatch_decisions", "dispatch decisions of the scheduler core by reason (route reasons, "
            "defer, fail_*)", ["reason"], registry=r,
        )
        self.worker_events = Counter(
            "lorafn_scheduler_worker_events", "workers that came up or were declared gone", ["event"], registry=r,
        )
        self.queue = Gauge(
            "lorafn_worker_queue", "calls dispatched to a live worker and not finished (the core's count)",
            ["worker"], registry=r,
        )
        self.live_workers = Gauge("lorafn_live_workers", "workers the scheduler counts as alive", registry=r)
        self.pending = Gauge(
            "lorafn_pending_invocations", "invocations waiting in the invocations stream per tenant/adapter "
            f"(the {self.top_adapters} with the most; the others summed as adapter=\"{OTHER_ADAPTERS}\")",
            ["adapter"], registry=r,
        )
        self.rescues = Counter("lorafn_rescues", "gone workers whose work was dispatched again", registry=r)
        self.rescued = Counter(
            "lorafn_rescued_invocations", "invocations a rescue took from a gone worker and dispatched again",
            registry=r,
        )
        self.workers_needed = Gauge(
            "lorafn_workers_needed", "workers the predicted load of the next interval needs (0: scale to zero)",
            registry=r,
        )
        self.predictor = Gauge("lorafn_staging_predictor", "1 for the demand predictor answering now",
                               ["predictor"], registry=r)
        self.switches = Counter("lorafn_staging_predictor_switches", "predictor fallbacks and returns",
                                ["from", "to"], registry=r)
        self.precision = Gauge("lorafn_staging_precision", "share of the versions predicted for the last interval "
                               "with predictions that were called in it", registry=r)
        self.recall = Gauge("lorafn_staging_recall", "share of the versions called in the last interval with calls "
                            "that were predicted", registry=r)
        self.device_hits = Gauge("lorafn_staging_device_hit_ratio", "share of the last interval's calls that found "
                                 "their adapter on a device", registry=r)
        self.stage_commands = Counter("lorafn_staging_commands", "staging commands issued", ["kind"], registry=r)
        self.loaded_bytes = Counter("lorafn_staging_loaded_bytes", "adapter bytes loaded ahead of calls", registry=r)
        self.unused_bytes = Counter("lorafn_staging_unused_loaded_bytes", "adapter bytes loaded for an interval in "
                                    "which the version was not called", registry=r)
        self.leader = Gauge("lorafn_scheduler_leader", "1 while this scheduler replica is the leader "
                            "(scheduler.leader), else 0", registry=r)
        self.dropped = Counter("lorafn_scheduler_dropped_commands", "commands this replica's core called for while "
                               "it did not lead (fetch, load, evict: dropped; rescue: kept until it leads)",
                               ["kind"], registry=r)
        self._predictors: set[str] = set()
        self._decisions_seen: dict[str, int] = {}
        self._workers: set[str] = set()
        self._adapters: set[str] = set()
        self.scale: dict[str, int] | None = None  # GET /scale's body, replaced whole each tick

    def observe_decisions(self, decisions: Mapping[str, int]) -> None:
        """Add what the core's decision counts gained since the last call. A count below the one seen
        (a new core) starts again from zero."""
        for reason, n in decisions.items():
            seen = self._decisions_seen.get(reason, 0)
            delta = n - seen if n >= seen else n
            if delta <= 0:
                continue
            self._decisions_seen[reason] = n
            event = _WORKER_EVENTS.get(reason)
            if event is not None:
                self.worker_events.labels(event).inc(delta)
            else:
                self.decisions.labels(reason).inc(delta)

    def observe_workers(self, views: Iterable[WorkerView]) -> None:
        """The live workers and their outstanding calls; series of workers no longer alive are removed."""
        live = set()
        for v in views:
            live.add(v.worker_id)
            self.queue.labels(v.worker_id).set(v.outstanding)
        for worker_id in self._workers - live:
            self.queue.remove(worker_id)
        self._workers = live
        self.live_workers.set(len(live))

    def observe_scale(self, workers: Iterable[WorkerView], waiting: int, workers_needed: int) -> None:
        """Measure GET /scale's body (replaced whole: the endpoint's threads read it)."""
        self.scale = scale_signal(workers, waiting, workers_needed)

    def scale_body(self) -> dict[str, int] | None:
        """GET /scale's body (None until measured)."""
        return self.scale

    def observe_pending(self, counts: Mapping[str, int]) -> None:
        """The invocations stream's per-subject counts (subject -> messages); see `pending_by_adapter`."""
        pending = pending_by_adapter(counts, self.top_adapters)
        for adapter, n in pending.items():
            self.pending.labels(adapter).set(n)
        for adapter in self._adapters - pending.keys():
            self.pending.remove(adapter)
        self._adapters = set(pending)

    def observe_rescue(self, invocations: int) -> None:
        """A gone worker's work was dispatched again (`invocations` of them)."""
        self.rescues.inc()
        self.rescued.inc(invocations)

    def observe_staging(self, records: Iterable[IntervalRecord], *, active: str, workers_needed: int,
                        switches: Iterable[tuple[str, str]] = ()) -> None:
        """Intervals closed since the last call, the predictor answering now, the latest workers-needed figure,
        and the predictor switches since the last call as (from, to)."""
        for rec in records:
            for kind, n in (("fetch", rec.fetches), ("load", rec.loads), ("evict", rec.evictions)):
                if n:
                    self.stage_commands.labels(kind).inc(n)
            self.loaded_bytes.inc(rec.loaded_bytes)
            self.unused_bytes.inc(rec.unused_loaded_bytes)
            if rec.precision is not None:
                self.precision.set(rec.precision)
            if rec.recall is not None:
                self.recall.set(rec.recall)
            if rec.device_hit_share is not None:
                self.device_hits.set(rec.device_hit_share)
        for old, new in switches:
            self.switches.labels(old, new).inc()
        self._predictors.add(active)
        for name in self._predictors:
            self.predictor.labels(name).set(1.0 if name == active else 0.0)
        self.workers_needed.set(workers_needed)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
