"""The scheduler service: the dispatcher (every invocation's worker), warm state, demand, invocation rows.

- Dispatch: `scheduler.dispatcher.Dispatcher` drives the pure `scheduler.core.SchedulerCore` from NATS (one
  durable consumer of the invocations stream for all adapters; each invocation goes to one worker's
  `lora.work.<worker>`; the work of a worker that stops heartbeating is dispatched again).
- Warm state: heartbeats (`lora.evt.worker.*`) feed the core and an in-memory `WarmState`, written to
  Postgres every `flush_every_s` in one transaction (workers, residency per tier); workers silent for
  `heartbeat_timeout_s` are marked down. Heartbeats between full ones carry residency changes only
  (`protocol.residency`): the warm state gets them made whole, and a worker from its first full one.
- Demand: the dispatcher counts each invocation once, at its first dispatch, in the bucket of the time the
  invocations stream stored it; counts are batched into the demand history.
- Invocation lifecycle in Postgres: running on `InvocationStarted`; succeeded/failed/cancelled, timestamps and
  token counts from the results stream (a durable consumer shared by the scheduler replicas).
- Liveness: a `SchedulerHeartbeat` every second on `lora.evt.scheduler.<id>`; gateways are ready only while
  some scheduler is alive (without one, nothing dispatches).
Several schedulers may run: they share the dispatcher's and the results' durable consumers, and each keeps
its own core from the same heartbeats and streams. What must happen once is done by the leader alone
(`scheduler.leader`: a Postgres advisory lock): staging verbs, rescues, the warm state's writes (worker rows,
residency, workers marked down, invocations marked running) and the pruning of rows of workers silent for
`worker_prune_after_s`. Every replica writes the demand it counted (the calls it dispatched).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.client import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from protocol import subjects
from protocol.consume import PullLoop
from protocol.messages import (
    AdapterEvent,
    Heartbeat,
    Invocation,
    InvocationResult,
    InvocationStarted,
    MessageInvalid,
    ResidentAdapter,
    SchedulerHeartbeat,
    Tier,
)
from protocol.residency import ResidencyTracker
from protocol.results import record_result
from protocol.streams import ensure_streams
from scheduler.core import CoreConfig, SchedulerCore
from scheduler.dispatcher import AdapterDirectory, Dispatcher, PredictorThread
from scheduler.leader import Change, LeaderElection, LeaderLock
from scheduler.metrics import SCALE_PATH, MetricsEndpoint, SchedulerMetrics, serve_metrics
from scheduler.nats_callout import NatsCallout
from scheduler.operating_points import DEFAULT_PATH as DEFAULT_POINTS
from scheduler.operating_points import OperatingPoints
from scheduler.placement import RankAwareRouter
from scheduler.policy import AffinityRouter, Router
from scheduler.predict import Predictor
from scheduler.settings import POSTGRES_NAME, PlacementSettings, SchedulerSettings, StagingSettings
from scheduler.staging import PredictiveStager, Stager, staging_policies
from scheduler.state import WarmState
from storage import repo
from storage.models import InvocationStatus

logger = logging.getLogger(__name__)

KIND_HEADER = subjects.KIND_HEADER


def core_config(cfg: PlacementSettings, staging: StagingSettings | None = None) -> CoreConfig:
    """The core's limits from the scheduler's settings."""
    staging = staging or StagingSettings()
    return CoreConfig(
        heartbeat_timeout_s=cfg.heartbeat_timeout_s, placement_grace_s=cfg.placement_grace_s,
        unknown_adapter_grace_s=cfg.unknown_adapter_grace_s, queue_per_worker=cfg.queue_per_worker,
        max_epochs=cfg.max_epochs, staging_interval_s=staging.interval_s, service_s=staging.service_s,
        placement_interval_s=cfg.placement_interval_s,
    )


def build_router(cfg: PlacementSettings) -> Router:
    """The routing policy the settings name (a bad operating points file is a clear error at start-up)."""
    affinity = AffinityRouter(replicate_at=cfg.replicate_at, replicate_margin=cfg.replicate_margin,
                              host_margin=cfg.host_margin)
    if cfg.router == "rank_aware":
        points = OperatingPoints.read(cfg.operating_points or DEFAULT_POINTS)
        return RankAwareRouter(points, fallback=affinity)
    return affinity


# How often the leader deletes the rows of workers silent for `worker_prune_after_s`.
PRUNE_EVERY_S = 60.0
# How long a follower keeps the invocation starts it saw (the leader writes them): longer than a takeover (a
# killed leader's lock goes at once, a vanished host's within about leader_ttl_s) and a short Postgres outage;
# at most STARTED_KEEP_MAX of them (the newest), whatever the rate.
STARTED_KEEP_S = 60.0
STARTED_KEEP_MAX = 100_000
# A resident adapter's last use is written to Postgres when it moved by this much (a row per adapter and second
# for every worker would be written otherwise; the live decisions use the heartbeats, not these rows).
LAST_USED_PRECISION_S = 30


ResidencyMarks = dict[tuple[str, Tier], tuple[int, int, int]]


def residency_changes(hb: Heartbeat, before: ResidencyMarks | None) -> tuple[ResidencyMarks, list[repo.ResidencyRow],
                                                                            list[tuple[str, Tier]]]:
    """A heartbeat's residency against what was written before (None: nothing): the marks that say what each
    (sha256, tier) row holds now, the rows to write (new or changed marks) and the keys to drop. Only changed
    entries become rows: a worker holding 1,000 versions costs a flush a tuple per version, not a row object
    and a datetime each (3 ms per worker and second)."""
    now: ResidencyMarks = {}
    changed = []
    for r in hb.resident:
        key = (r.version, Tier(r.tier))
        mark = (r.pages, r.bytes, int(r.last_used or 0) // LAST_USED_PRECISION_S)
        now[key] = mark
        if before is None or before.get(key) != mark:
            last_used = datetime.fromtimestamp(r.last_used, UTC) if r.last_used else None
            changed.append(repo.ResidencyRow(sha256=r.version, tier=key[1], pages=r.pages, nbytes=r.bytes,
                                             last_used_at=last_used))
    dropped = [] if before is None else [key for key in before if key not in now]
    return now, changed, dropped


def whole_heartbeat(tracker: ResidencyTracker[ResidentAdapter], heartbeat: Heartbeat) -> Heartbeat | None:
    """The heartbeat with the worker's whole residency (a delta applied on the heartbeats before it, which
    `tracker` followed); None until the worker's first full heartbeat (the warm state records no worker whose
    residency it does not know)."""
    tracker.apply(heartbeat)
    resident = tracker.resident(heartbeat.worker_id)
    if heartbeat.gone:
        tracker.forget(heartbeat.worker_id)
    if heartbeat.full or heartbeat.gone:  # a goodbye's residency is not recorded
        return heartbeat
    if resident is None:
        return None
    return heartbeat.model_copy(update={"resident": list(resident), "removed": [], "resident_base": None})


def default_scheduler_id() -> str:
    """<host>-<pid>, reduced to the subject-token alphabet."""
    return subjects.process_name("scheduler")


class SchedulerService:
    """Run with `run(stop)`; returns after flushing and draining once `stop` is set. `router`: the routing
    policy (default `AffinityRouter` with the settings' replication thresholds); `predictor` and `stager`: the
    pre-staging policies (default: those the staging settings name)."""

    def __init__(self, settings: SchedulerSettings, *, router: Router | None = None,
                 scheduler_id: str | None = None, predictor: Predictor | None = None,
                 stager: Stager | None = None) -> None:
        self.settings = settings
        self.cfg = settings.scheduler
        self.scheduler_id = subjects.check_name("scheduler", scheduler_id or default_scheduler_id())
        if predictor is None:
            predictor, stager = staging_policies(settings.staging)
        elif stager is None:
            stager = PredictiveStager()
        self.core = SchedulerCore(
            router=router or build_router(self.cfg), config=core_config(self.cfg, settings.staging), stager=stager,
        )
        self.predictor = predictor  # run by the dispatcher's PredictorThread (None: no pre-staging)
        self.state = WarmState(heartbeat_timeout_s=self.cfg.heartbeat_timeout_s)
        self.heartbeat_residency = ResidencyTracker.of_adapters()  # delta heartbeats made whole for `state`
        self.metrics = SchedulerMetrics()
        self.metrics_endpoint: MetricsEndpoint | None = None  # set by run() (None: disabled)
        self.nc: NatsClient | None = None
        self.js: JetStreamContext | None = None
        self.sessions: async_sessionmaker[AsyncSession] | None = None
        self.dispatcher: Dispatcher | None = None
        self._directory: AdapterDirectory | None = None
        self._demand: dict[tuple[str, str, datetime], int] = defaultdict(int)
        # Starts seen and not yet written, with when they came (time.monotonic()): the leader writes them; a
        # follower keeps the last STARTED_KEEP_S of them, so that starts a takeover's gap leaves unwritten are
        # written by the next leader (a start the previous leader wrote is written again, to the same effect).
        self._started: list[tuple[float, InvocationStarted]] = []
        self._demand_flushed = 0.0  # time.monotonic() of the last demand write
        self.election: LeaderElection | None = None  # set by run()
        self._pruned = -PRUNE_EVERY_S  # time.monotonic() of the last pruning of workers' rows
        # What this scheduler last wrote of each worker's residency, so a flush writes only what changed.
        self._residency: dict[str, ResidencyMarks] = {}

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        async with AsyncExitStack() as stack:
            engine = repo.create_engine(self.settings.database, name=POSTGRES_NAME)
            stack.push_async_callback(engine.dispose)
            predicting = PredictorThread(self.predictor) if self.predictor is not None else None
            if predicting is not None:  # closed after NATS: no event can ask it for a forecast any more
                stack.push_async_callback(asyncio.to_thread, predicting.close)
            self.sessions = repo.session_factory(engine)
            self.nc = await nats.connect(
                self.settings.nats.servers, connect_timeout=self.settings.nats.connect_timeout_s,
                max_reconnect_attempts=-1, reconnect_time_wait=0.5, name=f"lorafn-scheduler-{self.scheduler_id}",
                reconnected_cb=self._on_reconnect, inbox_prefix=self.settings.nats.inbox_prefix,
            )
            stack.push_async_callback(self._close_nats)
            self.js = self.nc.jetstream()
            await ensure_streams(self.js, replicas=self.settings.nats.stream_replicas,
                                 storage=self.settings.nats.stream_storage)
            self.metrics_endpoint = await stack.enter_async_context(serve_metrics(
                self.metrics.registry, self.settings.metrics, what=f"scheduler {self.scheduler_id}",
                json_routes={SCALE_PATH: self.metrics.scale_body}))
            self._directory = AdapterDirectory(self.sessions, ttl_s=self.cfg.adapter_cache_s)
            self.election = LeaderElection(LeaderLock(self.settings.database, ttl_s=self.cfg.leader_ttl_s,
                                                           name=POSTGRES_NAME),
                                           ttl_s=self.cfg.leader_ttl_s, on_change=self._on_leader_change)
            stack.push_async_callback(self.election.close)  # after the last flush: a follower takes over
            await self.election.step()  # a lone scheduler leads from the start
            self.dispatcher = Dispatcher(nc=self.nc, js=self.js, core=self.core, directory=self._directory,
                                         cfg=self.cfg, fail=self._finish_failed, demand=self._count_demand,
                                         metrics=self.metrics if self.settings.metrics.enabled else None,
                                         leading=self.leading, predictor=predicting)
            await self.nc.subscribe(subjects.WORKER_EVENTS_ALL, cb=self._on_heartbeat)
            await self.nc.subscribe(subjects.RESULT_ALL, cb=self._on_result)
            await self.nc.subscribe(subjects.ADAPTER_EVENTS_ALL, cb=self._on_adapter_event)
            await self.nc.subscribe(subjects.invocation_event("started"), cb=self._on_started)
            loops = [
                asyncio.create_task(self.dispatcher.run(stop), name="dispatcher"),
                asyncio.create_task(self._every(self.cfg.flush_every_s, self.flush, stop), name="flush"),
                asyncio.create_task(self._every(1.0, self._announce, stop), name="announce"),
                asyncio.create_task(self._results_loop(stop), name="results"),
                asyncio.create_task(self.election.run(stop), name="election"),
            ]
            if self.settings.nats_callout.enabled:  # tenants' direct NATS clients (scheduler.nats_callout)
                callout = NatsCallout(self.settings.nats_callout, self.sessions)
                loops.append(asyncio.create_task(callout.run(stop), name="nats-callout"))
            logger.info("scheduler %s ready", self.scheduler_id)
            await stop.wait()
            await asyncio.gather(*loops, return_exceptions=True)
            try:
                await self.flush(all_demand=True)
            except Exception:  # Postgres may be gone at shutdown; the next scheduler rewrites warm state
                logger.warning("last flush failed", exc_info=True)

    def leading(self) -> bool:
        """Whether this replica leads now (does what must happen once)."""
        return self.election is not None and self.election.leads()

    def _on_leader_change(self, change: Change) -> None:
        self.metrics.leader.set(1 if change.leader else 0)
        if change.leader:
            logger.info("scheduler %s is the leader (%s)", self.scheduler_id, change.reason)
            # Another leader wrote the warm state meanwhile: write every live worker whole at the next flush.
            self._residency.clear()
            for record in self.state.workers.values():
                record.dirty = True
        else:
            logger.warning("scheduler %s is no longer the leader: %s", self.scheduler_id, change.reason)

    async def _on_reconnect(self) -> None:
        """Adapter events sent while disconnected are lost to this process: drop the lookups they would clear."""
        logger.info("reconnected to NATS; adapter lookups are made afresh")
        if self._directory is not None:
            self._directory.clear()

    async def _close_nats(self) -> None:
        assert self.nc is not None
        if not self.nc.is_closed:
            with contextlib.suppress(nats.errors.Error):
                await self.nc.drain()

    @staticmethod
    async def _every(period_s: float, fn: Callable[[], Awaitable[None]], stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=period_s)
            try:
                await fn()
            except Exception:
                logger.exception("%s failed; trying again in %.1f s", getattr(fn, "__name__", fn), period_s)

    async def _announce(self) -> None:
        assert self.nc is not None
        if not self.nc.is_closed:
            beat = SchedulerHeartbeat(scheduler_id=self.scheduler_id, workers=len(self.core.workers()))
            await self.nc.publish(subjects.scheduler_event(self.scheduler_id), beat.encode())

    # -- subscriptions -----------------------------------------------------------------------------------

    async def _on_heartbeat(self, msg: Msg) -> None:
        if self.heartbeat_residency.has(msg.headers) and (
                self.dispatcher is None or self.dispatcher.reports.residency.has(msg.headers)):
            return  # the whole residency, which the delta just before it told: nothing to decode
        try:
            heartbeat = Heartbeat.decode(msg.data)
        except MessageInvalid as e:
            logger.warning("ignoring a heartbeat on %s: %s", msg.subject, e)
            return
        whole = whole_heartbeat(self.heartbeat_residency, heartbeat)
        if whole is not None:
            if heartbeat.worker_id not in self.state.workers:
                logger.info("worker %s is up", heartbeat.worker_id)
            self.state.observe(whole)
        if self.dispatcher is not None:
            self.dispatcher.on_heartbeat(heartbeat)

    async def _on_result(self, msg: Msg) -> None:
        if self.dispatcher is None:
            return
        try:
            self.dispatcher.on_result(InvocationResult.decode(msg.data))
        except MessageInvalid as e:
            logger.debug("ignoring an undecodable result on %s: %s", msg.subject, e)

    async def _on_adapter_event(self, msg: Msg) -> None:
        if self.dispatcher is None:
            return
        try:
            self.dispatcher.on_adapter_event(AdapterEvent.decode(msg.data))
        except MessageInvalid as e:
            logger.debug("ignoring an undecodable adapter event: %s", e)

    async def _on_started(self, msg: Msg) -> None:
        try:
            self._started.append((time.monotonic(), InvocationStarted.decode(msg.data)))
        except MessageInvalid as e:
            logger.debug("ignoring an undecodable started event: %s", e)

    def _count_demand(self, tenant: str, adapter: str, at: float) -> None:
        bucket = self.cfg.demand_bucket_s
        start = int(at) - int(at) % bucket
        self._demand[(tenant, adapter, datetime.fromtimestamp(start, UTC))] += 1

    # -- Postgres ----------------------------------------------------------------------------------------

    async def flush(self, *, all_demand: bool = False) -> None:
        """Write the demand this replica counted and, on the leader, heartbeats, residency and started
        invocations; mark silent workers down and prune long-silent ones (the leader)."""
        assert self.sessions is not None
        self.state.expire()
        heartbeats, gone = self.state.to_write()
        leading = self.leading()
        if not leading:  # the leader writes them; those gone are kept for when this replica leads
            for worker_id in gone:
                self.heartbeat_residency.forget(worker_id)
            self.state.unwritten([], gone)
            heartbeats, gone = [], []
        prune = leading and time.monotonic() - self._pruned >= PRUNE_EVERY_S
        demand: dict[tuple[str, str, datetime], int] = {}
        if all_demand or time.monotonic() - self._demand_flushed >= self.cfg.demand_flush_every_s:
            # Demand is counted per adapter and minute: written every few seconds, a busy adapter costs one row
            # update per flush, not one per second.
            demand, self._demand = self._demand, defaultdict(int)
            self._demand_flushed = time.monotonic()
        if leading:
            started, self._started = self._started, []
        else:
            started, self._started = [], _recent(self._started, time.monotonic() - STARTED_KEEP_S)
        if not (heartbeats or gone or demand or started or prune):
            return
        try:
            async with self.sessions() as session, session.begin():
                written = await self._write_heartbeats(session, heartbeats)
                for worker_id in gone:
                    logger.warning("worker %s is gone (goodbye, or no heartbeat for %.0f s); marking it down",
                                   worker_id, self.cfg.heartbeat_timeout_s)
                    await repo.mark_worker_down(session, worker_id=worker_id)
                counts = []
                for (tenant, adapter, bucket_start), count in demand.items():
                    adapter_id = self._directory.adapter_id(tenant, adapter) if self._directory else None
                    if adapter_id is not None:
                        counts.append((adapter_id, bucket_start, count))
                await repo.record_demand_many(session, counts=counts, bucket_seconds=self.cfg.demand_bucket_s)
                await repo.mark_invocations_running(session, started=[
                    (s.invocation_id, s.worker_id, s.attempt, datetime.fromtimestamp(s.started_at, UTC))
                    for _, s in started])
                pruned = await repo.prune_workers(session, silent_since=datetime.now(UTC) - timedelta(
                    seconds=self.cfg.worker_prune_after_s)) if prune else []
        except BaseException:
            for key, count in demand.items():  # keep what could not be written for the next flush
                self._demand[key] += count
            self._started[:0] = started  # kept for the next flush (while it fails: the last STARTED_KEEP_MAX)
            del self._started[:-STARTED_KEEP_MAX]
            self.state.unwritten(heartbeats, gone)
            raise
        if prune:
            self._pruned = time.monotonic()
        if pruned:
            logger.info("deleted the rows of %d workers silent for %.0f s: %s", len(pruned),
                        self.cfg.worker_prune_after_s, ", ".join(pruned[:20]))
        self._residency.update(written)
        for worker_id in gone:
            self._residency.pop(worker_id, None)
            self.heartbeat_residency.forget(worker_id)

    async def _write_heartbeats(self, session: AsyncSession, heartbeats: list[Heartbeat]) -> list[Any]:
        """Workers' rows, and what changed in their residency since this scheduler last wrote it (all of it the
        first time); the caller commits, then keeps `written` (returned) as the new record."""
        written = []
        for hb in heartbeats:
            state = hb.model_dump(mode="json", exclude={"resident", "capacity"})
            await repo.upsert_worker(session, worker_id=hb.worker_id, host=hb.host, device=hb.device,
                                     capacity=hb.capacity, state=state)
            before = self._residency.get(hb.worker_id)
            now, changed, dropped = residency_changes(hb, before)
            await repo.write_worker_residency(session, worker_id=hb.worker_id, rows=changed, drop=dropped,
                                              replace=before is None)
            written.append((hb.worker_id, now))
        return written

    # -- results -----------------------------------------------------------------------------------------

    async def _results_loop(self, stop: asyncio.Event) -> None:
        """Record every result in Postgres (succeeded/failed, timestamps, tokens), in batches: a durable pull
        consumer of `lora.result.>`; each batch is written in one transaction and acked after it commits (a
        batch that fails is redelivered)."""
        assert self.js is not None
        config = ConsumerConfig(durable_name=self.cfg.results_consumer, filter_subject=subjects.RESULT_ALL,
                                ack_policy=AckPolicy.EXPLICIT, ack_wait=30.0, max_ack_pending=4096)
        loop = PullLoop(self.js, stream=subjects.RESULTS_STREAM, config=config, fetch_timeout_s=0.5)

        async def want() -> int:
            return 256

        await loop.run(stop, self._record_batch, want)

    async def _record_batch(self, msgs: list[Msg]) -> None:
        if not msgs:
            return
        try:
            await self._record_results(msgs)
        except Exception:
            logger.exception("recording %d results failed; they will be redelivered", len(msgs))
            for m in msgs:
                try:
                    await m.nak(delay=1.0)
                except nats.errors.Error:
                    break  # NATS is away: all of them come back after the ack wait
            return
        for m in msgs:
            try:
                await m.ack()
            except nats.errors.Error:  # redelivered and written again: finish_invocation is idempotent
                logger.warning("acking recorded results failed; they will be written again")
                break

    async def _record_results(self, msgs: list[Msg]) -> None:
        assert self.sessions is not None
        outcomes = []
        for m in msgs:
            try:
                result = InvocationResult.decode(m.data)
            except MessageInvalid as e:
                logger.warning("ignoring an undecodable result on %s: %s", m.subject, e)
                continue
            ts = m.metadata.timestamp
            finished = ts if isinstance(ts, datetime) else datetime.now(UTC)
            outcomes.append(repo.Outcome(invocation_id=result.invocation_id, **self._result_fields(result, finished)))
        async with self.sessions() as session, session.begin():
            await repo.finish_invocations(session, outcomes=outcomes)

    @staticmethod
    def _result_fields(result: InvocationResult, finished: datetime) -> dict[str, Any]:
        t = result.timings

        def before_end(ms: float | None) -> datetime | None:
            if ms is None or t.total_ms is None:
                return None
            return finished - timedelta(milliseconds=max(0.0, t.total_ms - ms))

        return {
            "status": InvocationStatus(result.status),  # succeeded, failed or cancelled
            "finished_at": finished,
            "started_at": before_end(t.queued_ms),
            "first_token_at": before_end(t.first_token_ms),
            "prompt_tokens": result.usage.prompt_tokens if result.status == "succeeded" else None,
            "completion_tokens": result.usage.completion_tokens if result.status == "succeeded" else None,
            "worker_id": result.worker_id,
            "attempts": result.attempt,
            "error": f"{result.error.code}: {result.error.message}" if result.error else None,
        }

    # -- failures decided by the scheduler ------------------------------------------------------------------

    async def _finish_failed(self, inv: Invocation, result: InvocationResult) -> None:
        """Record a failure the scheduler decided (results stream with its callback copy, then the caller's reply
        subject, then the Postgres row) for an invocation no worker will answer."""
        assert self.js is not None and self.nc is not None and self.sessions is not None
        payload = result.encode()
        await record_result(self.js, inv.id, payload, callback=inv.callback_url is not None,
                            headers={subjects.TENANT_HEADER: inv.tenant})
        if inv.reply_to:
            try:
                await self.nc.publish(inv.reply_to, payload, headers={KIND_HEADER: subjects.KIND_RESULT})
            except nats.errors.Error as e:  # the caller can still read the results stream
                logger.debug("reply to %s failed: %s", inv.id, e)
        try:
            async with self.sessions() as session, session.begin():
                await repo.finish_invocation(session, invocation_id=inv.id,
                                             **self._result_fields(result, datetime.now(UTC)))
        except Exception:
            logger.exception("could not mark %s failed in Postgres (the results consumer will)", inv.id)


def _recent(started: list[tuple[float, InvocationStarted]], since: float) -> list[tuple[float, InvocationStarted]]:
    """The starts seen at `since` (time.monotonic()) or later, at most the newest STARTED_KEEP_MAX (oldest first)."""
    kept = [(at, s) for at, s in started if at >= since]
    return kept[-STARTED_KEEP_MAX:]
