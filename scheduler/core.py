"""The scheduler core: events in, commands out, time inside the events.

`SchedulerCore` decides where every invocation runs and which workers count as alive. It does no I/O and
reads no clock: the live dispatcher (`scheduler.dispatcher`) and the simulator (`bench.simulate`) feed it
the same events and carry out the same commands, so a policy judged on a trace is the policy that runs.

Events (each carries `at`, seconds on the driver's clock: unix time live, trace time in the simulator):
- `InvocationArrived`: a call to route (its adapter's version, rank and bytes, or unknown);
- `WorkerReport`: a heartbeat (capacity, residency per tier with rank/bytes/in-use, running);
- `WorkQueues`: how many dispatched calls each worker's work subject holds (read from the stream, so a
  restarted dispatcher rebuilds the load of every worker, and rescues the work of a worker it never heard
  from: one that died while no scheduler ran);
- `LoadFinished`: a worker finished (or failed) bringing a version to its device;
- `InvocationFinished`: a call's result was recorded;
- `WorkerGone`: a worker said goodbye or the driver knows it died;
- `Tick`: time passed (workers silent for `heartbeat_timeout_s` are declared gone);
- `Predicted`: the answer to a `Predict` (below).

Commands:
- `Dispatch(invocation, worker, reason)`: hand the call to that worker;
- `Defer(invocation, retry_at, reason)`: no worker can take it now; offer it again at `retry_at`;
- `Fail(invocation, code, message)`: the call can never run (unknown adapter after the grace period,
  a rank no worker can hold, dispatched too many times);
- `Rescue(worker)`: the worker is gone; its unfinished calls go back to be dispatched again;
- `Fetch` / `Load` / `Evict`: staging verbs, from the staging policy (below);
- `Predict(start, observed, keys)`: feed the demand predictor the counts of the intervals that closed, then score
  `keys` for the interval starting at `start`, and answer with `Predicted`.

Pre-staging (optional: a `Stager` injected; the `Predictor` belongs to the driver). Time is cut into intervals
of `staging_interval_s` (aligned to multiples of it on the driver's clock). The core counts each version's calls
(first dispatches) per interval; when an event's time passes an interval's end it closes every interval that
ended (empty ones too) and asks for a prediction (`Predict`, returned before the event's own commands) of the
probability of a call in the next interval for every version the core knows (seen in a call, or resident on a
worker). The driver carries it out with `predict` (below) and feeds the answer back as `Predicted`: the
simulator at once, the live dispatcher from a thread of its own, so that a forecast over thousands of adapters
(an LSTM's forward: ~0.5 s for 10,000) never holds up dispatch; calls keep being routed meanwhile. On
`Predicted` for the interval still open, the stager turns the scores, the adapters' specs and the workers'
budgets and residency (`StageView`) into Fetch / Load / Evict commands (an answer for an interval that has
closed since is dropped: decision `prediction_stale`). A staged load counts as a placement in flight (calls are
routed to it); an eviction takes the version off that worker's device (or both tiers) in the core's view at
once. Each closed interval leaves an `IntervalRecord` in `intervals`: the predictor that answered, precision and
recall of the versions it called likely (score >= `staging_cutoff`) against those called, what was staged, the
bytes loaded for it and not used, the share of its calls that found their adapter on the device, and
`workers_needed` (the scale-to-zero signal: `scheduler.staging.workers_needed` over the predicted load).

State (all rebuildable: from heartbeats, the work stream's per-subject counts, and the events of calls in
flight): the live workers and their latest report; residency per version, with placements in flight (a
version dispatched to a worker that did not hold it counts as on that worker's device until a heartbeat
shows it there, or until no call of it is outstanding there and `placement_grace_s` has passed); the calls
each worker has outstanding.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from protocol.messages import ErrorCode, Tier
from scheduler.placement import Demand, PlacementPlan, PlaceWorker, Replanning
from scheduler.policy import AdapterSpec, AffinityRouter, CallView, Residency, Route, Router, WorkerView
from scheduler.staging import HeldView, Stager, StageView, workers_needed

if TYPE_CHECKING:
    from scheduler.predict import Predictor

# -- events --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InvocationArrived:
    """A call to route. `adapter` None with `unknown` False: the bare backbone; with `unknown` True: the
    adapter (`name`, "tenant/adapter") does not exist (yet). `published_at`: when it was first accepted
    (stream time), for the unknown-adapter grace. `epoch`: 1 for a first dispatch, +1 for each rescue."""

    at: float
    invocation_id: str
    adapter: AdapterSpec | None = None
    unknown: bool = False
    name: str = ""
    published_at: float | None = None
    prompt_tokens: int = 0
    max_tokens: int = 0
    epoch: int = 1


@dataclass(frozen=True)
class ResidentReport:
    """One adapter version on a worker, as its heartbeat reported it."""

    version: str
    tier: Tier
    rank: int = 0
    bytes: int = 0
    pages: int = 0
    in_use: int = 0
    last_used: float = 0.0  # when a call last used it there (driver's clock; 0: unknown)


@dataclass(frozen=True)
class WorkerReport:
    """A heartbeat."""

    at: float
    worker_id: str
    total_pages: int = 0
    free_pages: int = 0
    max_rank: int = 0
    max_inflight: int = 32
    running: int = 0
    queue_depth: int = 0
    tokens_per_s: float = 0.0
    draining: bool = False
    resident: tuple[ResidentReport, ...] = ()
    device_bytes: int = 0  # capacity of its device adapter pool (0: unknown: nothing is staged to its device)
    host_bytes: int = 0  # capacity of its host cache (0: unknown: nothing is fetched ahead)
    page_bytes: int = 0  # bytes of one pool page (a resident adapter's device footprint is pages x this)


@dataclass(frozen=True)
class WorkQueues:
    """Calls waiting or running per worker, as the work stream counts them (unacked messages)."""

    at: float
    counts: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class LoadFinished:
    at: float
    worker_id: str
    version: str
    ok: bool = True


@dataclass(frozen=True)
class InvocationFinished:
    at: float
    invocation_id: str
    worker_id: str | None = None


@dataclass(frozen=True)
class WorkerGone:
    at: float
    worker_id: str


@dataclass(frozen=True)
class Tick:
    at: float


@dataclass(frozen=True)
class Predicted:
    """The answer to `Predict(start, ...)`: each version's probability of a call in the interval starting at
    `start`, and the name of the predictor that answered (a fallback chain names its active member)."""

    at: float
    start: float
    scores: Mapping[str, float]
    predictor: str


Event = (InvocationArrived | WorkerReport | WorkQueues | LoadFinished | InvocationFinished | WorkerGone | Tick
         | Predicted)

# -- commands ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dispatch:
    invocation_id: str
    worker_id: str
    reason: str
    epoch: int = 1


@dataclass(frozen=True)
class Defer:
    invocation_id: str
    retry_at: float
    reason: str


@dataclass(frozen=True)
class Fail:
    invocation_id: str
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class Rescue:
    """Dispatch again every call left in `worker_id`'s work subject (the worker is gone)."""

    worker_id: str
    reason: str


@dataclass(frozen=True)
class Fetch:
    version: str
    worker_id: str


@dataclass(frozen=True)
class Load:
    version: str
    worker_id: str


@dataclass(frozen=True)
class Evict:
    version: str
    worker_id: str
    to_tier: Tier = Tier.host


@dataclass(frozen=True)
class Predict:
    """Feed the predictor `observed` ((end, calls per version) of each interval closed since the last
    `Predict`, in order, empty ones included), then score `keys` for the interval starting at `start`; answer
    with `Predicted` (`predict` does both)."""

    start: float
    observed: tuple[tuple[float, Mapping[str, int]], ...]
    keys: tuple[str, ...]


Command = Dispatch | Defer | Fail | Rescue | Fetch | Load | Evict | Predict

# -- the core ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CoreConfig:
    """Timing and limits of the core's decisions (live values come from `PlacementSettings`)."""

    heartbeat_timeout_s: float = 5.0
    placement_grace_s: float = 5.0
    unknown_adapter_grace_s: float = 10.0
    defer_s: float = 0.1  # how soon a call no worker could take is offered again
    queue_per_worker: int = 32  # calls a worker may have waiting beyond its max_inflight
    max_epochs: int = 5  # dispatches of one call (first + rescues) before it fails as a dead letter
    outstanding_ttl_s: float = 3600.0  # forget a dispatched call never seen to finish after this long
    # A call dispatched this long ago is in the work stream's counts (its publish was acked long before) unless
    # it finished: the counts then correct the calls the core believes outstanding (see `_work_queues`).
    work_settle_s: float = 2.0
    staging_interval_s: float = 60.0  # pre-staging: the predictor's interval
    staging_cutoff: float = 0.5  # a score at or above this counts as "predicted" in the interval records
    interval_records: int = 100_000  # `IntervalRecord`s kept (the oldest are dropped)
    service_s: float = 2.0  # expected seconds of one call, for the workers-needed signal
    max_gap_intervals: int = 100_000  # empty intervals observed one by one after a silence; beyond, skipped
    forget_adapter_s: float = 30 * 86_400.0  # a version neither called nor held for this long is not scored
    placement_interval_s: float = 30.0  # a placing router (`scheduler.placement`) is replanned this often ...
    placement_min_interval_s: float = 5.0  # ... and early, at most this often, when demand drifts by
    placement_drift: float = 0.25  # this share of the planned load
    placement_window_s: float = 120.0  # the demand a plan is made for: decode tokens/s over this much history


@dataclass
class IntervalRecord:
    """One closed staging interval (start, end]: how the predictions made for it fared, and what was staged."""

    end: float
    predictor: str  # the predictor whose scores were used for this interval ("" for the first)
    calls: int = 0  # first dispatches of adapter calls in it
    called: int = 0  # distinct versions called
    predicted: int = 0  # versions scored >= staging_cutoff for it
    hits: int = 0  # versions both predicted and called
    device_hits: int = 0  # calls routed to a worker holding their adapter on the device (reason "device")
    fetches: int = 0  # staging commands issued at its start
    loads: int = 0
    evictions: int = 0
    loaded_bytes: int = 0
    unused_loaded_bytes: int = 0  # bytes loaded for it whose version was not called in it
    workers_needed: int = 0  # the scale signal computed at its start

    @property
    def precision(self) -> float | None:
        return self.hits / self.predicted if self.predicted else None

    @property
    def recall(self) -> float | None:
        return self.hits / self.called if self.called else None

    @property
    def device_hit_share(self) -> float | None:
        return self.device_hits / self.calls if self.calls else None


@dataclass
class _Worker:
    report: WorkerReport
    last_seen: float
    backlog: int = 0  # from WorkQueues: calls in its work subject
    held: dict[str, Tier] = field(default_factory=dict)  # version -> tier, from its latest report
    host_free: int = 0  # bytes its host cache has free by its latest report (0 when its budget is unknown)
    outstanding: dict[str, tuple[str | None, float]] = field(default_factory=dict)  # call -> (version, at)


class SchedulerCore:
    """Routes calls and tracks workers; see the module docstring. Not thread-safe; one per driver."""

    def __init__(self, *, router: Router | None = None, config: CoreConfig | None = None,
                 stager: Stager | None = None) -> None:
        self.router: Router = router or AffinityRouter()
        self.config = config or CoreConfig()
        if self.config.staging_interval_s <= 0:
            raise ValueError(f"staging_interval_s must be > 0 (got {self.config.staging_interval_s})")
        self.stager = stager
        self._workers: dict[str, _Worker] = {}
        self._resident: dict[str, dict[str, Tier]] = {}  # version -> worker -> tier (from heartbeats)
        self._placing: dict[str, dict[str, float]] = {}  # version -> worker -> last dispatch there
        self._where: dict[str, str] = {}  # call -> worker it was dispatched to
        # Workers with work queued on their subject that this core never heard from (they died while no
        # scheduler ran, or before this one started) -> when first seen; rescued after a heartbeat timeout.
        self._orphans: dict[str, float] = {}
        self.decisions: Counter[str] = Counter()  # dispatch reasons and other outcomes, for metrics
        self.now = 0.0
        # Pre-staging state: the open interval's end, its calls per version, the versions the core knows
        # (from calls; bounded to those seen within the histogram-length horizon), and the open interval's record.
        self._interval_end: float | None = None
        self._counts: Counter[str] = Counter()
        self._last_counts: dict[str, int] = {}  # the counts of the last closed interval
        self._unsent: list[tuple[float, dict[str, int]]] = []  # closed intervals not yet in a Predict
        self._adapters: dict[str, tuple[AdapterSpec, float]] = {}  # version -> (spec, last call)
        self._open: IntervalRecord | None = None
        self._scores: dict[str, float] = {}  # the scores the open interval was staged with
        self._loaded: dict[str, int] = {}  # versions loaded for the open interval -> bytes
        self.intervals: deque[IntervalRecord] = deque(maxlen=self.config.interval_records)
        self.workers_needed = 0
        self.intervals_closed = 0  # IntervalRecords made so far (drivers read the new ones from `intervals`)
        # Placement (a router that replans from demand): the recent first dispatches (at, version, tokens),
        # their sums per version, and when the next plan is due.
        self.placer: Replanning | None = self.router if isinstance(self.router, Replanning) else None
        self._recent: deque[tuple[float, str, int]] = deque()
        self._recent_tokens: Counter[str] = Counter()
        self._recent_specs: dict[str, AdapterSpec] = {}
        self._demand_since: float | None = None
        self._next_plan = 0.0
        self._last_plan_at = -math.inf
        self.plan: PlacementPlan | None = None
        self._planned_tokens_per_s = 0.0
        self._recent_total = 0
        self.plans = 0

    # -- the one entry point ---------------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Command]:
        """Apply one event; the commands it calls for, in order (the `Predict` of intervals that ended comes
        first, or right after a Tick's own)."""
        self.now = max(self.now, event.at)
        if self.placer is not None and self._plan_due():
            self._replan()
        if self.stager is not None and (self._interval_end is None or self.now >= self._interval_end):
            if isinstance(event, Tick):  # gone workers and expired placements are settled before the plan
                done = self._apply(event)
                return done + self._close_intervals()
            return self._close_intervals() + self._apply(event)
        return self._apply(event)

    def _apply(self, event: Event) -> list[Command]:
        match event:
            case InvocationArrived():
                return self._arrived(event)
            case WorkerReport():
                return self._report(event)
            case WorkQueues():
                return self._work_queues(event)
            case LoadFinished():
                if not event.ok:
                    self._placing.get(event.version, {}).pop(event.worker_id, None)
                return []
            case InvocationFinished():
                self._finished(event.invocation_id)
                return []
            case WorkerGone():
                return self._gone(event.worker_id, "it said goodbye or died")
            case Tick():
                return self._tick()
            case Predicted():
                return self._predicted(event)
        raise TypeError(f"not a scheduler event: {event!r}")

    # -- queries (for drivers, metrics and tests) --------------------------------------------------------------

    def views(self) -> list[WorkerView]:
        """Live workers as policies see them."""
        out = []
        for worker_id, w in sorted(self._workers.items()):
            r = w.report
            out.append(WorkerView(
                worker_id=worker_id, total_pages=r.total_pages, free_pages=r.free_pages, max_rank=r.max_rank,
                capacity=r.max_inflight + self.config.queue_per_worker,
                outstanding=max(len(w.outstanding), w.backlog), running=r.running,
                tokens_per_s=r.tokens_per_s, draining=r.draining, host_free_bytes=w.host_free,
            ))
        return out

    def residency(self) -> Residency:
        """version -> worker -> tier over live workers, placements in flight counted on the device (a view:
        each version's holders are merged when asked for, so routing one call costs no copy of the map)."""
        return _ResidencyView(self._resident, self._placing)

    def has_room(self) -> bool:
        """Whether some live worker may be sent another call now (the dispatcher fetches only then)."""
        limit = self.config.queue_per_worker
        return any(not w.report.draining and max(len(w.outstanding), w.backlog) < w.report.max_inflight + limit
                   for w in self._workers.values())

    def workers(self) -> list[str]:
        return sorted(self._workers)

    def outstanding(self, worker_id: str) -> int:
        w = self._workers.get(worker_id)
        return len(w.outstanding) if w is not None else 0

    # -- events ------------------------------------------------------------------------------------------------

    def _arrived(self, e: InvocationArrived) -> list[Command]:
        if e.epoch > self.config.max_epochs:
            self.decisions["fail_dead_letter"] += 1
            return [Fail(e.invocation_id, ErrorCode.dead_letter,
                         f"invocation {e.invocation_id} was dispatched {e.epoch - 1} times and its workers died "
                         f"each time (limit {self.config.max_epochs}); giving up")]
        if e.unknown:
            published = e.published_at if e.published_at is not None else e.at
            waited = e.at - published
            if waited >= self.config.unknown_adapter_grace_s:
                self.decisions["fail_not_found"] += 1
                return [Fail(e.invocation_id, ErrorCode.not_found,
                             f"adapter {e.name or '?'} does not exist (waited {waited:.1f} s, grace "
                             f"{self.config.unknown_adapter_grace_s:.1f} s)")]
            return [Defer(e.invocation_id, e.at + min(1.0, self.config.unknown_adapter_grace_s - waited),
                          "unknown_adapter")]
        call = CallView(e.invocation_id, e.adapter, e.prompt_tokens, e.max_tokens)
        views = self.views()
        route: Route | None = self.router.route(call, views, self.residency())
        if route is None or route.worker_id not in self._workers:
            if e.adapter is not None and views and all(
                v.max_rank and e.adapter.rank > v.max_rank for v in views
            ):
                self.decisions["fail_rank"] += 1
                return [Fail(e.invocation_id, ErrorCode.adapter_invalid,
                             f"adapter {e.adapter.tenant}/{e.adapter.adapter} has rank {e.adapter.rank}; the largest "
                             f"rank any worker holds is {max(v.max_rank for v in views)}")]
            self.decisions["defer"] += 1
            reason = "no_workers" if not views else "all_busy"
            return [Defer(e.invocation_id, e.at + self.config.defer_s, reason)]
        self._assign(e.invocation_id, route.worker_id, e.adapter.version if e.adapter else None, e.at)
        self.decisions[route.reason] += 1
        if self.placer is not None and e.adapter is not None and e.epoch == 1:
            self._recent.append((e.at, e.adapter.version, max(1, e.max_tokens)))
            self._recent_tokens[e.adapter.version] += max(1, e.max_tokens)
            self._recent_total += max(1, e.max_tokens)
            self._recent_specs[e.adapter.version] = e.adapter
            if self._demand_since is None:
                self._demand_since = e.at
        if self.stager is not None and e.adapter is not None and e.epoch == 1:
            self._counts[e.adapter.version] += 1
            self._adapters[e.adapter.version] = (e.adapter, e.at)
            if self._open is not None:
                self._open.calls += 1
                self._open.device_hits += route.reason == "device"
        return [Dispatch(e.invocation_id, route.worker_id, route.reason, e.epoch)]

    def _assign(self, invocation_id: str, worker_id: str, version: str | None, at: float) -> None:
        previous = self._where.pop(invocation_id, None)
        if previous is not None and previous in self._workers:
            self._workers[previous].outstanding.pop(invocation_id, None)
        self._where[invocation_id] = worker_id
        self._workers[worker_id].outstanding[invocation_id] = (version, at)
        if version is not None and self._resident.get(version, {}).get(worker_id) != Tier.device:
            self._placing.setdefault(version, {})[worker_id] = at

    def _work_queues(self, e: WorkQueues) -> list[Command]:
        """The work stream's counts are the truth of what each worker has waiting or running (a subject with
        nothing on it is not listed: its worker's count is 0). A call this core dispatched more than
        `work_settle_s` ago and still counts as outstanding although the stream holds fewer calls for that
        worker has finished without its result reaching this core: one another scheduler dispatched as well
        (this core dispatched it again after that scheduler died unacknowledged, and the worker had recorded
        its result before), or a result missed during a reconnection. The oldest such calls are forgotten, so
        that capacity the worker has is not held by calls that ended (otherwise until `outstanding_ttl_s`)."""
        counts = dict(e.counts)
        settled_before = e.at - self.config.work_settle_s
        for worker_id, w in self._workers.items():
            w.backlog = count = counts.get(worker_id, 0)
            settled = [i for i, (_, at) in w.outstanding.items() if at <= settled_before]
            if len(settled) > count:
                for invocation_id in settled[:len(settled) - count]:  # oldest first: the likeliest to be done
                    self._finished(invocation_id)
                self.decisions["outstanding_forgotten"] += len(settled) - count
        queued = {worker_id for worker_id, count in e.counts if count > 0 and worker_id not in self._workers}
        for worker_id in queued:
            self._orphans.setdefault(worker_id, e.at)
        for worker_id in set(self._orphans) - queued:
            del self._orphans[worker_id]
        return []

    def _finished(self, invocation_id: str) -> None:
        worker_id = self._where.pop(invocation_id, None)
        if worker_id is not None and worker_id in self._workers:
            self._workers[worker_id].outstanding.pop(invocation_id, None)

    def _report(self, r: WorkerReport) -> list[Command]:
        w = self._workers.get(r.worker_id)
        self._orphans.pop(r.worker_id, None)
        if w is None:
            w = self._workers[r.worker_id] = _Worker(r, r.at)
            self.decisions["worker_up"] += 1
            before: tuple[ResidentReport, ...] | None = None
        else:
            before = w.report.resident
            w.report, w.last_seen = r, r.at
        # The tuple of the last report again (a driver passes it while nothing changed): nothing to compare.
        # Otherwise versions and tiers are compared as a whole and walked only when one came, went or moved
        # (most reports change a few entries' last use, not where versions are).
        held = w.held if r.resident is before else {x.version: x.tier for x in r.resident}
        if held is not w.held and held != w.held:
            for version in w.held.keys() - held.keys():  # what it dropped since its last report
                self._drop_resident(version, r.worker_id)
            for version, tier in held.items():
                if w.held.get(version) != tier:
                    self._resident.setdefault(version, {})[r.worker_id] = tier
        if len(self._placing) <= len(held):
            for version, placing in self._placing.items():
                if held.get(version) == Tier.device:
                    placing.pop(r.worker_id, None)
        else:
            for version, tier in held.items():
                if tier == Tier.device and version in self._placing:
                    self._placing[version].pop(r.worker_id, None)
        w.held = held
        if r.resident is not before:
            w.host_free = max(r.host_bytes - sum(x.bytes for x in r.resident), 0) if r.host_bytes else 0
        return []

    def _drop_resident(self, version: str, worker_id: str) -> None:
        holders = self._resident.get(version)
        if holders is not None:
            holders.pop(worker_id, None)
            if not holders:
                del self._resident[version]

    def _gone(self, worker_id: str, why: str) -> list[Command]:
        w = self._workers.pop(worker_id, None)
        if w is None:
            return []
        for invocation_id in w.outstanding:
            self._where.pop(invocation_id, None)
        for version in w.held:
            self._drop_resident(version, worker_id)
        for version in list(self._placing):
            self._placing[version].pop(worker_id, None)
            if not self._placing[version]:
                del self._placing[version]
        self.decisions["worker_gone"] += 1
        return [Rescue(worker_id, why)]

    def _tick(self) -> list[Command]:
        now = self.now
        commands: list[Command] = []
        for worker_id, w in list(self._workers.items()):
            silent = now - w.last_seen
            if silent > self.config.heartbeat_timeout_s:
                commands += self._gone(worker_id, f"no heartbeat for {silent:.1f} s "
                                                  f"(timeout {self.config.heartbeat_timeout_s:.1f} s)")
        for worker_id, since in list(self._orphans.items()):
            if now - since > self.config.heartbeat_timeout_s:
                del self._orphans[worker_id]  # seen again in the next WorkQueues if the rescue did not empty it
                self.decisions["worker_gone"] += 1
                commands.append(Rescue(worker_id, f"work is queued for it and no heartbeat came for "
                                                  f"{now - since:.1f} s"))
        for w in self._workers.values():
            stale = [i for i, (_, at) in w.outstanding.items() if now - at > self.config.outstanding_ttl_s]
            for invocation_id in stale:
                self._finished(invocation_id)
        for version in list(self._placing):
            workers = self._placing[version]
            for worker_id, at in list(workers.items()):
                holder = self._workers.get(worker_id)
                busy = holder is not None and any(v == version for v, _ in holder.outstanding.values())
                if holder is None or (not busy and now - at > self.config.placement_grace_s):
                    del workers[worker_id]
            if not workers:
                del self._placing[version]
        return commands


    # -- placement ---------------------------------------------------------------------------------------------

    def demand(self) -> list[Demand]:
        """Each recently called version's decode tokens/s over the last `placement_window_s` (or since the first
        call, when that is shorter, but at least `placement_min_interval_s`)."""
        self._prune_demand()
        span = self._demand_span()
        return [Demand(self._recent_specs[v], t / span) for v, t in sorted(self._recent_tokens.items())]

    def _demand_span(self) -> float:
        since = self._demand_since if self._demand_since is not None else self.now
        return max(min(self.config.placement_window_s, self.now - since), self.config.placement_min_interval_s)

    def _prune_demand(self) -> None:
        horizon = self.now - self.config.placement_window_s
        while self._recent and self._recent[0][0] < horizon:
            _, version, tokens = self._recent.popleft()
            self._recent_total -= tokens
            self._recent_tokens[version] -= tokens
            if self._recent_tokens[version] <= 0:
                del self._recent_tokens[version]
                self._recent_specs.pop(version, None)

    def _plan_due(self) -> bool:
        """A plan is due every `placement_interval_s`, and early (at most every `placement_min_interval_s`) when
        the total demand moved by more than `placement_drift` of what the current plan was made for."""
        if self.now >= self._next_plan:
            return True
        if self.plan is None or self.now - self._last_plan_at < self.config.placement_min_interval_s:
            return False
        self._prune_demand()
        now, planned = self._recent_total / self._demand_span(), self._planned_tokens_per_s
        return abs(now - planned) > self.config.placement_drift * max(planned, 1.0)

    def _replan(self) -> None:
        assert self.placer is not None
        demand = self.demand()
        workers = [PlaceWorker(worker_id, w.report.max_rank, w.report.device_bytes)
                   for worker_id, w in sorted(self._workers.items()) if not w.report.draining]
        if not demand or not workers:  # nothing to plan for yet: look again soon
            self._next_plan = self.now + self.config.placement_min_interval_s
            return
        self._next_plan = self.now + self.config.placement_interval_s
        self._last_plan_at = self.now
        self.plan = self.placer.replan(self.now, demand, workers)
        self._planned_tokens_per_s = sum(d.tokens_per_s for d in demand)
        self.plans += 1
        self.decisions["replan"] += 1

    # -- pre-staging -------------------------------------------------------------------------------------------

    def _close_intervals(self) -> list[Command]:
        """Close every interval that ended by `now` and ask for the next one's prediction (`Predict`)."""
        assert self.stager is not None
        interval = self.config.staging_interval_s
        if self._interval_end is None:
            self._interval_end = (math.floor(self.now / interval) + 1) * interval
            self._open = IntervalRecord(end=self._interval_end, predictor="")
            return []
        gap = math.floor((self.now - self._interval_end) / interval) + 1  # intervals that ended
        if gap > self.config.max_gap_intervals:  # a long silence: observe a bounded run of empty intervals
            self._interval_end += (gap - self.config.max_gap_intervals) * interval
        while self._interval_end <= self.now:
            self._record_interval(self._interval_end)
            self._last_counts = dict(self._counts)
            self._unsent.append((self._interval_end, self._last_counts))
            self._counts.clear()
            self._interval_end += interval
        # The interval now open: its calls count in its record from here; its predictor and staging come with
        # the answer.
        self._open = IntervalRecord(end=self._interval_end, predictor="")
        start = self._interval_end - interval
        horizon = start - self.config.forget_adapter_s
        for version in [v for v, (_, last) in self._adapters.items() if last < horizon]:
            del self._adapters[version]
        observed, self._unsent = tuple(self._unsent), []
        return [Predict(start, observed, tuple(self._specs()))]

    def _record_interval(self, end: float) -> None:
        record = self._open if self._open is not None else IntervalRecord(end=end, predictor="")  # after a gap
        record.end = end
        called = set(self._counts)
        predicted = {v for v, p in self._scores.items() if p >= self.config.staging_cutoff}
        record.called, record.predicted, record.hits = len(called), len(predicted), len(called & predicted)
        record.unused_loaded_bytes = sum(b for v, b in self._loaded.items() if v not in called)
        self.intervals.append(record)
        self.intervals_closed += 1
        self._open, self._scores, self._loaded = None, {}, {}

    def _specs(self) -> dict[str, AdapterSpec]:
        """Every version the core knows: called within `forget_adapter_s`, or held by a worker (sized from its
        report)."""
        specs = {v: spec for v, (spec, _) in self._adapters.items()}
        for w in self._workers.values():
            for r in w.report.resident:
                if r.version not in specs:
                    specs[r.version] = AdapterSpec("", "", r.version, r.rank, r.bytes)
        return specs

    def _predicted(self, e: Predicted) -> list[Command]:
        """The scores for the interval starting at `e.start`: staged if that interval is still the open one."""
        if self.stager is None or self._interval_end is None or self._open is None:
            return []
        now = self._interval_end - self.config.staging_interval_s
        if e.start != now:
            self.decisions["prediction_stale"] += 1
            return []
        return self._stage(now, e.scores, e.predictor)

    def _stage(self, now: float, scores: Mapping[str, float], predictor: str) -> list[Command]:
        """Turn the stager's plan for the interval starting at `now` into commands."""
        assert self.stager is not None and self._open is not None
        specs = self._specs()
        views = self._stage_views(specs)
        stages = self.stager.plan(now, scores, specs, views)
        record = self._open
        record.predictor = predictor
        commands: list[Command] = []
        for st in stages:
            if st.worker_id not in self._workers:
                continue
            if st.kind == "fetch":
                record.fetches += 1
                commands.append(Fetch(st.version, st.worker_id))
            elif st.kind == "load":
                record.loads += 1
                nbytes = specs[st.version].bytes if st.version in specs else 0
                record.loaded_bytes += nbytes
                self._loaded[st.version] = self._loaded.get(st.version, 0) + nbytes
                if self._resident.get(st.version, {}).get(st.worker_id) != Tier.device:
                    self._placing.setdefault(st.version, {})[st.worker_id] = now
                commands.append(Load(st.version, st.worker_id))
            else:
                record.evictions += 1
                to_tier = st.to_tier or Tier.host
                self._unplace(st.version, st.worker_id, to_tier)
                commands.append(Evict(st.version, st.worker_id, to_tier))
            self.decisions[f"stage_{st.kind}"] += 1
        # Expected calls: the probability of a call, times the calls of the interval just closed when there were
        # several (a probability alone stops at one call however many come).
        expected = {v: p * max(1, self._last_counts.get(v, 0)) for v, p in scores.items() if p > 0}
        record.workers_needed = self.workers_needed = workers_needed(
            expected, interval_s=self.config.staging_interval_s, service_s=self.config.service_s,
            max_inflight=max((w.report.max_inflight for w in self._workers.values()), default=32),
            version_bytes={v: s.bytes for v, s in specs.items()},
            device_bytes=max((v.device_bytes for v in views), default=0),
        )
        self._scores = dict(scores)
        return commands

    def _stage_views(self, specs: Mapping[str, AdapterSpec]) -> list[StageView]:
        views = []
        for worker_id, w in sorted(self._workers.items()):
            r = w.report
            # Sizes are blob bytes throughout (what the stager sizes newcomers by); the device budget is scaled
            # from pool bytes to blob bytes by what the resident adapters take in the pool per blob byte.
            held: dict[str, HeldView] = {}
            pool = blob = 0
            for x in r.resident:
                held[x.version] = HeldView(x.tier, x.bytes, x.rank, x.in_use, x.last_used)
                if x.tier == Tier.device and x.pages and x.bytes:
                    pool, blob = pool + x.pages * r.page_bytes, blob + x.bytes
            device_bytes = r.device_bytes * blob // pool if pool and blob else r.device_bytes
            for version, placing in self._placing.items():
                if worker_id in placing and held.get(version, HeldView(Tier.host, 0)).tier != Tier.device:
                    spec = specs.get(version)
                    held[version] = HeldView(Tier.device, spec.bytes if spec else 0, spec.rank if spec else 0,
                                             in_use=sum(1 for v, _ in w.outstanding.values() if v == version),
                                             last_used=placing[worker_id])
            views.append(StageView(
                worker_id=worker_id, device_bytes=device_bytes, host_bytes=r.host_bytes, max_rank=r.max_rank,
                outstanding=max(len(w.outstanding), w.backlog), capacity=r.max_inflight + self.config.queue_per_worker,
                draining=r.draining, held=held,
            ))
        return views

    def _unplace(self, version: str, worker_id: str, to_tier: Tier) -> None:
        """An eviction commanded: the version leaves that worker's device (and its host cache for `object`)."""
        placing = self._placing.get(version)
        if placing is not None:
            placing.pop(worker_id, None)
            if not placing:
                del self._placing[version]
        w = self._workers[worker_id]
        if version in w.held:  # the worker's next report puts it back if the eviction did not happen
            if to_tier == Tier.host:
                w.held[version] = self._resident.setdefault(version, {})[worker_id] = Tier.host
            else:
                del w.held[version]
                self._drop_resident(version, worker_id)


def predict(predictor: Predictor, command: Predict, at: float) -> Predicted:
    """Carry out `command` with `predictor`: the answer to feed the core (at `at` on the driver's clock). The
    simulator calls it inline; the live dispatcher on a thread of its own (the predictor's only user)."""
    for end, counts in command.observed:
        predictor.observe(end, counts)
    scores = predictor.predict(command.start, command.keys) if command.keys else {}
    return Predicted(at, command.start, scores, predictor_name(predictor))


def predictor_name(predictor: Predictor) -> str:
    """The name of the predictor answering now (a fallback chain names its active member)."""
    active = getattr(predictor, "active", None)
    return f"{predictor.name}:{active}" if isinstance(active, str) else predictor.name


class _ResidencyView(Mapping[str, Mapping[str, Tier]]):
    def __init__(self, resident: dict[str, dict[str, Tier]], placing: dict[str, dict[str, float]]) -> None:
        self._resident, self._placing = resident, placing

    def __getitem__(self, version: str) -> Mapping[str, Tier]:
        held, placing = self._resident.get(version), self._placing.get(version)
        if held is None and placing is None:
            raise KeyError(version)
        out = dict(held or {})
        for worker_id in placing or ():
            out[worker_id] = Tier.device
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(set(self._resident) | set(self._placing))

    def __len__(self) -> int:
        return len(set(self._resident) | set(self._placing))


def replay(core: SchedulerCore, events: Iterable[Event]) -> list[Command]:
    """Every command `core` issues for `events`, in order (tests and the simulator's warm-up)."""
    out: list[Command] = []
    for event in events:
        out += core.handle(event)
    return out
