"""The scheduler service (first version: reactive placement).

- Warm state: heartbeats (`lora.evt.worker.*`) update an in-memory `WarmState`; every `flush_every_s`
  it is written to Postgres in one transaction (workers, residency per tier); workers silent for
  `heartbeat_timeout_s` are marked down (their residency no longer counts).
- Demand: a CORE subscription on `lora.invoke.>` sees every published invocation without consuming it;
  counts per adapter and time bucket are batched into the demand history.
- Placement: when an invocation arrives for an adapter version that no live worker holds on its device,
  the `PlacementPolicy` picks a worker and the scheduler sends it `load` (the worker then pulls that
  adapter's consumer). A reconcile loop also places adapters whose consumer has queued messages that no
  live worker pulls (e.g. after the worker holding it died).
- Invocation lifecycle in Postgres: running on `InvocationStarted`; succeeded/failed, timestamps and
  token counts from the results stream (a durable consumer).
- Dead letters: the JetStream advisory of max deliveries makes the scheduler publish a failed result
  (`dead_letter`) to the results stream and the caller, mark the invocation failed, and remove the
  message from the invocations stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import defaultdict
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from protocol import subjects
from protocol.messages import (
    BASE_ADAPTER,
    ControlReply,
    ControlRequest,
    ControlVerb,
    ErrorCode,
    Heartbeat,
    Invocation,
    InvocationError,
    InvocationResult,
    InvocationStarted,
    MessageInvalid,
)
from protocol.results import record_result
from protocol.streams import ensure_streams
from scheduler.policy import AdapterRef, LeastLoadedPlacement, PlacementPolicy
from scheduler.settings import SchedulerSettings
from scheduler.state import WarmState
from storage import repo
from storage.errors import NotFound
from storage.models import InvocationStatus, Tier

logger = logging.getLogger(__name__)

KIND_HEADER = subjects.KIND_HEADER


@dataclass(frozen=True)
class AdapterInfo:
    """What the scheduler caches about `tenant/adapter`: ids and the current version."""

    adapter_id: uuid.UUID
    version: str | None
    fetched_at: float


class SchedulerService:
    """Run with `run(stop)`; returns after flushing and draining once `stop` is set."""

    def __init__(self, settings: SchedulerSettings, *, placement: PlacementPolicy | None = None) -> None:
        self.settings = settings
        self.cfg = settings.scheduler
        self.placement: PlacementPolicy = placement or LeastLoadedPlacement()
        self.state = WarmState(heartbeat_timeout_s=self.cfg.heartbeat_timeout_s,
                               placement_grace_s=self.cfg.placement_grace_s)
        self.nc: NatsClient | None = None
        self.js: JetStreamContext | None = None
        self.sessions: async_sessionmaker[AsyncSession] | None = None
        self._demand: dict[tuple[str, str, datetime], int] = defaultdict(int)
        self._started: list[InvocationStarted] = []
        self._adapters: dict[tuple[str, str], AdapterInfo] = {}
        self._unknown_since: dict[tuple[str, str], float] = {}  # adapters with queued work that do not exist
        self._draining: set[tuple[str, str]] = set()  # ... whose invocations are being failed now
        self._placing: dict[str, asyncio.Task[None]] = {}
        self._down: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        async with AsyncExitStack() as stack:
            engine = repo.create_engine(self.settings.database)
            stack.push_async_callback(engine.dispose)
            self.sessions = repo.session_factory(engine)
            self.nc = await nats.connect(
                self.settings.nats.url, connect_timeout=self.settings.nats.connect_timeout_s,
                max_reconnect_attempts=-1, reconnect_time_wait=0.5, name="lorafn-scheduler",
            )
            stack.push_async_callback(self._close_nats)
            self.js = self.nc.jetstream()
            await ensure_streams(self.js)
            await self.nc.subscribe(subjects.WORKER_EVENTS_ALL, cb=self._on_heartbeat)
            await self.nc.subscribe(subjects.INVOKE_ALL, cb=self._on_invocation)
            await self.nc.subscribe(subjects.invocation_event("started"), cb=self._on_started)
            await self.nc.subscribe(subjects.max_deliveries_advisory(subjects.INVOCATIONS_STREAM), cb=self._on_max_deliveries)
            loops = [
                asyncio.create_task(self._every(self.cfg.flush_every_s, self.flush, stop), name="flush"),
                asyncio.create_task(self._every(self.cfg.reconcile_every_s, self.reconcile, stop), name="reconcile"),
                asyncio.create_task(self._results_loop(stop), name="results"),
            ]
            logger.info("scheduler ready")
            await stop.wait()
            await asyncio.gather(*loops, return_exceptions=True)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.flush()

    async def _close_nats(self) -> None:
        assert self.nc is not None
        if not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.drain()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @staticmethod
    async def _every(period_s: float, fn: Any, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=period_s)
            try:
                await fn()
            except Exception:
                logger.exception("%s failed; trying again in %.1f s", getattr(fn, "__name__", fn), period_s)

    # -- subscriptions -----------------------------------------------------------------------------------

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            heartbeat = Heartbeat.decode(msg.data)
        except MessageInvalid as e:
            logger.warning("ignoring a heartbeat on %s: %s", msg.subject, e)
            return
        if heartbeat.worker_id not in self.state.workers:
            logger.info("worker %s is up", heartbeat.worker_id)
        self._down.discard(heartbeat.worker_id)
        self.state.observe(heartbeat)

    async def _on_started(self, msg: Msg) -> None:
        with contextlib.suppress(MessageInvalid):
            self._started.append(InvocationStarted.decode(msg.data))

    async def _on_invocation(self, msg: Msg) -> None:
        """A copy of every published invocation: count demand, place its adapter if nobody holds it."""
        try:
            inv = Invocation.decode(msg.data)
        except MessageInvalid:
            return
        adapter = inv.adapter if inv.adapter is not None else BASE_ADAPTER
        if adapter == BASE_ADAPTER:
            return
        bucket = self.cfg.demand_bucket_s
        now = int(time.time())
        self._demand[(inv.tenant, adapter, datetime.fromtimestamp(now - now % bucket, UTC))] += 1
        self.ensure_placed(inv.tenant, adapter, inv.version)

    # -- placement ---------------------------------------------------------------------------------------

    async def _adapter_info(self, tenant: str, adapter: str) -> AdapterInfo | None:
        key = (tenant, adapter)
        info = self._adapters.get(key)
        if info is not None and time.monotonic() - info.fetched_at < self.cfg.adapter_cache_s:
            return info
        assert self.sessions is not None
        try:
            async with self.sessions() as session:
                tenant_row = await repo.get_tenant(session, name=tenant)
                assert tenant_row is not None
                row = await repo.get_adapter(session, tenant=tenant_row, name=adapter)
        except NotFound:
            self._adapters.pop(key, None)
            return None
        version = row.current_version.sha256 if row.current_version is not None else None
        info = AdapterInfo(row.id, version, time.monotonic())
        self._adapters[key] = info
        return info

    def ensure_placed(self, tenant: str, adapter: str, version: str | None) -> None:
        """Place `tenant/adapter` (at `version`, or its current version) unless a live worker holds it."""
        if version is not None and self.state.holders(version):
            return
        key = version or f"{tenant}/{adapter}"
        if key in self._placing:
            return
        task = self._spawn(self._place(tenant, adapter, version), f"place-{tenant}-{adapter}")
        self._placing[key] = task
        task.add_done_callback(lambda _: self._placing.pop(key, None))

    async def _place(self, tenant: str, adapter: str, version: str | None) -> None:
        assert self.nc is not None
        if version is None:
            info = await self._adapter_info(tenant, adapter)
            if info is None or info.version is None:
                logger.warning("invocation for unknown adapter %s/%s: nothing to place", tenant, adapter)
                return
            version = info.version
        tried: set[str] = set()
        while not self.state.holders(version):
            ref = AdapterRef(tenant=tenant, adapter=adapter, version=version)
            views = [v for v in self.state.views() if v.worker_id not in tried]
            worker_id = self.placement.choose_worker(ref, views, self.state.residency())
            if worker_id is None:
                logger.warning("no worker can take %s/%s (%s) now; will retry", tenant, adapter, version[:12])
                return
            tried.add(worker_id)
            request = ControlRequest(verb=ControlVerb.load, tenant=tenant, adapter=adapter, version=version)
            self.state.placed(version, worker_id)
            try:
                raw = await self.nc.request(subjects.control(worker_id, ControlVerb.load.value), request.encode(),
                                            timeout=self.cfg.control_timeout_s)
                reply = ControlReply.decode(raw.data)
            except (nats.errors.Error, MessageInvalid) as e:
                self.state.unplaced(version, worker_id)
                logger.warning("load of %s/%s on %s failed: %s", tenant, adapter, worker_id, e)
                continue
            if not reply.ok:
                self.state.unplaced(version, worker_id)
                logger.warning("worker %s refused to load %s/%s: %s", worker_id, tenant, adapter,
                               reply.error.message if reply.error else "?")
                if reply.error is not None and reply.error.code in (
                    ErrorCode.adapter_corrupted, ErrorCode.adapter_invalid, ErrorCode.not_found
                ):
                    return  # no other worker would do better; invocations fail with this code on arrival
                continue
            logger.info("placed %s/%s (%s) on %s in %.1f ms", tenant, adapter, version[:12], worker_id,
                        reply.load_ms or 0.0)
            return

    async def reconcile(self) -> None:
        """Place adapters with invocations queued in the stream that no live worker holds (their worker
        died, a placement failed, or they were published while the adapter was unknown)."""
        assert self.js is not None
        try:
            info = await self.js.stream_info(subjects.INVOCATIONS_STREAM, subjects_filter=subjects.INVOKE_ALL)
        except (nats.errors.Error, nats.js.errors.Error) as e:
            logger.debug("cannot read the invocations stream: %s", e)
            return
        queued_unknown: set[tuple[str, str]] = set()
        for subject, count in (info.state.subjects or {}).items():
            parts = subject.split(".")
            if not count or len(parts) != 4 or parts[3] == BASE_ADAPTER:
                continue
            tenant, adapter = parts[2], parts[3]
            adapter_info = await self._adapter_info(tenant, adapter)
            if adapter_info is None or adapter_info.version is None:
                queued_unknown.add((tenant, adapter))
                since = self._unknown_since.setdefault((tenant, adapter), time.monotonic())
                if time.monotonic() - since >= self.cfg.unknown_adapter_grace_s and (tenant, adapter) not in self._draining:
                    self._spawn(self._fail_unknown(tenant, adapter), f"unknown-{tenant}-{adapter}")
                continue
            if not self.state.holders(adapter_info.version):
                logger.info("%d invocations of %s/%s queued and no live worker holds it; placing", count, tenant,
                            adapter)
                self.ensure_placed(tenant, adapter, adapter_info.version)
        for key in set(self._unknown_since) - queued_unknown:
            del self._unknown_since[key]

    async def _fail_unknown(self, tenant: str, adapter: str) -> None:
        """Fail, visibly, the invocations queued for an adapter that does not exist (published over NATS for a
        name never pushed, or accepted by a gateway just before the adapter was deleted): nobody would ever
        pull them. They get a `not_found` result (results stream, reply subject, Postgres row) and are acked
        off the work queue by a consumer of their subject only, removed at the end."""
        assert self.js is not None
        self._draining.add((tenant, adapter))
        try:
            await self._drain_unknown(tenant, adapter)
        finally:
            self._draining.discard((tenant, adapter))

    async def _drain_unknown(self, tenant: str, adapter: str) -> None:
        assert self.js is not None
        subject = subjects.invoke(tenant, adapter)
        try:
            psub = await self.js.pull_subscribe(
                subject, stream=subjects.INVOCATIONS_STREAM,
                config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, inactive_threshold=60.0),
            )
        except (nats.errors.Error, nats.js.errors.Error) as e:  # e.g. a worker still consumes the subject
            logger.info("cannot drain invocations of unknown adapter %s/%s yet: %s", tenant, adapter, e)
            return
        failed = 0
        try:
            while True:
                try:
                    msgs = await psub.fetch(64, timeout=0.5)
                except (nats.errors.TimeoutError, TimeoutError):
                    break
                if await self._adapter_info(tenant, adapter) is not None:  # pushed meanwhile: its workers take them
                    for msg in msgs:
                        await msg.nak()
                    return
                for msg in msgs:
                    try:
                        inv = Invocation.decode(msg.data)
                    except MessageInvalid:
                        await msg.term()
                        continue
                    result = InvocationResult(
                        invocation_id=inv.id, status="failed", attempt=msg.metadata.num_delivered or 1,
                        error=InvocationError(code=ErrorCode.not_found,
                                              message=f"adapter {tenant}/{adapter} does not exist"),
                    )
                    await self._finish_failed(inv, result)
                    await msg.ack()
                    failed += 1
        finally:
            with contextlib.suppress(Exception):
                name = (await psub.consumer_info()).name
                await psub.unsubscribe()
                await self.js.delete_consumer(subjects.INVOCATIONS_STREAM, name)
            if failed:
                logger.warning("failed %d invocations of unknown adapter %s/%s", failed, tenant, adapter)

    # -- Postgres ----------------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write heartbeats, residency, demand and started invocations; mark silent workers down."""
        assert self.sessions is not None
        heartbeats = self.state.dirty()
        gone = [w for w in self.state.expire() if w not in self._down]
        demand, self._demand = self._demand, defaultdict(int)
        started, self._started = self._started, []
        if not (heartbeats or gone or demand or started):
            return
        try:
            async with self.sessions() as session, session.begin():
                await self._write_heartbeats(session, heartbeats)
                for worker_id in gone:
                    logger.warning("worker %s missed its heartbeats for %.0f s; marking it down", worker_id,
                                   self.cfg.heartbeat_timeout_s)
                    await repo.mark_worker_down(session, worker_id=worker_id)
                for (tenant, adapter, bucket_start), count in demand.items():
                    info = await self._adapter_info(tenant, adapter)
                    if info is not None:
                        await repo.record_demand(session, adapter_id=info.adapter_id, at=bucket_start,
                                                 bucket_seconds=self.cfg.demand_bucket_s, count=count)
                for s in started:
                    await repo.mark_invocation_running(
                        session, invocation_id=s.invocation_id, worker_id=s.worker_id, attempt=s.attempt,
                        started_at=datetime.fromtimestamp(s.started_at, UTC),
                    )
        except BaseException:
            for key, count in demand.items():  # keep what could not be written for the next flush
                self._demand[key] += count
            self._started[:0] = started
            raise
        self._down.update(gone)

    async def _write_heartbeats(self, session: AsyncSession, heartbeats: list[Heartbeat]) -> None:
        shas = [r.version for hb in heartbeats for r in hb.resident]
        ids = await repo.version_ids_by_sha(session, shas=shas)
        for hb in heartbeats:
            state = hb.model_dump(mode="json", exclude={"resident", "capacity"})
            await repo.upsert_worker(session, worker_id=hb.worker_id, host=hb.host, device=hb.device,
                                     capacity=hb.capacity, state=state)
            rows = [
                repo.ResidencyRow(
                    version_id=ids[r.version], tier=Tier(r.tier), pages=r.pages, nbytes=r.bytes,
                    last_used_at=datetime.fromtimestamp(r.last_used, UTC) if r.last_used else None,
                )
                for r in hb.resident if r.version in ids
            ]
            await repo.sync_worker_residency(session, worker_id=hb.worker_id, rows=rows)

    # -- results -----------------------------------------------------------------------------------------

    async def _results_loop(self, stop: asyncio.Event) -> None:
        """Record every result in Postgres (succeeded/failed, timestamps, tokens), in batches.

        A durable push consumer of the results stream feeds a local queue; each batch is written in one
        transaction and acked after it commits (a batch that fails is redelivered)."""
        assert self.js is not None
        durable = self.cfg.results_consumer
        inbox: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_result(msg: Msg) -> None:
            inbox.put_nowait(msg)

        sub = None
        while sub is None and not stop.is_set():
            try:
                sub = await self.js.subscribe(
                    subjects.RESULT_ALL, durable=durable, stream=subjects.RESULTS_STREAM, cb=on_result,
                    manual_ack=True,
                    config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
                                          ack_wait=30.0, max_ack_pending=1024),
                )
            except (nats.errors.Error, nats.js.errors.Error) as e:
                logger.warning("cannot consume the results stream yet (%s); retrying", e)
                await asyncio.sleep(1.0)
        while not stop.is_set():
            try:
                first = await asyncio.wait_for(inbox.get(), timeout=0.5)
            except TimeoutError:
                continue
            msgs = [first]
            while not inbox.empty() and len(msgs) < 256:
                msgs.append(inbox.get_nowait())
            try:
                await self._record_results(msgs)
            except Exception:
                logger.exception("recording %d results failed; they will be redelivered", len(msgs))
                for m in msgs:
                    with contextlib.suppress(Exception):
                        await m.nak(delay=1.0)
                continue
            for m in msgs:
                with contextlib.suppress(Exception):
                    await m.ack()

    async def _record_results(self, msgs: list[Msg]) -> None:
        assert self.sessions is not None
        async with self.sessions() as session, session.begin():
            for m in msgs:
                try:
                    result = InvocationResult.decode(m.data)
                except MessageInvalid as e:
                    logger.warning("ignoring an undecodable result on %s: %s", m.subject, e)
                    continue
                ts = m.metadata.timestamp
                finished = ts if isinstance(ts, datetime) else datetime.now(UTC)
                await repo.finish_invocation(session, invocation_id=result.invocation_id,
                                             **self._result_fields(result, finished))

    @staticmethod
    def _result_fields(result: InvocationResult, finished: datetime) -> dict[str, Any]:
        t = result.timings

        def before_end(ms: float | None) -> datetime | None:
            if ms is None or t.total_ms is None:
                return None
            return finished - timedelta(milliseconds=max(0.0, t.total_ms - ms))

        return {
            "status": InvocationStatus.succeeded if result.status == "succeeded" else InvocationStatus.failed,
            "finished_at": finished,
            "started_at": before_end(t.queued_ms),
            "first_token_at": before_end(t.first_token_ms),
            "prompt_tokens": result.usage.prompt_tokens if result.status == "succeeded" else None,
            "completion_tokens": result.usage.completion_tokens if result.status == "succeeded" else None,
            "worker_id": result.worker_id,
            "attempts": result.attempt,
            "error": f"{result.error.code}: {result.error.message}" if result.error else None,
        }

    # -- dead letters ------------------------------------------------------------------------------------

    async def _on_max_deliveries(self, msg: Msg) -> None:
        self._spawn(self._dead_letter(msg.data), "dead-letter")

    async def _dead_letter(self, advisory: bytes) -> None:
        """Fail an invocation visibly once JetStream gave up redelivering it."""
        assert self.js is not None and self.nc is not None
        try:
            body = json.loads(advisory)
            seq, deliveries = int(body["stream_seq"]), int(body.get("deliveries", 0))
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("ignoring a malformed max-deliveries advisory: %s", e)
            return
        try:
            raw = await self.js.get_msg(subjects.INVOCATIONS_STREAM, seq)
            inv = Invocation.decode(raw.data or b"")
        except nats.js.errors.NotFoundError:
            return  # acked (or removed) meanwhile
        except MessageInvalid as e:
            logger.warning("dead message %d is not an invocation (%s); removing it", seq, e)
            with contextlib.suppress(Exception):
                await self.js.delete_msg(subjects.INVOCATIONS_STREAM, seq)
            return
        try:
            existing = await self.js.get_last_msg(subjects.RESULTS_STREAM, subjects.result(inv.id))
        except nats.js.errors.NotFoundError:
            existing = None
        if existing is not None:  # answered meanwhile: send the recorded result again
            if inv.reply_to:
                with contextlib.suppress(nats.errors.Error):
                    await self.nc.publish(inv.reply_to, existing.data or b"",
                                          headers={KIND_HEADER: subjects.KIND_RESULT})
        else:
            result = InvocationResult(
                invocation_id=inv.id, status="failed", attempt=deliveries,
                error=InvocationError(
                    code=ErrorCode.dead_letter,
                    message=f"invocation {inv.id} was delivered {deliveries} times and never completed "
                            f"(the workers that took it died or timed out); giving up",
                ),
            )
            logger.warning("invocation %s dead-lettered after %d deliveries", inv.id, deliveries)
            await self._finish_failed(inv, result)
        with contextlib.suppress(Exception):
            await self.js.delete_msg(subjects.INVOCATIONS_STREAM, seq)

    async def _finish_failed(self, inv: Invocation, result: InvocationResult) -> None:
        """Record a failure the scheduler decided (results stream with its callback copy, then the caller's reply
        subject, then the Postgres row) for an invocation no worker will answer."""
        assert self.js is not None and self.nc is not None and self.sessions is not None
        payload = result.encode()
        await record_result(self.js, inv.id, payload, callback=inv.callback_url is not None)
        if inv.reply_to:
            with contextlib.suppress(nats.errors.Error):
                await self.nc.publish(inv.reply_to, payload, headers={KIND_HEADER: subjects.KIND_RESULT})
        try:
            async with self.sessions() as session, session.begin():
                await repo.finish_invocation(session, invocation_id=inv.id,
                                             **self._result_fields(result, datetime.now(UTC)))
        except Exception:
            logger.exception("could not mark %s failed in Postgres (the results consumer will)", inv.id)
