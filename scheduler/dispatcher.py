"""The dispatcher: the live driver of `SchedulerCore` (NATS and Postgres in, NATS out).

Mechanism (docs/nats.md, "Dispatch"):
- ONE durable pull consumer (`dispatcher`) of the invocations stream, filter `lora.invoke.>`, shared by
  every scheduler replica: JetStream hands each message to one of them, and a replica that dies leaves its
  unacked messages to the others after `dispatch_ack_wait_s`.
- For each invocation the core says Dispatch / Defer / Fail. Dispatch publishes it to `lora.work.<worker>`
  (de-duplicated by `dispatch-<stream sequence>`) and then acks the original; Defer naks it with a delay (it
  stays in the stream: its adapter's subject depth is the gateway's admission signal); Fail records a
  failed result (results stream, reply subject, Postgres row) and acks.
- The dispatcher fetches only while some worker has room (the core's capacity), so a burst waits in the
  invocations stream, not in a worker's queue.
- A cancelled invocation (its `cancelled` result seen on `lora.result.>`) still in the invocations stream is
  acked and never dispatched (a scheduler that missed the cancel dispatches it, and its worker answers from
  the recorded result).
- Heartbeats, the work stream's per-worker counts and recorded results become core events; a `Tick` every
  `tick_s` lets the core declare silent workers gone, and the driver carries out `Rescue`: delete the
  worker's consumer (a paused worker can take nothing more), requeue what is left on its subject.
  A heartbeat carries the worker's whole residency every few heartbeats and the changes in between;
  `WorkerReports` keeps each worker's residency and hands the core the whole of it with every report.
- Staging verbs and rescues must happen once: with several scheduler replicas only the leader
  (`scheduler.leader`, the `leading` callable) carries them out. A follower's core decides the same way (its
  view stays whole, so it can lead at once); the follower drops its staging verbs and keeps its rescues until
  it leads (then carried out at its next tick) or until the worker heartbeats again.
- Pre-staging: the demand predictor belongs to the dispatcher's `PredictorThread`, which carries out the core's
  `Predict` commands in order on a thread of its own and feeds each answer back as `Predicted`; the event loop
  keeps dispatching while a forecast runs (every replica predicts, so a follower that comes to lead has a warm
  predictor; only the leader carries out the staging verbs that follow).
- Everything the core knows is rebuilt after a restart: workers and residency from heartbeats (residency
  from each worker's next full one), their load from the work stream, calls in flight from the streams
  themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from protocol import subjects
from protocol.consume import PullLoop, stream_time
from protocol.dispatch import WorkHeaders, dispatch, requeue_subject
from protocol.messages import (
    BASE_ADAPTER,
    AdapterEvent,
    ControlReply,
    ControlRequest,
    ControlVerb,
    ErrorCode,
    Heartbeat,
    Invocation,
    InvocationError,
    InvocationResult,
    MessageInvalid,
    ResidentAdapter,
    Tier,
)
from protocol.nats_auth import envelope_problem
from protocol.residency import ResidencyTracker
from scheduler.core import (
    Command,
    Defer,
    Dispatch,
    Event,
    Evict,
    Fail,
    Fetch,
    InvocationArrived,
    InvocationFinished,
    Load,
    LoadFinished,
    Predict,
    Predicted,
    Rescue,
    ResidentReport,
    SchedulerCore,
    Tick,
    WorkerGone,
    WorkerReport,
    WorkQueues,
    predict,
)
from scheduler.metrics import SchedulerMetrics
from scheduler.policy import AdapterSpec
from scheduler.settings import PlacementSettings
from storage import repo

if TYPE_CHECKING:
    from scheduler.predict import Predictor, Switch

logger = logging.getLogger(__name__)

# Invocations fetched per pull: enough to amortise the round trip under load, few enough that a dispatcher
# that dies leaves little to its ack wait.
FETCH_BATCH = 64
# Batches whose dispatches (publish to a work subject, then ack) may be in flight while the next is fetched.
MAX_BATCHES_IN_FLIGHT = 4
# Cancelled invocation ids remembered so that their queued copies are dropped, not dispatched (the oldest are
# forgotten first; a forgotten one is dispatched, and its worker answers it from the recorded result).
CANCELLED_REMEMBERED = 100_000
# Rescues a follower keeps for when it leads (the oldest are forgotten first: the work of a forgotten worker is
# still found on its subject by the core, as an orphan, and rescued).
RESCUES_REMEMBERED = 10_000


def resident_report(r: ResidentAdapter) -> ResidentReport:
    """A heartbeat's entry as the core's."""
    return ResidentReport(r.version, Tier(r.tier), r.rank, r.bytes, r.pages, r.in_use, r.last_used or 0.0)


def worker_report(hb: Heartbeat, at: float, resident: tuple[ResidentReport, ...]) -> WorkerReport:
    """A heartbeat as a core event, with the worker's residency as tracked up to it (`WorkerReports`)."""
    cap = hb.capacity
    return WorkerReport(
        at=at, worker_id=hb.worker_id, total_pages=int(cap.get("pool_pages", 0)), free_pages=hb.free_pages,
        max_rank=int(cap.get("max_rank", 0)), max_inflight=int(cap.get("max_inflight", 32)),
        running=hb.running, queue_depth=hb.queue_depth, tokens_per_s=hb.tokens_per_s,
        draining=hb.draining or hb.gone,
        device_bytes=int(cap.get("pool_pages", 0)) * int(cap.get("page_bytes", 0)),
        # RAM holds copies of the hottest disk blobs: the cache holds as many bytes as its larger level
        host_bytes=max(int(cap.get("host_ram_bytes", 0)), int(cap.get("host_disk_bytes", 0))),
        page_bytes=int(cap.get("page_bytes", 0)),
        resident=resident,
    )


@dataclass(frozen=True)
class PredictorAnswer:
    """A `Predict` carried out: the event for the core, the predictor's health switches made on the way (a
    fallback chain's; `scheduler.predict.Switch`), and the name of the predictor answering now."""

    event: Predicted
    switches: list[Switch]
    active: str


class PredictorThread:
    """The demand predictor's one user: carries out the core's `Predict` commands in order, on a thread of its
    own, so that a forecast (an LSTM's forward over 10,000 adapters: ~0.5 s on a CPU core) never holds up the
    event loop. `close()` waits for the forecast running and closes the predictor (a background trainer)."""

    def __init__(self, predictor: Predictor, clock: Callable[[], float] = time.time) -> None:
        self.predictor, self.clock = predictor, clock
        self.active = predictor.name
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorafn-predict")

    def submit(self, command: Predict) -> asyncio.Future[PredictorAnswer]:
        """Queue `command` behind those submitted before it (call on the event loop; await the answer)."""
        return asyncio.get_running_loop().run_in_executor(self._pool, self._answer, command)

    def _answer(self, command: Predict) -> PredictorAnswer:
        event = predict(self.predictor, command, self.clock())
        take = getattr(self.predictor, "take_switches", None)
        active = getattr(self.predictor, "active", None)
        return PredictorAnswer(event, take() if take is not None else [],
                               active if isinstance(active, str) else self.predictor.name)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        close = getattr(self.predictor, "close", None)  # a background-trained predictor's thread
        if close is not None:
            close()


class WorkerReports:
    """Heartbeats -> the core's `WorkerReport`s. A heartbeat carries the whole residency every few heartbeats
    and the changes in between (`protocol.residency`); the core still gets the whole residency with every
    report, a tuple rebuilt only when something changed, of `ResidentReport`s made once per change (at 1,000
    resident versions a heartbeat's residency cost 3.2 ms to decode and convert whole, against tens of
    microseconds for a few changes). A delta on a heartbeat this reader missed (lost on core NATS, or sent
    before it started) leaves the residency as it last was until the next full heartbeat; a worker whose full
    heartbeat has not come yet is reported holding nothing (it is routed to, and what it holds counts from
    its first full heartbeat, at most `protocol.residency.FULL_EVERY` heartbeats later)."""

    def __init__(self) -> None:
        self.residency: ResidencyTracker[ResidentReport] = ResidencyTracker(resident_report)

    def report(self, hb: Heartbeat, at: float) -> WorkerReport:
        self.residency.apply(hb)
        report = worker_report(hb, at, self.residency.resident(hb.worker_id) or ())
        if hb.gone:
            self.residency.forget(hb.worker_id)
        return report

    def forget(self, worker_id: str) -> None:
        """The worker is gone: its next heartbeat, if any, starts from a full one."""
        self.residency.forget(worker_id)


@dataclass
class _Lookup:
    spec: AdapterSpec | None
    at: float


class AdapterDirectory:
    """tenant/adapter[/version] -> `AdapterSpec` from Postgres, cached (`adapter_cache_s`; a miss for
    `miss_cache_s`) and cleared by the registry's AdapterEvents."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, ttl_s: float, miss_ttl_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sessions = sessions
        self.ttl_s = ttl_s
        self.miss_ttl_s = miss_ttl_s
        self.clock = clock
        self._cache: dict[tuple[str, str, str | None], _Lookup] = {}
        self._ids: dict[tuple[str, str], uuid.UUID] = {}  # tenant/adapter -> its row id (demand history)

    def clear(self) -> None:
        """Forget every lookup (adapter events may have been missed: a NATS reconnection)."""
        self._cache.clear()

    def forget(self, tenant: str, adapter: str) -> None:
        for key in [k for k in self._cache if k[0] == tenant and k[1] == adapter]:
            del self._cache[key]
        self._ids.pop((tenant, adapter), None)

    def cached(self, key: tuple[str, str, str | None]) -> _Lookup | None:
        """A lookup still fresh, else None."""
        hit = self._cache.get(key)
        if hit is None or self.clock() - hit.at >= (self.ttl_s if hit.spec is not None else self.miss_ttl_s):
            return None
        return hit

    async def prefetch(self, keys: Iterable[tuple[str, str, str | None]]) -> None:
        """Look up every key not fresh in the cache, in one round trip (a batch of invocations of many
        adapters costs one query, not one per invocation)."""
        missing = list({k for k in keys if self.cached(k) is None})
        if not missing:
            return
        async with self.sessions() as session:
            found = await repo.find_adapter_targets(session, keys=missing)
        now = self.clock()
        if len(self._cache) + len(missing) > 100_000:
            self._cache.clear()
            self._ids.clear()
        for key in missing:
            target = found.get(key)
            tenant, adapter, _ = key
            spec = None if target is None else AdapterSpec(tenant, adapter, target.version, target.max_rank,
                                                           target.bytes)
            self._cache[key] = _Lookup(spec, now)
            if target is not None:
                self._ids[(tenant, adapter)] = target.adapter_id

    async def lookup(self, tenant: str, adapter: str, version: str | None) -> AdapterSpec | None:
        """The spec of `tenant/adapter` at `version` (its current version when None); None: it does not exist."""
        key = (tenant, adapter, version)
        hit = self.cached(key)
        if hit is None:
            await self.prefetch([key])
            hit = self._cache[key]
        return hit.spec

    def adapter_id(self, tenant: str, adapter: str) -> uuid.UUID | None:
        """The adapter's row id if a lookup found it (demand history needs it)."""
        return self._ids.get((tenant, adapter))


FailHook = Callable[[Invocation, InvocationResult], Awaitable[None]]
DemandHook = Callable[[str, str, float], None]


class Dispatcher:
    """Run with `run(stop)`; see the module docstring."""

    def __init__(self, *, nc: NatsClient, js: JetStreamContext, core: SchedulerCore, directory: AdapterDirectory,
                 cfg: PlacementSettings, fail: FailHook, demand: DemandHook | None = None,
                 clock: Callable[[], float] = time.time, metrics: SchedulerMetrics | None = None,
                 leading: Callable[[], bool] = lambda: True, predictor: PredictorThread | None = None) -> None:
        self.nc, self.js, self.core, self.directory, self.cfg = nc, js, core, directory, cfg
        self.leading = leading  # whether this replica carries out staging verbs and rescues now
        self.fail_hook = fail
        self.demand_hook = demand
        self.clock = clock
        self.reports = WorkerReports()  # heartbeats -> core events, residency tracked across delta heartbeats
        self._room = asyncio.Event()  # set while some worker can take more work
        self._tasks: set[asyncio.Task[None]] = set()
        self._unrescued: dict[str, str] = {}  # gone workers whose rescue failed or waits for leadership -> why
        self._sending = asyncio.Semaphore(MAX_BATCHES_IN_FLIGHT)
        self._cancelled: OrderedDict[str, None] = OrderedDict()  # invocations cancelled before their dispatch
        self.dispatched = 0
        self.metrics = metrics  # refreshed on ticks: nothing per invocation
        self._intervals_seen = 0  # the core's interval records already in the metrics
        self.predictor = predictor  # carries out the core's Predict commands (None: no pre-staging)
        self._switches: list[tuple[str, str]] = []  # predictor health switches not yet in the metrics

    # -- events from NATS ----------------------------------------------------------------------------------

    def apply(self, event: Event) -> list[Command]:
        """Feed the core one event and carry out what needs no message at hand (rescues, staging verbs: the
        leader's alone)."""
        commands = self.core.handle(event)
        for c in commands:
            if isinstance(c, Rescue):
                self.reports.forget(c.worker_id)
                if self.leading():
                    self._spawn(self.rescue(c.worker_id, c.reason), f"rescue-{c.worker_id}")
                else:
                    self._unrescued[c.worker_id] = c.reason
                    if len(self._unrescued) > RESCUES_REMEMBERED:
                        del self._unrescued[next(iter(self._unrescued))]
                    self._dropped("rescue")
            elif isinstance(c, Fetch | Load | Evict):
                if self.leading():
                    self._spawn(self.stage(c), f"stage-{c.worker_id}")
                else:
                    self._dropped(type(c).__name__.lower())
            elif isinstance(c, Predict):
                if self.predictor is None:
                    raise RuntimeError("the core asked for a prediction and the dispatcher has no predictor")
                self._spawn(self._predicted(self.predictor, self.predictor.submit(c)), "predict")  # in order
        self._update_room()
        return commands

    async def _predicted(self, thread: PredictorThread, answer: Awaitable[PredictorAnswer]) -> None:
        """Feed the core a prediction when its thread is done (a failed one leaves that interval unstaged)."""
        try:
            got = await answer
        except Exception:
            logger.exception("demand prediction failed (this interval is not pre-staged)")
            return
        thread.active = got.active
        for s in got.switches:
            logger.warning("demand predictor %s -> %s at %.0f: %s", s.from_, s.to, s.at, s.reason)
            self._switches.append((s.from_, s.to))
        self.apply(got.event)

    def on_heartbeat(self, hb: Heartbeat) -> None:
        now = self.clock()
        if not hb.gone:  # back (paused, or restarted with its id): its work is its own again, not to rescue
            self._unrescued.pop(hb.worker_id, None)
        self.apply(self.reports.report(hb, now))
        if hb.gone:
            self.apply(WorkerGone(now, hb.worker_id))

    def on_result(self, result: InvocationResult) -> None:
        if result.status == "cancelled":
            self._cancelled[result.invocation_id] = None
            if len(self._cancelled) > CANCELLED_REMEMBERED:
                self._cancelled.popitem(last=False)
        self.apply(InvocationFinished(self.clock(), result.invocation_id, result.worker_id))

    def on_adapter_event(self, event: AdapterEvent) -> None:
        self.directory.forget(event.tenant, event.adapter)

    def _dropped(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.dropped.labels(kind).inc()

    def _update_room(self) -> None:
        if self.core.has_room():
            self._room.set()
        else:
            self._room.clear()

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- loops ---------------------------------------------------------------------------------------------

    def consumer_config(self) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=subjects.DISPATCH_CONSUMER, filter_subject=subjects.INVOKE_ALL,
            ack_policy=AckPolicy.EXPLICIT, ack_wait=self.cfg.dispatch_ack_wait_s, max_deliver=-1,
            max_ack_pending=-1,
        )

    async def remove_other_consumers(self) -> None:
        """Delete every other consumer of the invocations stream: on a work-queue stream JetStream refuses a
        consumer whose filter overlaps another's, and the per-adapter consumers of lorafn's earlier releases
        (`invoke-<tenant>-<adapter>`) would keep the dispatcher's from being created on an upgraded stack."""
        for info in await self.js.consumers_info(subjects.INVOCATIONS_STREAM):
            if info.name != subjects.DISPATCH_CONSUMER:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await self.js.delete_consumer(subjects.INVOCATIONS_STREAM, info.name)
                logger.info("deleted consumer %s of the invocations stream (the dispatcher consumes it alone)",
                            info.name)

    async def run(self, stop: asyncio.Event) -> None:
        """Dispatch until `stop`; then wait for rescues in flight."""
        await self.remove_other_consumers()
        loop = PullLoop(self.js, stream=subjects.INVOCATIONS_STREAM, config=self.consumer_config(),
                        fetch_timeout_s=self.cfg.dispatch_fetch_timeout_s)
        ticks = asyncio.create_task(self._tick_loop(stop), name="dispatcher-ticks")

        async def want() -> int:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), timeout=self.cfg.tick_s)
                if self._room.is_set():
                    return FETCH_BATCH
            return 1

        try:
            await loop.run(stop, self.handle_batch, want)
        finally:
            ticks.cancel()
            await asyncio.gather(ticks, return_exceptions=True)
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=5.0)

    async def _tick_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.cfg.tick_s)
            try:
                await self.tick()
            except (nats.errors.Error, nats.js.errors.Error) as e:
                logger.warning("dispatcher tick failed: %s", e)

    async def tick(self) -> None:
        """Read the work stream's per-worker counts, then let time pass in the core."""
        try:
            info = await self.js.stream_info(subjects.WORK_STREAM, subjects_filter=subjects.WORK_ALL)
            counts = tuple((s.rpartition(".")[2], n) for s, n in (info.state.subjects or {}).items())
            self.apply(WorkQueues(self.clock(), counts))
        except nats.js.errors.NotFoundError:
            pass
        self.apply(Tick(self.clock()))
        if self.leading():
            for worker_id, reason in list(self._unrescued.items()):
                self._spawn(self.rescue(worker_id, reason), f"rescue-{worker_id}")
        switches, self._switches = self._switches, []
        if self.metrics is not None:
            await self._observe(self.metrics, switches)

    async def _observe(self, metrics: SchedulerMetrics, switches: list[tuple[str, str]]) -> None:
        """Copy the core's decisions, worker queues and staging records into the metrics, and read the
        invocations waiting per adapter subject (one request per tick, whatever the number of adapters)."""
        metrics.observe_decisions(self.core.decisions)
        metrics.observe_workers(self.core.views())
        if self.predictor is not None:
            new = min(self.core.intervals_closed - self._intervals_seen, len(self.core.intervals))
            self._intervals_seen = self.core.intervals_closed
            records = [self.core.intervals[-k] for k in range(new, 0, -1)]  # the newest, without copying them all
            metrics.observe_staging(records, active=self.predictor.active, workers_needed=self.core.workers_needed,
                                    switches=switches)
        try:
            info = await self.js.stream_info(subjects.INVOCATIONS_STREAM, subjects_filter=subjects.INVOKE_ALL)
        except nats.js.errors.NotFoundError:
            return
        pending = info.state.subjects or {}
        metrics.observe_pending(pending)
        metrics.observe_scale(self.core.views(), sum(pending.values()), self.core.workers_needed)

    # -- one batch -----------------------------------------------------------------------------------------

    async def handle_batch(self, batch: list[Msg]) -> None:
        """Decide every message of the batch in order (their adapters looked up in one query), then publish the
        dispatches together, in the background: the next fetch does not wait for this batch's round trips
        (at most `MAX_BATCHES_IN_FLIGHT` batches are)."""
        if not batch:
            return
        decoded: list[tuple[Msg, Invocation]] = []
        for msg in batch:
            try:
                decoded.append((msg, Invocation.decode(msg.data)))
            except MessageInvalid as e:
                logger.error("dropping an undecodable invocation on %s: %s", msg.subject, e)
                await msg.term()
        try:
            await self.directory.prefetch((inv.tenant, inv.adapter, inv.version) for _, inv in decoded
                                          if inv.adapter is not None and inv.adapter != BASE_ADAPTER)
        except (OSError, SQLAlchemyError) as e:  # Postgres away: each message decides alone (see _decide)
            logger.warning("adapter lookups failed (%s)", e)
        sends: list[Awaitable[None]] = []
        for msg, inv in decoded:
            try:
                send = await self._decide(msg, inv)
            except Exception:  # a bug or Postgres down: the message comes back after a delay
                logger.exception("dispatching %s failed; retrying it in 1 s", msg.subject)
                await self._nak(msg, 1.0)
                continue
            if send is not None:
                sends.append(send)
        if sends:
            await self._sending.acquire()
            self._spawn(self._send_all(sends), "dispatch-sends")

    async def _send_all(self, sends: list[Awaitable[None]]) -> None:
        try:
            await asyncio.gather(*sends)
        finally:
            self._sending.release()

    async def _decide(self, msg: Msg, inv: Invocation) -> Awaitable[None] | None:
        if inv.id in self._cancelled:  # its cancelled result is recorded: nothing to run
            await self._ack(msg)
            return None
        work = WorkHeaders.read(msg)
        problem = envelope_problem(msg.subject, inv)
        if problem is not None:
            await self._refuse(msg, inv, work, problem.code, problem.reason, reply_ok=problem.reply_ok)
            return None
        published = stream_time(msg) or self.clock()
        arrived = work.arrived_at if work.arrived_at is not None else published
        now = self.clock()
        adapter = inv.adapter if inv.adapter is not None else BASE_ADAPTER
        spec: AdapterSpec | None = None
        unknown = False
        if adapter != BASE_ADAPTER:
            # Postgres away: the lookup raises and the invocation waits (nak). A version named by the payload is
            # never served unchecked: anyone who may publish on the tenant's subjects may name any version.
            spec = await self.directory.lookup(inv.tenant, adapter, inv.version)
            if spec is None and inv.version is not None and \
                    await self.directory.lookup(inv.tenant, adapter, None) is not None:
                # The adapter exists and this is not one of its versions (they live as long as the adapter): a
                # version of another tenant or adapter, named on purpose. An adapter that does not exist takes
                # the unknown-adapter path below (deleted while queued: not_found after the grace period).
                await self._refuse(msg, inv, work, ErrorCode.forbidden,
                                   f"version {inv.version[:16]} is not a version of {inv.tenant}/{adapter}",
                                   reply_ok=True)
                return None
            unknown = spec is None
        if work.epoch == 1 and self.demand_hook is not None and adapter != BASE_ADAPTER and \
                (msg.metadata.num_delivered or 1) == 1:
            self.demand_hook(inv.tenant, adapter, published)
        event = InvocationArrived(
            at=now, invocation_id=inv.id, adapter=spec, unknown=unknown, name=f"{inv.tenant}/{adapter}",
            published_at=published, max_tokens=inv.sampling.max_tokens, epoch=work.epoch,
        )
        for command in self.apply(event):
            if isinstance(command, Dispatch):
                data = msg.data
                if spec is not None and inv.version != spec.version:  # a direct client named no version
                    data = inv.model_copy(update={"version": spec.version}).encode()
                # The subject it arrived on, not a header a publisher could have set: they agree (checked above).
                headers = WorkHeaders(epoch=work.epoch, arrived_at=arrived, subject=msg.subject,
                                      route=command.reason)
                return self._send(msg, data, inv.id, command.worker_id, headers)
            if isinstance(command, Defer):
                await self._nak(msg, max(0.0, command.retry_at - now))
                return None
            if isinstance(command, Fail):
                result = InvocationResult(invocation_id=inv.id, status="failed", epoch=work.epoch,
                                          error=InvocationError(code=command.code, message=command.message))
                await self.fail_hook(inv, result)
                await self._ack(msg)
                return None
        return None

    async def _refuse(self, msg: Msg, inv: Invocation, work: WorkHeaders, code: str, reason: str, *,
                      reply_ok: bool) -> None:
        """Fail an invocation that must not run (its payload disagrees with its subject, or names what its tenant
        may not use): a failed result in the results stream, to its reply subject only when that is the tenant's
        own, and a log line; then ack it. It never reaches a worker."""
        logger.warning("refused invocation %s on %s (%s): %s", inv.id, msg.subject, code, reason)
        result = InvocationResult(invocation_id=inv.id, status="failed", epoch=work.epoch,
                                  error=InvocationError(code=ErrorCode(code), message=reason))
        target = inv if reply_ok else inv.model_copy(update={"reply_to": None, "callback_url": None})
        await self.fail_hook(target, result)
        await self._ack(msg)

    async def _send(self, msg: Msg, data: bytes, invocation_id: str, worker_id: str, work: WorkHeaders) -> None:
        try:
            await dispatch(self.js, data, msg.metadata.sequence.stream, worker_id, work)
        except (nats.errors.Error, nats.js.errors.Error) as e:
            logger.warning("could not dispatch %s to %s (%s); retrying", invocation_id, worker_id, e)
            self.apply(InvocationFinished(self.clock(), invocation_id, worker_id))
            await self._nak(msg, 0.5)
            return
        self.dispatched += 1
        logger.debug("dispatched %s to %s (%s, epoch %d)", invocation_id, worker_id, work.route, work.epoch)
        await self._ack(msg)

    @staticmethod
    async def _ack(msg: Msg) -> None:
        try:
            await msg.ack()
        except nats.errors.Error as e:  # redelivered after the ack wait; the dispatch is de-duplicated
            logger.warning("ack of %s failed: %s", msg.subject, e)

    @staticmethod
    async def _nak(msg: Msg, delay_s: float) -> None:
        try:
            await msg.nak(delay=delay_s)
        except nats.errors.Error as e:
            logger.warning("nak of %s failed: %s", msg.subject, e)

    # -- staging -------------------------------------------------------------------------------------------

    async def stage(self, command: Fetch | Load | Evict) -> None:
        """Carry out a staging verb on its worker (request/reply on lora.ctl.<worker>.<verb>); the outcome of a
        load comes back to the core as `LoadFinished`."""
        verb = {Fetch: ControlVerb.fetch, Load: ControlVerb.load, Evict: ControlVerb.evict}[type(command)]
        tier = None
        if isinstance(command, Evict):  # the verb names the tier to leave: the device, or the host cache too
            tier = Tier.host if command.to_tier == Tier.object else Tier.device
        request = ControlRequest(verb=verb, version=command.version, tier=tier)
        try:
            raw = await self.nc.request(subjects.control(command.worker_id, verb.value), request.encode(),
                                        timeout=self.cfg.control_timeout_s)
            reply = ControlReply.decode(raw.data)
        except (nats.errors.Error, MessageInvalid) as e:
            logger.warning("%s of %s on %s failed: %s", verb.value, command.version[:12], command.worker_id, e)
            reply = ControlReply(ok=False)
        if not reply.ok and reply.error is not None:
            logger.warning("%s of %s on %s refused: %s", verb.value, command.version[:12], command.worker_id,
                           reply.error.message)
        if isinstance(command, Load):
            self.apply(LoadFinished(self.clock(), command.worker_id, command.version, ok=reply.ok))

    # -- rescue --------------------------------------------------------------------------------------------

    async def rescue(self, worker_id: str, reason: str) -> None:
        """Give the unfinished work of a gone worker to the others: delete its consumer first (a paused worker
        that wakes up takes nothing more), then requeue what its subject holds."""
        self._unrescued.pop(worker_id, None)
        try:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await self.js.delete_consumer(subjects.WORK_STREAM, subjects.work_consumer(worker_id))
            count = await requeue_subject(self.js, worker_id)
        except (nats.errors.Error, nats.js.errors.Error) as e:
            logger.warning("rescue of worker %s failed (%s); the next tick tries again", worker_id, e)
            self._unrescued[worker_id] = reason
            return
        if self.metrics is not None:
            self.metrics.observe_rescue(count)
        logger.warning("worker %s is gone (%s); %d unfinished invocations dispatched again", worker_id, reason,
                       count)
