"""The worker service: consumer of its own work subject, adapter tiers, control verbs, heartbeats.

One process holds ONE backbone and one engine (run in its own thread, see `workers.engine_thread`);
this module is the asyncio side:

- consumes `lora.work.<worker id>` through ONE durable consumer (`work-<worker id>`), whatever the number
  of adapters: the scheduler's dispatcher decides which worker runs each invocation and publishes it
  there. At most `consumer.max_inflight` invocations run at a time; the loop fetches only as many as there
  are free slots (`protocol.consume.PullLoop`);
- for each: returns the recorded result if the results stream already has one (a redelivery after the
  result was recorded), else brings its adapter to the device (cold start if needed), publishes
  `InvocationStarted`, generates, streams `TokenChunk`s to the caller's reply subject, records the
  `InvocationResult` in the results stream (deduplicated by `Nats-Msg-Id: result-<id>`), sends it to the
  reply subject, and only then acks. In-progress acks keep a long generation from being redelivered;
- every message about an invocation carries its dispatch `epoch`. When this worker was silent past the
  scheduler's heartbeat timeout (paused, partitioned), the dispatcher has rescued its work: the work
  message is gone from the stream. The worker checks that on every in-progress tick and before recording
  a result, and abandons a rescued invocation (abort, no result, no more chunks);
- stops a cancelled invocation: the canceller records its `cancelled` result, then publishes
  `lora.cancel.<invocation id>` (every worker listens). The worker running it aborts the generation (its
  batch slot and KV blocks are free at the next step), records its own cancelled result (dropped as a
  duplicate: the first one recorded is the outcome), answers with the recorded one and acks. A cancelled
  invocation still queued is answered from its record when it is picked up, so it never runs; the
  in-progress tick also looks for a recorded result, so a cancel whose message was lost ends the
  generation within `in_progress_every_s`;
- answers the control verbs fetch / load / evict / drain on `lora.ctl.<worker id>.<verb>`;
- publishes a typed `Heartbeat` every `heartbeat_s` (per resident adapter: tier, rank, bytes, pages,
  in-use count; what it is running): the changes to its residency since the heartbeat before, and the whole
  residency every few heartbeats, first and after a reconnection or a failed publish (`protocol.residency`);
- on stop (SIGTERM): stops fetching, gives running invocations `drain_timeout_s` to finish, aborts the rest
  and hands them (and whatever is still queued on its subject) back to the dispatcher, sends a last
  heartbeat with gone=true, drains NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import torch
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.client import JetStreamContext

from protocol import subjects
from protocol.consume import PullLoop
from protocol.dispatch import WorkHeaders, requeue, requeue_subject
from protocol.messages import (
    BASE_ADAPTER,
    CancelInvocation,
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
    ResidentAdapter,
    Tier,
    Timings,
    TokenChunk,
    Usage,
)
from protocol.residency import ResidencySender, residency_headers
from protocol.results import record_result
from protocol.streams import ensure_streams
from scheduler.metrics import MetricsEndpoint, serve_metrics
from storage.objectstore import ObjectStore
from workers.batcher import Completion, FinishReason, TokenEvent
from workers.engine import Engine, EngineError, PromptTooLong
from workers.engine_thread import EngineThread, StepFailed
from workers.host_cache import HostCache, host_eviction
from workers.metrics import WorkerMetrics
from workers.sampling import SamplingParams, SamplingParamsInvalid
from workers.settings import WorkerSettings
from workers.tiers import AdapterTiers, AdapterUnavailable
from workers.tokenizer import Tokenizer, TokenizerError
from workers.weights import load_backbone

logger = logging.getLogger(__name__)

# Header of every message on a reply subject: which message type the payload is.
KIND_HEADER = subjects.KIND_HEADER


def default_worker_id(host: str | None = None) -> str:
    """The host name (`host`, default this machine's) reduced to the subject-token alphabet and 64 characters:
    a Kubernetes pod's name, a compose container's. It stays the same when the process restarts, so the worker
    resumes its Postgres row and its durable consumer (`work-<id>`) and serves what waits on its subject.
    Workers that share a host need LORAFN_WORKER_ID each."""
    name = socket.gethostname() if host is None else host
    token = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "-" for c in name)[:64]
    return token or "worker"


def invocation_seed(invocation_id: str) -> int:
    """The sampling seed of an invocation that gives none: derived from its id, so that a redelivered
    invocation samples the same tokens again."""
    return int.from_bytes(hashlib.sha256(invocation_id.encode()).digest()[:8], "big") >> 1


class InvocationFailed(Exception):
    """An invocation that cannot succeed (terminal: a failed result is recorded and the message acked)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Retry(Exception):
    """An invocation to try again later on this worker (NAK with a delay). `code` is the error it fails with
    once it has been retried for `consumer.max_retry_s`."""

    def __init__(self, reason: str, delay_s: float | None = None, code: ErrorCode = ErrorCode.unavailable) -> None:
        super().__init__(reason)
        self.delay_s = delay_s
        self.code = code


class Rescued(Exception):
    """The dispatcher gave this invocation to another worker (this one was silent too long): abandon it."""


class IdTaken(Exception):
    """The invocation's id already has a result recorded by a call of another tenant: this call is not answered
    from that record (it would hand one tenant's output to another, or one tenant's forged answer to another's
    caller)."""

    def __init__(self, invocation_id: str, recorder: str) -> None:
        super().__init__(f"invocation id {invocation_id} is already used by another call; pick a new id")
        self.recorder = recorder


def _refused(e: EngineError) -> InvocationFailed:
    """What the engine refused (before generating: the prompt, the adapter, the parameters), as a terminal
    failure: a prompt beyond the context window is `prompt_too_long`, anything else `bad_request`."""
    return InvocationFailed(ErrorCode.prompt_too_long if isinstance(e, PromptTooLong) else ErrorCode.bad_request,
                            str(e))


class HandBack(Exception):
    """The worker is stopping: hand the invocation back to the dispatcher."""


class Cancelled(Exception):
    """The invocation was cancelled: record `result` (its cancelled result, with what was generated)."""

    def __init__(self, result: InvocationResult) -> None:
        super().__init__(result.error.message if result.error else "cancelled")
        self.result = result


@dataclass
class _Running:
    """An invocation being handled on this worker."""

    invocation: Invocation
    seq: int  # stream sequence of its work message (gone from the stream: rescued)
    request_id: str | None = None
    aborted: bool = False
    rescued: bool = False
    cancelled: str | None = None  # why, once a cancel arrived


class WorkerService:
    """One worker: call `run(stop)`; it returns after a clean drain once `stop` is set."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        worker_id: str,
        engine: EngineThread,
        tiers: AdapterTiers,
        device: str,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or WorkerMetrics()
        self.metrics_endpoint: MetricsEndpoint | None = None  # set by run() (None: disabled)
        self.worker_id = subjects.check_name("worker", worker_id)
        self.engine = engine
        self.tiers = tiers
        self.tokenizer = engine.tokenizer
        self.device = device
        self.host = socket.gethostname()
        self.started_at = time.time()
        self.draining = False
        self._residency = ResidencySender()  # heartbeats as published: the changes, the whole every few
        self.nc: NatsClient | None = None
        self.js: JetStreamContext | None = None
        self._slots = asyncio.Semaphore(settings.consumer.max_inflight)
        self._puller: asyncio.Task[None] | None = None
        self._pull_stop = asyncio.Event()
        self._handlers: set[asyncio.Task[None]] = set()
        self._running: dict[str, _Running] = {}
        self._pending_submit = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then drain and return."""
        async with AsyncExitStack() as stack:
            self.nc = await nats.connect(
                self.settings.nats.servers,
                connect_timeout=self.settings.nats.connect_timeout_s,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                name=f"lorafn-worker-{self.worker_id}",
                inbox_prefix=self.settings.nats.inbox_prefix,
                reconnected_cb=self._on_reconnect,
            )
            stack.push_async_callback(self._close_nats)
            self.js = self.nc.jetstream()
            await ensure_streams(self.js, replicas=self.settings.nats.stream_replicas,
                                 storage=self.settings.nats.stream_storage)
            self.metrics_endpoint = await stack.enter_async_context(serve_metrics(
                self.metrics.registry, self.settings.metrics, what=f"worker {self.worker_id}"))
            for verb in ControlVerb:
                await self.nc.subscribe(subjects.control(self.worker_id, verb.value), cb=self._on_control)
            await self.nc.subscribe(subjects.CANCEL_ALL, cb=self._on_cancel)
            heartbeats = asyncio.create_task(self._heartbeat_loop(stop), name="heartbeats")
            stack.push_async_callback(self._cancel, heartbeats)
            await self._claim_work_consumer()
            self._puller = asyncio.create_task(self._pull(), name="pull-work")
            logger.info("worker %s ready on %s (%d adapter pages), consuming %s", self.worker_id, self.device,
                        self.tiers.total_pages, subjects.work(self.worker_id))
            await stop.wait()
            await self._drain()

    async def _close_nats(self) -> None:
        assert self.nc is not None
        if not self.nc.is_closed:
            with contextlib.suppress(nats.errors.Error):
                await self.nc.drain()

    @staticmethod
    async def _cancel(task: asyncio.Task[Any]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _drain(self) -> None:
        """Stop fetching, let running invocations finish (bounded), hand the rest and the queue back."""
        logger.info("worker %s draining: %d invocations running", self.worker_id, len(self._handlers))
        self.draining = True
        await self._publish_heartbeat()  # draining: the dispatcher stops sending work here
        await self._stop_pulling()
        if self._handlers:
            _, pending = await asyncio.wait(set(self._handlers), timeout=self.settings.drain_timeout_s)
            if pending:
                logger.warning("%d invocations did not finish in %.0f s; handing them back",
                               len(pending), self.settings.drain_timeout_s)
                for running in list(self._running.values()):
                    await self._abort(running)
                await asyncio.wait(pending, timeout=10.0)
        await self._hand_back_queue()
        await self._publish_heartbeat(gone=True)
        for task in list(self._tasks):
            task.cancel()

    async def _stop_pulling(self) -> None:
        self._pull_stop.set()
        if self._puller is not None:
            await asyncio.gather(self._puller, return_exceptions=True)
            self._puller = None

    async def _abort(self, running: _Running) -> None:
        running.aborted = True
        if running.request_id is not None:
            try:
                await self.engine.abort(running.request_id)
            except Exception:  # the engine may be stopping; the generation ends either way
                logger.debug("abort of %s failed", running.request_id, exc_info=True)

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- pulling -----------------------------------------------------------------------------------------

    def _consumer_config(self) -> ConsumerConfig:
        c = self.settings.consumer
        return ConsumerConfig(
            durable_name=subjects.work_consumer(self.worker_id),
            filter_subject=subjects.work(self.worker_id),
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=c.ack_wait_s,
            max_deliver=-1,  # retries are bounded by age (max_retry_s); a dead worker's work is rescued
            max_ack_pending=-1,
            # A worker that never comes back leaves no consumer behind (the rescue deletes it at once).
            inactive_threshold=3600.0,
        )

    async def _claim_work_consumer(self) -> None:
        """Before the first fetch: take over this worker's work consumer from a previous process of the same id.

        - Another live process pulling on it (its pull requests wait there; a dead process's expire within a
          fetch timeout, and the backbone takes longer to load): say so and change nothing. Two processes with
          one id share its work and flap in its heartbeats.
        - Calls the consumer delivered that nobody acknowledged were taken by the previous process, which died
          (killed, crashed, its machine lost) and came back before the scheduler declared it gone: they are
          handed back for a new dispatch now (epoch + 1, as a rescue does; the caller follows the newest), not
          redelivered here after the ack wait. Calls queued but not yet delivered stay: they were routed here.
        - The consumer is updated to this process's settings (its ack wait, for one): binding to a durable
          consumer would keep the settings it was created with.
        """
        assert self.js is not None
        durable = subjects.work_consumer(self.worker_id)
        try:
            info = await self.js.consumer_info(subjects.WORK_STREAM, durable)
        except nats.js.errors.NotFoundError:
            return  # a new worker, or one the scheduler rescued: the first fetch creates it
        except (nats.errors.Error, nats.js.errors.Error) as e:
            logger.warning("cannot read consumer %s (%s); pulling without taking it over", durable, e)
            return
        if info.num_waiting:
            logger.warning("worker id %s seems taken by another live process (%d pull requests wait on consumer "
                           "%s): give each worker its own LORAFN_WORKER_ID", self.worker_id, info.num_waiting,
                           durable)
            return
        try:
            if info.num_ack_pending and info.delivered is not None and info.delivered.stream_seq:
                handed = await requeue_subject(self.js, self.worker_id, up_to=info.delivered.stream_seq)
                logger.warning("worker %s: %d invocations its previous process took were unfinished; handed back "
                               "for a new dispatch", self.worker_id, handed)
            await self.js.add_consumer(subjects.WORK_STREAM, config=self._consumer_config())  # create or update
        except (nats.errors.Error, nats.js.errors.Error) as e:
            logger.warning("taking over consumer %s failed (%s); its unfinished calls come back after the ack "
                           "wait", durable, e)

    async def _free_slots(self) -> int:
        """Wait for at least one free slot; how many are free (taken now: the loop fetches that many). 0 when
        the worker stops taking work meanwhile (the loop then ends without fetching)."""
        while True:
            if self._pull_stop.is_set():
                return 0
            try:
                await asyncio.wait_for(self._slots.acquire(), timeout=0.5)
                break
            except TimeoutError:
                continue
        n = 1
        while not self._slots.locked() and n < self.settings.consumer.max_inflight:
            await self._slots.acquire()
            n += 1
        return n

    async def _pull(self) -> None:
        assert self.js is not None
        loop = PullLoop(self.js, stream=subjects.WORK_STREAM, config=self._consumer_config(),
                        fetch_timeout_s=self.settings.consumer.fetch_timeout_s)
        taken = 0

        async def want() -> int:
            nonlocal taken
            taken = await self._free_slots()
            return taken

        async def handle(batch: list[Msg]) -> None:
            nonlocal taken
            for msg in batch:
                task = asyncio.create_task(self._handle(msg), name="invocation")
                self._handlers.add(task)
                task.add_done_callback(self._handler_done)
            for _ in range(taken - len(batch)):  # slots taken for messages that did not come
                self._slots.release()
            taken = 0

        try:
            await loop.run(self._pull_stop, handle, want)
        finally:
            for _ in range(taken):  # stopped between `want` and `handle`
                self._slots.release()

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        self._slots.release()

    async def _hand_back_queue(self) -> None:
        """Give what is still queued on this worker's subject back to the dispatcher (stopping)."""
        assert self.js is not None
        try:
            handed = await requeue_subject(self.js, self.worker_id)
        except (nats.errors.Error, nats.js.errors.Error) as e:
            logger.warning("could not hand back the queue (%s); the dispatcher rescues it", e)
            return
        if handed:
            logger.info("handed %d queued invocations back to the dispatcher", handed)

    # -- one invocation ----------------------------------------------------------------------------------

    async def _handle(self, msg: Msg) -> None:
        """Run one delivered invocation to its recorded result (or hand it back)."""
        try:
            inv = Invocation.decode(msg.data)
        except MessageInvalid as e:
            logger.error("dropping an undecodable invocation on %s: %s", msg.subject, e)
            await msg.term()
            return
        work = WorkHeaders.read(msg)
        attempt = msg.metadata.num_delivered or 1
        arrived_at = work.arrived_at if work.arrived_at is not None else inv.submitted_at
        running = _Running(inv, msg.metadata.sequence.stream)
        self._running[inv.id] = running
        ticker = asyncio.create_task(self._keep_alive(msg, running), name=f"in-progress-{inv.id}")
        try:
            existing = await self._recorded_result(inv.id, tenant=inv.tenant)
            if existing is not None:
                logger.info("invocation %s already has a result; sending it again", inv.id)
                if inv.callback_url is not None:
                    try:
                        await self._record(inv, existing)
                    except (nats.errors.Error, nats.js.errors.Error) as e:
                        raise Retry(f"cannot record the callback copy: {e}", self.settings.consumer.retry_delay_s) from e
                await self._reply(inv, existing, subjects.KIND_RESULT)
                await self._ack(msg, inv.id)
                return
            result = await self._execute(inv, attempt, work.epoch, arrived_at)
            if running.rescued or await self._was_rescued(running):
                raise Rescued()
        except Rescued:
            logger.warning("invocation %s was rescued to another worker while this one was silent; abandoned",
                           inv.id)
            self.metrics.observe_ending("rescued")
            return
        except Cancelled as e:
            logger.info("invocation %s cancelled after %d tokens: %s", inv.id, e.result.usage.completion_tokens, e)
            result = e.result
        except IdTaken as e:
            logger.warning("invocation %s of tenant %s refused: its id has a result of tenant %s", inv.id, inv.tenant,
                           e.recorder)
            failed = self._failed(inv, attempt, work.epoch, ErrorCode.bad_request, str(e))
            await self._reply(inv, failed.encode(), subjects.KIND_RESULT)  # not recorded: the id's record is not its
            await self._ack(msg, inv.id)
            return
        except HandBack:
            await self._hand_back(msg, inv, work)
            self.metrics.observe_ending("handed_back")
            return
        except Retry as e:
            if time.time() - arrived_at > self.settings.consumer.max_retry_s:
                result = self._failed(inv, attempt, work.epoch, e.code,
                                      f"{e} (retried for {self.settings.consumer.max_retry_s:.0f} s; giving up)")
            else:
                logger.info("invocation %s (attempt %d) retried later: %s", inv.id, attempt, e)
                await self._nak(msg, inv.id, e.delay_s)
                return
        except Exception as e:
            logger.exception("invocation %s failed with an internal error", inv.id)
            result = self._failed(inv, attempt, work.epoch, ErrorCode.internal, f"{type(e).__name__}: {e}")
        finally:
            ticker.cancel()
            self._running.pop(inv.id, None)
        payload = result.encode()
        try:
            if not await self._record(inv, payload):
                # A result was recorded first (a cancel that raced the end of the generation): it is the outcome.
                recorded = await self._recorded_or(inv.id, payload, tenant=inv.tenant)
                with contextlib.suppress(MessageInvalid):
                    result, payload = InvocationResult.decode(recorded), recorded
        except (nats.errors.Error, nats.js.errors.Error) as e:
            logger.warning("could not record the result of %s (%s); retrying it later", inv.id, e)
            await self._nak(msg, inv.id, self.settings.consumer.retry_delay_s)
            return
        self.metrics.observe_result(result)
        await self._reply(inv, payload, subjects.KIND_RESULT)
        await self._ack(msg, inv.id)

    async def _ack(self, msg: Msg, invocation_id: str) -> None:
        """Ack a finished invocation. If the ack is lost the message is redelivered and answered from the
        recorded result, so a failure here is logged, not raised."""
        try:
            await msg.ack()
        except nats.errors.Error as e:
            logger.warning("ack of %s failed (%s); its redelivery will find the recorded result", invocation_id, e)

    async def _nak(self, msg: Msg, invocation_id: str, delay_s: float | None) -> None:
        try:
            await msg.nak(delay=delay_s)
        except nats.errors.Error as e:
            logger.warning("nak of %s failed (%s); it is redelivered after the ack wait", invocation_id, e)

    async def _hand_back(self, msg: Msg, inv: Invocation, work: WorkHeaders) -> None:
        """Publish the invocation again for the dispatcher (next epoch), then ack this copy."""
        assert self.js is not None
        try:
            await requeue(self.js, msg.data, inv, work)
        except (nats.errors.Error, nats.js.errors.Error) as e:
            logger.warning("could not hand %s back (%s); the dispatcher rescues it", inv.id, e)
            return
        await self._ack(msg, inv.id)

    async def _was_rescued(self, running: _Running) -> bool:
        """Whether this invocation's work message left the stream without our ack (the dispatcher rescued
        it). Unknown (NATS unreachable) counts as not rescued: the result's de-duplication still holds."""
        assert self.js is not None
        try:
            await self.js.get_msg(subjects.WORK_STREAM, running.seq)
        except nats.js.errors.NotFoundError:
            running.rescued = True
        except (nats.errors.Error, nats.js.errors.Error):
            return False
        return running.rescued

    async def _keep_alive(self, msg: Msg, running: _Running) -> None:
        """In-progress acks while the invocation runs, so ack_wait does not redeliver it; abandon it when the
        dispatcher has rescued it meanwhile, stop it when a result was recorded meanwhile (a cancel whose
        message this worker missed)."""
        while True:
            await asyncio.sleep(self.settings.consumer.in_progress_every_s)
            if await self._was_rescued(running):
                await self._abort(running)
                return
            if running.cancelled is None and await self._answered(running.invocation.id, running.invocation.tenant):
                await self._stop_cancelled(running, "a result was recorded while it ran (a cancel)")
            try:
                await msg.in_progress()
            except nats.errors.Error as e:
                logger.debug("in-progress ack of %s failed: %s", running.invocation.id, e)

    async def _answered(self, invocation_id: str, tenant: str) -> bool:
        """Whether the results stream holds a result of the invocation (unknown, or another tenant's record of
        the same id, counts as no)."""
        try:
            return await self._recorded_result(invocation_id, tenant=tenant) is not None
        except (Retry, IdTaken):
            return False

    async def _recorded_or(self, invocation_id: str, payload: bytes, *, tenant: str | None = None) -> bytes:
        """The recorded result of an invocation, or `payload` if it cannot be read now (or is another tenant's)."""
        try:
            return await self._recorded_result(invocation_id, tenant=tenant) or payload
        except (Retry, IdTaken):
            return payload

    async def _recorded_result(self, invocation_id: str, *, tenant: str | None = None) -> bytes | None:
        """The recorded result of an invocation (None: none yet). IdTaken when `tenant` is given and the record
        was made for another tenant's call of the same id (ids are the callers' choice on the bus)."""
        assert self.js is not None
        try:
            raw = await self.js.get_last_msg(subjects.RESULTS_STREAM, subjects.result(invocation_id))
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.Error, nats.js.errors.Error) as e:
            raise Retry(f"cannot read the results stream: {e}", self.settings.consumer.retry_delay_s) from e
        recorder = (raw.headers or {}).get(subjects.TENANT_HEADER)
        if tenant is not None and recorder is not None and recorder != tenant:
            raise IdTaken(invocation_id, recorder)
        return raw.data

    async def _record(self, inv: Invocation, payload: bytes) -> bool:
        """Publish the encoded result (and its callback copy) to the results stream and wait for the acks,
        retrying through reconnects. Idempotent: a redelivered invocation whose result exists calls it again
        in case the callback copy was not published before a crash. False: a result was recorded before."""
        assert self.js is not None
        deadline = time.monotonic() + self.settings.consumer.ack_wait_s
        while True:
            try:
                return await record_result(self.js, inv.id, payload, callback=inv.callback_url is not None,
                                           headers={subjects.TENANT_HEADER: inv.tenant})
            except (nats.errors.Error, nats.js.errors.Error) as e:
                if time.monotonic() > deadline:
                    raise
                logger.debug("recording the result of %s failed (%s); retrying", inv.id, e)
                await asyncio.sleep(0.5)

    async def _reply(self, inv: Invocation, payload: bytes, kind: str) -> None:
        if inv.reply_to is None or self.nc is None:
            return
        try:
            await self.nc.publish(inv.reply_to, payload, headers={KIND_HEADER: kind})
        except nats.errors.Error as e:  # the caller misses this message; the results stream has the result
            logger.debug("reply to %s failed: %s", inv.id, e)

    def _failed(self, inv: Invocation, attempt: int, epoch: int, code: ErrorCode, message: str,
                tier: Tier | None = None) -> InvocationResult:
        return InvocationResult(
            invocation_id=inv.id, status="failed", worker_id=self.worker_id, attempt=attempt, epoch=epoch,
            adapter_tier=tier,
            error=InvocationError(code=code, message=message),
            timings=Timings(total_ms=(time.time() - inv.submitted_at) * 1e3),
        )

    def _cancelled(self, inv: Invocation, attempt: int, epoch: int, reason: str, tier: Tier | None,
                   load_ms: float | None, completion: Completion | None = None) -> InvocationResult:
        """The cancelled result of an invocation, with what it generated before it stopped."""
        return InvocationResult(
            invocation_id=inv.id, status="cancelled", worker_id=self.worker_id, attempt=attempt, epoch=epoch,
            adapter_tier=tier, finish_reason="abort",
            text=completion.text if completion else "", token_ids=completion.token_ids if completion else [],
            usage=Usage(prompt_tokens=completion.prompt_tokens if completion else 0,
                        completion_tokens=len(completion.token_ids) if completion else 0),
            timings=Timings(load_ms=load_ms, total_ms=(time.time() - inv.submitted_at) * 1e3),
            error=InvocationError(code=ErrorCode.cancelled, message=reason),
        )

    # -- cancellation ------------------------------------------------------------------------------------

    async def _on_cancel(self, msg: Msg) -> None:
        """lora.cancel.<id>: stop the invocation if it is on this worker (every worker hears every cancel)."""
        running = self._running.get(msg.subject.rpartition(".")[2])
        if running is None or running.cancelled is not None:
            return
        try:
            reason = CancelInvocation.decode(msg.data).reason
        except MessageInvalid:
            reason = "cancelled"
        self._spawn(self._stop_cancelled(running, reason), f"cancel-{running.invocation.id}")

    async def _stop_cancelled(self, running: _Running, reason: str) -> None:
        """Mark the invocation cancelled and abort its generation (`_generate` checks the mark before it
        submits, so a cancel during the adapter's load never reaches the engine)."""
        if running.cancelled is not None:
            return
        running.cancelled = reason
        logger.info("invocation %s cancelled: %s", running.invocation.id, reason)
        await self._abort(running)

    @staticmethod
    def _version_of(inv: Invocation) -> str | None:
        """The adapter version an invocation needs (None: the bare backbone). The dispatcher fills in the
        current version of an invocation that names none."""
        if inv.adapter is None or inv.adapter == BASE_ADAPTER:
            return None
        if inv.version is None:
            raise InvocationFailed(ErrorCode.not_found,
                                   f"adapter {inv.tenant}/{inv.adapter}: the invocation names no version")
        return inv.version

    async def _bring_to_device(self, sha: str, arrived_at: float) -> tuple[Tier, float]:
        """Load `sha` if needed and pin it; (tier on arrival, load ms).

        The load may have been started by a concurrent call of the same adapter, or finished just before this
        call was handed to the worker: what the call reports is where the adapter was when the call arrived in
        lorafn and the part of the load that happened after then (`AdapterTiers.arrival`), whichever call ran
        the load (one that arrived while the blob was being fetched paid the cold start too)."""
        for _ in range(3):
            try:
                await self.tiers.load(sha)
            except AdapterUnavailable as e:
                if e.terminal:
                    raise InvocationFailed(e.code, str(e)) from e
                raise Retry(str(e), self.settings.consumer.retry_delay_s, e.code) from e
            if self.tiers.acquire(sha):  # no await since load returned: nothing evicted it meanwhile
                return self.tiers.arrival(sha, arrived_at)
        raise Retry(f"adapter {sha} was evicted while loading", self.settings.consumer.retry_delay_s,
                    ErrorCode.overloaded)

    def _prompt_ids(self, inv: Invocation) -> list[int]:
        if self.tokenizer is None:
            raise InvocationFailed(ErrorCode.internal, "this worker's engine has no tokenizer")
        try:
            if inv.messages:
                return self.tokenizer.encode_chat([m.model_dump() for m in inv.messages])
            if inv.prompt is not None:
                return self.tokenizer.encode(inv.prompt)
        except TokenizerError as e:
            raise InvocationFailed(ErrorCode.bad_request, str(e)) from e
        raise InvocationFailed(ErrorCode.bad_request, "an invocation needs a prompt or messages")

    @staticmethod
    def _params(inv: Invocation) -> SamplingParams:
        s = inv.sampling
        seed = s.seed if s.seed is not None else invocation_seed(inv.id)
        try:
            return SamplingParams(
                temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=seed, max_tokens=s.max_tokens,
                stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids),
            )
        except SamplingParamsInvalid as e:
            raise InvocationFailed(ErrorCode.bad_request, str(e)) from e

    async def _execute(self, inv: Invocation, attempt: int, epoch: int, arrived_at: float) -> InvocationResult:
        """Generate one invocation; its result (succeeded, or failed for a terminal reason)."""
        tier: Tier | None = None
        sha: str | None = None
        try:
            # A prompt the engine would refuse fails here, before its adapter is loaded and before the caller
            # is told the call started: a streaming caller gets the error as its HTTP status, not in a 200.
            prompt_ids, params = self._prompt_ids(inv), self._params(inv)
            try:
                self.engine.check_prompt(prompt_ids)
            except EngineError as e:
                raise _refused(e) from e
            sha = self._version_of(inv)
            load_ms: float | None = None
            if sha is not None:
                tier, load_ms = await self._bring_to_device(sha, arrived_at)
            try:
                return await self._generate(inv, attempt, epoch, sha, tier, load_ms, prompt_ids, params)
            finally:
                if sha is not None:
                    self.tiers.release(sha)
        except InvocationFailed as e:
            logger.info("invocation %s failed (%s): %s", inv.id, e.code, e)
            return self._failed(inv, attempt, epoch, e.code, str(e), tier)

    async def _generate(
        self, inv: Invocation, attempt: int, epoch: int, sha: str | None, tier: Tier | None, load_ms: float | None,
        prompt_ids: list[int], params: SamplingParams,
    ) -> InvocationResult:
        assert self.nc is not None
        running = self._running[inv.id]
        if running.cancelled is not None:
            raise Cancelled(self._cancelled(inv, attempt, epoch, running.cancelled, tier, load_ms))
        started = time.time()
        event = InvocationStarted(
            invocation_id=inv.id, worker_id=self.worker_id, attempt=attempt, started_at=started,
            adapter_tier=tier, load_ms=load_ms, epoch=epoch,
        ).encode()
        await self.nc.publish(subjects.invocation_event("started"), event)  # the scheduler's record
        # The caller gets it on its reply subject, where it arrives before the first chunk: the gateway sends
        # the adapter's tier in the response headers, which leave with the first event.
        await self._reply(inv, event, subjects.KIND_STARTED)
        request_id = f"{inv.id}#{epoch}.{attempt}"
        self._pending_submit += 1
        try:
            try:
                generation = await self.engine.submit(prompt_ids, adapter=sha, params=params, request_id=request_id)
            except EngineError as e:
                raise _refused(e) from e
            finally:
                self._pending_submit -= 1
            running.request_id = request_id
            if running.aborted:
                await self.engine.abort(request_id)
            completion, first_token_at = await self._stream(inv, epoch, running, generation.items)
        finally:
            running.request_id = None
        if completion.finish_reason == FinishReason.ABORT:
            if running.rescued:
                raise Rescued()
            if running.cancelled is not None:
                raise Cancelled(self._cancelled(inv, attempt, epoch, running.cancelled, tier, load_ms, completion))
            raise HandBack()
        ended = time.time()
        return InvocationResult(
            invocation_id=inv.id,
            status="succeeded",
            text=completion.text,
            token_ids=completion.token_ids,
            finish_reason=completion.finish_reason.value,  # type: ignore[arg-type]
            usage=Usage(prompt_tokens=completion.prompt_tokens, completion_tokens=len(completion.token_ids)),
            timings=Timings(
                queued_ms=(started - inv.submitted_at) * 1e3,
                load_ms=load_ms,
                first_token_ms=(first_token_at - inv.submitted_at) * 1e3 if first_token_at else None,
                total_ms=(ended - inv.submitted_at) * 1e3,
            ),
            worker_id=self.worker_id,
            adapter_tier=tier,
            attempt=attempt,
            epoch=epoch,
        )

    async def _stream(
        self, inv: Invocation, epoch: int, running: _Running,
        items: asyncio.Queue[list[TokenEvent] | Completion | BaseException],
    ) -> tuple[Completion, float | None]:
        """Forward each step's tokens as one chunk until the completion arrives."""
        index = 0
        first_token_at: float | None = None
        while True:
            item = await items.get()
            if isinstance(item, Completion):
                return item, first_token_at
            if isinstance(item, StepFailed):
                raise InvocationFailed(ErrorCode.internal, str(item))
            if isinstance(item, BaseException):
                raise item
            token_ids = [e.token_id for e in item if e.token_id is not None]
            if not token_ids:
                continue
            if first_token_at is None:
                first_token_at = time.time()
            if inv.stream and not running.rescued and running.cancelled is None:
                chunk = TokenChunk(invocation_id=inv.id, index=index, token_ids=token_ids,
                                   text="".join(e.text for e in item), epoch=epoch)
                await self._reply(inv, chunk.encode(), subjects.KIND_CHUNK)
            index += len(token_ids)

    # -- control -----------------------------------------------------------------------------------------

    async def _on_control(self, msg: Msg) -> None:
        self._spawn(self._control(msg), f"control-{msg.subject}")

    async def _control(self, msg: Msg) -> None:
        try:
            request = ControlRequest.decode(msg.data)
            reply = await asyncio.wait_for(self.control(request), timeout=self.settings.control_timeout_s)
        except MessageInvalid as e:
            reply = ControlReply(ok=False, error=InvocationError(code=ErrorCode.bad_request, message=str(e)))
        except TimeoutError:
            reply = ControlReply(ok=False, error=InvocationError(
                code=ErrorCode.timeout, message=f"not done in {self.settings.control_timeout_s} s"))
        if msg.reply:
            try:
                await msg.respond(reply.encode())
            except nats.errors.Error as e:
                logger.debug("control reply on %s failed: %s", msg.subject, e)

    async def control(self, request: ControlRequest) -> ControlReply:
        """Run one control verb (each is idempotent). The scheduler stages adapters with them; invocations
        never depend on them (a worker loads what a dispatched invocation needs)."""
        verb = request.verb
        if verb == ControlVerb.drain:
            # Take nothing more, and give back what waits on this worker's subject (the dispatcher would not
            # rescue it: this worker still heartbeats); what runs finishes here.
            self.draining = True
            await self._publish_heartbeat()
            await self._stop_pulling()
            await self._hand_back_queue()
            return ControlReply(ok=True)
        sha = request.version
        if sha is None:
            return ControlReply(ok=False, error=InvocationError(
                code=ErrorCode.bad_request, message=f"{verb.value} needs the adapter version"))
        try:
            if verb == ControlVerb.fetch:
                ms = await self.tiers.fetch(sha)
                return ControlReply(ok=True, tier=self.tiers.tier(sha), load_ms=ms)
            if verb == ControlVerb.load:
                if self.draining:
                    return ControlReply(ok=False, tier=self.tiers.tier(sha), error=InvocationError(
                        code=ErrorCode.unavailable, message=f"worker {self.worker_id} is draining"))
                ms = await self.tiers.load(sha)
                return ControlReply(ok=True, tier=self.tiers.tier(sha), load_ms=ms)
            tier = await self.tiers.evict(sha, tier=request.tier or Tier.device)
            return ControlReply(ok=True, tier=tier)
        except AdapterUnavailable as e:
            return ControlReply(ok=False, tier=self.tiers.tier(sha),
                                error=InvocationError(code=e.code, message=str(e)))

    # -- heartbeats --------------------------------------------------------------------------------------

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._publish_heartbeat()
            except nats.errors.Error as e:
                logger.debug("heartbeat failed: %s", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.settings.heartbeat_s)

    async def _on_reconnect(self) -> None:
        self._residency.reset()  # readers may have missed heartbeats: the next one is full

    def heartbeat(self, *, gone: bool = False) -> Heartbeat:
        """This worker's state now, with its whole residency (`_publish_heartbeat` sends what changed)."""
        waiting, running = self.engine.counts()
        kv_free, kv_blocks = self.engine.kv_blocks()
        resident = [
            ResidentAdapter(version=r.version, tier=r.tier, rank=r.rank, pages=r.pages, bytes=r.bytes,
                            in_use=r.in_use, last_used=r.last_used)
            for r in self.tiers.resident()
        ]
        return Heartbeat(
            worker_id=self.worker_id,
            host=self.host,
            device=self.device,
            started_at=self.started_at,
            draining=self.draining,
            gone=gone,
            capacity={
                "pool_pages": self.tiers.total_pages,
                "page_bytes": self.tiers.page_bytes,
                "max_rank": self.tiers.max_rank,
                "max_inflight": self.settings.consumer.max_inflight,
                "kv_blocks": kv_blocks,
                "kv_free_blocks": kv_free,
                **self.tiers.cache.usage(),
                "transitions": {k: v.as_dict() for k, v in self.tiers.stats.items()},
            },
            resident=resident,
            free_pages=self.tiers.free_pages,
            queue_depth=waiting + self._pending_submit,
            running=running,
            tokens_per_s=round(self.engine.tokens_per_s, 2),
        )

    async def _publish_heartbeat(self, *, gone: bool = False) -> None:
        if self.nc is None or self.nc.is_closed:
            return
        heartbeat = self.heartbeat(gone=gone)
        self.metrics.observe_heartbeat(heartbeat)
        self.metrics.observe_batcher(self.engine.batcher_stats())
        try:
            for stamped in self._residency.stamp(heartbeat):
                await self.nc.publish(subjects.worker_event(self.worker_id), stamped.encode(),
                                      headers=residency_headers(stamped))
        except BaseException:
            self._residency.reset()  # the next one must not be a delta on a heartbeat nobody got
            raise
        if gone:
            await self.nc.flush(timeout=2)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@contextlib.asynccontextmanager
async def open_worker(settings: WorkerSettings, *, worker_id: str | None = None) -> AsyncIterator[WorkerService]:
    """Load the backbone (once), start the engine thread, open the host cache and the object store, and
    yield the service; everything is released on exit. `workers.__main__` and the tests use this."""
    async with AsyncExitStack() as stack:
        backbone = await asyncio.to_thread(
            load_backbone, settings.backbone.path, dtype=_DTYPES[settings.backbone.dtype],
            device=settings.backbone.device,
        )
        tokenizer = await asyncio.to_thread(Tokenizer.load, settings.backbone.path)
        engine = Engine(backbone, settings.engine, tokenizer=tokenizer)
        thread = EngineThread(engine, asyncio.get_running_loop())
        thread.start()
        stack.push_async_callback(thread.stop)
        directory = settings.host_cache.directory
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lorafn-host-cache-")))
        cache = HostCache(directory, disk_bytes=settings.host_cache.disk_bytes, ram_bytes=settings.host_cache.ram_bytes,
                          eviction=host_eviction(settings.host_cache.eviction))
        metrics = WorkerMetrics()
        tiers = AdapterTiers(engine=thread, store=ObjectStore(settings.object_store), cache=cache,
                             on_load=metrics.observe_load)
        yield WorkerService(
            settings, worker_id=worker_id or settings.worker_id or default_worker_id(), engine=thread,
            tiers=tiers, device=str(backbone.device), metrics=metrics,
        )

